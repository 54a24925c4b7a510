"""Loaders that mmap (issue 12, part 3): a cold multi-hundred-MiB file mapped from a real
mount and faulted in random order returns the right bytes and fetches only the chunks it
touches (plus the kernel's read-around), a later scan and a later mapping are right, a moved
tag gives a new mapping the new bytes; safetensors and gguf readers load the right tensors.

Bytes fetched are counted at a proxy in front of the registry (the Range of each blob GET).
Mappings live in a child process (tests/mmap_probe.py): a page fault that hangs in the kernel
could not be interrupted in the test process, a child can be killed."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gguf import GGUFReader

from ocifs.digest import Digest
from ocifs.model import (
    ANNOTATION_TITLE,
    EMPTY_DESCRIPTOR,
    EMPTY_JSON,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    Descriptor,
    build_manifest,
)
from ocifs.registry import RegistryClient

from .conftest import Mounter, make_client
from .content import push_blob
from .faultproxy import FaultProxy
from .models import write_gguf, write_safetensors
from .registry_server import RunningRegistry
from .test_read_ahead import asked_bytes

KiB = 1024
MiB = 1024 * KiB
CHUNK = 1 * MiB  # the mount's chunk size (BlobStore default): the unit a random read fetches
PAGE = 4 * KiB
BIG = 320 * MiB
PROBE = Path(__file__).with_name("mmap_probe.py")


class SeededBlob:
    """`size` bytes made from `seed`, never held whole: 1 MiB block k is random bytes seeded
    by (seed, k), so every block (and every page) differs from every other and a page served
    from the wrong place, or from the other blob of a moved tag, is caught."""

    BLOCK = 1 * MiB

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self._cache: dict[int, bytes] = {}
        hasher = hashlib.sha256()
        for k in range(-(-size // self.BLOCK)):
            hasher.update(self.block(k))
        self.digest = Digest.parse(f"sha256:{hasher.hexdigest()}")

    def block(self, k: int) -> bytes:
        data = self._cache.get(k)
        if data is None:
            length = min(self.BLOCK, self.size - k * self.BLOCK)
            data = random.Random(f"{self.seed}/{k}").randbytes(length)
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[k] = data
        return data

    def span(self, offset: int, length: int) -> bytes:
        end = min(self.size, offset + length)
        parts, pos = [], offset
        while pos < end:
            k = pos // self.BLOCK
            stop = min(end, (k + 1) * self.BLOCK)
            parts.append(self.block(k)[pos - k * self.BLOCK:stop - k * self.BLOCK])
            pos = stop
        return b"".join(parts)

    def page_hash(self, offset: int, length: int) -> str:
        return hashlib.sha256(self.span(offset, length)).hexdigest()

    def reader(self) -> io.RawIOBase:
        blob = self

        class Reader(io.RawIOBase):
            pos = 0

            def readable(self) -> bool:
                return True

            def seekable(self) -> bool:
                return True

            def seek(self, offset: int, whence: int = 0) -> int:
                self.pos = offset if whence == 0 else (self.pos + offset if whence == 1 else blob.size + offset)
                return self.pos

            def tell(self) -> int:
                return self.pos

            def read(self, size: int = -1) -> bytes:
                size = blob.size - self.pos if size < 0 else size
                data = blob.span(self.pos, size)
                self.pos += len(data)
                return data

        return Reader()


def push_file(client: RegistryClient, repo: str, tag: str, name: str, size: int, digest: Digest,
              reader: io.RawIOBase | io.BufferedIOBase) -> None:
    """One titled layer, uploaded from `reader` (in 16 MiB pieces when big), under `tag`."""
    client.push_blob(repo, reader, digest, size)  # type: ignore[arg-type]
    push_blob(client, repo, EMPTY_JSON)
    layer = Descriptor(OCI_LAYER_TAR, digest, size, {ANNOTATION_TITLE: name})
    client.put_manifest(repo, tag, build_manifest([layer], config=EMPTY_DESCRIPTOR), OCI_MANIFEST)


def push_path(client: RegistryClient, repo: str, tag: str, name: str, path: Path) -> None:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        for piece in iter(lambda: file.read(MiB), b""):
            hasher.update(piece)
        push_file(client, repo, tag, name, path.stat().st_size, Digest.parse(f"sha256:{hasher.hexdigest()}"),
                  file)


class Probe:
    """The child process holding the mappings (tests/mmap_probe.py)."""

    def __init__(self) -> None:
        self._process = subprocess.Popen([sys.executable, str(PROBE)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)

    def ask(self, timeout: float = 120, **command: Any) -> dict[str, Any]:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps(command) + "\n")
        self._process.stdin.flush()
        ready, _, _ = select.select([self._process.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise AssertionError(f"{command['op']} did not finish within {timeout} s (a page fault hangs?)")
        line = self._process.stdout.readline()
        assert line, f"the probe died during {command['op']}"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def map(self, ident: int, path: Path, *, shared: bool) -> int:
        answer = self.ask(op="map", id=ident, path=str(path), shared=shared)
        assert "error" not in answer, f"mmap of {path}: {answer}"
        return int(answer["size"])

    def touch(self, ident: int, offsets: list[int], length: int = PAGE) -> tuple[list[str], list[float]]:
        answer = self.ask(op="touch", id=ident, offsets=offsets, length=length)
        assert "error" not in answer, answer
        return answer["sha256"], answer["seconds"]

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait(10)
        for stream in (self._process.stdin, self._process.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def probe(mounter: Mounter) -> Iterator[Probe]:
    """Depends on `mounter` so that it is killed (its mappings gone) before the unmount."""
    instance = Probe()
    try:
        yield instance
    finally:
        instance.close()


@pytest.fixture(scope="module")
def big(registry: RunningRegistry) -> tuple[SeededBlob, str]:
    """A 320 MiB blob pushed once for the module, under <repo>:t as big.bin; each test mounts
    with its own cache, so it is cold in every test."""
    blob = SeededBlob(BIG, seed=1)
    repo = f"test/mmap{os.getpid()}"
    push_file(make_client(registry), repo, "t", "big.bin", blob.size, blob.digest, blob.reader())
    return blob, repo


def readahead_window(path: Path) -> int:
    """The kernel's read-ahead for the mount (its backing device's read_ahead_kb): a page fault
    reads around the page, up to this much."""
    dev = os.stat(path).st_dev
    text = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text()
    return int(text) * KiB


def chunks_around(offsets: list[int], length: int, window: int, size: int) -> set[int]:
    """The chunks a fault at each [offset, offset+length) may bring: its pages and the kernel's
    read-around of `window` on either side."""
    chunks: set[int] = set()
    for offset in offsets:
        first = max(0, offset - window) // CHUNK
        last = (min(size, offset + length + window) - 1) // CHUNK
        chunks.update(range(first, last + 1))
    return chunks


def chunk_bytes(chunks: set[int], size: int) -> int:
    return sum(min(CHUNK, size - c * CHUNK) for c in chunks)


def served_bytes(mnt: Path) -> int:
    """Bytes the mount's cache handed to readers so far (MNT/.ocifs/status)."""
    return int(json.loads((mnt / ".ocifs" / "status").read_bytes())["store"]["served"])


