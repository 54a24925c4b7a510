"""Packed directories through a real mount on the real registry (issue 11, item 1): a directory
pushed by oras-py, and one laid out as the oras CLI lays it, browse as read-only directories."""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import stat
import tarfile
from pathlib import Path

from ocifs.digest import Digest
from ocifs.model import (
    ANNOTATION_TITLE,
    EMPTY_DESCRIPTOR,
    EMPTY_JSON,
    OCI_LAYER_TAR_GZIP,
    OCI_MANIFEST,
    Descriptor,
    build_manifest,
)
from ocifs.registry import RegistryClient

from .clients import oras_push
from .conftest import Mounter
from .content import push_blob
from .helpers import errno_of
from .registry_server import RunningRegistry

UNPACK = "io.deis.oras.content.unpack"


def tree_of(root: Path) -> dict[str, tuple[str, bytes | str]]:
    """relative path -> (kind, bytes or link target), without following links."""
    found: dict[str, tuple[str, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = ("symlink", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir", b"")
            else:
                found[rel] = ("file", path.read_bytes())
    return found


def push_packed(client: RegistryClient, repo: str, tag: str, title: str, blob: bytes,
                annotations: dict[str, str] | None = None) -> Descriptor:
    push_blob(client, repo, blob)
    push_blob(client, repo, EMPTY_JSON)
    layer = Descriptor.for_bytes(OCI_LAYER_TAR_GZIP, blob, {ANNOTATION_TITLE: title, **(annotations or {})})
    client.put_manifest(repo, tag, build_manifest([layer], config=EMPTY_DESCRIPTOR), OCI_MANIFEST)
    return layer


def targz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return gzip.compress(raw.getvalue(), mtime=0)


def info(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, mtime: int = 1_600_000_000,
         linkname: str = "") -> tarfile.TarInfo:
    result = tarfile.TarInfo(name)
    result.type, result.mode, result.mtime, result.linkname = kind, mode, mtime, linkname
    return result


def test_a_directory_pushed_by_oras_py_browses_with_identical_bytes(
        registry: RunningRegistry, repo: str, tmp_path: Path, mounter: Mounter) -> None:
    src = tmp_path / "project"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "README.md").write_text("hello\n")
    (src / "sub" / "data.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (src / "sub" / "deeper" / "empty").write_bytes(b"")
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(src / "run.sh", 0o755)
    (src / "link").symlink_to("sub/data.bin")
    oras_push(registry, f"{repo}:dir", [src])
    mnt = mounter(f"{registry.host}/{repo}", "--read-only")
    packed = mnt / "dir" / "project"
    assert sorted(os.listdir(mnt / "dir")) == ["project"]  # the raw blob is not listed
    assert packed.is_dir()
    assert tree_of(packed) == tree_of(src)
    assert stat.S_IMODE((packed / "run.sh").stat().st_mode) == 0o555  # x kept, never writable
    assert stat.S_IMODE((packed / "README.md").stat().st_mode) == 0o444
    assert (packed / "README.md").stat().st_mtime == 0  # oras-py zeroes tar mtimes
    # the raw blob stays reachable beside it
    raw = (mnt / "dir" / "project.tar.gz").read_bytes()
    assert os.getxattr(packed, "user.oci.digest").decode() == str(Digest.of(raw))
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        assert "project/README.md" in tar.getnames()


def test_a_directory_laid_out_as_the_oras_cli_does(
        client: RegistryClient, registry: RunningRegistry, repo: str, mounter: Mounter) -> None:
    big = os.urandom(2 * 1024 * 1024)
    blob = targz([
        (info("site/", tarfile.DIRTYPE, 0o755), None),
        (info("site/index.html", mode=0o600, mtime=1_650_000_000), b"<html>hi</html>\n"),
        (info("site/assets/", tarfile.DIRTYPE, 0o750), None),
        (info("site/assets/big.bin"), big),
        (info("site/latest", tarfile.SYMTYPE, linkname="assets/big.bin"), None),
    ])
    push_packed(client, repo, "cli", "site", blob, {UNPACK: "true", "io.deis.oras.content.digest": "sha256:0"})
    # a tarball without the mark stays a file
    plain = targz([(info("x/y"), b"y")])
    push_blob(client, repo, plain)
    layers = [Descriptor.for_bytes(OCI_LAYER_TAR_GZIP, blob, {ANNOTATION_TITLE: "site", UNPACK: "true"}),
              Descriptor.for_bytes(OCI_LAYER_TAR_GZIP, plain, {ANNOTATION_TITLE: "backup.tar.gz"})]
    client.put_manifest(repo, "both", build_manifest(layers, config=EMPTY_DESCRIPTOR), OCI_MANIFEST)
    mnt = mounter(f"{registry.host}/{repo}", "--read-only")
    site = mnt / "cli" / "site"
    assert sorted(os.listdir(site)) == ["assets", "index.html", "latest"]
    assert (site / "index.html").read_bytes() == b"<html>hi</html>\n"
    assert (site / "assets" / "big.bin").read_bytes() == big
    assert (site / "latest").read_bytes() == big  # relative, inside the mount: the kernel follows it
    assert os.readlink(site / "latest") == "assets/big.bin"
    st = (site / "index.html").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_mtime, st.st_size) == (0o400, 1_650_000_000, 16)
    assert stat.S_IMODE((site / "assets").stat().st_mode) == 0o550
    both = mnt / "both"
    assert sorted(os.listdir(both)) == ["backup.tar.gz", "site"]
    assert (both / "backup.tar.gz").is_file() and (both / "backup.tar.gz").read_bytes() == plain
    assert (both / "site" / "index.html").read_bytes() == b"<html>hi</html>\n"


def test_unsafe_members_are_shown_safely_or_not_at_all(
        client: RegistryClient, registry: RunningRegistry, repo: str, mounter: Mounter) -> None:
    blob = targz([
        (info("/etc/evil"), b"absolute"),
        (info("../escape"), b"dotdot"),
        (info("ok/../../up"), b"dotdot inside"),
        (info("null", tarfile.CHRTYPE), None),
        (info("pipe", tarfile.FIFOTYPE), None),
        (info("dup"), b"first"),
        (info("dup"), b"second"),
        (info("out", tarfile.SYMTYPE, linkname="/etc"), None),
        (info("out/passwd"), b"through the link"),
        (info("hard", tarfile.LNKTYPE, linkname="/etc/passwd"), None),
        (info("fine"), b"fine"),
    ])
    push_packed(client, repo, "unsafe", "stuff", blob)
    mnt = mounter(f"{registry.host}/{repo}", "--read-only")
    stuff = mnt / "unsafe" / "stuff"
    assert sorted(os.listdir(stuff)) == ["dup", "fine", "out"]
    assert (stuff / "dup").read_bytes() == b"second"
    assert os.readlink(stuff / "out") == "/etc"  # shown as stored, never resolved by ocifs
    # the member below the symlink is not served: that path is whatever /etc/passwd is here
    through = stuff / "out" / "passwd"
    assert not through.exists() or through.read_bytes() != b"through the link"
    for name in ("null", "pipe", "hard", "escape", "etc"):
        assert errno_of(lambda n=name: os.lstat(stuff / n)) == errno.ENOENT  # type: ignore[misc]


def test_writes_inside_are_refused_with_nothing_staged(
        client: RegistryClient, registry: RunningRegistry, repo: str, mounter: Mounter) -> None:
    blob = targz([(info("d/a.txt"), b"a"), (info("d/sub/b.txt"), b"b")])
    push_packed(client, repo, "w", "d", blob, {UNPACK: "true"})
    mnt = mounter(f"{registry.host}/{repo}")
    d = mnt / "w" / "d"
    assert (d / "a.txt").read_bytes() == b"a"
    refused = (errno.EROFS, errno.EPERM)
    assert errno_of(lambda: (d / "new.txt").write_bytes(b"x")) in refused
    assert errno_of(lambda: open(d / "a.txt", "r+b").close()) in refused
    assert errno_of(lambda: (d / "a.txt").unlink()) in refused
    assert errno_of(lambda: (d / "newdir").mkdir()) in refused
    assert errno_of(lambda: (d / "sub").rmdir()) in refused
    assert errno_of(lambda: os.rename(d / "a.txt", d / "b.txt")) in refused
    assert errno_of(lambda: os.truncate(d / "a.txt", 0)) in refused
    assert errno_of(lambda: os.symlink("a.txt", d / "l")) in refused
    assert errno_of(lambda: os.setxattr(d / "a.txt", "user.oci.mediatype", b"text/plain")) in refused
    status = json.loads((mnt / ".ocifs" / "status").read_bytes())
    assert status["staged"] == []
    assert (d / "a.txt").read_bytes() == b"a" and sorted(os.listdir(d)) == ["a.txt", "sub"]
