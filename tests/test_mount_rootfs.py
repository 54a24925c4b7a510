"""Container images from the inside through a real mount on the real registry (issue 11, item
2): an image built by umoci, with several layers, a whiteout and an opaque directory, copied in
by skopeo (as gzip, as zstd, and as both mixed), shows a hidden `rootfs/` equal to what
`umoci unpack` makes of it, and `layers/<n>/`."""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import struct
import tarfile
import time
from pathlib import Path

import pytest
import zstandard

from ocifs.digest import Digest
from ocifs.model import (
    OCI_CONFIG,
    OCI_LAYER_TAR_GZIP,
    OCI_LAYER_TAR_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    build_manifest,
)
from ocifs.registry import RegistryClient

from .clients import build_umoci_image, run, skopeo_copy
from .conftest import Mounter
from .content import push_blob
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


def build_image(tmp_path: Path, *, zstd_below_last: bool = False) -> tuple[Path, Path]:
    """The image's layout, and the same image with gzip layers only (umoci 0.4 unpacks no zstd).
    `zstd_below_last`: skopeo recompresses every layer but the last to zstd, then umoci adds the
    last one (gzip) on top: an image that mixes both."""
    layout = tmp_path / "layout"
    # Layers unique to this test: skopeo's blob info cache (shared, kept across runs) would
    # otherwise reuse a layer pushed before in another compression instead of compressing it.
    unique = 1_600_000_000 + int.from_bytes(os.urandom(3), "big")
    # One layer per file (umoci insert), then two layers of our own (umoci raw add-layer).
    build_umoci_image(layout, "t", mtime=unique, files={
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
    image = layout
    if zstd_below_last:
        image = tmp_path / "mixed"
        run("skopeo", "copy", "--quiet", "--dest-compress-format", "zstd", f"oci:{layout}:t", f"oci:{image}:t")
    third = tmp_path / "third.tar"
    third.write_bytes(layer_tar([
        (".wh.gone.txt", tarfile.REGTYPE, 0o644, b""),
        ("opaque", tarfile.DIRTYPE, 0o755, None),
        ("opaque/.wh..wh..opq", tarfile.REGTYPE, 0o644, b""),
        ("opaque/new", tarfile.REGTYPE, 0o644, f"only this one ({unique})\n".encode()),
        ("bin", tarfile.DIRTYPE, 0o755, None),
        ("bin/.wh.link", tarfile.REGTYPE, 0o644, b""),
    ]))
    for target in {layout, image}:
        run("umoci", "raw", "add-layer", "--image", f"{target}:t", str(third))
    return image, layout


GZIP, ZSTD = OCI_LAYER_TAR_GZIP, OCI_LAYER_TAR_ZSTD
MAGIC = {GZIP: b"\x1f\x8b", ZSTD: b"\x28\xb5\x2f\xfd"}
COMPRESSIONS = {  # how the image is pushed -> its layers' media types, bottom first
    "gzip": [GZIP] * 7,
    "zstd": [ZSTD] * 7,  # skopeo copy --dest-compress-format zstd
    "mixed": [ZSTD] * 6 + [GZIP],
}


@pytest.mark.parametrize("compression", list(COMPRESSIONS))
def test_rootfs_of_a_umoci_image_equals_umoci_unpack(
        client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path, mounter: Mounter,
        compression: str) -> None:
    layout, reference = build_image(tmp_path, zstd_below_last=compression == "mixed")
    bundle = tmp_path / "bundle"
    run("umoci", "unpack", "--rootless", "--image", f"{reference}:t", str(bundle))
    options = ("--dest-compress-format", "zstd") if compression == "zstd" else ()
    skopeo_copy(layout, "t", registry, f"{repo}:img", *options)
    manifest = client.get_manifest(repo, "img")
    assert isinstance(manifest, Manifest)
    assert [layer.media_type for layer in manifest.layers] == COMPRESSIONS[compression]
    mnt = mounter(f"{registry.host}/{repo}")
    image = mnt / "img"
    assert "rootfs" not in os.listdir(image) and "layers" not in os.listdir(image)  # hidden
    for layer in manifest.layers:  # the blobs are what their media types say (ocifs goes by the bytes)
        suffix = ".tar.zst" if layer.media_type == ZSTD else ".tar.gz"
        with open(image / (layer.digest.filename + suffix), "rb") as blob:
            assert blob.read(4).startswith(MAGIC[layer.media_type])
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
    count = len(manifest.layers)
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


def test_zstd_layers_in_frames_and_a_truncated_one(
        client: RegistryClient, registry: RunningRegistry, repo: str, mounter: Mounter) -> None:
    """A layer in several zstd frames with skippable frames among them (as zstd:chunked lays
    them out; skopeo 1.9 hangs writing zstd:chunked) reads; a truncated one answers EIO in
    `rootfs/` and its `layers/<n>/`, and nothing else."""
    data = os.urandom(100_000)
    tar = layer_tar([("etc", tarfile.DIRTYPE, 0o755, None), ("etc/data", tarfile.REGTYPE, 0o644, data),
                     ("etc/small", tarfile.REGTYPE, 0o644, b"small\n")])
    compressor = zstandard.ZstdCompressor(write_checksum=True)
    toc = struct.pack("<II", 0x184D2A50, 11) + b'{"toc": []}'  # a skippable frame
    good = compressor.compress(tar[:50_000]) + toc + compressor.compress(tar[50_000:]) + toc
    other = layer_tar([("other", tarfile.REGTYPE, 0o644, os.urandom(10_000))])
    cut = compressor.compress(other)[:-100]
    layers = [Descriptor.for_bytes(OCI_LAYER_TAR_ZSTD, blob) for blob in (good, cut)]
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [str(Digest.of(tar)), str(Digest.of(other))]}}).encode()
    for blob in (good, cut, config):
        push_blob(client, repo, blob)
    manifest = build_manifest(layers, config=Descriptor.for_bytes(OCI_CONFIG, config), artifact_type=None)
    client.put_manifest(repo, "img", manifest, OCI_MANIFEST)
    image = mounter(f"{registry.host}/{repo}") / "img"
    assert (image / "layers" / "0" / "etc" / "data").read_bytes() == data
    assert (image / "layers" / "0" / "etc" / "small").read_bytes() == b"small\n"
    assert errno_of(lambda: os.listdir(image / "layers" / "1")) == errno.EIO
    assert errno_of(lambda: os.listdir(image / "rootfs")) == errno.EIO
    assert (image / (layers[1].digest.filename + ".tar.zst")).read_bytes() == cut  # the raw blob reads
    assert (image / "layers" / "0" / "etc" / "small").read_bytes() == b"small\n"
