"""The import arrows of the design (DESIGN.md section 4): each part imports only the parts
below it; only fs.py imports the FUSE binding; only registry/ speaks HTTP; store/ never
imports registry/; the writer never imports the tree."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ocifs"

# part -> the parts it may import (itself always allowed).
ALLOWED: dict[str, set[str]] = {
    "cli": {"deadline", "mountopts", "status", "cachetool", "fs", "view", "tree", "write", "metadata", "helm",
            "layout", "store", "registry", "model", "digest", "reference", "errors", "__init__"},
    # The commands beside `mount` (DESIGN.md 4: cli-level helpers; cli only parses and dispatches).
    "status": {"cachetool", "layout", "store", "registry", "errors"},
    "cachetool": {"write", "store", "errors"},
    "__main__": {"cli"},
    "mountopts": set(),  # mount(8) options -> `ocifs mount` arguments: plain text, below cli only
    "fs": {"deadline", "view", "layout", "errors"},
    "view": {"tree", "write", "layout", "model", "errors"},
    "tree": {"deadline", "metadata", "helm", "layout", "archive", "gguf", "store", "model", "digest", "reference",
             "errors"},
    # Archive indexes (issue 11): tar headers and cache files; no FUSE, no HTTP.
    "archive": {"store", "digest", "errors"},
    "write": {"deadline", "metadata", "helm", "gguf", "layout", "store", "registry", "model", "digest", "reference",
              "errors"},
    # GGUF headers (issue 12): bytes in, fields out; no FUSE, no HTTP, no cache.
    "gguf": {"errors"},
    "metadata": {"deadline", "store", "registry", "model", "digest", "reference", "errors"},
    "helm": {"layout", "model", "digest", "reference", "errors"},
    "layout": {"model", "digest", "errors"},
    "store": {"deadline", "digest", "errors"},
    "registry": {"deadline", "model", "digest", "reference", "errors", "__init__"},
    "model": {"digest", "errors"},
    "reference": {"digest", "errors"},
    "digest": {"errors"},
    "deadline": {"errors"},
    "errors": set(),
    "__init__": set(),
}
# Third-party modules only one part may import.
EXCLUSIVE = {"mfusepy": "fs", "fuse": "fs", "requests": "registry", "urllib3": "registry"}


def part_of(path: Path, root: Path = PACKAGE) -> str:
    relative = path.relative_to(root)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imports(path: Path, root: Path = PACKAGE) -> list[tuple[str, int]]:
    """(what, line) for each import: `ocifs.<part>` as the part name, others as their top module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package_parts = path.relative_to(root).parts[:-1]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name.split(".")
                found.append((name[1] if name[0] == "ocifs" and len(name) > 1 else name[0], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                name = (node.module or "").split(".")
                found.append((name[1] if name[0] == "ocifs" and len(name) > 1 else name[0], node.lineno))
                continue
            base = list(package_parts[: len(package_parts) - (node.level - 1)])
            target = base + (node.module.split(".") if node.module else [])
            if target:
                found.append((target[0], node.lineno))
            else:  # `from . import fs` at the package top
                found.extend((alias.name, node.lineno) for alias in node.names)
    return found


def test_every_module_keeps_to_its_arrows() -> None:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = part_of(path)
        assert part in ALLOWED, f"{path}: a part the design does not name; add it to ALLOWED"
        for name, line in imports(path):
            if name in ALLOWED and name != part and name not in ALLOWED[part]:
                problems.append(f"{path.relative_to(PACKAGE)}:{line}: {part} imports {name}")
            owner = EXCLUSIVE.get(name)
            if owner is not None and owner != part:
                problems.append(f"{path.relative_to(PACKAGE)}:{line}: only {owner} may import {name}")
    assert not problems, "\n".join(problems)


def test_the_checker_sees_a_forbidden_arrow(tmp_path: Path) -> None:
    """The checker itself can fail: a store module importing the registry is caught."""
    (tmp_path / "store").mkdir()
    fake = tmp_path / "store" / "probe.py"
    fake.write_text("from ..registry import client\nimport requests\nfrom . import files\n")
    found = imports(fake, tmp_path)
    assert ("registry", 1) in found and ("requests", 2) in found and ("store", 3) in found
    assert part_of(fake, tmp_path) == "store" and "registry" not in ALLOWED["store"]
