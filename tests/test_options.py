"""distkl.options: validation, context-manager restore, global setting, thread isolation."""

from __future__ import annotations

import threading

import pytest
import torch

import distkl
from distkl import Options, get_options, options


def test_defaults():
    opts = get_options()
    assert opts == Options()
    assert opts.method == "auto"
    assert opts.num_samples is None  # a per-call budget: distkl._options.samples_per_pair
    assert opts.generator is None


def test_context_manager_restores():
    with options(method="mc", num_samples=100) as opts:
        assert opts.method == "mc"
        assert get_options().num_samples == 100
        with options(num_samples=7):
            assert get_options() == Options(method="mc", num_samples=7)
        assert get_options().num_samples == 100
    assert get_options() == Options()


def test_restores_after_exception():
    with pytest.raises(RuntimeError):
        with options(method="quadrature"):
            raise RuntimeError("boom")
    assert get_options().method == "auto"


def test_plain_call_sets_from_here_on():
    distkl.options(method="mc")  # the autouse fixture restores the defaults afterwards
    assert get_options().method == "mc"


def test_generator_is_kept():
    g = torch.Generator().manual_seed(3)
    with options(generator=g):
        assert get_options().generator is g


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"method": "magic"}, ValueError, "method must be one of"),
        ({"num_samples": 0}, ValueError, "num_samples must be a positive int, got 0"),
        ({"num_samples": 2.5}, ValueError, "num_samples must be a positive int"),
        ({"num_samples": True}, ValueError, "num_samples must be a positive int"),
        ({"chunk_size": -1}, ValueError, "chunk_size must be a positive int"),
        ({"quadrature_nodes": 0}, ValueError, "quadrature_nodes"),
        ({"generator": 3}, TypeError, "generator must be a torch.Generator"),
        ({"num_sample": 10}, TypeError, r"Unknown distkl option\(s\) \['num_sample'\]"),
    ],
)
def test_invalid_options_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        options(**kwargs)
    assert get_options() == Options()


def test_threads_do_not_see_each_others_blocks():
    barrier = threading.Barrier(2)
    seen: dict[str, str] = {}

    def worker(name: str, method: str) -> None:
        with options(method=method):
            barrier.wait()  # both threads are inside their blocks now
            seen[name] = get_options().method
            barrier.wait()

    threads = [
        threading.Thread(target=worker, args=("a", "mc")),
        threading.Thread(target=worker, args=("b", "quadrature")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": "mc", "b": "quadrature"}
    assert get_options() == Options()