def blob_sent(proxy: FaultProxy) -> int:
    return proxy.bytes_sent("GET", r"/v2/.*/blobs/sha256:[0-9a-f]+")


@pytest.mark.parametrize("shared", [True, False], ids=["MAP_SHARED", "MAP_PRIVATE"])
def test_random_page_faults_fetch_only_the_chunks_they_touch(big: tuple[SeededBlob, str], proxy: FaultProxy,
                                                            mounter: Mounter, probe: Probe, shared: bool) -> None:
    """~100 faults at seeded random offsets of a cold 320 MiB mapping, plus its start and end:
    every byte right; fetched at most the chunks under each fault's read-around window (the
    mount's read_ahead_kb, 128 KiB by default: about one chunk a fault), never a read-ahead
    (the fault at offset 0 starts a sequential reader for the store, whose read-ahead starts
    at none). Then a scan
    through the mapping gets every byte, each fetched once overall; and a second mapping
    after the first is gone is served from the cache."""
    blob, repo = big
    mnt = mounter(f"{proxy.host}/{repo}", "--read-only")
    path = mnt / "t" / "big.bin"
    window = readahead_window(path)
    rng = random.Random(12)
    offsets = [rng.randrange(0, blob.size - PAGE) for _ in range(100)]
    offsets += [0, PAGE, blob.size - PAGE, blob.size - 1, 1]  # the start and end, as headers are read
    assert probe.map(1, path, shared=shared) == blob.size
    assert asked_bytes(proxy) == 0  # mapping fetches nothing
    hashes, seconds = probe.touch(1, offsets)
    for offset, got in zip(offsets, hashes, strict=True):
        assert got == blob.page_hash(offset, PAGE), f"wrong bytes at {offset}"
    fetched = asked_bytes(proxy)
    bound = chunk_bytes(chunks_around(offsets, PAGE, window, blob.size), blob.size)
    print(f"\nmmap {'shared' if shared else 'private'}: {len(offsets)} faults, window {window // KiB} KiB, "
          f"fetched {fetched / MiB:.1f} MiB (bound {bound / MiB:.0f} MiB), "
          f"{fetched / len(offsets) / MiB:.2f} MiB a fault, sent {blob_sent(proxy) / MiB:.1f} MiB, "
          f"median fault {sorted(seconds)[len(seconds) // 2] * 1000:.1f} ms, max {max(seconds) * 1000:.1f} ms")
    assert fetched <= bound
    assert fetched <= blob.size // 2

    # A scan through the same mapping (a loader reading all the weights): right, and the
    # chunks the faults brought are not fetched again.
    answer = probe.ask(op="scan", id=1, step=CHUNK)
    assert answer["sha256"] == blob.digest.hex
    print(f"scan {answer['seconds']:.1f} s, fetched {asked_bytes(proxy) / MiB:.1f} MiB in all")
    assert asked_bytes(proxy) == blob.size

    # Unmapped, then mapped again with the kernel's pages of it dropped: ocifs' cache serves
    # the faults (bytes served grow), nothing is fetched.
    probe.ask(op="unmap", id=1)
    with path.open("rb") as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    served = served_bytes(mnt)
    probe.map(2, path, shared=shared)
    again = [*offsets[:20], blob.size // 2]
    assert probe.touch(2, again)[0] == [blob.page_hash(o, PAGE) for o in again]
    assert served_bytes(mnt) >= served + len(again) * PAGE
    assert asked_bytes(proxy) == blob.size


def blob_requests(proxy: FaultProxy) -> int:
    return len(proxy.arrivals("GET", r"/v2/.*/blobs/sha256:[0-9a-f]+"))


def timed_dd(path: Path, skip_mib: int, count_mib: int) -> float:
    started = time.monotonic()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", f"skip={skip_mib}", f"count={count_mib}"],
                   check=True, capture_output=True, timeout=300)
    return time.monotonic() - started


