"""mkdocs hook: the API reference is generated from the package's ``__all__`` lists.

``docs/api.md`` holds the prose and the marker below; this hook replaces the marker with one
mkdocstrings directive per public name, so the reference follows the public surface as it
changes:

* every name in ``distkl.__all__`` under its public path (``distkl.options``, not
  ``distkl._options.options``);
* every public module (no path component starting with ``_``) and every name in its ``__all__``
  that is not already re-exported by ``distkl`` (``distkl.bounds.KLBounds``,
  ``distkl.registry.RuleInfo``, ``distkl.symbolic.Family``, ...).

Names are grouped into sections by the public module they come from; a module the table below
does not know lands in "Other", never nowhere.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

MARKER = "<!-- distkl:api-reference -->"

#: Section title per public module (first component after ``distkl.``), in page order.
SECTIONS: dict[str, str] = {
    "registry": "Registries",
    "options": "Options",
    "montecarlo": "Monte Carlo",
    "density": "Monte Carlo",
    "jsd": "Monte Carlo",
    "quadrature": "Deterministic methods and bounds",
    "approx": "Deterministic methods and bounds",
    "bounds": "Deterministic methods and bounds",
    "bounded": "Bounded divergences and losses",
    "losses": "Bounded divergences and losses",
    "latent": "Latent regularisation",
    "functional": "Raw tensors",
    "verify": "Verification",
    "symbolic": "Symbolic closed forms",
    "rules": "Registered rule modules",
    "examples": "Example pairs (used by verify and the tests)",
    "cli": "Command line",
}
OTHER = "Other"


def public_modules() -> list[str]:
    """Every importable public module of distkl, sorted, ``distkl`` itself excluded."""
    import distkl

    names = []
    for info in pkgutil.walk_packages(distkl.__path__, "distkl."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def section_of(module_name: str) -> str:
    """The section of a (possibly private) module path: its first public component decides."""
    parts = [p.lstrip("_") for p in module_name.split(".")[1:]]
    return SECTIONS.get(parts[0], OTHER) if parts else OTHER


def home_module(obj: object, fallback: str) -> str:
    module = obj.__name__ if isinstance(obj, ModuleType) else getattr(obj, "__module__", None)
    return module if isinstance(module, str) and module.startswith("distkl") else fallback


def _resolve(path: str) -> object:
    """What griffe finds at ``path``: a submodule wins over a package attribute of its name."""
    try:
        return importlib.import_module(path)
    except ImportError:
        module_name, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module_name), name)


def reference_entries() -> dict[str, list[tuple[str, str]]]:
    """Section title -> ``(identifier, public path)`` to document, top-level names first.

    The identifier is what mkdocstrings loads (and the anchor cross-references point to); it
    equals the public path except for a name shadowed by a submodule.
    """
    import distkl

    seen: set[int] = set()
    entries: dict[str, list[tuple[str, str]]] = {}

    def add(path: str, obj: object, module: str) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        identifier = path
        if isinstance(_resolve(path), ModuleType):
            # A name shadowed by a submodule of the same name (``distkl.symbolic.derive`` is a
            # function and a module): document the object where it is defined, title it by the
            # public path.
            identifier = f"{obj.__module__}.{obj.__qualname__}"  # type: ignore[attr-defined]
        entries.setdefault(section_of(home_module(obj, module)), []).append((identifier, path))

    for name in distkl.__all__:
        obj = getattr(distkl, name)
        if not isinstance(obj, ModuleType):
            add(f"distkl.{name}", obj, "distkl")
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if not isinstance(obj, ModuleType):
                add(f"{module_name}.{name}", obj, module_name)
    return entries


def directive(identifier: str, path: str) -> str:
    if identifier == path:
        return f"::: {path}\n"
    return f"::: {identifier}\n    options:\n      heading: {path}\n      toc_label: {path}\n"


def reference_markdown() -> str:
    entries = reference_entries()
    order = list(dict.fromkeys([*SECTIONS.values(), OTHER]))
    blocks = []
    for title in order:
        if title in entries:
            blocks.append(f"## {title}\n")
            blocks.extend(directive(ident, path) for ident, path in entries[title])
    return "\n".join(blocks)


def documented_objects() -> dict[str, object]:
    """Identifier -> object for every entry of the reference (the docs tests and the docstring
    converter use it to check return types and resolve cross-references)."""
    out: dict[str, object] = {}
    for pairs in reference_entries().values():
        for identifier, path in pairs:
            module_name, _, name = path.rpartition(".")
            out[identifier] = getattr(importlib.import_module(module_name), name)
    return out


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, reference_markdown())
