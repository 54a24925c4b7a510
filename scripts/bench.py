"""ocifs against curl and oras-py in one run, on a local registry and through a throttling
proxy that stands for a registry across the internet (see scripts/bench, docs/benchmarks.md).

Every figure is taken in the same run as its baseline and printed with the ratio, the target
of issue 9 and whether it was met; the whole run is also written as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The daemons run `python -m ocifs`: make them run this checkout's ocifs, wherever the
# bench is started from and whichever checkout the venv was installed from.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

import tests.registry_server as registry_server  # noqa: E402 - after the path is set
from ocifs.digest import Digest  # noqa: E402
from ocifs.model import (  # noqa: E402
    ANNOTATION_TITLE,
    EMPTY_DESCRIPTOR,
    EMPTY_JSON,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    Descriptor,
    build_manifest,
)
from ocifs.registry import RegistryClient  # noqa: E402
from tests.clients import oras_client  # noqa: E402
from tests.conftest import make_client  # noqa: E402
from tests.content import push_blob  # noqa: E402
from tests.faultproxy import FaultProxy  # noqa: E402
from tests.helpers import peak_rss_kib, process_alive, wait_until  # noqa: E402
from tests.mounts import daemon_pid, is_mounted, mount, unmount  # noqa: E402
from tests.registry_server import RunningRegistry, start_registry  # noqa: E402

MiB = 1 << 20
BLOCK = 8 * MiB
RSS_LIMIT_BYTES = 150_000_000  # issue 9: "daemon RSS < 150 MB"
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
WALK_TTL = 600  # the second walk must fall within --ttl however slow the first one was
# A hung mount must end the run (through the cleanup), not hold it forever.
COMMAND_TIMEOUT = 600.0
WALK_TIMEOUT = 1800.0


# ---- what a run records -----------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: a figure, its ratio to a baseline, and a target when there is one."""

    section: str
    key: str
    what: str
    value: float
    unit: str  # MiB/s, ms, s, MiB, requests
    ratio: float | None = None
    versus: str = ""  # what the ratio is taken against
    note: str = ""  # shown instead of a ratio when there is none
    target: str = ""
    met: bool | None = None  # None: no target (a baseline, or information)


@dataclass
class Results:
    params: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)  # section -> measurement -> figures
    rows: list[Row] = field(default_factory=list)

    def record(self, section: str, name: str, **figures: Any) -> dict[str, Any]:
        entry: dict[str, Any] = self.data.setdefault(section, {}).setdefault(name, {})
        entry.update(figures)
        return entry

    def row(self, row: Row) -> None:
        self.rows.append(row)
        print(f"  {format_row(row)}", flush=True)


def format_value(value: float, unit: str) -> str:
    if value != value:  # NaN: not measured
        return "n/a"
    if unit == "requests":
        return f"{value:.0f} req"
    if unit == "MiB/s":
        return f"{value:.0f} MiB/s" if value >= 10 else f"{value:.1f} MiB/s"
    if unit == "MiB":
        return f"{value:.2f} MiB"
    if unit == "ms":
        return f"{value:.1f} ms"
    return f"{value:.2f} {unit}"


def format_row(row: Row) -> str:
    ratio = f"{row.ratio:.2f}x {row.versus}".strip() if row.ratio is not None else row.note
    result = "" if row.met is None else ("met" if row.met else "MISSED")
    return f"{row.what:44} {format_value(row.value, row.unit):>14}  {ratio:28} {row.target:22} {result}"


def print_table(results: Results) -> None:
    header = f"{'what':44} {'value':>14}  {'ratio':28} {'target':22} result"
    for section in dict.fromkeys(row.section for row in results.rows):
        print(f"\n== {section} ==")
        print(header)
        print("-" * len(header))
        for row in results.rows:
            if row.section == section:
                print(format_row(row))
    judged = [row for row in results.rows if row.met is not None]
    print(f"\ntargets met: {sum(1 for row in judged if row.met)} of {len(judged)}")


# ---- content ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    path: Path
    digest: Digest
    size: int
    repo: str = ""
    tag: str = ""

    @property
    def mib(self) -> float:
        return self.size / MiB


