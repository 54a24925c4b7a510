"""The overlay: what this mount holds that the registry does not show yet. Staged files by
path, directories made with mkdir, artifact types set on such directories before their first
file, and repositories removed here that the registry cannot delete. One lock guards it all,
never held over I/O.

One staged file per path: whoever opens a path for writing while a staged file is there
shares it (POSIX semantics), and making one is serialised per path (`claim`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..layout import split_path
from .staging import StagedFile
from .targets import LayerTarget, LocalDir


class Overlay:
    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._files: dict[str, StagedFile] = {}
        self._dirs: dict[str, LocalDir] = {}
        self._artifact_types: dict[str, str] = {}  # directory path -> artifact type for its tag
        self._removed: set[str] = set()  # repositories removed here, still in the catalog
        self._claims: dict[str, _Claim] = {}  # paths being staged

    # ---- reading ------------------------------------------------------------------------------

    def file(self, path: str) -> StagedFile | None:
        with self._mutex:
            return self._files.get(path)

    def dir(self, path: str) -> LocalDir | None:
        with self._mutex:
            return self._dirs.get(path)

    def files(self) -> list[StagedFile]:
        with self._mutex:
            return list(self._files.values())

    def children(self, path: str) -> dict[str, StagedFile | LocalDir]:
        """What this mount adds to directory `path`, by name: staged files, directories made
        here, and the directories staged files deeper down lie in (the registry may have
        lost them: `rm docs/a` while `docs/b` waits for its push)."""
        found: dict[str, StagedFile | LocalDir] = {}
        prefix = f"{path}/" if path else ""
        with self._mutex:
            for child, local in self._dirs.items():
                parent, name = split_path(child)
                if parent == path:
                    found[name] = local
            for child, staged in self._files.items():
                if not child.startswith(prefix):
                    continue
                name, _, below = child[len(prefix):].partition("/")
                if not below:
                    found[name] = staged
                elif name not in found:
                    implied = _implied_dir(prefix + name, child, staged)
                    if implied is not None:
                        found[name] = implied
        return found

    def implied_dir(self, path: str) -> LocalDir | None:
        """The directory a staged file lies in, when nothing else shows it."""
        prefix = f"{path}/"
        with self._mutex:
            for child, staged in self._files.items():
                if child.startswith(prefix):
                    implied = _implied_dir(path, child, staged)
                    if implied is not None:
                        return implied
        return None

    def renamed_away(self, path: str) -> bool:
        """Whether `path` is an earlier name of a staged file that was renamed (its layer
        is dropped by that file's next push; until then the name is hidden)."""
        with self._mutex:
            return any(drop.path == path for staged in self._files.values() for drop in staged.drops)

    def renamed_away_under(self, path: str) -> set[str]:
        """The names directly in directory `path` that are earlier names of renamed files."""
        prefix = f"{path}/" if path else ""
        with self._mutex:
            return {drop.path[len(prefix):] for staged in self._files.values() for drop in staged.drops
                    if drop.path.startswith(prefix) and "/" not in drop.path[len(prefix):]}

    def is_removed(self, path: str) -> bool:
        with self._mutex:
            return path in self._removed

    def artifact_type(self, path: str) -> str | None:
        with self._mutex:
            return self._artifact_types.get(path)

    def pending_artifact_type(self, repository: str, tag: str) -> str | None:
        """The artifact type set on the directory that became `repository:tag`, if any."""
        with self._mutex:
            for path, local in self._dirs.items():
                if local.kind == "tag" and (local.repository, local.tag) == (repository, tag):
                    return self._artifact_types.get(path)
        return None

    # ---- staged files -------------------------------------------------------------------------

    def claim(self, path: str, make: Callable[[], StagedFile], *, writer: bool) -> tuple[StagedFile, bool]:
        """The staged file at `path` with one more handle counted: the one already there, else
        one made by `make()` (which may do I/O: a download). Concurrent claims of one path
        wait for each other, so there is never a second staged file for a path.
        Returns (file, whether it was made now)."""
        with self._mutex:
            claim = self._claims.setdefault(path, _Claim())
            claim.users += 1
        try:
            with claim.lock:
                existing = self.acquire(path, writer=writer)
                if existing is not None:
                    return existing, False
                staged = make()
                with self._mutex:
                    self._files[path] = staged
                    staged.handles += 1
                    staged.writers += int(writer)
                return staged, True
        finally:
            with self._mutex:
                claim.users -= 1
                if claim.users == 0:
                    del self._claims[path]

    def acquire(self, path: str, *, writer: bool) -> StagedFile | None:
        """The staged file at `path` with one more handle counted, in one step: a release or
        unlink in between could otherwise close it under the new handle."""
        with self._mutex:
            staged = self._files.get(path)
            if staged is not None:
                staged.handles += 1
                staged.writers += int(writer)
            return staged

    def adopt(self, staged: StagedFile) -> bool:
        """Put a recovered file back at its path (no handle); False when the path is taken."""
        with self._mutex:
            if staged.path in self._files:
                return False
            self._files[staged.path] = staged
            return True

    def hold(self, staged: StagedFile) -> None:
        """One more (non-writing) handle, for an operation that must not see it retired."""
        with self._mutex:
            staged.handles += 1

    def release(self, staged: StagedFile, *, writer: bool = False, handle: bool = True) -> bool:
        """One handle fewer (`handle=False`: none was held, e.g. a recovered file). When no
        handle is left and the file is settled, it leaves the overlay: returns True, and the
        caller disposes of it."""
        with self._mutex:
            if handle:
                staged.handles -= 1
                staged.writers -= int(writer)
            if staged.handles > 0 or not staged.settled:
                return False
            if self._files.get(staged.path) is staged:
                del self._files[staged.path]
            return True

    def remove(self, path: str, staged: StagedFile) -> bool:
        """unlink: `staged` leaves `path` (if it is still the file there) and is never pushed
        again."""
        with self._mutex:
            if self._files.get(path) is not staged:
                return False
            del self._files[path]
            staged.removed = True
            return True

    def move(self, staged: StagedFile, old: str, new: str) -> StagedFile | None:
        """rename of a staged file (its `path` changes with the table, in one step); returns
        the staged file it displaced at `new`, if any (marked removed)."""
        with self._mutex:
            if self._files.get(old) is staged:
                del self._files[old]
            displaced = self._files.pop(new, None)
            self._files[new] = staged
            staged.path = new
            if displaced is staged:
                return None
            if displaced is not None:
                displaced.removed = True
            return displaced

    def displace(self, path: str) -> StagedFile | None:
        """A registry file renamed over the staged file at `path`: that one is gone."""
        with self._mutex:
            displaced = self._files.pop(path, None)
            if displaced is not None:
                displaced.removed = True
            return displaced

    # ---- directories --------------------------------------------------------------------------

    def add_dir(self, path: str, local: LocalDir) -> None:
        with self._mutex:
            self._dirs[path] = local

    def forget_dir(self, path: str) -> None:
        with self._mutex:
            self._dirs.pop(path, None)
            self._artifact_types.pop(path, None)

    def set_artifact_type(self, path: str, value: str) -> None:
        with self._mutex:
            self._artifact_types[path] = value

    def decide_tag(self, path: str, repository: str, tag: str) -> None:
        """The undecided directory `path` took a file: it is tag `repository:tag`; the
        undecided directories below it are directories of its titles, the one above it the
        repository, and those further up namespaces (none of them can be a tag any more)."""
        prefix = f"{path}/"
        with self._mutex:
            local = self._dirs.get(path)
            if local is None or local.kind != "path":
                return
            self._dirs[path] = LocalDir("tag", repository, tag)
            for child, other in list(self._dirs.items()):
                if other.kind != "path":
                    continue
                if child.startswith(prefix):
                    parts = tuple(child[len(prefix):].split("/"))
                    self._dirs[child] = LocalDir("title", repository, tag, parts)
                elif path.startswith(f"{child}/"):
                    full = "/".join((other.repository, *other.parts)).strip("/")
                    kind = "repository" if full == repository else "namespace"
                    self._dirs[child] = LocalDir(kind, full)

    def mark_removed(self, path: str) -> None:
        """A repository removed here that the registry keeps listing with no tags: hidden in
        this mount while it has none."""
        with self._mutex:
            self._removed.add(path)

    def unmark_removed(self, path: str) -> None:
        with self._mutex:
            self._removed.discard(path)


class _Claim:
    """A path being staged: its lock, and how many claims wait on it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


def _implied_dir(path: str, child: str, staged: StagedFile) -> LocalDir | None:
    """Directory `path` above staged file `child`, as its target says (a layer's title)."""
    if not isinstance(staged.target, LayerTarget):
        return None
    below = child[len(path) + 1:].split("/")
    title = staged.target.title.split("/")
    if len(title) < len(below) or title[len(title) - len(below):] != below:
        return None
    parts = tuple(title[: len(title) - len(below)])
    if not parts:
        return LocalDir("tag", staged.target.repository, staged.target.tag)
    return LocalDir("title", staged.target.repository, staged.target.tag, parts)
