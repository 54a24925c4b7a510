"""Units of the status figures and of prune's in-use rule: store counters and download
progress, flock-protected open blobs, busy partials, rate-limit headers in the transport."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from ocifs.digest import Digest
from ocifs.reference import Registry
from ocifs.registry import RegistryClient
from ocifs.registry.client import ClientOptions
from ocifs.registry.transport import TransportOptions
from ocifs.store import BlobStore

from .fakeserver import FakeServer, Reply
from .helpers import wait_until

KiB = 1024
MiB = 1024 * KiB


Fetch = Callable[[int, int], Iterator[bytes]]


def fetch_of(data: bytes, *, gate: threading.Event | None = None, after: int = 0) -> Fetch:
    """Serves `data` in 64 KiB pieces; with `gate`, stops after `after` bytes until it is set."""
    def fetch(offset: int, length: int) -> Iterator[bytes]:
        pos = offset
        while pos < offset + length:
            if gate is not None and pos >= after:
                gate.wait(10)
            end = min(offset + length, pos + 64 * KiB)
            yield data[pos:end]
            pos = end
    return fetch


def test_counters_and_progress_of_a_download(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 5)
    digest = Digest.of(data)
    gate = threading.Event()
    with BlobStore(tmp_path / "c") as store:
        handle = store.open(digest, len(data), fetch_of(data, gate=gate, after=MiB + 128 * KiB))
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append(handle.read(0, len(data))))
        reader.start()
        assert wait_until(lambda: store.stats()["reads_in_flight"] == 1
                          and store.stats()["fetching"]
                          and store.stats()["fetching"][0]["on_disk"] >= MiB + 128 * KiB)
        stats = store.stats()
        assert stats["fetching"][0]["digest"] == str(digest) and stats["fetching"][0]["size"] == len(data)
        assert stats["fetching"][0]["on_disk"] <= stats["fetched"] <= len(data)
        gate.set()
        reader.join(20)
        handle.close()
        assert result == [data]
        stats = store.stats()
        assert stats["fetched"] == len(data) and stats["served"] == len(data)
        assert stats["reads_in_flight"] == 0 and stats["fetching"] == []
        with store.open(digest, len(data), fetch_of(data)) as again:  # complete: no fetch
            assert again.read(0, 10) == data[:10]
            assert store.stats()["open_blobs"] == 1
        assert store.stats()["fetched"] == len(data) and store.stats()["served"] == len(data) + 10


def test_prune_spares_a_blob_another_process_holds_open(tmp_path: Path) -> None:
    blobs = [os.urandom(100 * KiB) for _ in range(3)]
    root = tmp_path / "c"
    with BlobStore(root) as store:
        for blob in blobs:
            store.add_bytes(Digest.of(blob), blob)
    paths = [root / "blobs" / "sha256" / Digest.of(blob).hex for blob in blobs]
    held = os.open(paths[1], os.O_RDONLY)  # as a mount's daemon does at open
    fcntl.flock(held, fcntl.LOCK_SH | fcntl.LOCK_NB)
    try:
        with BlobStore(root) as pruner:
            result = pruner.prune(0)
        assert (result.removed, result.busy) == (2, 1)
        assert [p.exists() for p in paths] == [False, True, False]
        with BlobStore(root) as pruner:
            result = pruner.clear()  # clear removes it anyway: the holder reads on
        assert result.removed == 1 and not paths[1].exists()
        assert os.pread(held, len(blobs[1]), 0) == blobs[1]
    finally:
        os.close(held)


def test_prune_spares_a_partial_written_recently(tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    digest = Digest.of(data)
    root = tmp_path / "c"
    with BlobStore(root) as store, store.open(digest, len(data), fetch_of(data)) as handle:
        handle.read(MiB, 10)  # a random read: one chunk on disk, a partial left behind
    assert (root / "partial" / "sha256" / digest.hex).exists()
    with BlobStore(root) as pruner:
        assert pruner.prune(0).busy == 1
        assert pruner.prune(0, busy_grace=0).removed == 1
    assert not (root / "partial" / "sha256" / digest.hex).exists()


def test_the_transport_keeps_the_rate_limit_headers(servers: Callable[[], FakeServer]) -> None:
    server = servers()
    server.route("*", "/v2/", Reply(200, {}, {"ratelimit-limit": "100;w=21600",
                                              "ratelimit-remaining": "99;w=21600",
                                              "docker-ratelimit-source": "1.2.3.4"}))
    client = RegistryClient(Registry.parse(server.host), ClientOptions(
        plain_http=True, transport=TransportOptions(retries=0)))
    assert client.transport.rate_limit() == {}
    client.ping()
    seen = client.transport.rate_limit()
    assert seen["ratelimit-remaining"] == "99;w=21600" and seen["docker-ratelimit-source"] == "1.2.3.4"
    assert seen["seen_at"] > 0