class Maker:
    """Distinct files cheaply: a unique 32-byte head, then one random block repeated. Nothing
    on the way (HTTP, registry, cache) compresses or deduplicates, so this reads like random data."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.block = os.urandom(BLOCK)

    def make(self, name: str, size: int) -> Blob:
        path = self.directory / name
        hasher = hashlib.sha256()
        head = hashlib.sha256(f"{name} {time.time_ns()}".encode()).digest()
        with open(path, "wb") as file:
            left = size
            first = True
            while left > 0:
                piece = (head + self.block[len(head):]) if first else self.block
                piece = piece[:left]
                first = False
                hasher.update(piece)
                file.write(piece)
                left -= len(piece)
        return Blob(path, Digest("sha256", hasher.hexdigest()), size)


def push_file(client: RegistryClient, repo: str, tag: str, blob: Blob) -> Blob:
    """An ORAS-style artifact with one file, `blob.bin`; the blob streams from disk."""
    with open(blob.path, "rb") as file:
        client.upload_monolithic(repo, file, blob.digest)
    push_blob(client, repo, EMPTY_JSON)
    layer = Descriptor(OCI_LAYER_TAR, blob.digest, blob.size, {ANNOTATION_TITLE: "blob.bin"})
    client.put_manifest(repo, tag, build_manifest([layer]), OCI_MANIFEST)
    return dataclasses.replace(blob, repo=repo, tag=tag)


def push_walk(server: RunningRegistry, repos: int, tags: int, stop: threading.Event | None = None) -> None:
    """`repos` repositories walk/r<i> with `tags` tags t<j>, each a distinct manifest over the same
    small file. The file uploads once; the other repositories mount it (one request each), and
    the manifests go in from 8 threads, each with its own client. Ends early once `stop` is set."""
    data = b"ocifs bench walk\n"
    digest = Digest.of(data)
    layer = Descriptor(OCI_LAYER_TAR, digest, len(data), {ANNOTATION_TITLE: "f.txt"})
    first = make_client(server)
    push_blob(first, "walk/r0", data)
    push_blob(first, "walk/r0", EMPTY_JSON)
    local = threading.local()

    def one(index: int) -> None:
        if stop is not None and stop.is_set():
            return
        client: RegistryClient | None = getattr(local, "client", None)
        if client is None:
            client = local.client = make_client(server)
        repo = f"walk/r{index}"
        if index:
            for wanted, content in ((digest, data), (EMPTY_DESCRIPTOR.digest, EMPTY_JSON)):
                if not client.mount_blob(repo, wanted, "walk/r0"):
                    client.upload_monolithic(repo, content, wanted)
        for tag in range(tags):
            raw = build_manifest([layer], annotations={"io.ocifs.bench.tag": f"{index}/{tag}"})
            client.put_manifest(repo, f"t{tag}", raw, OCI_MANIFEST)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(repos)))


# ---- measuring --------------------------------------------------------------------------------


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def run(*command: str, timeout: float = COMMAND_TIMEOUT) -> None:
    subprocess.run(command, stdout=subprocess.DEVNULL, check=True, timeout=timeout)


def parallel(commands: list[list[str]]) -> float:
    """Seconds until every command, all started together, has finished."""
    started = time.perf_counter()
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL) for command in commands]
    try:
        codes = [process.wait(max(1.0, started + COMMAND_TIMEOUT - time.perf_counter())) for process in processes]
    finally:
        for process in processes:  # a timeout or Ctrl-C: ours, ended by pid
            if process.poll() is None:
                process.kill()
                process.wait()
    elapsed = time.perf_counter() - started
    if any(codes):
        raise RuntimeError(f"parallel run failed ({codes}): {commands}")
    return elapsed


def blob_url(host: str, blob: Blob) -> str:
    return f"http://{host}/v2/{blob.repo}/blobs/{blob.digest}"


def curl_get(host: str, blob: Blob) -> float:
    return timed(lambda: run("curl", "-sf", "-o", "/dev/null", blob_url(host, blob)))


def curl_first_byte(host: str, blob: Blob) -> float:
    """curl's time_starttransfer (connect, request, first byte of the answer) in seconds."""
    out = subprocess.run(["curl", "-sf", "-o", "/dev/null", "-w", "%{time_starttransfer}", blob_url(host, blob)],
                         capture_output=True, text=True, check=True, timeout=COMMAND_TIMEOUT).stdout
    return float(out)


def ocifs_first_byte(path: Path) -> float:
    """open() and a 4 KiB read() of a file whose blob is not cached, in this process (no program
    start in the figure, as curl's time_starttransfer has none). The file is looked up first:
    curl knows its URL too."""
    os.stat(path)
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.read(fd, 4096)
        return time.perf_counter() - started
    finally:
        os.close(fd)


