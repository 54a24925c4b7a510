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
from ..layout import (
    NAME_MAX,
    RESERVED_NAMES,
    UNSAFE_CHARACTERS,
    ManifestDir,
    PrefixDir,
    ReferrersDir,
    TitleDir,
    type_of_referrer_dir,
)
from ..model import Descriptor, Index
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


@dataclass(frozen=True)
class ReferrerTarget:
    """A file copied into `.referrers/<type>/<subtype>/` of a manifest: attached to it as
    `oras attach --artifact-type <type>/<subtype>` does (a new manifest whose `subject` is
    that manifest, the file its one layer, titled `title`)."""

    repository: str
    subject: Descriptor  # media type, digest and size of the manifest it refers to
    artifact_type: str
    title: str


Target = LayerTarget | HelmTarget | ScratchTarget | ReferrerTarget


@dataclass(frozen=True)
class LocalDir:
    """A directory made with mkdir that the registry does not have yet.

    kind "path": a new registry path, not decided yet: `repository` is the registry path it
    was made under (its nearest registry directory) and `parts` the new components down to it.
    The first file copied into such a directory makes it the tag and the path above it the
    repository (DESIGN.md section 3); directories made below it become title directories.
    kind "tag": `repository:tag`; kind "title": a directory `parts` of that tag's titles.
    Once a tag is decided, the undecided directories above it become kind "repository" (the
    one holding the tag; `repository` is its path) and "namespace" (further up)."""

    kind: str  # "path", "tag", "title", "repository", "namespace" or "referrers"
    repository: str
    tag: str | None = None
    parts: tuple[str, ...] = ()
    # kind "referrers": a type directory under `.referrers/` of this manifest (`parts`: the
    # type's one or two components).
    subject: Descriptor | None = None

    def as_tag(self) -> LayerTarget | None:
        """For a "path" directory: the repository and tag it becomes when it takes a file
        (the title left empty), or None when the path cannot be one."""
        if self.kind != "path":
            return None
        repository = "/".join((self.repository, *self.parts[:-1])).strip("/")
        tag = self.parts[-1] if self.parts else ""
        if not is_valid_repository(repository) or not is_valid_tag(tag):
            return None
        return LayerTarget(repository, tag, "")


# What a parent directory can be when something is made in it.
Parent = PrefixDir | ManifestDir | TitleDir | LocalDir | ReferrersDir


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
    if UNSAFE_CHARACTERS.search(name):
        raise Refused(f"{path!r}: control or bidi formatting characters cannot be titles", errno.EINVAL)
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
    referrer = _referrer_parent(parent)
    if referrer is not None:
        return _referrer_target(path, name, *referrer)
    if isinstance(parent, LocalDir):
        if parent.kind in ("repository", "namespace"):
            if name.endswith(".tgz"):
                return HelmTarget(parent.repository)
            raise Refused(f"{path}: files go into tag directories", errno.EPERM)
        if parent.kind == "path":
            if name.endswith(".tgz"):
                return HelmTarget("/".join((parent.repository, *parent.parts)).strip("/"))
            tag = parent.as_tag()
            if tag is None:
                raise Refused(f"{path}: files go into tag directories, and "
                              f"{'/'.join(parent.parts)!r} cannot be a tag here", errno.EPERM)
            return LayerTarget(tag.repository, tag.tag, name)
        assert parent.tag is not None
        return LayerTarget(parent.repository, parent.tag, "/".join((*parent.parts, name)))
    if isinstance(parent, PrefixDir):
        if name.endswith(".tgz"):
            return HelmTarget(parent.prefix)
        raise Refused(f"{path}: only Helm charts (.tgz) can be copied into a repository "
                      "or namespace directory; files go into tag directories", errno.EPERM)
    assert not isinstance(parent, (LocalDir, ReferrersDir))
    owner = parent.manifest_dir if isinstance(parent, TitleDir) else parent
    check_writable(owner)
    assert owner.tag is not None
    parts = parent.parts if isinstance(parent, TitleDir) else ()
    return LayerTarget(owner.repository, owner.tag, "/".join((*parts, name)))


