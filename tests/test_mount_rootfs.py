"""Container images from the inside through a real mount on the real registry (issue 11, item
2): an image built by umoci, with several layers, a whiteout and an opaque directory, copied in
by skopeo, shows a hidden `rootfs/` equal to what `umoci unpack` makes of it, and `layers/<n>/`."""

from __future__ import annotations

import errno
import io
import os
import stat
import tarfile
import time
from pathlib import Path

from ocifs.registry import RegistryClient

from .clients import build_umoci_image, run, skopeo_copy
from .conftest import Mounter
from .helpers import errno_of
from .registry_server import RunningRegistry


def tree_of(root: Path) -> dict[str, tuple[str, bytes | str, int]]:
    """relative path -> (kind, bytes or link target, permission bits without write bits),
    without following links."""
    found: dict[str, tuple[str, bytes | str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            mode = stat.S_IMODE(path.lstat().st_mode) & ~0o222
            if path.is_symlink():
                found[rel] = ("symlink", os.readlink(path), 0)
            elif path.is_dir():
                found[rel] = ("dir", b"", mode)
            else:
                found[rel] = ("file", path.read_bytes(), mode)
    return found


def layer_tar(members: list[tuple[str, bytes, int, bytes | str | None]]) -> bytes:
    """(name, type, mode, bytes of a file or a symlink's target)"""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, mode, data in members:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = kind, mode, 1_700_000_000
            if isinstance(data, str):
                info.linkname = data
                tar.addfile(info)
            elif data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return raw.getvalue()


def build_image(tmp_path: Path) -> Path:
    layout = tmp_path / "layout"
    # One layer per file (umoci insert), then two layers of our own (umoci raw add-layer).
    build_umoci_image(layout, "t", {
        "etc/os-release": b'NAME="ocifs test"\nID=ocifs\n',
        "keep/a": b"first a\n",
        "gone.txt": b"deleted later\n",
        "opaque/old1": b"hidden by the opaque directory\n",
        "opaque/sub/old2": b"also hidden\n",
    })
    second = tmp_path / "second.tar"
    second.write_bytes(layer_tar([
        ("bin", tarfile.DIRTYPE, 0o755, None),
        ("bin/sh", tarfile.REGTYPE, 0o755, b"#!not really a shell\n"),
        ("bin/link", tarfile.SYMTYPE, 0o777, "sh"),
        ("abs", tarfile.SYMTYPE, 0o777, "/etc/os-release"),
        ("etc", tarfile.DIRTYPE, 0o755, None),
        ("etc/private", tarfile.REGTYPE, 0o600, b"secret\n"),
        ("keep", tarfile.DIRTYPE, 0o750, None),
        ("keep/a", tarfile.REGTYPE, 0o640, b"second a\n"),
        ("keep/b", tarfile.REGTYPE, 0o644, os.urandom(300_000)),
    ]))
    run("umoci", "raw", "add-layer", "--image", f"{layout}:t", str(second))
    third = tmp_path / "third.tar"
    third.write_bytes(layer_tar([
        (".wh.gone.txt", tarfile.REGTYPE, 0o644, b""),
        ("opaque", tarfile.DIRTYPE, 0o755, None),
        ("opaque/.wh..wh..opq", tarfile.REGTYPE, 0o644, b""),
        ("opaque/new", tarfile.REGTYPE, 0o644, b"only this one\n"),
        ("bin", tarfile.DIRTYPE, 0o755, None),
        ("bin/.wh.link", tarfile.REGTYPE, 0o644, b""),
    ]))
    run("umoci", "raw", "add-layer", "--image", f"{layout}:t", str(third))
    return layout


def test_rootfs_of_a_umoci_image_equals_umoci_unpack(
        client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path, mounter: Mounter) -> None:
    layout = build_image(tmp_path)
    bundle = tmp_path / "bundle"
    run("umoci", "unpack", "--rootless", "--image", f"{layout}:t", str(bundle))
    skopeo_copy(layout, "t", registry, f"{repo}:img")
    mnt = mounter(f"{registry.host}/{repo}")
    image = mnt / "img"
    assert "rootfs" not in os.listdir(image) and "layers" not in os.listdir(image)  # hidden
    rootfs = image / "rootfs"
    assert sorted(os.listdir(rootfs)) == sorted(os.listdir(bundle / "rootfs"))
    expected = tree_of(bundle / "rootfs")
    assert "gone.txt" not in expected and "opaque/old1" not in expected  # the reference applied them
    assert tree_of(rootfs) == expected
    assert (rootfs / "etc" / "os-release").read_bytes() == b'NAME="ocifs test"\nID=ocifs\n'
    assert os.readlink(rootfs / "abs") == "/etc/os-release"  # shown, never followed
    assert stat.S_ISLNK((rootfs / "abs").lstat().st_mode)
    assert (rootfs / "etc" / "private").stat().st_mtime == 1_700_000_000
    # each layer's own files, whiteouts included
    manifest = client.get_manifest(repo, "img")
    count = len(manifest.layers)  # type: ignore[union-attr]
    assert count == 7
    assert os.listdir(image / "layers") == [str(n) for n in range(count)]
    last = image / "layers" / str(count - 1)
    assert sorted(os.listdir(last)) == [".wh.gone.txt", "bin", "opaque"]
    assert sorted(os.listdir(last / "opaque")) == [".wh..wh..opq", "new"]
    assert (image / "layers" / str(count - 2) / "keep" / "a").read_bytes() == b"second a\n"
    assert errno_of(lambda: os.listdir(image / "layers" / str(count))) == errno.ENOENT
    # read-only, in a writable mount too
    assert errno_of(lambda: (rootfs / "new").write_bytes(b"x")) == errno.EROFS
    assert errno_of(lambda: os.unlink(rootfs / "etc" / "os-release")) == errno.EROFS
    assert errno_of(lambda: os.mkdir(rootfs / "d")) == errno.EROFS


def test_a_first_look_that_times_out_goes_on_in_the_background(
        registry: RunningRegistry, repo: str, tmp_path: Path, mounter: Mounter) -> None:
    """A layer that takes longer than --timeout to download: the first look answers ETIMEDOUT
    but the download and index go on, so a look after it has had time succeeds at once, and
    the layer was downloaded once."""
    from .faultproxy import FaultProxy

    layout = tmp_path / "layout"
    size = 12 << 20  # at 1 MiB/s: 4 s before the store even tries parallel streams
    build_umoci_image(layout, "t", {"etc/os-release": b"ID=slow\n", "big": os.urandom(size)})
    skopeo_copy(layout, "t", registry, f"{repo}:img")
    slow = FaultProxy(registry.host, rate=1 << 20)  # 1 MiB/s per connection: several seconds
    try:
        mnt = mounter(f"{slow.host}/{repo}", "--read-only", "--timeout", "3")
        rootfs = mnt / "img" / "rootfs"
        assert errno_of(lambda: os.listdir(rootfs)) == errno.ETIMEDOUT
        time.sleep(1)
        assert slow.bytes_sent("GET", r".*/blobs/sha256:.*") > 0  # still downloading, nobody waiting
        for _ in range(60):
            time.sleep(0.5)
            if not any(code is None for code in slow.requests("GET", r".*/blobs/sha256:.*")) \
                    and slow.bytes_sent("GET", r".*/blobs/sha256:.*") >= size:
                break
        time.sleep(0.5)  # the index is written after the last byte
        assert sorted(os.listdir(rootfs)) == ["big", "etc"]
        assert (rootfs / "etc" / "os-release").read_bytes() == b"ID=slow\n"
        assert slow.bytes_sent("GET", r".*/blobs/sha256:.*") < size * 1.25  # not downloaded again
    finally:
        slow.close()