def curl_put(host: str, repo: str, blob: Blob) -> float:
    """A monolithic upload as curl does it: POST for a session, one PUT of the whole file with
    the digest (known beforehand: that is the wire, not hashing)."""

    def upload() -> None:
        answer = subprocess.run(["curl", "-sf", "-X", "POST", "-D", "-", "-o", "/dev/null",
                                 f"http://{host}/v2/{repo}/blobs/uploads/"],
                                capture_output=True, text=True, check=True, timeout=COMMAND_TIMEOUT).stdout
        location = next(line.split(":", 1)[1].strip() for line in answer.splitlines()
                        if line.lower().startswith("location:"))
        location = urljoin(f"http://{host}/", location)
        separator = "&" if urlsplit(location).query else "?"
        # -T streams the file; no Expect: 100-continue round trip.
        run("curl", "-sf", "-X", "PUT", "-T", str(blob.path), "-H", "Content-Type: application/octet-stream",
            "-H", "Expect:", f"{location}{separator}digest={blob.digest}")

    return timed(upload)


def oras_pull(server: RunningRegistry, host: str, blob: Blob, outdir: Path) -> float:
    client = oras_client(dataclasses.replace(server, host=host))
    return timed(lambda: client.pull(target=f"{host}/{blob.repo}:{blob.tag}", outdir=str(outdir)))


def oras_push(server: RunningRegistry, repo: str, blob: Blob) -> float:
    client = oras_client(server)
    return timed(lambda: client.push(target=f"{server.host}/{repo}:v1", files=[str(blob.path)],
                                     disable_path_validation=True))


def settle(proxy: FaultProxy, quiet: float = 0.5, limit: float = 10.0) -> None:
    """Wait until the proxy saw no new request and sent no new byte for `quiet` seconds
    (read-ahead and background work triggered by what was just measured have ended)."""
    deadline = time.monotonic() + limit
    last = (len(proxy.arrived), len(proxy.seen), proxy.bytes_sent())
    calm_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = (len(proxy.arrived), len(proxy.seen), proxy.bytes_sent())
        if now != last:
            last, calm_since = now, time.monotonic()
        elif now[0] == now[1] and time.monotonic() - calm_since >= quiet:
            return


def request_kinds(seen: list[tuple[str, str, int | None]]) -> dict[str, int]:
    """How many requests of each kind ("GET /v2/walk/rN/manifests/tN 200"), most frequent first:
    what a walk spends its round trips on."""
    def kind(path: str) -> str:
        rest = path.removeprefix("/v2/")  # numbers in names become N, not the API's version
        return path[:len(path) - len(rest)] + re.sub(r"[0-9]+", "N", DIGEST.sub("<digest>", rest))

    kinds = Counter(f"{method} {kind(path)} {status}" for method, path, status in seen)
    return dict(kinds.most_common())


def mib_s(size: int, seconds: float) -> float:
    return size / MiB / seconds


# ---- what the bench starts, and stops whatever happens --------------------------------------


@dataclass
class Mounted:
    path: Path
    pid: int | None


class Session:
    """Mounts, proxies and the registry, undone in reverse order on any exit (Ctrl-C and
    SIGTERM included). A daemon that outlives its unmount is killed, by its own pid."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.stack = ExitStack()
        self._count = 0

    def mount(self, source: str, *options: str, cache: Path) -> Mounted:
        self._count += 1
        mounted = Mounted(self.work / f"mnt{self._count}", None)
        self.stack.callback(lambda: self.unmount(mounted))  # before mounting: a half-made mount is undone too
        mount(source, mounted.path, "--plain-http", *options, cache_dir=cache)
        try:
            mounted.pid = daemon_pid(mounted.path)
        except AssertionError:
            pass
        return mounted

    def unmount(self, mounted: Mounted) -> None:
        if is_mounted(mounted.path):
            unmount(mounted.path)
        pid = mounted.pid
        if pid is not None and not wait_until(lambda: not process_alive(pid), 15):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def proxy(self, upstream: str, *, latency: float = 0.0, rate: float | None = None) -> FaultProxy:
        proxy = FaultProxy(upstream, latency=latency, rate=rate)
        self.stack.callback(proxy.close)
        return proxy


def peak_rss_mib(mounted: Mounted) -> float:
    try:
        return peak_rss_kib(mounted.pid if mounted.pid is not None else daemon_pid(mounted.path)) / 1024
    except (AssertionError, OSError):
        return float("nan")


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run like Ctrl-C does: through every cleanup."""

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def quietly_cleanup(stack: ExitStack) -> None:
    """Undo everything; a second Ctrl-C while unmounting must not leave mounts behind."""
    handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        stack.close()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