@pytest.mark.parametrize("link", ["loopback", "throttled"])
def test_a_loader_copying_a_tensor_out_of_the_mapping_gets_read_ahead(big: tuple[SeededBlob, str],
                                                                       proxy: FaultProxy, mounter: Mounter,
                                                                       probe: Probe, link: str) -> None:
    """A loader copies 64 MiB out of the middle of the mapping (a tensor): the kernel faults it
    in 128 KiB read-arounds that never start at 0, which the store sees as random reads. They
    form a run: after its first chunks, read-ahead comes in background requests bigger than a
    chunk (far fewer requests than chunks), and it stays within the walk plus as much again.
    Throttled as scripts/bench stands for a registry across the internet (40 ms round trip,
    30 MiB/s per connection), where one request a chunk held a mapped walk to 13 MiB/s. Prints
    the figures of docs/models.md (with -s): cold faults, the walk, `dd` of a cold 64 MiB from
    offset 0 (a sequential reader) in the same run."""
    blob, repo = big
    if link == "throttled":
        proxy.throttle(latency=0.04, rate=30 * MiB)
    mnt = mounter(f"{proxy.host}/{repo}", "--read-only")
    path = mnt / "t" / "big.bin"
    window = readahead_window(path)
    probe.map(1, path, shared=True)
    rng = random.Random(4)
    faults = [rng.randrange(200 * MiB, blob.size - PAGE) for _ in range(10)]
    hashes, seconds = probe.touch(1, faults)
    assert hashes == [blob.page_hash(o, PAGE) for o in faults]

    start, length = 100 * MiB + 5 * PAGE, 64 * MiB
    requests, asked = blob_requests(proxy), asked_bytes(proxy)
    answer = probe.ask(op="scan", id=1, step=PAGE, start=start, end=start + length)
    expected = hashlib.sha256()
    for offset in range(start, start + length, CHUNK):
        expected.update(blob.span(offset, min(CHUNK, start + length - offset)))
    assert answer["sha256"] == expected.hexdigest()
    requests, asked = blob_requests(proxy) - requests, asked_bytes(proxy) - asked
    edges = chunk_bytes(chunks_around([start], length, window, blob.size), blob.size)
    sequential = timed_dd(path, 0, 64)
    print(f"\n{link}: cold fault median {sorted(seconds)[len(seconds) // 2] * 1000:.0f} ms; mapped walk of "
          f"{length // MiB} MiB {length / MiB / answer['seconds']:.0f} MiB/s in {requests} requests, "
          f"{asked / MiB:.0f} MiB asked; dd of 64 MiB from 0 {64 / sequential:.0f} MiB/s")
    assert requests <= length // CHUNK // 2  # one a chunk without runs
    assert asked <= 2 * edges

