"""The ``distkl`` command: list, verify, derive (via ``main(argv)``, and once via subprocess)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal
from torch.distributions import kl as torch_kl

import distkl
import distkl.examples
import distkl.rules.categorical  # noqa: F401
import distkl.rules.mixture  # noqa: F401
import distkl.rules.normal  # noqa: F401
from distkl import registry
from distkl.cli import TABLE_BEGIN, TABLE_END, main, rules_markdown
from distkl.examples import Example
from distkl.verify import plot

ROW = "MixtureSameFamily(Normal)-Normal"  # a KL estimate rule and a JSD rule, 1-D: fast


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_python_dash_m_and_console_script():
    """`python -m distkl` runs main; a bad argument exits 2 with usage and no traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "distkl", "verify", "--num-samples", "0"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("usage: distkl verify")
    assert "--num-samples: expected an int >= 2, got 0" in done.stderr
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
    assert "rules.mixture" in text and "estimate" in text and "method in force (auto" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "rules.categorical" in text and "exact" in text


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
    assert "rule" in out and "MC +- s.e." in out and "ok" in out and "columns:" in out
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

    monkeypatch.setattr(distkl.examples, "EXAMPLES", [Example("_P-_Q", make, "normal")])
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
    monkeypatch.setattr(distkl.examples, "EXAMPLES", [Example("Normal-Normal", make, "normal")])
    status, out, _ = run(capsys, "verify", "--device", "cpu", "--quick", "--no-progress")
    assert status == 0 and "warning: KL rule" in out
    status, out, _ = run(
        capsys, "verify", "--device", "cpu", "--quick", "--no-progress", "--strict"
    )
    assert status == 1 and "error: KL rule" in out


def test_verify_plot(capsys, tmp_path, monkeypatch):
    """One panel per pair (both rows of the table here), each with every dtype checked."""
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    panels: list[list[tuple[str, str]]] = []
    draw = plot._panel

    def recording(ax, rows, zstar):
        panels.append([(r.pair, r.dtype) for r in rows])
        draw(ax, rows, zstar)

    monkeypatch.setattr(plot, "_panel", recording)
    path = tmp_path / "verify.png"
    argv = [
        "verify",
        "--quick",
        "--device",
        "cpu",
        "--kind",
        "kl",
        "--only",
        "MixtureSameFamily(Normal)-",
        "--plot",
    ]
    status, out, _ = run(capsys, *argv, str(path), "--no-progress", "--num-samples", "512")
    assert status == 0, out
    rows = {ex.id for ex in distkl.examples.EXAMPLES if "MixtureSameFamily(Normal)-" in ex.id}
    assert {p[0][0] for p in panels} == rows and len(panels) == len(rows)
    assert all(sorted(d for _, d in p) == ["float32", "float64"] for p in panels)
    assert path.stat().st_size > 10_000


def test_verify_plot_without_matplotlib_is_a_clear_error(capsys, monkeypatch, tmp_path):
    def no_matplotlib():
        raise ImportError("distkl verify --plot needs matplotlib; pip install 'distkl[plot]'")

    monkeypatch.setattr(plot, "figure_class", no_matplotlib)
    status, _, err = run(capsys, "verify", "--quick", "--plot", str(tmp_path / "x.png"))
    assert status == 2 and "usage:" in err
    assert "pip install 'distkl[plot]'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_verify_cuda_without_cuda_is_a_clear_error(capsys):
    status, _, err = run(capsys, "verify", "--device", "cuda")
    assert status == 2 and "CUDA is not available" in err


def test_derive_prints_pretty_and_latex(capsys):
    status, out, _ = run(capsys, "derive", "Normal", "Laplace")
    assert status == 0
    assert "KL(p || q) in nats, p = Normal(loc_p, scale_p), q = Laplace(loc_q, scale_q)" in out
    assert "erf" in out and max(len(line) for line in out.splitlines()) <= 100
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


BAD_ARGUMENTS = {
    "num-samples 0": ["verify", "--num-samples", "0"],
    "num-samples 1": ["verify", "--num-samples", "1"],
    "num-samples text": ["verify", "--num-samples", "many"],
    "alpha 2": ["verify", "--alpha", "2"],
    "alpha 0": ["verify", "--alpha", "0"],
    "alpha nan": ["verify", "--alpha", "nan"],
    "threads 0": ["verify", "--threads", "0"],
    "seed -1": ["verify", "--seed", "-1"],
    "kind kld": ["verify", "--kind", "kld"],
    "plot folder missing": ["verify", "--plot", "/no/such/folder/verify.png"],
    "plot is a folder": ["verify", "--plot", "."],
    "timeout nan": ["derive", "Normal", "Laplace", "--timeout", "nan"],
    "timeout -1": ["derive", "Normal", "Laplace", "--timeout", "-1"],
    "timeout 0": ["derive", "Normal", "Laplace", "--timeout", "0"],
    "timeout inf": ["derive", "Normal", "Laplace", "--timeout", "inf"],
    "latex and torch": ["derive", "Normal", "Laplace", "--latex", "--torch"],
}