# ---- the measurements -------------------------------------------------------------------------


@dataclass
class ReadSet:
    """The blobs one read section needs, each cold to a new cache directory."""

    big: Blob  # the cold sequential read
    probe: Blob  # a 4 KiB read of a cold 256 MiB file
    first: list[Blob]  # time to first byte, one per sample
    four: list[Blob]  # 4 parallel readers


def read_section(results: Results, session: Session, server: RunningRegistry, blobs: ReadSet, *,
                 section: str, host: str, counter: FaultProxy, throttled: bool) -> Mounted:
    """Cold read, time to first byte, bytes fetched by a 4 KiB read and 4 parallel readers,
    each against curl (and oras-py pull), through `host` (the registry or the throttling proxy).
    Returns the read mount, still mounted (the warm re-reads use it)."""
    work = session.work
    tag = "throttled" if throttled else "loopback"
    print(f"\n{section}", flush=True)

    curl = curl_get(host, blobs.big)
    results.record(section, "curl_get", seconds=curl, mib_s=mib_s(blobs.big.size, curl), size=blobs.big.size)
    results.row(Row(section, "curl_get", f"curl GET {blobs.big.mib:.0f} MiB (the wire)",
                    mib_s(blobs.big.size, curl), "MiB/s", note="baseline"))
    pull = oras_pull(server, host, blobs.big, work / f"pulled-{tag}")
    shutil.rmtree(work / f"pulled-{tag}", ignore_errors=True)
    results.record(section, "oras_pull", seconds=pull, mib_s=mib_s(blobs.big.size, pull))
    results.row(Row(section, "oras_pull", "oras-py pull", mib_s(blobs.big.size, pull), "MiB/s",
                    curl / pull, "curl"))

    cache = work / f"cache-{tag}-read"
    mounted = session.mount(f"{host}/bench", "--read-only", cache=cache)
    path = mounted.path / blobs.big.repo.removeprefix("bench/") / blobs.big.tag / "blob.bin"
    os.stat(path)  # the tag's manifest is fetched: the figure is the blob's
    cold = timed(lambda: run("cat", str(path)))
    results.record(section, "cold_read", seconds=cold, mib_s=mib_s(blobs.big.size, cold),
                   ratio_curl=curl / cold, ratio_oras_pull=pull / cold)
    if throttled:
        results.row(Row(section, "cold_read", "ocifs cat, cold", mib_s(blobs.big.size, cold), "MiB/s",
                        curl / cold, "curl", target=">= 2.5x curl", met=curl / cold >= 2.5))
    else:
        results.row(Row(section, "cold_read", "ocifs cat, cold", mib_s(blobs.big.size, cold), "MiB/s",
                        curl / cold, "curl", target=">= 0.4x (stretch 0.5x)", met=curl / cold >= 0.4))
    results.row(Row(section, "cold_read_vs_oras", "ocifs cat, cold, vs oras-py pull",
                    mib_s(blobs.big.size, cold), "MiB/s", pull / cold, "oras-py pull",
                    target="" if throttled else ">= 2x oras-py pull",
                    met=None if throttled else pull / cold >= 2.0))

    # 4 readers of 4 different cold blobs, against 4 curls at once.
    four_size = sum(blob.size for blob in blobs.four)
    curls = parallel([["curl", "-sf", "-o", "/dev/null", blob_url(host, blob)] for blob in blobs.four])
    paths = [mounted.path / blob.repo.removeprefix("bench/") / blob.tag / "blob.bin" for blob in blobs.four]
    for each in paths:
        os.stat(each)
    readers = parallel([["cat", str(each)] for each in paths])
    results.record(section, "parallel", readers=len(paths), size_each=blobs.four[0].size,
                   curl_seconds=curls, curl_mib_s=mib_s(four_size, curls),
                   ocifs_seconds=readers, ocifs_mib_s=mib_s(four_size, readers), ratio=curls / readers)
    results.row(Row(section, "parallel_curl", f"4 curls at once ({blobs.four[0].mib:.0f} MiB each)",
                    mib_s(four_size, curls), "MiB/s", note="baseline"))
    results.row(Row(section, "parallel", "4 ocifs readers of 4 cold files", mib_s(four_size, readers), "MiB/s",
                    curls / readers, "4 curls", target="" if throttled else ">= 0.35x 4 curls",
                    met=None if throttled else curls / readers >= 0.35))

    # Time to first byte: the median of a few cold blobs, curl first.
    curl_firsts = [curl_first_byte(host, blob) for blob in blobs.first]
    ocifs_firsts: list[float] = []
    for blob in blobs.first:
        ocifs_firsts.append(ocifs_first_byte(mounted.path / blob.repo.removeprefix("bench/") / blob.tag / "blob.bin"))
        time.sleep(0.2)  # let the small read-ahead of one sample end before the next
    curl_ms = statistics.median(curl_firsts) * 1000
    ocifs_ms = statistics.median(ocifs_firsts) * 1000
    results.record(section, "first_byte", curl_ms=curl_ms, ocifs_ms=ocifs_ms,
                   curl_samples_ms=[s * 1000 for s in curl_firsts],
                   ocifs_samples_ms=[s * 1000 for s in ocifs_firsts])
    results.row(Row(section, "first_byte_curl", "first byte, curl (time_starttransfer)", curl_ms, "ms",
                    note="baseline"))
    results.row(Row(section, "first_byte", "first byte, ocifs open + 4 KiB read, cold", ocifs_ms, "ms",
                    note=f"{ocifs_ms - curl_ms:+.1f} ms vs curl",
                    target="" if throttled else "<= curl + 15 ms",
                    met=None if throttled else ocifs_ms <= curl_ms + 15))

    # Bytes a 4 KiB read of a cold 256 MiB file makes ocifs download, counted by a proxy.
    probe_mount = mounted  # through the throttling proxy, the read mount's own traffic is counted
    if not throttled:
        probe_mount = session.mount(f"{counter.host}/bench", "--read-only", cache=work / f"cache-{tag}-probe")
    probe_path = probe_mount.path / blobs.probe.repo.removeprefix("bench/") / blobs.probe.tag / "blob.bin"
    os.stat(probe_path)
    blob_path = f"/v2/{blobs.probe.repo}/blobs/{blobs.probe.digest}"
    before = counter.bytes_sent("GET", blob_path)
    requests_before = len(counter.requests("GET", blob_path))
    run("head", "-c", "4096", str(probe_path))
    settle(counter)
    fetched = counter.bytes_sent("GET", blob_path) - before
    blob_requests = len(counter.requests("GET", blob_path)) - requests_before
    results.record(section, "read_4k", file_size=blobs.probe.size, bytes_fetched=fetched,
                   blob_requests=blob_requests)
    results.row(Row(section, "read_4k", f"downloaded for 4 KiB of a cold {blobs.probe.mib:.0f} MiB file",
                    fetched / MiB, "MiB", note=f"{blob_requests} blob GETs",
                    target="" if throttled else "<= 2 MiB", met=None if throttled else fetched <= 2 * MiB))
    if probe_mount is not mounted:
        results.record(section, "rss", probe_mib=peak_rss_mib(probe_mount))
        session.unmount(probe_mount)
    return mounted


