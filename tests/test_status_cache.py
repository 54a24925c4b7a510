"""`ocifs status`, `.ocifs/status` and `ocifs cache info|prune|clear`, through real processes:
a live cold read made slow by the fault proxy, cache commands beside a live mount."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ocifs.digest import Digest
from ocifs.registry import RegistryClient

from .conftest import Mounter
from .content import push_artifact
from .faultproxy import FaultProxy
from .helpers import run, wait_until
from .registry_server import RunningRegistry

KiB = 1024
MiB = 1024 * KiB


def ocifs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "ocifs", *args, check=check, timeout=60)


def status_json(mnt: Path) -> dict[str, Any]:
    """`ocifs status MNT --json`: the one mount's status."""
    entries = json.loads(ocifs("status", str(mnt), "--json").stdout)
    assert len(entries) == 1 and entries[0]["mountpoint"] == str(mnt.resolve())
    status = entries[0]["status"]
    assert isinstance(status, dict)
    return status


def cache_info(cache: Path) -> dict[str, Any]:
    data = json.loads(ocifs("cache", "info", "--cache-dir", str(cache), "--json").stdout)
    assert isinstance(data, dict)
    return data


def fetching(status: dict[str, Any], digest: Digest) -> int | None:
    """Bytes on disk of `digest` while it is being fetched, else None."""
    for blob in status["store"]["fetching"]:
        if blob["digest"] == str(digest):
            assert blob["size"] > 0
            return int(blob["on_disk"])
    return None


def start_cat(path: Path, out: Path) -> subprocess.Popen[bytes]:
    with open(out, "wb") as sink:
        return subprocess.Popen(["cat", str(path)], stdout=sink)


def test_status_shows_a_cold_read_progress_and_the_counters(
        client: RegistryClient, repo: str, proxy: FaultProxy, mounter: Mounter, tmp_path: Path) -> None:
    data = os.urandom(6 * MiB)
    digest = Digest.of(data)
    push_artifact(client, repo, "t", {"big.bin": data})
    proxy.extra_headers = [("ratelimit-limit", "100;w=21600"), ("ratelimit-remaining", "76;w=21600")]
    # About 2.5 MB/s: a few seconds for the whole blob.
    proxy.drip("GET", f"/v2/{repo}/blobs/{digest}", piece=128 * KiB, interval=0.05)
    mnt = mounter(f"{proxy.host}/{repo}", "--read-only")
    out = tmp_path / "copy"
    cat = start_cat(mnt / "t" / "big.bin", out)
    try:
        seen: list[int] = []

        def progressed() -> bool:
            on_disk = fetching(status_json(mnt), digest)
            if on_disk is not None and (not seen or on_disk != seen[-1]):
                seen.append(on_disk)
            return len(seen) >= 2

        assert wait_until(progressed, timeout=20, interval=0.2), f"no progress seen: {seen}"
        assert seen[0] < seen[-1] <= len(data)
        # The hidden file itself, read with cat (direct_io: whole JSON whatever stat said).
        hidden = json.loads(run("cat", str(mnt / ".ocifs" / "status")).stdout)
        assert hidden["source"] == f"{proxy.host}/{repo}"
        assert hidden["cache_dir"] == str(mounter.cache_dir)
        text = ocifs("status").stdout  # every mount, pretty-printed
        assert str(mnt.resolve()) in text and "fetching:" in text and str(digest) in text
        assert cat.wait(60) == 0
    finally:
        if cat.poll() is None:
            cat.kill()
    assert out.read_bytes() == data
    status = status_json(mnt)
    store = status["store"]
    assert store["fetched"] >= len(data) and store["served"] >= len(data)
    assert store["reads_in_flight"] == 0 and fetching(status, digest) is None
    assert status["cache"]["usage"] >= len(data)
    assert status["registry"]["rate_limit"]["ratelimit-remaining"] == "76;w=21600"
    text = ocifs("status", str(mnt)).stdout
    assert "rate limit: 76;w=21600 remaining of 100;w=21600" in text
    assert "pushes:    0 pending, 0 failed" in text


def test_status_of_a_path_that_is_not_an_ocifs_mount(tmp_path: Path) -> None:
    result = ocifs("status", str(tmp_path), check=False)
    assert result.returncode == 2 and "not an ocifs mount" in result.stderr


