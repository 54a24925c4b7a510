"""scripts/bench runs end to end and writes every figure (a smoke run: sizes are small and no
target is checked, benchmarks are not timed tests; byte counts are checked, they do not depend
on timing); the fault proxy's throttle slows what it forwards as configured."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from ocifs.registry import RegistryClient

from .content import push_blob
from .faultproxy import FaultProxy
from .mounts import fuse_mounts_under
from .registry_server import RunningRegistry

ROOT = Path(__file__).resolve().parent.parent

# Measurement -> figures that must be positive numbers, for every section.
READS = {
    "curl_get": ["seconds", "mib_s"],
    "oras_pull": ["seconds", "mib_s"],
    "cold_read": ["seconds", "mib_s", "ratio_curl", "ratio_oras_pull"],
    "parallel": ["curl_mib_s", "ocifs_mib_s", "ratio"],
    "first_byte": ["curl_ms", "ocifs_ms"],
    "read_4k": ["file_size", "bytes_fetched", "blob_requests"],
    "walk": ["cold_seconds", "cold_requests", "cold_connections", "ttl_seconds"],
    "rss": ["peak_mib"],
}
LOOPBACK_ONLY = {
    "warm": ["cat_cache_file_mib_s", "same_mount_mib_s", "after_remount_mib_s", "same_mount_ratio",
             "after_remount_ratio"],
    "curl_put": ["seconds", "mib_s"],
    "oras_push": ["seconds", "mib_s"],
    "cp_in": ["seconds", "mib_s", "ratio_curl_put", "ratio_oras_push"],
}

ROOTFS = {
    "image": ["layers", "compressed", "uncompressed", "files", "entries"],
    "reference": ["pull_seconds", "unpack_seconds", "seconds", "tar_x_seconds", "local_ls_seconds"],
    "first_ls": ["seconds", "bytes_fetched", "ratio_reference", "rss_mib", "cache_bytes"],
    "second_ls": ["seconds"],
    "remount_ls": ["seconds"],
    "cat_first": ["seconds", "bytes_fetched"],
    "cat_other": ["size", "seconds", "mib_s"],
    "throttled": ["pull_seconds", "first_ls_seconds", "bytes_fetched"],
    "rss": ["peak_mib"],
}


def positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_section(section: dict[str, Any], wanted: dict[str, list[str]], repos: int, tags: int) -> None:
    for name, figures in wanted.items():
        assert name in section, f"{name} missing"
        for figure in figures:
            assert positive(section[name].get(figure)), f"{name}.{figure} = {section[name].get(figure)!r}"
    walk = section["walk"]
    assert walk["files_seen"] == repos * tags and walk["ls_status"] == 0, walk
    # A walk asks at least the tag list and a manifest per tag; again within the TTL, a count.
    assert walk["cold_requests"] >= repos * (tags + 1)
    assert isinstance(walk["ttl_requests"], int) and walk["ttl_requests"] >= 0
    assert sum(walk["cold_kinds"].values()) == walk["cold_requests"]
    assert sum(walk["ttl_kinds"].values()) == walk["ttl_requests"]
    assert walk["cold_kinds"].get("GET /v2/walk/rN/manifests/tN 200", 0) >= repos * tags
    read_4k = section["read_4k"]
    assert 4096 <= read_4k["bytes_fetched"] <= read_4k["file_size"]
    assert 0 < section["first_byte"]["curl_ms"] < 10_000 and 0 < section["first_byte"]["ocifs_ms"] < 10_000
    assert 0 < section["rss"]["peak_mib"] < 4096


def check_rootfs(section: dict[str, Any]) -> None:
    for name, figures in ROOTFS.items():
        assert name in section, f"{name} missing"
        for figure in figures:
            assert positive(section[name].get(figure)), f"{name}.{figure} = {section[name].get(figure)!r}"
    image = section["image"]
    assert image["layers"] == 4 and image["entries"] > image["files"] >= 100
    # Every look lists the whole merged tree; the first downloads each layer once, later looks
    # and a read once indexed download nothing.
    for look in ("first_ls", "second_ls", "remount_ls"):
        assert section[look]["names"] == image["entries"] and section[look]["ls_status"] == 0, section[look]
    assert section["reference"]["local_ls_names"] == image["entries"]
    assert section["first_ls"]["bytes_fetched"] == image["compressed"]
    assert section["cat_first"]["bytes_fetched"] == image["compressed"]
    assert section["second_ls"]["bytes_fetched"] == 0 and section["remount_ls"]["bytes_fetched"] == 0
    assert section["cat_other"]["bytes_fetched"] == 0
    assert section["throttled"]["first_ls_names"] == image["entries"]
    assert section["throttled"]["bytes_fetched"] >= image["compressed"]
    assert 0 < section["rss"]["peak_mib"] < 4096


def test_quick_bench_writes_every_measurement(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    started = time.monotonic()
    # Its work directory under tmp_path: what it leaves behind is checked there, apart from
    # other test sessions' mounts.
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          env=os.environ | {"TMPDIR": str(tmp_path)})
    assert done.returncode == 0, f"bench failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert time.monotonic() - started < 240
    document = json.loads(out.read_text())
    assert document["complete"] and document["error"] is None
    params = document["params"]
    repos, tags = params["repos"], params["tags"]
    results = document["results"]
    check_section(results["loopback"], READS | LOOPBACK_ONLY, repos, tags)
    check_section(results[params["throttled_section"]], READS, repos, tags)
    check_rootfs(results["rootfs"])
    assert params["sections"] == ["loopback", "rootfs", "throttled"] and params["rootfs_size_mib"] == 4
    # Every row of the table is a finite figure, judged against its target or not at all.
    keys = {(row["section"], row["key"]) for row in document["rows"]}
    assert len(keys) == len(document["rows"])
    for row in document["rows"]:
        assert isinstance(row["value"], (int, float)) and row["value"] >= 0, row
        assert row["met"] in (True, False, None)
        assert (row["met"] is None) == (row["target"] in ("", "(FUSE bound, ~0.3x)")), row
    assert document["targets"]["judged"] == sum(1 for row in document["rows"] if row["met"] is not None)
    for text in ("targets met:", "cold", "ls -lR", "== rootfs ==", "first ls -R rootfs/", str(out)):
        assert text in done.stdout
    # Nothing stays mounted, and the bench's work directory is gone.
    assert not fuse_mounts_under(tmp_path)
    assert not list(tmp_path.glob("ocifs-bench-*"))


def test_throttled_proxy_adds_round_trips_and_paces_bodies(registry: RunningRegistry, client: RegistryClient,
                                                          repo: str) -> None:
    data = bytes(range(256)) * (4096 * 2)  # 2 MiB
    digest = push_blob(client, repo, data)
    proxy = FaultProxy(registry.host, latency=0.05, rate=8 * 2**20)
    try:
        with requests.Session() as session:
            started = time.monotonic()
            answer = session.get(f"http://{proxy.host}/v2/{repo}/blobs/{digest}", timeout=30)
            elapsed = time.monotonic() - started
            assert answer.content == data
            # A new connection and a request: two round trips; 2 MiB at 8 MiB/s: 0.25 s.
            assert elapsed >= 0.1 + 0.25 * 0.9
            started = time.monotonic()
            assert session.get(f"http://{proxy.host}/v2/", timeout=30).status_code == 200
            assert time.monotonic() - started >= 0.05  # one more round trip, on the same connection
        assert proxy.connections == 1
        assert proxy.bytes_sent("GET", f"/v2/{repo}/blobs/.*") == len(data)
        proxy.throttle()  # off: as fast as before
        started = time.monotonic()
        assert requests.get(f"http://{proxy.host}/v2/{repo}/blobs/{digest}", timeout=30).content == data
        assert time.monotonic() - started < 0.25
    finally:
        proxy.close()