@pytest.mark.parametrize("link", ["loopback", "throttled"])
def test_a_populated_mapping_reads_the_file_once_from_its_start(big: tuple[SeededBlob, str], proxy: FaultProxy,
                                                                 mounter: Mounter, probe: Probe, link: str) -> None:
    """llama.cpp maps a model with MAP_POPULATE (and MADV_WILLNEED): mmap() itself faults in
    every page, from the first on, which the store sees as a sequential reader from offset 0
    (as `cat`): every byte fetched once, with its growing read-ahead, and all of them right.
    Prints the load speed for docs/models.md (with -s), on loopback and throttled as in
    scripts/bench (40 ms, 30 MiB/s per connection)."""
    blob, repo = big
    if link == "throttled":
        proxy.throttle(latency=0.04, rate=30 * MiB)
    mnt = mounter(f"{proxy.host}/{repo}", "--read-only")
    answer = probe.ask(op="map", id=1, path=str(mnt / "t" / "big.bin"), shared=True, populate=True, timeout=300)
    assert answer["size"] == blob.size
    print(f"\n{link}: MAP_POPULATE of a cold {blob.size // MiB} MiB file {answer['seconds']:.2f} s, "
          f"{blob.size / MiB / answer['seconds']:.0f} MiB/s, {blob_requests(proxy)} requests")
    assert asked_bytes(proxy) == blob.size
    assert probe.ask(op="scan", id=1, step=CHUNK)["sha256"] == blob.digest.hex
    assert asked_bytes(proxy) == blob.size  # all of it was there


@pytest.mark.parametrize("shared", [True, False], ids=["MAP_SHARED", "MAP_PRIVATE"])
def test_a_moved_tag_and_mappings_of_the_path(registry: RunningRegistry, client: RegistryClient, repo: str,
                                              mounter: Mounter, probe: Probe, shared: bool) -> None:
    """The tag moves to another blob while a mapping of the old one is alive. The kernel keeps
    one inode, and so one page cache, per path (libfuse's high-level API numbers nodes by
    name): the live mapping stays right (pages the kernel drops are read again through its own
    handle, which keeps its digest), a new MAP_SHARED mapping is refused (ENODEV: the new
    handle bypasses the page cache), and once the old mapping is gone a new mapping sees only
    the new bytes, none of the pages the old one cached (the digest-keyed keep_cache rule).
    The new blob is bigger: a smaller one would cut the old mapping short (docs/models.md)."""
    old, new = SeededBlob(40 * MiB, seed=2), SeededBlob(56 * MiB, seed=3)
    push_file(client, repo, "t", "model.bin", old.size, old.digest, old.reader())
    mnt = mounter(f"{registry.host}/{repo}", "--read-only", "--ttl", "1")
    path = mnt / "t" / "model.bin"
    rng = random.Random(5)
    warm = [*(rng.randrange(0, old.size - PAGE) for _ in range(20)), 0]
    cold = [rng.randrange(0, old.size - PAGE) for _ in range(20)]
    probe.map(1, path, shared=shared)
    assert probe.touch(1, warm)[0] == [old.page_hash(o, PAGE) for o in warm]

    push_file(client, repo, "t", "model.bin", new.size, new.digest, new.reader())
    deadline = time.monotonic() + 15
    while os.stat(path).st_size != new.size:  # past --ttl and the kernel's attribute cache
        assert time.monotonic() < deadline, "the moved tag never showed"
        time.sleep(0.2)
    # The live mapping: still the old bytes, where it had pages and where it had none.
    assert probe.touch(1, warm + cold)[0] == [old.page_hash(o, PAGE) for o in warm + cold]
    # read(2) of a new open gets the new bytes meanwhile; mapping it shared is refused.
    with path.open("rb") as file:
        assert file.read(PAGE) == new.span(0, PAGE)
        file.seek(warm[0])
        assert file.read(PAGE) == new.span(warm[0], PAGE)
    refused = probe.ask(op="map", id=2, path=str(path), shared=True)
    assert refused.get("errno") == errno.ENODEV, refused
    assert probe.touch(1, warm)[0] == [old.page_hash(o, PAGE) for o in warm]

    # Old mapping gone: new mappings, shared and private, see the new blob only.
    probe.ask(op="unmap", id=1)
    probe.map(3, path, shared=True)
    probe.map(4, path, shared=False)
    every = [*warm, *cold, new.size - PAGE]
    for ident in (3, 4):
        assert probe.touch(ident, every)[0] == [new.page_hash(o, PAGE) for o in every]


