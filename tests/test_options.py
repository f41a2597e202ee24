"""distkl.options: validation, context-manager restore, global setting, thread isolation."""

from __future__ import annotations

import inspect
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
        ({"num_sample": 10}, TypeError, "unexpected keyword argument 'num_sample'"),
        ({"num_samples": 10**40}, ValueError, "num_samples must be at most"),
        ({"quadrature_nodes": 10**40}, ValueError, "quadrature_nodes must be at most"),
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


def test_huge_num_samples_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"num_samples must be at most \d+, got 1000000000"):
        options(num_samples=10**40)
    assert get_options() == Options()


def test_reused_context_object_applies_on_every_enter():
    ctx = options(method="mc", num_samples=11)  # the call applies it ...
    with ctx:
        assert get_options().method == "mc"
    assert get_options() == Options()
    with ctx as opts:  # ... and so does every later ``with``
        assert opts.method == "mc" and get_options().num_samples == 11
    assert get_options() == Options()
    with ctx:
        with ctx:  # re-entrant
            assert get_options().method == "mc"
        assert get_options().method == "mc"
    assert get_options() == Options()


def test_first_block_restores_what_was_before_the_call():
    ctx = options(method="mc")
    options(num_samples=5)  # a plain call between the construction and the ``with``
    with ctx:
        assert get_options() == Options(method="mc", num_samples=5)
    assert get_options() == Options()  # the block began at the call, as before 0.2
    options(num_samples=6)
    with ctx:  # later blocks begin at their ``with``
        assert get_options() == Options(method="mc", num_samples=6)
    assert get_options() == Options(num_samples=6)


def test_out_of_order_exit_restores_the_defaults():
    a, b = options(method="mc"), options(num_samples=9)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)  # out of order: b stays in force, a is undone
    assert get_options() == Options(num_samples=9)
    b.__exit__(None, None, None)
    assert get_options() == Options()


def test_out_of_order_exit_of_three_blocks():
    a, b, c = options(method="mc"), options(num_samples=9), options(quadrature_nodes=7)
    for ctx in (a, b, c):
        ctx.__enter__()
    b.__exit__(None, None, None)
    assert get_options() == Options(method="mc", quadrature_nodes=7)
    a.__exit__(None, None, None)
    assert get_options() == Options(quadrature_nodes=7)
    c.__exit__(None, None, None)
    assert get_options() == Options()


def test_exit_without_enter_is_an_error():
    with pytest.raises(RuntimeError, match="without a matching __enter__"):
        options(method="mc").__exit__(None, None, None)


def test_options_signature_is_typed_and_keyword_only():
    params = inspect.signature(options).parameters
    assert list(params) == ["method", "num_samples", "generator", "chunk_size", "quadrature_nodes"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    with pytest.raises(TypeError):
        options("mc")  # type: ignore[misc]


def test_explicit_none_resets_generator_and_chunk_size():
    g = torch.Generator()
    options(generator=g, chunk_size=64)
    with options(generator=None, chunk_size=None):
        assert get_options().generator is None and get_options().chunk_size is None
    assert get_options().generator is g and get_options().chunk_size == 64