def warm_section(results: Results, session: Session, server: RunningRegistry, mounted: Mounted, blob: Blob,
                 cache: Path, section: str) -> None:
    """Re-reads of the cold-read blob: in the same mount (the kernel's page cache) and after a
    remount (ocifs' disk cache), against `cat` of the cache file itself."""
    path = mounted.path / blob.repo.removeprefix("bench/") / blob.tag / "blob.bin"
    warm = timed(lambda: run("cat", str(path)))
    cache_file = cache / "blobs" / blob.digest.algorithm / blob.digest.hex
    baseline_file = cache_file if cache_file.exists() else blob.path  # the source: a local file too
    run("cat", str(baseline_file))  # in the page cache before it is timed
    local = timed(lambda: run("cat", str(baseline_file)))
    results.record(section, "rss", read_mib=peak_rss_mib(mounted))
    session.unmount(mounted)
    again = session.mount(f"{server.host}/bench", "--read-only", cache=cache)
    path = again.path / blob.repo.removeprefix("bench/") / blob.tag / "blob.bin"
    os.stat(path)
    remount = timed(lambda: run("cat", str(path)))
    results.record(section, "rss", remount_mib=peak_rss_mib(again))
    session.unmount(again)
    results.record(section, "warm", size=blob.size, cat_cache_file_mib_s=mib_s(blob.size, local),
                   cat_cache_file_is_cache=cache_file.exists(),
                   same_mount_mib_s=mib_s(blob.size, warm), same_mount_ratio=local / warm,
                   after_remount_mib_s=mib_s(blob.size, remount), after_remount_ratio=local / remount)
    what = "cat of the cache file (page cache)" if cache_file.exists() else "cat of a local copy (page cache)"
    results.row(Row(section, "cat_cache_file", what, mib_s(blob.size, local), "MiB/s", note="baseline"))
    results.row(Row(section, "warm_same_mount", "ocifs cat again, same mount", mib_s(blob.size, warm), "MiB/s",
                    local / warm, "cat", target=">= 0.8x cat", met=local / warm >= 0.8))
    results.row(Row(section, "warm_remount", "ocifs cat after a remount", mib_s(blob.size, remount), "MiB/s",
                    local / remount, "cat", target="(FUSE bound, ~0.3x)"))