def test_a_mapping_through_the_digest_path_survives_the_tag_moving(registry: RunningRegistry,
                                                                   client: RegistryClient, repo: str,
                                                                   mounter: Mounter, probe: Probe) -> None:
    """What a model server should map: `<repo>/sha256:<manifest>/<file>` (the tag's
    user.oci.digest) names the same bytes for ever and is another kernel inode than the tag's
    path. The tag moves to a smaller blob: the digest path's mapping keeps every old byte,
    beyond the new size too (a mapping of the tag path would get SIGBUS there), while a new
    MAP_SHARED mapping of the tag path sees the new bytes at the same time."""
    old, new = SeededBlob(40 * MiB, seed=4), SeededBlob(24 * MiB, seed=5)
    push_file(client, repo, "t", "model.bin", old.size, old.digest, old.reader())
    mnt = mounter(f"{registry.host}/{repo}", "--read-only", "--ttl", "1")
    manifest = os.getxattr(mnt / "t", "user.oci.digest").decode()
    pinned, tagged = mnt / manifest / "model.bin", mnt / "t" / "model.bin"
    rng = random.Random(6)
    offsets = [rng.randrange(0, new.size - PAGE) for _ in range(15)]
    beyond = [rng.randrange(new.size, old.size - PAGE) for _ in range(15)]
    probe.map(1, pinned, shared=True)
    assert probe.touch(1, offsets)[0] == [old.page_hash(o, PAGE) for o in offsets]

    push_file(client, repo, "t", "model.bin", new.size, new.digest, new.reader())
    deadline = time.monotonic() + 15
    while os.stat(tagged).st_size != new.size:
        assert time.monotonic() < deadline, "the moved tag never showed"
        time.sleep(0.2)
    probe.map(2, tagged, shared=True)
    for _ in range(2):  # interleaved: neither mapping is served the other's pages
        assert probe.touch(2, offsets)[0] == [new.page_hash(o, PAGE) for o in offsets]
        assert probe.touch(1, offsets + beyond)[0] == [old.page_hash(o, PAGE) for o in offsets + beyond]
    assert os.stat(pinned).st_size == old.size


