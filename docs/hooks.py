"""mkdocs hook: fill generated sections from the live registry, never typed by hand."""

from __future__ import annotations

MARKER = "<!-- distkl:rules-table -->"


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001
    if MARKER not in markdown:
        return markdown
    import distkl  # noqa: F401  (registers the rules)
    from distkl.registry import rules_markdown

    return markdown.replace(MARKER, rules_markdown())
