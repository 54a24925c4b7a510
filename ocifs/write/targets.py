"""Where a path written in the mount goes, and the name rules of writing (DESIGN.md section 3).

Pure rules: the caller says what the parent directory is (a registry node or a directory
made with mkdir), these functions say what a file or directory made there becomes, or
refuse with the errno a user should see.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

from ..errors import Refused
from ..layout import NAME_MAX, RESERVED_NAMES, ManifestDir, PrefixDir, TitleDir
from ..model import Index
from ..reference import is_valid_component, is_valid_repository, is_valid_tag

# Editors' and tools' scratch files: kept in the mount, never pushed.
SCRATCH_RE = re.compile(r"^(?:\..*\.sw[a-p]|.*~|4913|\.#.*)$")


@dataclass(frozen=True)
class LayerTarget:
    """A file of a tag: layer titled `title` (a path relative to the tag directory)."""

    repository: str
    tag: str
    title: str


@dataclass(frozen=True)
class HelmTarget:
    """A chart package copied into a namespace directory: pushed as `helm push` would."""

    namespace: str


@dataclass(frozen=True)
class ScratchTarget:
    """An editor's scratch file: local to the mount."""


Target = LayerTarget | HelmTarget | ScratchTarget


@dataclass(frozen=True)
class LocalDir:
    """A directory made with mkdir that the registry does not have yet."""

    kind: str  # "repository", "tag" or "title"
    repository: str
    tag: str | None = None
    parts: tuple[str, ...] = ()


# What a parent directory can be when something is made in it.
Parent = PrefixDir | ManifestDir | TitleDir | LocalDir


def is_scratch(name: str) -> bool:
    return SCRATCH_RE.match(name) is not None


def check_name(path: str, name: str) -> None:
    """A name the registry can hold as a title: UTF-8, at most NAME_MAX bytes, not reserved."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise Refused(f"{path!r}: names must be UTF-8", errno.EINVAL) from None
    if len(encoded) > NAME_MAX:
        raise Refused(f"{path}: name longer than {NAME_MAX} bytes", errno.ENAMETOOLONG)
    if name in RESERVED_NAMES:
        raise Refused(f"{path}: {name} is reserved", errno.EPERM)


def check_writable(node: ManifestDir) -> None:
    """Only tags of artifacts take files: not digests, platforms, indexes or images."""
    if node.tag is None:
        raise Refused(f"{node.path}: a manifest by digest or a platform cannot change", errno.EPERM)
    if isinstance(node.manifest, Index):
        raise Refused(f"{node.path}: an image index cannot take files", errno.EPERM)
    if node.manifest.is_image:
        raise Refused(f"{node.path}: a runnable container image is never modified", errno.EPERM)


def file_target(parent: Parent, path: str, name: str) -> Target:
    """Where a file named `name` in `parent` is pushed."""
    check_name(path, name)
    if is_scratch(name):
        return ScratchTarget()
    if isinstance(parent, LocalDir):
        if parent.kind == "repository":
            if name.endswith(".tgz"):
                return HelmTarget(parent.repository)
            raise Refused(f"{path}: files go into tag directories", errno.EPERM)
        assert parent.tag is not None
        return LayerTarget(parent.repository, parent.tag, "/".join((*parent.parts, name)))
    if isinstance(parent, PrefixDir):
        if name.endswith(".tgz"):
            return HelmTarget(parent.prefix)
        raise Refused(f"{path}: only Helm charts (.tgz) can be copied into a repository "
                      "or namespace directory; files go into tag directories", errno.EPERM)
    owner = parent.manifest_dir if isinstance(parent, TitleDir) else parent
    check_writable(owner)
    assert owner.tag is not None
    parts = parent.parts if isinstance(parent, TitleDir) else ()
    return LayerTarget(owner.repository, owner.tag, "/".join((*parts, name)))


def new_directory(parent: Parent, path: str, name: str, *, parent_is_repository: bool) -> LocalDir:
    """What `mkdir path` makes in `parent`: a repository, a tag, or a title directory."""
    check_name(path, name)
    if isinstance(parent, LocalDir):
        if parent.kind == "repository":
            return _new_tag(path, parent.repository, name)
        assert parent.tag is not None
        return LocalDir("title", parent.repository, parent.tag, (*parent.parts, name))
    if isinstance(parent, PrefixDir):
        if parent_is_repository:
            return _new_tag(path, parent.prefix, name)
        repository = f"{parent.prefix}/{name}" if parent.prefix else name
        if not is_valid_component(name) or not is_valid_repository(repository):
            raise Refused(f"{path}: {name!r} cannot be a repository name", errno.EINVAL)
        return LocalDir("repository", repository)
    owner = parent.manifest_dir if isinstance(parent, TitleDir) else parent
    check_writable(owner)
    assert owner.tag is not None
    parts = parent.parts if isinstance(parent, TitleDir) else ()
    return LocalDir("title", owner.repository, owner.tag, (*parts, name))


def _new_tag(path: str, repository: str, name: str) -> LocalDir:
    if not is_valid_tag(name):
        raise Refused(f"{path}: {name!r} cannot be a tag", errno.EINVAL)
    return LocalDir("tag", repository, name)