def local_safetensors(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (start, end) of its bytes in the file, from the header (8-byte length, JSON)."""
    raw = path.read_bytes()[:1 << 20]
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    base = 8 + length
    return {name: (base + info["data_offsets"][0], base + info["data_offsets"][1])
            for name, info in header.items() if name != "__metadata__"}


# Run in a child (a hung fault can be killed): the loader opens the mounted file and prints
# the dtype, shape and sha256 of each tensor asked for.
LOAD_SAFETENSORS = """
import hashlib, json, sys
from safetensors import safe_open
with safe_open(sys.argv[1], framework="numpy") as f:
    keys = sorted(f.keys())
    got = {n: (str(t.dtype), list(t.shape), hashlib.sha256(t.tobytes()).hexdigest())
           for n in sys.argv[2:] for t in [f.get_tensor(n)]}
print(json.dumps({"keys": keys, "tensors": got}))
"""

LOAD_GGUF = """
import hashlib, json, sys
import numpy as np
from gguf import GGUFReader
reader = GGUFReader(sys.argv[1])
keys = sorted(t.name for t in reader.tensors)
got = {t.name: (str(t.data.dtype), hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest())
       for t in reader.tensors if t.name in sys.argv[2:]}
print(json.dumps({"keys": keys, "tensors": got}))
"""


def load(script: str, path: Path, *names: str) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-c", script, str(path), *names], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def loads_tensors_fetching_their_chunks(proxy: FaultProxy, path: Path, loader: str, label: str,
                                        spans: dict[str, tuple[int, int]], written: dict[str, Any],
                                        names: tuple[str, ...], seen: Callable[[Any], list[Any]]) -> None:
    """`loader` opens the mounted file: its header costs the chunks before the first tensor
    (and the read-around); each of `names` reads back as written (`seen(array)` is what the
    loader reports of it) and costs its chunks and the read-around at its edges; a tensor of
    two chunks or more is a run, whose read-ahead never exceeds what it read: at most as much
    again. Then every tensor, through the same reader, is exactly what was written."""
    size = path.stat().st_size
    window = readahead_window(path)
    opened = load(loader, path)
    assert opened["keys"] == sorted(written)
    header = asked_bytes(proxy)
    assert header <= chunk_bytes(chunks_around([0], min(spans.values())[0], window, size), size)
    for name in names:
        before = asked_bytes(proxy)
        got = load(loader, path, name)["tensors"][name]
        assert got == seen(written[name])
        start, end = spans[name]
        bound = 2 * chunk_bytes(chunks_around([start], end - start, window, size), size)
        print(f"\n{label} {name}: {(end - start) / MiB:.2f} MiB tensor, fetched "
              f"{(asked_bytes(proxy) - before) / MiB:.1f} MiB (bound {bound / MiB:.0f} MiB of {size / MiB:.0f})")
        assert asked_bytes(proxy) - before <= bound < size
    every = load(loader, path, *written)["tensors"]
    assert every == {name: seen(array) for name, array in written.items()}


def test_safetensors_reads_tensors_from_the_mount(client: RegistryClient, repo: str, proxy: FaultProxy,
                                                  mounter: Mounter, tmp_path: Path) -> None:
    """safetensors' own reader maps the file (memmap2, MAP_SHARED) and parses the header at
    its start: the tensors are the ones written, and reading one fetches its chunks (plus the
    read-around at its edges and a bounded read-ahead), not the whole ~100 MiB file."""
    shapes = {"model.embed.weight": (8192, 1024), "layers.0.weight": (4096, 1024), "layers.1.weight": (4096, 1024),
              "layers.2.weight": (4096, 1024), "lm_head.weight": (4096, 1024), "norm.weight": (1024,)}
    local = tmp_path / "model.safetensors"
    written = write_safetensors(local, tensors=shapes, seed=7)
    spans = local_safetensors(local)
    push_path(client, repo, "m", "model.safetensors", local)
    path = mounter(f"{proxy.host}/{repo}", "--read-only") / "m" / "model.safetensors"
    loads_tensors_fetching_their_chunks(
        proxy, path, LOAD_SAFETENSORS, "safetensors", spans, written, ("layers.1.weight", "norm.weight"),
        lambda array: [str(array.dtype), list(array.shape), hashlib.sha256(array.tobytes()).hexdigest()])


def test_gguf_reader_reads_tensors_from_the_mount(client: RegistryClient, repo: str, proxy: FaultProxy,
                                                  mounter: Mounter, tmp_path: Path) -> None:
    """llama.cpp's gguf package maps the file (numpy.memmap) and walks its header and tensor
    infos from the start: the tensors are the ones written, and reading one fetches its chunks
    (plus the read-around at its edges and a bounded read-ahead), not the whole file."""
    shapes = {"token_embd.weight": (8192, 2048), "blk.0.attn_q.weight": (2048, 2048),
              "blk.0.ffn_up.weight": (4096, 2048), "output_norm.weight": (2048,), "output.weight": (4096, 2048)}
    local = tmp_path / "model.gguf"
    written = write_gguf(local, tensors=shapes, seed=9)
    reader = GGUFReader(local)
    spans = {t.name: (int(t.data_offset), int(t.data_offset) + int(t.n_bytes)) for t in reader.tensors}
    del reader
    push_path(client, repo, "m", "model.gguf", local)
    path = mounter(f"{proxy.host}/{repo}", "--read-only") / "m" / "model.gguf"
    loads_tensors_fetching_their_chunks(
        proxy, path, LOAD_GGUF, "gguf", spans, written, ("blk.0.attn_q.weight", "output_norm.weight"),
        lambda array: [str(array.dtype), hashlib.sha256(array.tobytes()).hexdigest()])
