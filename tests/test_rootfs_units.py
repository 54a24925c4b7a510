"""merge_layers: OCI whiteouts and opaque directories over per-layer indexes (issue 11, item 2)."""

from __future__ import annotations

from ocifs.archive import DIR, FILE, SYMLINK, ArchiveIndex, Member, _children, merge_layers


def layer(members: dict[str, Member]) -> ArchiveIndex:
    entries = {(): Member(DIR, 0o755, 0, 0.0, implied=True)}
    for name, member in members.items():
        parts = tuple(name.split("/"))
        for i in range(1, len(parts)):
            entries.setdefault(parts[:i], Member(DIR, 0o755, 0, 0.0, implied=True))
        entries[parts] = member
    return ArchiveIndex(entries, _children(entries))


def f(data: int = 1, mode: int = 0o644) -> Member:
    return Member(FILE, mode, data, 0.0)


def d(mode: int = 0o755) -> Member:
    return Member(DIR, mode, 0, 0.0)


def test_whiteouts_opaque_directories_and_replacements() -> None:
    merged = merge_layers([
        layer({"a": d(0o700), "a/x": f(), "b": d(), "b/y": f(), "b/sub/z": f(), "c": f(), "l": d(), "l/in": f()}),
        layer({".wh.c": f(0), "b": d(), "b/.wh..wh..opq": f(0), "b/new": f(2), "a/more": f(3),
               "l": Member(SYMLINK, 0o777, 1, 0.0, target="a")}),
    ])
    paths = {"/".join(path) for path in merged.entries if path}
    assert paths == {"a", "a/x", "a/more", "b", "b/new", "l"}
    assert merged.entries[("a",)].mode == 0o700  # implied above: the lower directory's attributes
    assert merged.entries[("a", "x")].layer == 0 and merged.entries[("a", "more")].layer == 1
    assert merged.entries[("l",)].kind == SYMLINK  # a symlink replaces a directory and its members
    assert merged.children[("b",)] == ["new"]
    assert merged.children[()] == ["a", "b", "l"]


def test_a_deleted_directory_comes_back_empty() -> None:
    merged = merge_layers([
        layer({"d/old": f()}),
        layer({".wh.d": f(0)}),
        layer({"d": d(0o750)}),
    ])
    assert merged.children[("d",)] == [] and merged.entries[("d",)].mode == 0o750
