"""The ``distkl`` command: list, verify, derive (via ``main(argv)``, and once via subprocess)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from torch.distributions import Normal
from torch.distributions import kl as torch_kl

import distkl.jsd  # noqa: F401  (JSD rules; `import distkl` may not import them yet)
import distkl.rules.categorical  # noqa: F401
import distkl.rules.mixture  # noqa: F401
import distkl.rules.normal  # noqa: F401
from distkl import registry, verify
from distkl.cli import main
from distkl.examples import Example

ROW = "MixtureSameFamily(Normal)-Normal"  # a KL estimate rule and a JSD rule, 1-D: fast


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_python_dash_m_and_console_script():
    done = subprocess.run(
        [sys.executable, "-m", "distkl", "list", "--json"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "rules" in json.loads(done.stdout)
    assert shutil.which("distkl") is not None


def test_no_command_prints_help(capsys):
    status, out, _ = run(capsys)
    assert status == 2 and "verify" in out and "derive" in out


def test_list_shows_every_registered_rule(capsys):
    status, out, _ = run(capsys, "list", "--json")
    assert status == 0
    data = json.loads(out)
    listed = {(r["divergence"], r["pair"], r["kind"], r["module"]) for r in data["rules"]}
    expected = {("KL", r.name, r.kind, r.module) for r in registry.kl_rules()}
    expected |= {("JSD", r.name, r.kind, r.module) for r in registry.jsd_rules()}
    assert listed == expected
    assert data["method"].startswith("auto")
    assert all((r["method"] is None) == (r["kind"] == "exact") for r in data["rules"])
    status, text, _ = run(capsys, "list")
    assert status == 0
    assert "distkl.rules.mixture" in text and "estimate (auto)" in text
    assert "distkl.rules.categorical" in text and "exact" in text


def test_verify_json_on_one_row(capsys):
    status, out, err = run(capsys, "verify", "--quick", "--device", "cpu", "--only", ROW, "--json")
    assert status == 0, out
    data = json.loads(out)
    assert data["passed"] is True
    assert {(r["divergence"], r["dtype"]) for r in data["rows"]} == {
        ("KL", "float32"),
        ("KL", "float64"),
        ("JSD", "float32"),
        ("JSD", "float64"),
    }
    assert "[1/4]" in err  # progress on stderr


def test_verify_table(capsys):
    status, out, _ = run(
        capsys,
        "verify",
        "--quick",
        "--device",
        "cpu",
        "--dtype",
        "float64",
        "--only",
        ROW,
        "--no-progress",
    )
    assert status == 0
    assert "analytic" in out and "MC +- stderr" in out and "ok" in out
    assert "4 checks" not in out and "2 checks: 2 passed, 0 failed" in out


class _P(Normal):
    pass


class _Q(Normal):
    pass


def test_verify_exits_1_on_a_planted_wrong_rule(capsys, monkeypatch):
    def wrong(p, q):
        return 1.1 * torch_kl._kl_normal_normal(p, q)

    def make(device, dtype):
        loc = torch.tensor([0.0, 1.0, -1.0], device=device, dtype=dtype)
        return _P(loc, 1.0), _Q(-loc, 1.5)

    monkeypatch.setattr(verify, "EXAMPLES", [Example("_P-_Q", make, "normal")])
    with registry.registered_kl(_P, _Q, wrong):
        status, out, _ = run(capsys, "verify", "--device", "cpu", "--no-progress")
        assert status == 1
        assert "FAIL" in out and "_P-_Q" in out
        status, out, _ = run(capsys, "verify", "--device", "cpu", "--no-progress", "--json")
        assert status == 1 and json.loads(out)["passed"] is False


def test_verify_strict_fails_on_gaps(capsys, monkeypatch):
    def make(device, dtype):
        return Normal(torch.zeros(2, device=device, dtype=dtype), 1.0), Normal(1.0, 2.0)

    # a table that exercises none of distkl's rules: every registered rule is a gap
    monkeypatch.setattr(verify, "EXAMPLES", [Example("Normal-Normal", make, "normal")])
    status, out, _ = run(capsys, "verify", "--device", "cpu", "--quick", "--no-progress")
    assert status == 0 and "warning: KL rule" in out
    status, out, _ = run(
        capsys, "verify", "--device", "cpu", "--quick", "--no-progress", "--strict"
    )
    assert status == 1 and "error: KL rule" in out


def test_verify_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    path = tmp_path / "verify.png"
    status, out, _ = run(
        capsys,
        "verify",
        "--quick",
        "--device",
        "cpu",
        "--dtype",
        "float64",
        "--only",
        ROW,
        "--no-progress",
        "--plot",
        str(path),
    )
    assert status == 0, out
    assert path.stat().st_size > 10_000


def test_verify_plot_without_matplotlib_is_a_clear_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    status, _, err = run(capsys, "verify", "--quick", "--plot", str(tmp_path / "x.png"))
    assert status == 2
    assert "pip install 'distkl[plot]'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_verify_cuda_without_cuda_is_a_clear_error(capsys):
    status, _, err = run(capsys, "verify", "--device", "cuda")
    assert status == 2 and "CUDA is not available" in err


def test_derive_prints_pretty_and_latex(capsys):
    status, out, _ = run(capsys, "derive", "Normal", "Laplace")
    assert status == 0
    assert "KL(p || q) in nats, p = Normal(loc_p, scale_p), q = Laplace(loc_q, scale_q)" in out
    assert "LaTeX:" in out and "\\operatorname{erf}" in out
    status, out, _ = run(capsys, "derive", "laplace", "laplace", "--latex")
    assert status == 0 and out.strip().startswith("\\frac") and "\\left|" in out


def test_derive_errors(capsys):
    status, _, err = run(capsys, "derive", "Normal", "Foo")
    assert status == 2 and "no built-in family 'Foo'" in err and "supported:" in err
    status, _, err = run(capsys, "derive", "Normal")
    assert status == 2 and "give two families" in err
    status, _, err = run(capsys, "derive", "Gamma", "Laplace", "--timeout", "1")
    assert status == 1 and "error:" in err
    status, out, _ = run(capsys, "derive", "--list")
    assert status == 0 and "Normal-Laplace" in out