def new_directory(parent: Parent, path: str, name: str, *, parent_is_repository: bool) -> LocalDir:
    """What `mkdir path` makes in `parent`: a repository, a tag, or a title directory."""
    check_name(path, name)
    referrer = _referrer_parent(parent)
    if referrer is not None:
        return _new_referrer_type(path, name, *referrer)
    if isinstance(parent, LocalDir):
        if parent.kind == "path":
            return _new_path(path, parent.repository, (*parent.parts, name))
        if parent.kind == "repository":
            return _new_tag(path, parent.repository, name)
        if parent.kind == "namespace":
            return _new_path(path, parent.repository, (name,))
        assert parent.tag is not None
        return LocalDir("title", parent.repository, parent.tag, (*parent.parts, name))
    if isinstance(parent, PrefixDir):
        if parent_is_repository:
            return _new_tag(path, parent.prefix, name)
        return _new_path(path, parent.prefix, (name,))
    assert not isinstance(parent, (LocalDir, ReferrersDir))
    owner = parent.manifest_dir if isinstance(parent, TitleDir) else parent
    check_writable(owner)
    assert owner.tag is not None
    parts = parent.parts if isinstance(parent, TitleDir) else ()
    return LocalDir("title", owner.repository, owner.tag, (*parts, name))


def _new_path(path: str, base: str, parts: tuple[str, ...]) -> LocalDir:
    """A new directory below a registry path that is not a repository: a repository path
    component, or a tag (decided by the first file copied into it)."""
    name = parts[-1]
    as_component = is_valid_component(name) and is_valid_repository("/".join((base, *parts)).strip("/"))
    as_tag = is_valid_tag(name) and is_valid_repository("/".join((base, *parts[:-1])).strip("/"))
    if not as_component and not as_tag:
        raise Refused(f"{path}: {name!r} can be neither a repository name nor a tag", errno.EINVAL)
    return LocalDir("path", base, None, parts)


def _new_tag(path: str, repository: str, name: str) -> LocalDir:
    if not is_valid_tag(name):
        raise Refused(f"{path}: {name!r} cannot be a tag", errno.EINVAL)
    return LocalDir("tag", repository, name)


# ---- `.referrers/` --------------------------------------------------------------------------


def _referrer_parent(parent: Parent) -> tuple[str, Descriptor, tuple[str, ...]] | None:
    """(repository, subject, type parts) when `parent` is `.referrers/` or a type directory
    in it (from the registry or made here), else None."""
    if isinstance(parent, ReferrersDir):
        subject = parent.subject
        clean = Descriptor(subject.descriptor.media_type, subject.descriptor.digest, subject.descriptor.size)
        return subject.repository, clean, parent.parts
    if isinstance(parent, LocalDir) and parent.kind == "referrers" and parent.subject is not None:
        return parent.repository, parent.subject, parent.parts
    return None


def _referrer_target(path: str, name: str, repository: str, subject: Descriptor,
                     parts: tuple[str, ...]) -> ReferrerTarget:
    artifact_type = type_of_referrer_dir(parts)
    if artifact_type is None:
        raise Refused(f"{path}: files are attached in .referrers/<type>/<subtype>/ "
                      "(an artifact type such as application/vnd.example.sbom+json)", errno.EPERM)
    return ReferrerTarget(repository, subject, artifact_type, name)


def _new_referrer_type(path: str, name: str, repository: str, subject: Descriptor,
                       parts: tuple[str, ...]) -> LocalDir:
    """`mkdir .referrers/<type>` and `.referrers/<type>/<subtype>`: the two halves of an
    artifact type; nothing deeper (a referrer's own directory is made by attaching)."""
    new = (*parts, name)
    if len(new) > 2 or type_of_referrer_dir((*new, "x")[:2]) is None:
        raise Refused(f"{path}: directories in .referrers/ spell an artifact type, "
                      "<type>/<subtype> (letters, digits and !#$&^_.+-)", errno.EINVAL)
    return LocalDir("referrers", repository, None, new, subject)
