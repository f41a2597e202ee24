"""mkdocs hook. The pairs table is committed in docs/pairs.md (regenerate it with
`python -m distkl list --markdown --update docs/pairs.md`; tests/test_cli.py checks it against the
live registry), so the site needs no generation step for it."""

from __future__ import annotations


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001
    return markdown
