"""Metadata at network speed (issue "Close to the wire", item 4), counted at a proxy in front
of the real registry: a tag directory costs one manifest GET (no HEAD first), a walk through a
repository's tags fetches their manifests in parallel without fetching any twice, and a second
walk within the TTL asks the registry nothing."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

from ocifs.registry import RegistryClient

from .conftest import Mounter
from .content import push_artifact
from .faultproxy import FaultProxy


def manifest_requests(proxy: FaultProxy, repository: str) -> Counter[tuple[str, str]]:
    """(method, reference) -> how many times the proxy saw it for `repository`."""
    counted: Counter[tuple[str, str]] = Counter()
    prefix = f"/v2/{repository}/manifests/"
    for method, path, _ in list(proxy.seen):
        if path.startswith(prefix):
            counted[(method, path[len(prefix):])] += 1
    return counted


def test_a_walk_fetches_each_manifest_once_and_a_second_walk_nothing(
        client: RegistryClient, repo: str, proxy: FaultProxy, mounter: Mounter) -> None:
    tags = [f"v{i}" for i in range(12)]
    for tag in tags:
        push_artifact(client, repo, tag, {f"{tag}.txt": tag.encode()})
    mnt = mounter(f"{proxy.host}/{repo}", "--read-only", "--ttl", "60")
    walk = subprocess.run(["ls", "-lR", str(mnt)], capture_output=True, text=True, timeout=60)
    assert walk.returncode == 0, walk.stderr
    for tag in tags:
        assert f"{tag}.txt" in walk.stdout
    counted = manifest_requests(proxy, repo)
    # One GET per tag, and nothing else: no HEAD before it, nothing fetched twice by the
    # walk and the background fetches racing for the same tag.
    assert counted == Counter({("GET", tag): 1 for tag in tags}), counted
    before = len(proxy.seen)
    again = subprocess.run(["ls", "-lR", str(mnt)], capture_output=True, text=True, timeout=60)
    assert again.stdout == walk.stdout
    assert proxy.seen[before:] == []  # within the TTL: answered from memory


def test_looking_at_one_tag_fetches_only_that_tag(client: RegistryClient, repo: str, proxy: FaultProxy,
                                                  mounter: Mounter, tmp_path: Path) -> None:
    """Reading one file does not fetch every other tag's manifest (that is for walks)."""
    for tag in ("a", "b", "c", "d"):
        push_artifact(client, repo, tag, {"f.txt": tag.encode()})
    mnt = mounter(f"{proxy.host}/{repo}", "--read-only")
    assert sorted(p.name for p in mnt.iterdir()) == ["a", "b", "c", "d"]
    assert (mnt / "b" / "f.txt").read_bytes() == b"b"
    counted = manifest_requests(proxy, repo)
    assert {reference for _, reference in counted} == {"b"}, counted
