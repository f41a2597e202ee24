"""Every ```python block in README.md and docs/*.md runs, in order, one namespace per page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


ALL_PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
PAGES = [p for p in ALL_PAGES if python_blocks(p)]


def test_readme_and_guide_have_code():
    assert ROOT / "README.md" in PAGES
    assert len(PAGES) >= 3


@pytest.fixture
def _registries_restored():
    """Pages may register example rules; undo that so tests stay independent of order."""
    from torch.distributions import kl as torch_kl

    from distkl import registry

    saved = (dict(torch_kl._KL_REGISTRY), dict(registry._KL_RULES), dict(registry._JSD_RULES))
    yield
    for table, old in zip((torch_kl._KL_REGISTRY, registry._KL_RULES, registry._JSD_RULES), saved):
        table.clear()
        table.update(old)
    torch_kl._KL_MEMOIZE.clear()
    registry._dispatch_jsd.cache_clear()


@pytest.mark.usefixtures("_registries_restored")
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_code_blocks_run(page: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # pages that write files write them here
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, block in enumerate(python_blocks(page)):
        code = compile(block, f"{page.relative_to(ROOT)}[block {i}]", "exec")
        exec(code, namespace)
