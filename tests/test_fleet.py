"""Machines share downloads through a pull-through cache, not through ocifs (issue "Daily
use", 8): Debian's docker-registry in proxy mode in front of the upstream, ocifs mounts on
several machines (here: two mounts with two cache directories) pointed at it with `--mirror`.
Each blob then leaves the upstream once."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ocifs.digest import Digest

from .conftest import Mounter, make_client
from .content import push_artifact
from .faultproxy import FaultProxy
from .registry_server import RunningRegistry, start_registry

MiB = 1024 * 1024


@pytest.fixture
def pull_through(tmp_path: Path, registry: RunningRegistry) -> Iterator[tuple[RunningRegistry, FaultProxy]]:
    """(a pull-through registry, the counting proxy between it and the upstream registry)."""
    upstream = FaultProxy(registry.host)
    cache = start_registry(tmp_path / "pull-through", pull_through=f"http://{upstream.host}")
    try:
        yield cache, upstream
    finally:
        cache.stop()
        upstream.close()


def test_two_mounts_behind_a_pull_through_cache_download_each_blob_once_from_upstream(
        registry: RunningRegistry, repo: str, pull_through: tuple[RunningRegistry, FaultProxy],
        mounter: Mounter, tmp_path: Path) -> None:
    cache, upstream = pull_through
    data = os.urandom(8 * MiB)
    push_artifact(make_client(registry), repo, "v1", {"model.bin": data, "notes.txt": b"fleet"})
    digest = Digest.of(data)
    source = f"{registry.host}/{repo}"
    mounts = [mounter(source, "--read-only", "--mirror", cache.url, cache_dir=tmp_path / f"cache{i}")
              for i in range(2)]
    def upstream_blob_gets() -> list[int | None]:
        return [status for method, path, status in upstream.seen
                if method == "GET" and re.fullmatch(rf"/v2/{re.escape(repo)}/blobs/{digest}", path)]

    seen: list[int] = []
    for mnt in mounts:
        read = subprocess.run(["cat", str(mnt / "v1" / "model.bin")], capture_output=True, timeout=120,
                              check=True)
        assert read.stdout == data
        assert (mnt / "v1" / "notes.txt").read_bytes() == b"fleet"
        seen.append(len(upstream_blob_gets()))
    assert 200 in upstream_blob_gets()  # the first machine's read went through to the upstream...
    assert seen[1] == seen[0], f"the second machine downloaded from upstream again: {upstream_blob_gets()}"