def push_section(results: Results, session: Session, server: RunningRegistry, maker: Maker, size: int,
                 section: str) -> None:
    """`cp` into a tag against curl's POST+PUT and oras-py push, each of a file of its own (the
    registry already having a blob would skip its upload)."""
    print(f"\n{section}: uploads", flush=True)
    sources = [maker.make(f"upload-{name}.bin", size) for name in ("curl", "oras", "ocifs")]
    for source in sources:
        run("cat", str(source.path))  # every source in the page cache alike
    put = curl_put(server.host, "bench/curl", sources[0])
    results.record(section, "curl_put", seconds=put, mib_s=mib_s(size, put))
    results.row(Row(section, "curl_put", f"curl POST+PUT {size / MiB:.0f} MiB", mib_s(size, put), "MiB/s",
                    note="baseline"))
    oras = oras_push(server, "bench/oras", sources[1])
    results.record(section, "oras_push", seconds=oras, mib_s=mib_s(size, oras))
    results.row(Row(section, "oras_push", "oras-py push", mib_s(size, oras), "MiB/s", put / oras, "curl PUT"))
    mounted = session.mount(server.host, cache=session.work / "cache-push")
    target = mounted.path / "bench" / "cp" / "v1"
    os.makedirs(target)
    cp = timed(lambda: run("cp", str(sources[2].path), f"{target}/"))
    results.record(section, "cp_in", seconds=cp, mib_s=mib_s(size, cp), ratio_curl_put=put / cp,
                   ratio_oras_push=oras / cp)
    results.record(section, "rss", write_mib=peak_rss_mib(mounted))
    session.unmount(mounted)
    results.row(Row(section, "cp_in", "ocifs cp into a tag", mib_s(size, cp), "MiB/s", put / cp, "curl PUT",
                    target=">= 0.8x curl PUT", met=put / cp >= 0.8))
    results.row(Row(section, "cp_in_vs_oras", "ocifs cp into a tag, vs oras-py push", mib_s(size, cp), "MiB/s",
                    oras / cp, "oras-py push", target=">= 1.2x oras-py push", met=oras / cp >= 1.2))
    for source in sources:
        source.path.unlink()


