"""Read-ahead through a real mount grows with sequential access (issue "Close to the wire"):
`head -c 4096` of a cold big file downloads one chunk, not tens of MiB; `cat` of it still
reads the whole blob, each byte fetched once. Counted at a proxy in front of the registry."""

from __future__ import annotations

import os
import re
import subprocess

from ocifs.registry import RegistryClient

from .conftest import Mounter
from .content import push_artifact
from .faultproxy import FaultProxy

MiB = 1024 * 1024
CHUNK = 1 * MiB  # the mount's chunk size (BlobStore default)


def asked_bytes(proxy: FaultProxy) -> int:
    """Bytes the blob GETs asked for (their Range), as they arrived at the proxy."""
    total = 0
    for headers in proxy.arrivals("GET", r"/v2/.*/blobs/sha256:[0-9a-f]+"):
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", headers.get("Range", "") or "")
        assert match is not None, f"a blob GET without a bounded Range: {headers.get('Range')}"
        total += int(match.group(2)) - int(match.group(1)) + 1
    return total


def test_a_small_read_of_a_cold_big_file_downloads_one_chunk(client: RegistryClient, repo: str,
                                                            proxy: FaultProxy, mounter: Mounter) -> None:
    """Target of the issue: a 4 KiB read of a cold 256 MiB file downloads at most 2 MiB."""
    data = os.urandom(256 * MiB)
    push_artifact(client, repo, "t", {"big.bin": data})
    mnt = mounter(f"{proxy.host}/{repo}", "--read-only")
    head = subprocess.run(["head", "-c", "4096", str(mnt / "t" / "big.bin")], capture_output=True,
                          timeout=60, check=True)
    assert head.stdout == data[:4096]
    assert asked_bytes(proxy) <= 2 * MiB
    whole = subprocess.run(["cat", str(mnt / "t" / "big.bin")], capture_output=True, timeout=120, check=True)
    assert whole.stdout == data
    assert asked_bytes(proxy) == len(data)  # the rest, each byte once