@pytest.mark.parametrize("argv", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_are_usage_errors(capsys, argv):
    """Exit 2 with argparse's usage line and message, before any work, and no traceback."""
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert err.startswith("usage: distkl ") and "error: argument" in err, err
    assert "Traceback" not in out + err and "checks" not in out


def test_only_without_a_match_lists_the_ids(capsys):
    status, _, err = run(capsys, "verify", "--only", "NoSuchPair")
    assert status == 2 and "usage:" in err and "no example id contains 'NoSuchPair'" in err
    assert all(ex.id in err for ex in distkl.examples.EXAMPLES)


def test_version(capsys):
    status, out, _ = run(capsys, "--version")
    assert status == 0 and out.strip() == f"distkl {distkl.__version__}"


def test_verify_kind_filter(capsys):
    argv = ["verify", "--quick", "--device", "cpu", "--dtype", "float64", "--only", ROW]
    status, out, _ = run(capsys, *argv, "--kind", "jsd", "--json")
    assert status == 0 and {r["divergence"] for r in json.loads(out)["rows"]} == {"JSD"}
    status, out, _ = run(capsys, *argv, "--kind", "kl", "--json", "--no-progress")
    assert status == 0 and {r["divergence"] for r in json.loads(out)["rows"]} == {"KL"}


def test_list_labels_the_per_call_kind(capsys):
    status, out, _ = run(capsys, "list", "--json")
    rule = next(
        r
        for r in json.loads(out)["rules"]
        if r["pair"] == "MixtureSameFamily-MixtureSameFamily" and r["divergence"] == "KL"
    )
    assert rule["kind_summary"] == "exact for categorical components, estimate otherwise"
    status, out, _ = run(capsys, "list")
    assert "exact for categorical components, estimate otherwise" in out


def test_derive_torch_prints_a_function_torch_can_register(capsys):
    status, out, _ = run(capsys, "derive", "Laplace", "Laplace", "--torch")
    assert status == 0 and "@register_kl(Laplace, Laplace)" in out
    p = torch.distributions.Laplace(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.5]))
    q = torch.distributions.Laplace(torch.tensor([0.5, -1.0]), torch.tensor([2.0, 1.5]))
    expected = torch_kl.kl_divergence(p, q)  # torch's own rule
    with registry.preserved_registries():
        namespace: dict = {}
        exec(out, namespace)  # registers over torch's rule inside the block only
        assert torch_kl.kl_divergence(p, q) is not None
        torch.testing.assert_close(namespace["_kl_laplace_laplace"](p, q), expected)
    assert torch_kl._dispatch_kl(type(p), type(q)) is torch_kl._kl_laplace_laplace


PAIRS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "pairs.md"


def test_pairs_page_is_the_live_registry():
    """docs/pairs.md holds the table as markdown (it reads on a forge), and it is current."""
    text = PAIRS_PAGE.read_text(encoding="utf-8")
    block = text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].strip()
    assert block == rules_markdown(), (
        "docs/pairs.md is stale: run python -m distkl list --update docs/pairs.md"
    )
    assert "| KL | `MixtureSameFamily` | `MixtureSameFamily` | exact for categorical" in block


def test_list_update_rewrites_a_stale_table(capsys, tmp_path):
    page = tmp_path / "pairs.md"
    page.write_text(f"# Pairs\n\n{TABLE_BEGIN}\n| stale |\n{TABLE_END}\n\nafter\n")
    status, out, _ = run(capsys, "list", "--update", str(page))
    assert status == 0 and "table updated" in out
    assert (
        page.read_text() == f"# Pairs\n\n{TABLE_BEGIN}\n{rules_markdown()}\n{TABLE_END}\n\nafter\n"
    )
    status, out, _ = run(capsys, "list", "--update", str(page))
    assert status == 0 and "already current" in out
    page.write_text("no markers\n")
    status, _, err = run(capsys, "list", "--update", str(page))
    assert status == 2 and "no generated-table markers" in err and "Traceback" not in err
    status, out, _ = run(capsys, "list", "--markdown")
    assert status == 0 and out.strip() == rules_markdown()