def walk_section(results: Results, session: Session, proxy: FaultProxy, repos: int, tags: int, section: str,
                 tag: str, latency: float) -> None:
    """`ls -lR` of the walk namespace, cold and again within the TTL, requests counted by `proxy`."""
    mounted = session.mount(f"{proxy.host}/walk", "--read-only", "--ttl", str(WALK_TTL),
                            cache=session.work / f"cache-{tag}-walk")
    listing: list[str] = []

    def walk() -> None:
        done = subprocess.run(["ls", "-lR", str(mounted.path)], capture_output=True, text=True,
                              timeout=WALK_TIMEOUT)
        listing[:] = [done.stdout, done.stderr, str(done.returncode)]

    settle(proxy)
    before, connections = len(proxy.seen), proxy.connections
    cold = timed(walk)
    cold_status, cold_errors = int(listing[2]), listing[1].strip().splitlines()
    files = sum(1 for line in listing[0].splitlines() if line.endswith(" f.txt"))
    settle(proxy)
    cold_requests = len(proxy.seen) - before
    cold_connections = proxy.connections - connections
    again = timed(walk)
    settle(proxy)
    again_requests = len(proxy.seen) - before - cold_requests
    cold_kinds = request_kinds(proxy.seen[before:before + cold_requests])
    again_kinds = request_kinds(proxy.seen[before + cold_requests:])
    results.record(section, "rss", walk_mib=peak_rss_mib(mounted))
    session.unmount(mounted)
    budget = cold_requests * latency
    results.record(section, "walk", repos=repos, tags=tags, files_seen=files, ls_status=cold_status,
                   ls_errors=cold_errors[:10], cold_seconds=cold, cold_requests=cold_requests,
                   cold_connections=cold_connections, cold_kinds=cold_kinds,
                   ttl_seconds=again, ttl_requests=again_requests, ttl_kinds=again_kinds,
                   round_trip_s=latency or None, requests_x_rtt_s=budget or None)
    if cold_status != 0 or files != repos * tags:
        print(f"  warning: ls -lR exited {cold_status} and listed {files} of {repos * tags} files: "
              f"{cold_errors[:3]}", file=sys.stderr)
    what = f"ls -lR of {repos} repos x {tags} tags, cold"
    if latency:
        results.row(Row(section, "walk_cold", what, cold, "s", cold / budget if budget else None,
                        f"of {cold_requests} req x RTT", target="< 0.33x req x RTT",
                        met=bool(budget) and cold / budget < 1 / 3 and files == repos * tags))
    else:
        results.row(Row(section, "walk_cold", what, cold, "s", note=f"{cold_requests} requests",
                        met=None))
    results.row(Row(section, "walk_ttl", "ls -lR again within the TTL", again, "s",
                    note=f"{again_requests} requests", target="0 requests", met=again_requests == 0))


def rss_row(results: Results, section: str) -> None:
    figures = [value for value in results.data.get(section, {}).get("rss", {}).values() if value == value]
    if not figures:
        return
    peak = max(figures)
    results.record(section, "rss", peak_mib=peak)
    results.row(Row(section, "rss", "daemon peak RSS (all mounts above)", peak, "MiB",
                    target="< 150 MB", met=peak * MiB < RSS_LIMIT_BYTES))


