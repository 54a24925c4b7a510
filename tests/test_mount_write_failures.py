"""The write path when things go wrong: nothing is lost, errors are clear errnos."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from ocifs.digest import Digest
from ocifs.registry import RegistryClient

from .conftest import Mounter, make_client
from .content import push_artifact
from .helpers import layer_titles as layer_titles  # re-exported: other tests import it from here
from .helpers import peak_rss_kib, wait_gone, wait_until
from .mounts import daemon_pid, is_mounted
from .registry_server import RunningRegistry, start_registry


def test_registry_stopped_during_cp_keeps_the_file_until_a_later_flush(tmp_path: Path, mounter: Mounter) -> None:
    workdir = tmp_path / "registry"
    server = start_registry(workdir)
    port = int(server.host.rsplit(":", 1)[1])
    client = make_client(server)
    push_artifact(client, "w/repo", "t", {"old.txt": b"old"})
    mnt = mounter(f"{server.host}/w/repo", "--timeout", "2")
    assert os.listdir(mnt / "t") == ["old.txt"]
    server.stop()
    source = tmp_path / "precious.txt"
    source.write_bytes(b"do not lose me\n" * 1000)
    result = subprocess.run(["cp", str(source), str(mnt / "t") + "/"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Input/output error" in result.stderr
    # The staged file survives, visible and readable in the mount.
    assert sorted(os.listdir(mnt / "t")) == ["old.txt", "precious.txt"]
    assert (mnt / "t" / "precious.txt").read_bytes() == source.read_bytes()
    server = start_registry(workdir, port=port)
    try:
        # No hold after a refused connection: the registry is usable at once.
        with open(mnt / "t" / "precious.txt", "ab"):
            pass  # closing a handle opened for writing flushes: the push happens now
        assert layer_titles(client, "w/repo", "t") == {"old.txt": Digest.of(b"old"),
                                                       "precious.txt": Digest.of(source.read_bytes())}
        assert (mnt / "t" / "precious.txt").read_bytes() == source.read_bytes()
    finally:
        server.stop()


def test_disk_full_during_staging_is_enospc(client: RegistryClient, registry: RunningRegistry, repo: str,
                                            tmp_path: Path, mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f": b"x"})
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(small)], check=True)
    try:
        mnt = mounter(f"{registry.host}/{repo}", cache_dir=small / "cache")
        big = tmp_path / "big.bin"
        with open(big, "wb") as file:
            file.write(os.urandom(96 * 1024 * 1024))
        result = subprocess.run(["cp", str(big), str(mnt / "t") + "/"], capture_output=True, text=True, timeout=120)
        assert result.returncode != 0
        assert "No space left on device" in result.stderr
        assert set(layer_titles(client, repo, "t")) == {"f"}  # nothing half-pushed
        # Removing the partial file frees the space; small files then work again.
        if (mnt / "t" / "big.bin").exists():
            os.unlink(mnt / "t" / "big.bin")
        (mnt / "t" / "small.txt").write_bytes(b"fits")
        assert set(layer_titles(client, repo, "t")) == {"f", "small.txt"}
        # Below the free-space floor, files are refused when created.
        filler = small / "filler"
        subprocess.run(["fallocate", "-l", "60m", str(filler)], check=True)
        with pytest.raises(OSError) as caught:
            open(mnt / "t" / "refused.txt", "wb")
        assert caught.value.errno == errno.ENOSPC
        mounter.unmount_all()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_registry_that_refuses_deletes(tmp_path: Path, mounter: Mounter) -> None:
    server = start_registry(tmp_path / "nodelete", deletes=False)
    try:
        client = make_client(server)
        push_artifact(client, "d/repo", "t", {"f": b"x"})
        mnt = mounter(f"{server.host}/d/repo")
        os.unlink(mnt / "t" / "f")  # removing a file is a manifest edit: fine
        with pytest.raises(OSError) as caught:
            os.rmdir(mnt / "t")
        assert caught.value.errno == errno.EPERM
        assert "t" in client.tags("d/repo")
    finally:
        server.stop()


def test_big_file_pushed_intact_with_flat_memory(client: RegistryClient, registry: RunningRegistry, repo: str,
                                                 tmp_path: Path, mounter: Mounter) -> None:
    push_artifact(client, repo, "big", {"small": b"x"})
    mnt = mounter(f"{registry.host}/{repo}")
    source = tmp_path / "big.bin"
    hasher = hashlib.sha256()
    with open(source, "wb") as file:
        for _ in range(40):
            block = os.urandom(8 * 1024 * 1024)
            hasher.update(block)
            file.write(block)
    pid = daemon_pid(mnt)
    subprocess.run(["cp", str(source), str(mnt / "big") + "/"], check=True, timeout=300)
    digest = Digest("sha256", hasher.hexdigest())
    assert layer_titles(client, repo, "big")["big.bin"] == digest
    assert client.blob_size(repo, digest) == 320 * 1024 * 1024
    peak = peak_rss_kib(pid)
    assert peak < 200 * 1024, f"daemon peak RSS {peak} KiB for a 320 MiB file"
    # Read back through the mount from the cache: no download, same bytes.
    check = hashlib.sha256()
    with open(mnt / "big" / "big.bin", "rb") as file:
        while block := file.read(4 * 1024 * 1024):
            check.update(block)
    assert check.hexdigest() == digest.hex
    assert is_mounted(mnt)


def test_staged_file_survives_kill_9_and_is_pushed_by_the_next_mount(tmp_path: Path, mounter: Mounter) -> None:
    import signal

    workdir = tmp_path / "registry"
    server = start_registry(workdir)
    port = int(server.host.rsplit(":", 1)[1])
    client = make_client(server)
    push_artifact(client, "k/repo", "t", {"old.txt": b"old"})
    mnt = mounter(f"{server.host}/k/repo", "--timeout", "2")
    assert os.listdir(mnt / "t") == ["old.txt"]
    server.stop()
    source = tmp_path / "saved.txt"
    source.write_bytes(b"written while the registry was down\n")
    result = subprocess.run(["cp", str(source), f"{mnt}/t/"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0  # the push failed: the file stays staged
    pid = daemon_pid(mnt)
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    mounter.unmount_all()
    server = start_registry(workdir, port=port)
    try:
        mnt = mounter(f"{server.host}/k/repo")
        # The next mount of the same SOURCE takes the file back and pushes it.
        wait_until(lambda: "saved.txt" in layer_titles(client, "k/repo", "t"), timeout=20, interval=0.2)
        assert layer_titles(client, "k/repo", "t")["saved.txt"] == Digest.of(b"written while the registry was down\n")
        assert (mnt / "t" / "saved.txt").read_bytes() == b"written while the registry was down\n"
        # The push returns once the tag is checked after the PUT; then the staged file goes.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and list((mounter.cache_dir / "staging").glob("stage-*")):
            time.sleep(0.1)
        assert not list((mounter.cache_dir / "staging").glob("stage-*"))
    finally:
        server.stop()