def test_cache_commands_beside_a_cold_read(
        client: RegistryClient, repo: str, proxy: FaultProxy, mounter: Mounter, tmp_path: Path) -> None:
    """prune and clear while a file is being fetched: the read completes with the right bytes,
    staged files stay."""
    data = os.urandom(4 * MiB)
    digest = Digest.of(data)
    push_artifact(client, repo, "t", {"big.bin": data})
    proxy.drip("GET", f"/v2/{repo}/blobs/{digest}", piece=128 * KiB, interval=0.05)
    mnt = mounter(f"{proxy.host}/{repo}", "--read-only")
    cache = mounter.cache_dir
    # A staged file left by some mount: the cache commands never touch it.
    staged = cache / "staging" / "stage-test"
    staged.parent.mkdir(parents=True, exist_ok=True)
    staged.write_bytes(b"not pushed yet")
    staged.with_name("stage-test.json").write_text("{}")
    out = tmp_path / "copy"
    cat = start_cat(mnt / "t" / "big.bin", out)
    try:
        assert wait_until(lambda: (fetching(status_json(mnt), digest) or 0) > 0, timeout=20, interval=0.1)
        info = cache_info(cache)
        assert info["partials"]["count"] == 1 and info["staged"] == {"count": 1, "bytes": 14}
        pruned = ocifs("cache", "prune", "--cache-dir", str(cache), "--max-size", "0").stdout
        assert "in use, kept" in pruned  # the partial being downloaded
        ocifs("cache", "clear", "--cache-dir", str(cache))
        assert cat.wait(60) == 0
    finally:
        if cat.poll() is None:
            cat.kill()
    assert out.read_bytes() == data
    assert staged.read_bytes() == b"not pushed yet"
    ocifs("cache", "clear", "--cache-dir", str(cache))
    info = cache_info(cache)
    assert info["blobs"]["count"] == 0 and info["partials"]["count"] == 0
    assert info["staged"]["count"] == 1
    assert (mnt / "t" / "big.bin").read_bytes() == data  # fetched again, or from the page cache


def test_prune_spares_a_blob_a_live_mount_holds_open_and_clear_keeps_it_readable(
        client: RegistryClient, registry: RunningRegistry, repo: str, mounter: Mounter) -> None:
    a, b = os.urandom(MiB), os.urandom(2 * MiB)
    push_artifact(client, repo, "t", {"a.bin": a, "b.bin": b})
    mnt = mounter(f"{registry.host}/{repo}", "--read-only")
    cache = mounter.cache_dir
    assert (mnt / "t" / "a.bin").read_bytes() == a and (mnt / "t" / "b.bin").read_bytes() == b
    blob_a, blob_b = (cache / "blobs" / "sha256" / Digest.of(x).hex for x in (a, b))
    assert wait_until(lambda: blob_a.is_file() and blob_b.is_file(), timeout=10)
    with open(mnt / "t" / "a.bin", "rb", buffering=0) as held:
        assert wait_until(lambda: status_json(mnt)["store"]["open_blobs"] >= 1, timeout=5)
        result = ocifs("cache", "prune", "--cache-dir", str(cache), "--max-size", "0").stdout
        assert "in use, kept" in result, result
        assert blob_a.is_file() and not blob_b.exists()
        # clear removes even an open blob: the mount keeps reading through its fd.
        ocifs("cache", "clear", "--cache-dir", str(cache))
        assert not blob_a.exists() and cache_info(cache)["blobs"]["count"] == 0
        os.posix_fadvise(held.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(held.fileno(), len(a), 0) == a
    # After the clear, the next open fetches again.
    time.sleep(0.1)
    assert (mnt / "t" / "b.bin").read_bytes() == b


def test_cache_info_of_a_missing_cache_creates_nothing(tmp_path: Path) -> None:
    result = ocifs("cache", "info", "--cache-dir", str(tmp_path / "none"))
    assert "none yet" in result.stdout and not (tmp_path / "none").exists()
    assert ocifs("cache", "clear", "--cache-dir", str(tmp_path / "none")).returncode == 0
    assert not (tmp_path / "none").exists()


def test_cache_commands_use_the_mount_default_cache_dir(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    result = subprocess.run([sys.executable, "-m", "ocifs", "cache", "info"], capture_output=True,
                            text=True, env=env, check=True)
    assert str(tmp_path / "xdg" / "ocifs") in result.stdout