# ---- the run ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    option = parser.add_argument
    option("--size", type=int, metavar="MIB", help="the cold-read file and each upload (default 512)")
    option("--throttled-size", type=int, metavar="MIB", help="the cold read through the throttling proxy (default 128)")
    option("--probe-size", type=int, metavar="MIB", help="the file read 4 KiB of (default 256)")
    option("--repos", type=int, metavar="N", help="repositories of the ls -lR walk (default 200)")
    option("--tags", type=int, metavar="M", help="tags per repository of the walk (default 10)")
    option("--latency", type=float, default=40.0, metavar="MS",
           help="round trip the throttling proxy adds (default 40)")
    option("--rate", type=float, default=30.0, metavar="MIB/S",
           help="per connection through the throttling proxy (default 30)")
    option("--skip-throttled", action="store_true", help="only the loopback measurements")
    option("--quick", action="store_true",
           help="small sizes (16, 8, 32 MiB; a 10 x 3 walk): a smoke run of every figure")
    option("--json", type=Path, default=Path("bench-results.json"), metavar="PATH",
           help="where to write the results (default ./bench-results.json)")
    args = parser.parse_args(argv)
    defaults = (dict(size=16, throttled_size=8, probe_size=32, repos=10, tags=3) if args.quick else
                dict(size=512, throttled_size=128, probe_size=256, repos=200, tags=10))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def finite(value: Any) -> Any:
    """`value` with NaN (a figure that could not be taken) as null: JSON has no NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite(item) for item in value]
    return value


def git_describe() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "ocifs"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def make_reads(maker: Maker, client: RegistryClient, big_mib: int, probe_mib: int, name: str,
               first_mib: int) -> ReadSet:
    """Push the blobs of one read section as tags of bench/<name>."""
    repo = f"bench/{name}"
    quarter = max(big_mib * MiB // 4, MiB)

    def pushed(tag: str, size: int, keep: bool = False) -> Blob:
        blob = push_file(client, repo, tag, maker.make(f"{name}-{tag}.bin", size))
        if not keep:
            blob.path.unlink()  # only the registry's copy is read
        return blob

    return ReadSet(
        big=pushed("big", big_mib * MiB, keep=True),  # a local copy, should the cache file be missing
        probe=pushed("probe", probe_mib * MiB),
        first=[pushed(f"first{i}", first_mib * MiB) for i in range(3)],
        four=[pushed(f"four{i}", quarter) for i in range(4)],
    )


def bench(args: argparse.Namespace, session: Session, results: Results) -> None:
    work = session.work
    # A stock distribution pages its catalog by 1000; the tests' registry pages by 3 on purpose.
    registry_server.CATALOG_MAX_ENTRIES = 1000
    server = start_registry(work / "registry")
    session.stack.callback(server.stop)
    client = make_client(server)
    maker = Maker(work)
    latency = args.latency / 1000
    rate = args.rate * MiB

    print(f"preparing content in {work} ...", flush=True)
    started = time.perf_counter()
    first_mib = 4 if args.quick else 16
    # The walk's many small requests wait on round trips, the blobs on bandwidth: both at once.
    stop = threading.Event()
    with ThreadPoolExecutor(1) as background:
        walk = background.submit(push_walk, server, args.repos, args.tags, stop)
        try:
            loop = make_reads(maker, client, args.size, args.probe_size, "loop", first_mib)
            far: ReadSet | None = None
            if not args.skip_throttled:
                far = make_reads(maker, client, args.throttled_size, args.probe_size, "far", first_mib)
        except BaseException:
            stop.set()  # Ctrl-C or a failure: do not wait for the rest of the walk's content
            raise
        blobs = time.perf_counter() - started
        walk.result()
    results.record("setup", "content", seconds=time.perf_counter() - started, blobs_seconds=blobs)
    print(f"  {time.perf_counter() - started:.1f} s", flush=True)

    section = "loopback"
    counter = session.proxy(server.host)  # counts bytes and requests; no throttle
    mounted = read_section(results, session, server, loop, section=section, host=server.host, counter=counter,
                           throttled=False)
    warm_section(results, session, server, mounted, loop.big, work / "cache-loopback-read", section)
    push_section(results, session, server, maker, args.size * MiB, section)
    walk_section(results, session, counter, args.repos, args.tags, section, "loopback", 0.0)
    rss_row(results, section)

    if far is not None:
        section = f"throttled ({args.latency:.0f} ms round trip, {args.rate:.0f} MiB/s per connection)"
        results.params["throttled_section"] = section
        slow = session.proxy(server.host, latency=latency, rate=rate)
        mounted = read_section(results, session, server, far, section=section, host=slow.host, counter=slow,
                               throttled=True)
        results.record(section, "rss", read_mib=peak_rss_mib(mounted))
        session.unmount(mounted)
        walk_section(results, session, slow, args.repos, args.tags, section, "throttled", latency)
        rss_row(results, section)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    params = {
        "size_mib": args.size, "throttled_size_mib": None if args.skip_throttled else args.throttled_size,
        "probe_size_mib": args.probe_size, "repos": args.repos, "tags": args.tags,
        "latency_ms": None if args.skip_throttled else args.latency,
        "rate_mib_s": None if args.skip_throttled else args.rate, "quick": args.quick,
    }
    results = Results(params)
    work = Path(tempfile.mkdtemp(prefix="ocifs-bench-"))
    session = Session(work)
    session.stack.callback(shutil.rmtree, work, ignore_errors=True)
    error: str | None = None
    with interruptible():
        try:
            bench(args, session, results)
        except KeyboardInterrupt:
            error = "interrupted"
        except Exception as exc:  # noqa: BLE001 - reported, partial results kept
            traceback.print_exc()
            error = f"{type(exc).__name__}: {exc}"
        finally:
            print("\ncleaning up ...", flush=True)
            quietly_cleanup(session.stack)
    wall = time.perf_counter() - started

    print(f"\nocifs {git_describe()}, {os.cpu_count()} cores, {platform.release()}, wall time {wall:.0f} s")
    print_table(results)
    judged = [row for row in results.rows if row.met is not None]
    document = {
        "complete": error is None,
        "error": error,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "ocifs": git_describe(),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "wall_seconds": wall,
        "params": results.params,
        "results": results.data,
        "rows": [dataclasses.asdict(row) for row in results.rows],
        "targets": {"met": sum(1 for row in judged if row.met), "judged": len(judged),
                    "missed": [f"{row.section}: {row.key}" for row in judged if not row.met]},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(finite(document), indent=2, allow_nan=False, default=str) + "\n")
    print(f"results: {args.json.resolve()}")
    if error is not None:
        print(f"bench failed: {error}", file=sys.stderr)
        return 130 if error == "interrupted" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
