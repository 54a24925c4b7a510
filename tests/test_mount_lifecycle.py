"""Mounting and unmounting as users meet it: busy and stale mountpoints, dead daemons,
failing and hanging registries."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ocifs.model import OCI_MANIFEST
from ocifs.registry import RegistryClient

from .conftest import Mounter, make_client
from .content import push_artifact
from .fakeserver import FakeServer, Reply, Request
from .helpers import wait_gone as wait_gone  # re-exported: other tests import it from here
from .mounts import daemon_pid as daemon_pid  # re-exported: other tests import it from here
from .mounts import is_mounted, ocifs
from .registry_server import RunningRegistry, start_registry


def test_busy_mountpoint_is_refused(client: RegistryClient, registry: RunningRegistry, repo: str,
                                    mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f": b"x"})
    mnt = mounter(f"{registry.host}/{repo}")
    result = ocifs("mount", "--cache-dir", str(mounter.cache_dir), f"{registry.host}/{repo}", str(mnt))
    assert result.returncode != 0
    assert "busy" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (mnt / "t" / "f").read_bytes() == b"x"  # the first mount is untouched


def test_killed_daemon_leaves_a_stale_mount_that_umount_and_mount_clean_up(
        client: RegistryClient, registry: RunningRegistry, repo: str, mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f": b"x"})
    mnt = mounter(f"{registry.host}/{repo}")
    pid = daemon_pid(mnt)
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    with pytest.raises(OSError) as caught:
        os.listdir(mnt)
    assert caught.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    # Mounting again over the stale mount cleans it up first.
    result = ocifs("mount", "--cache-dir", str(mounter.cache_dir), f"{registry.host}/{repo}", str(mnt))
    assert result.returncode == 0, result.stderr
    assert (mnt / "t" / "f").read_bytes() == b"x"
    # And umount works after the daemon died.
    pid = daemon_pid(mnt)
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    result = ocifs("umount", str(mnt))
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mnt)
    assert ocifs("umount", str(mnt)).returncode == 0  # already unmounted: fine


def test_sigterm_unmounts_cleanly(client: RegistryClient, registry: RunningRegistry, repo: str,
                                  mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f": b"x"})
    mnt = mounter(f"{registry.host}/{repo}")
    pid = daemon_pid(mnt)
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid)
    assert not is_mounted(mnt)


def test_fuse_failure_is_one_line_and_leaves_nothing_mounted(registry: RunningRegistry, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = ocifs("mount", "--cache-dir", str(tmp_path / "cache"), "-o", "no_such_fuse_option",
                   registry.host, str(mnt))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ocifs: "), result.stderr
    assert "no_such_fuse_option" in lines[0]
    assert not is_mounted(mnt)


def test_cache_dir_is_private(client: RegistryClient, registry: RunningRegistry, repo: str,
                              mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f": b"x"})
    mnt = mounter(f"{registry.host}/{repo}")
    assert (mnt / "t" / "f").read_bytes() == b"x"
    assert mounter.cache_dir.stat().st_mode & 0o777 == 0o700


def test_registry_gone_while_mounted_serves_what_is_cached(tmp_path: Path, mounter: Mounter) -> None:
    server = start_registry(tmp_path / "registry")
    try:
        client = make_client(server)
        push_artifact(client, "gone/repo", "v1", {"cached.txt": b"in the cache", "other.txt": b"never read"})
        mnt = mounter(f"{server.host}/gone/repo", "--ttl", "0.5", "--timeout", "2")
        assert (mnt / "v1" / "cached.txt").read_bytes() == b"in the cache"
    finally:
        server.stop()
    time.sleep(1.5)  # past the TTL and the kernel's attribute cache
    started = time.monotonic()
    assert os.listdir(mnt) == ["v1"]
    assert sorted(os.listdir(mnt / "v1")) == ["cached.txt", "other.txt"]
    assert (mnt / "v1" / "cached.txt").read_bytes() == b"in the cache"
    with pytest.raises(OSError) as caught:
        (mnt / "v1" / "other.txt").read_bytes()
    assert caught.value.errno in (errno.EHOSTUNREACH, errno.ETIMEDOUT)
    assert time.monotonic() - started < 30


def test_hanging_registry_fails_reads_with_etimedout(tmp_path: Path, mounter: Mounter) -> None:
    """A registry that answers metadata but never sends blob bytes: the reader gets
    ETIMEDOUT within the timeouts, never a hang."""
    from ocifs.model import ANNOTATION_TITLE, EMPTY_DESCRIPTOR, Descriptor, build_manifest

    data = b"bytes that never arrive"
    layer = Descriptor.for_bytes("application/vnd.oci.image.layer.v1.tar", data, {ANNOTATION_TITLE: "slow.bin"})
    manifest = build_manifest([layer])
    from ocifs.digest import Digest

    digest = str(Digest.of(manifest))
    server = FakeServer()
    headers = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": digest}
    server.route("GET", "/v2/", Reply(200, b"{}"))
    server.route("GET", "/v2/hang/tags/list", Reply(200, {"name": "hang", "tags": ["v1"]}))
    server.route("HEAD", "/v2/hang/manifests/v1", Reply(200, b"", headers | {"Content-Length": str(len(manifest))}))
    for ref in ("v1", digest):
        server.route("GET", f"/v2/hang/manifests/{ref}", Reply(200, manifest, headers))

    def hang(request: Request) -> None:
        request.hang(60)

    server.route("GET", f"/v2/hang/blobs/{layer.digest}", hang)
    server.route("GET", f"/v2/hang/blobs/{EMPTY_DESCRIPTOR.digest}", Reply(200, b"{}"))
    try:
        mnt = mounter(f"{server.host}/hang", "--timeout", "1")
        assert os.listdir(mnt / "v1") == ["slow.bin"]
        started = time.monotonic()
        result = subprocess.run(["cat", str(mnt / "v1" / "slow.bin")], capture_output=True, timeout=60)
        elapsed = time.monotonic() - started
        assert result.returncode != 0
        assert b"timed out" in result.stderr.lower()
        assert elapsed < 30
    finally:
        server.close()


def test_offline_mount_serves_the_cache_after_a_restart(tmp_path: Path, mounter: Mounter) -> None:
    server = start_registry(tmp_path / "registry")
    host = server.host
    try:
        client = make_client(server)
        push_artifact(client, "off/repo", "v1", {"kept.txt": b"kept for offline use", "other.txt": b"not"})
        mnt = mounter(f"{host}/off/repo")
        assert (mnt / "v1" / "kept.txt").read_bytes() == b"kept for offline use"
        mounter.unmount_all()
    finally:
        server.stop()
    # Without --offline, an unreachable registry refuses the mount.
    (tmp_path / "x").mkdir()
    result = ocifs("mount", "--cache-dir", str(mounter.cache_dir), f"{host}/off/repo", str(tmp_path / "x"))
    assert result.returncode == 1
    assert "cannot reach" in result.stderr
    assert not is_mounted(tmp_path / "x")
    mnt = mounter(f"{host}/off/repo", "--offline")
    assert os.listdir(mnt) == ["v1"]
    assert sorted(os.listdir(mnt / "v1")) == ["kept.txt", "other.txt"]
    assert (mnt / "v1" / "kept.txt").read_bytes() == b"kept for offline use"
    with pytest.raises(OSError) as caught:
        (mnt / "v1" / "other.txt").read_bytes()
    assert caught.value.errno == errno.EHOSTUNREACH
    refs = mounter.cache_dir / "refs"
    assert refs.stat().st_mode & 0o777 == 0o700


def test_umount_of_a_busy_mount_says_so_and_keeps_it(client: RegistryClient, registry: RunningRegistry,
                                                    repo: str, mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f": b"x"})
    mnt = mounter(f"{registry.host}/{repo}")
    with open(mnt / "t" / "f", "rb"):
        result = ocifs("umount", str(mnt))
        assert result.returncode == 1
        assert "busy" in result.stderr.lower()
        assert is_mounted(mnt)
    assert ocifs("umount", str(mnt)).returncode == 0
    assert not is_mounted(mnt)
