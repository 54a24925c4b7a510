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
import io
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import zlib
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
from ocifs.status import read as read_status  # noqa: E402
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


# ---- a container image for the root filesystem figures ---------------------------------------

ROOTFS_REPO, ROOTFS_TAG = "bench/rootfs", "img"
OS_RELEASE = b'PRETTY_NAME="ocifs bench image"\nNAME="ocifs bench"\nID=ocifs-bench\nVERSION_ID="1"\n'
FIXED_MTIME = 1_700_000_000
WHITEOUT = ".wh."


class Noise(io.RawIOBase):
    """`size` bytes: a unique head, then `block` (random bytes, or text) from a varying offset,
    produced as tarfile asks for them: no file is held in memory whole. The block is bigger than
    gzip's window, so a file compresses as the block's own bytes do."""

    def __init__(self, block: bytes, size: int, name: str) -> None:
        head = hashlib.sha256(f"{name} {time.time_ns()}".encode()).digest()
        self._block = block
        self._at = int.from_bytes(head[:4], "big") % len(block)
        self._pending = head[:min(size, len(head))]
        self._left = size - len(self._pending)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._pending:
            count = min(len(view), len(self._pending))
            view[:count] = self._pending[:count]
            self._pending = self._pending[count:]
            return count
        count = min(len(view), self._left, len(self._block) - self._at)
        view[:count] = self._block[self._at:self._at + count]
        self._left -= count
        self._at = (self._at + count) % len(self._block)
        return count


@dataclass(frozen=True)
class Image:
    """A container image in an OCI layout (tag ROOTFS_TAG) and what `rootfs/` must show of it."""

    layout: Path
    layers: int
    compressed: int  # bytes of its layer blobs (gzip)
    uncompressed: int  # bytes of its layer tars
    files: int  # regular files and symlinks in the merged root filesystem
    entries: int  # names `ls -R rootfs/` lists (directories included)
    other: str  # a big file of a lower layer, read once everything is indexed
    other_size: int
    build_seconds: float

    @property
    def mib(self) -> float:
        return self.compressed / MiB


class LayerTar:
    """One layer's tar, written as files are added; records what the merged tree will hold."""

    def __init__(self, path: Path, tree: dict[str, str], block: bytes, text: bytes) -> None:
        self.path = path
        self.tree = tree  # path in the root filesystem -> "file" or "symlink" (merged so far)
        self.block = block  # random: does not compress
        self.text = text  # compresses about as binaries and text do
        self._tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - closed by close()
        self._dirs: set[str] = set()

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            directory = "/".join(parts[:i])
            if directory not in self._dirs:
                self._dirs.add(directory)
                info = tarfile.TarInfo(directory)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, FIXED_MTIME
                self._tar.addfile(info)

    def file(self, name: str, size: int, data: bytes | None = None, mode: int = 0o644,
             compressible: bool = False) -> None:
        self._parents(name)
        info = tarfile.TarInfo(name)
        info.mode, info.mtime = mode, FIXED_MTIME
        info.size = len(data) if data is not None else size
        block = self.text if compressible else self.block
        self._tar.addfile(info, io.BytesIO(data) if data is not None else
                          io.BufferedReader(Noise(block, size, f"{self.path.name} {name}"), MiB))
        self.tree[name] = "file"

    def symlink(self, name: str, target: str) -> None:
        self._parents(name)
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime, info.linkname = tarfile.SYMTYPE, 0o777, FIXED_MTIME, target
        self._tar.addfile(info)
        self.tree[name] = "symlink"

    def whiteout(self, name: str) -> None:
        """Delete `name` (a file of a lower layer) from the root filesystem."""
        directory, _, base = name.rpartition("/")
        self._parents(name)
        info = tarfile.TarInfo(f"{directory}/{WHITEOUT}{base}" if directory else f"{WHITEOUT}{base}")
        info.mode, info.mtime = 0o644, FIXED_MTIME
        self._tar.addfile(info)
        del self.tree[name]

    def close(self) -> None:
        self._tar.close()


def build_image(work: Path, maker: Maker, size_mib: int) -> Image:
    """About `size_mib` MiB of gzip layers, built by umoci as the tests build images: four
    layers of our own tars (`umoci raw add-layer`, which compresses them). Random bytes (which
    gzip stores as they are: inflating them is a copy) and text of random words (which gzip
    shrinks about 2.2x, as it does binaries: inflating it is real work):

      0  a base: /etc (os-release, ...), a random binary (2% of the size) and a symlink to it,
         3/4 of the small files (text, 64 B - 8 KiB; a few thousand at the default size) in
         /usr/share/doc/<pkg>/
      1  an application: four big random files in /opt/app (18%, 12%, 8%, 4% of the size)
      2  libraries: text files of 256 KiB - 4 MiB in /usr/lib/<arch>/, up to the size
      3  an update: the other small files (random) in /var/lib/app/, a new random
         /opt/app/data-3.bin (replacing layer 1's, 4%), whiteouts deleting some of layer 0's files
    """
    started = time.perf_counter()
    total = size_mib * MiB
    small = max(100, min(4000, size_mib * 20))
    rng = random.Random(size_mib)  # the same shape every run; the bytes differ
    layout = work / "rootfs-layout"
    tree: dict[str, str] = {}
    tars: list[Path] = []

    text = text_block(rng, 8 * MiB)
    ratio = len(text[:MiB]) / len(zlib.compress(text[:MiB], 6))  # gzip's default level, as umoci's

    def layer(number: int) -> LayerTar:
        tars.append(work / f"rootfs-layer{number}.tar")
        return LayerTar(tars[-1], tree, maker.block, text)

    small_sizes = [rng.randint(64, 8192) for _ in range(small)]
    base = layer(0)
    base.file("etc/os-release", 0, OS_RELEASE)
    base.file("etc/hostname", 0, b"ocifs-bench\n")
    base.file("etc/passwd", 0, b"root:x:0:0:root:/root:/bin/sh\n")
    base.file("usr/bin/busybox", total // 50, mode=0o755)
    base.symlink("bin/sh", "../usr/bin/busybox")
    docs = small * 3 // 4
    for i in range(docs):
        base.file(f"usr/share/doc/pkg{i // 40}/file{i}.txt", small_sizes[i], compressible=True)
    base.close()

    app = layer(1)
    for i, share in enumerate((18, 12, 8, 4)):
        app.file(f"opt/app/data-{i}.bin", total * share // 100)
    app.close()
    other, other_size = "opt/app/data-0.bin", total * 18 // 100

    planned = (sum(small_sizes[:docs]) / ratio + sum(small_sizes[docs:]) + total // 50
               + total * (18 + 12 + 8 + 4 + 4) // 100)
    libs = layer(2)
    left, number = int((total - planned) * ratio), 0  # bytes of text, uncompressed
    while left > 0:
        size = min(left, rng.randint(256 * 1024, 4 * MiB))
        libs.file(f"usr/lib/x86_64-linux-gnu/lib{number}.so.1", size, compressible=True)
        left -= size
        number += 1
    libs.close()

    update = layer(3)
    for i in range(docs, small):
        update.file(f"var/lib/app/state{i // 100}/{i}.dat", small_sizes[i])
    update.file("opt/app/data-3.bin", total * 4 // 100)
    for i in range(0, docs, 25):
        update.whiteout(f"usr/share/doc/pkg{i // 40}/file{i}.txt")
    update.close()

    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", f"{layout}:{ROOTFS_TAG}")
    for tar in tars:
        run("umoci", "raw", "add-layer", "--image", f"{layout}:{ROOTFS_TAG}", str(tar))
    run("umoci", "config", "--image", f"{layout}:{ROOTFS_TAG}", "--config.cmd", "/bin/sh")
    uncompressed = sum(tar.stat().st_size for tar in tars)
    for tar in tars:
        tar.unlink()

    directories = {"/".join(name.split("/")[:i]) for name in tree for i in range(1, name.count("/") + 1)}
    return Image(layout, len(tars), sum(size for _, size in layer_blobs(layout, ROOTFS_TAG)), uncompressed,
                 len(tree), len(tree) + len(directories), other, other_size, time.perf_counter() - started)


def text_block(rng: random.Random, size: int) -> bytes:
    """`size` bytes of words drawn from 4096 random ones: gzip shrinks it about 2.2x."""
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(4096)]
    return " ".join(rng.choices(words, k=size // 5)).encode()[:size]


def layer_blobs(layout: Path, tag: str) -> list[tuple[Path, int]]:
    """The layer blobs of `tag` in an OCI layout (path, size), bottom first."""
    def path(digest: str) -> Path:
        algorithm, hexpart = digest.split(":", 1)
        return layout / "blobs" / algorithm / hexpart

    index = json.loads((layout / "index.json").read_bytes())
    wanted = next(m for m in index["manifests"]
                  if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    manifest = json.loads(path(wanted["digest"]).read_bytes())
    return [(path(layer["digest"]), layer["size"]) for layer in manifest["layers"]]


def push_image(host: str, image: Image) -> None:
    run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{image.layout}:{ROOTFS_TAG}",
        f"docker://{host}/{ROOTFS_REPO}:{ROOTFS_TAG}")


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


def fetched_bytes(mounted: Mounted) -> int:
    """Blob bytes the mount's daemon has received from the registry (its `.ocifs/status`)."""
    status = read_status(mounted.path)
    if "error" in status:
        raise RuntimeError(f"{mounted.path}: status unreadable: {status['error']}")
    return int(status["store"]["fetched"])


def settled_bytes(mounted: Mounted, quiet: float = 0.3, limit: float = 10.0) -> int:
    """`fetched_bytes` once no blob is being fetched and the count has not moved for `quiet` s."""
    deadline = time.monotonic() + limit
    last, calm_since = -1, time.monotonic()
    while True:
        status = read_status(mounted.path)
        if "error" in status:
            raise RuntimeError(f"{mounted.path}: status unreadable: {status['error']}")
        now = int(status["store"]["fetched"])
        if now != last or status["store"]["fetching"]:
            last, calm_since = now, time.monotonic()
        elif time.monotonic() - calm_since >= quiet or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


@dataclass
class Listing:
    seconds: float
    names: int  # names listed, directories included
    status: int
    errors: list[str]


def list_recursively(path: Path) -> Listing:
    """`ls -R path`, timed; its output is read through a pipe (as a terminal or a script would)."""
    started = time.perf_counter()
    done = subprocess.run(["ls", "-R", str(path)], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    seconds = time.perf_counter() - started
    names = sum(1 for line in done.stdout.splitlines() if line and not line.endswith(":"))
    return Listing(seconds, names, done.returncode, done.stderr.strip().splitlines()[:10])


def allocated(root: Path) -> int:
    """Bytes the files under `root` take on disk."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def rootfs_section(results: Results, session: Session, server: RunningRegistry, image: Image, section: str,
                   slow: FaultProxy | None) -> None:
    """An image's `rootfs/` from a cold mount: the first `ls -R` (every layer downloaded and
    indexed), a second one, one after a remount (indexes read from the cache), a `cat` of one
    file from an empty cache and of another once indexed; against a full pull (skopeo copy to
    an OCI directory) and unpack (umoci unpack) of the same image. Bytes downloaded are the
    daemon's own count (`.ocifs/status`: blob bytes received from the registry)."""
    work = session.work
    image_mib = image.mib
    print(f"\n{section}: {image.layers} layers, {image_mib:.0f} MiB compressed "
          f"({image.uncompressed / MiB:.0f} MiB of tar), {image.files} files", flush=True)
    results.record(section, "image", layers=image.layers, compressed=image.compressed,
                   uncompressed=image.uncompressed, files=image.files, entries=image.entries,
                   build_seconds=image.build_seconds)
    reference = f"{ROOTFS_REPO}:{ROOTFS_TAG}"

    # The reference: a full pull to a local OCI layout, then unpacked.
    pulled, bundle = work / "rootfs-pulled", work / "rootfs-bundle"
    pull = timed(lambda: run("skopeo", "copy", "--quiet", "--src-tls-verify=false",
                             f"docker://{server.host}/{reference}", f"oci:{pulled}:{ROOTFS_TAG}"))
    unpack = timed(lambda: run("umoci", "unpack", "--rootless", "--image", f"{pulled}:{ROOTFS_TAG}", str(bundle)))
    list_recursively(bundle / "rootfs")
    local = list_recursively(bundle / "rootfs")  # the second: dentries and inodes in the kernel's caches
    shutil.rmtree(bundle, ignore_errors=True)
    # A floor for unpacking: GNU tar (gzip inside) of each layer in turn, whiteouts not applied.
    extracted = work / "rootfs-extracted"
    extracted.mkdir()

    def extract() -> None:
        for blob, _ in layer_blobs(pulled, ROOTFS_TAG):
            run("tar", "-xzf", str(blob), "-C", str(extracted))

    untar = timed(extract)
    shutil.rmtree(extracted, ignore_errors=True)
    shutil.rmtree(pulled, ignore_errors=True)
    full = pull + unpack
    results.record(section, "reference", pull_seconds=pull, unpack_seconds=unpack, seconds=full,
                   tar_x_seconds=untar, local_ls_seconds=local.seconds, local_ls_names=local.names)
    results.row(Row(section, "ref_pull", f"skopeo copy of the {image_mib:.0f} MiB image to a dir", pull, "s",
                    note="baseline"))
    results.row(Row(section, "ref_unpack", "umoci unpack --rootless of it", unpack, "s", note="baseline"))
    results.row(Row(section, "ref_total", "full pull + unpack", full, "s", note="baseline"))
    results.row(Row(section, "ref_tar", "tar -xzf of each layer (no whiteouts)", untar, "s",
                    note="a floor for unpacking"))

    # First, second and remounted `ls -R rootfs/`, each with the bytes it made ocifs download.
    cache = work / "cache-rootfs"
    mounted = session.mount(f"{server.host}/bench", "--read-only", cache=cache)
    tag_dir = mounted.path / ROOTFS_REPO.removeprefix("bench/") / ROOTFS_TAG
    os.listdir(tag_dir)  # the tag's manifest: the figures are the layers'
    rss_mounted = peak_rss_mib(mounted)
    before = settled_bytes(mounted)
    first = list_recursively(tag_dir / "rootfs")
    first_bytes = settled_bytes(mounted) - before
    rss_first = peak_rss_mib(mounted)
    disk = allocated(cache)
    second = list_recursively(tag_dir / "rootfs")
    second_bytes = settled_bytes(mounted) - before - first_bytes
    session.unmount(mounted)
    mounted = session.mount(f"{server.host}/bench", "--read-only", cache=cache)
    tag_dir = mounted.path / ROOTFS_REPO.removeprefix("bench/") / ROOTFS_TAG
    os.listdir(tag_dir)
    before = settled_bytes(mounted)
    remount = list_recursively(tag_dir / "rootfs")
    remount_bytes = settled_bytes(mounted) - before
    rss_remount = peak_rss_mib(mounted)
    session.unmount(mounted)
    for what, listing in (("first", first), ("second", second), ("remount", remount)):
        if listing.status != 0 or listing.names != image.entries:
            print(f"  warning: {what} ls -R exited {listing.status} and listed {listing.names} of "
                  f"{image.entries} names: {listing.errors[:3]}", file=sys.stderr)
    results.record(section, "first_ls", seconds=first.seconds, bytes_fetched=first_bytes, names=first.names,
                   ls_status=first.status, ls_errors=first.errors, ratio_reference=first.seconds / full,
                   ratio_pull=first.seconds / pull, ratio_pull_tar=first.seconds / (pull + untar),
                   mib_s=image_mib / first.seconds, rss_mounted_mib=rss_mounted, rss_mib=rss_first,
                   cache_bytes=disk)
    results.record(section, "second_ls", seconds=second.seconds, bytes_fetched=second_bytes, names=second.names,
                   ls_status=second.status, ratio_local=second.seconds / local.seconds)
    results.record(section, "remount_ls", seconds=remount.seconds, bytes_fetched=remount_bytes,
                   names=remount.names, ls_status=remount.status, ratio_local=remount.seconds / local.seconds)
    results.row(Row(section, "ls_first", "first ls -R rootfs/ (download + index)", first.seconds, "s",
                    first.seconds / full, "of pull+unpack's time"))
    results.row(Row(section, "ls_first_bytes", "downloaded by the first ls -R", first_bytes / MiB, "MiB",
                    first_bytes / image.compressed, "of the image", target="<= 1x the image",
                    met=first_bytes <= image.compressed))
    results.row(Row(section, "cache_disk", "cache after it (blobs, tars, indexes)", disk / MiB, "MiB",
                    disk / image.compressed, "of the image"))
    results.row(Row(section, "ls_local", "ls -R of umoci's unpacked rootfs, again", local.seconds * 1000, "ms",
                    note="baseline"))
    results.row(Row(section, "ls_second", "second ls -R rootfs/, same mount", second.seconds * 1000, "ms",
                    second.seconds / local.seconds, f"local, {second_bytes} B fetched",
                    target="0 bytes", met=second_bytes == 0))
    results.row(Row(section, "ls_remount", "ls -R rootfs/ after a remount (disk index)",
                    remount.seconds * 1000, "ms", remount.seconds / local.seconds,
                    f"local, {remount_bytes} B fetched", target="0 bytes", met=remount_bytes == 0))

    # One file from an empty cache (the root filesystem needs every layer's index), then another.
    mounted = session.mount(f"{server.host}/bench", "--read-only", cache=work / "cache-rootfs-cat")
    tag_dir = mounted.path / ROOTFS_REPO.removeprefix("bench/") / ROOTFS_TAG
    os.listdir(tag_dir)
    before = settled_bytes(mounted)
    shown: list[bytes] = []
    cat = timed(lambda: shown.append(subprocess.run(["cat", str(tag_dir / "rootfs" / "etc" / "os-release")],
                                                    capture_output=True, check=True,
                                                    timeout=COMMAND_TIMEOUT).stdout))
    cat_bytes = settled_bytes(mounted) - before
    if shown != [OS_RELEASE]:
        raise RuntimeError(f"rootfs/etc/os-release reads {shown!r}")
    other = timed(lambda: run("cat", str(tag_dir / "rootfs" / image.other)))
    other_bytes = settled_bytes(mounted) - before - cat_bytes
    rss_cat = peak_rss_mib(mounted)
    session.unmount(mounted)
    results.record(section, "cat_first", path="etc/os-release", seconds=cat, bytes_fetched=cat_bytes,
                   ratio_reference=cat / full)
    results.record(section, "cat_other", path=image.other, size=image.other_size, seconds=other,
                   mib_s=mib_s(image.other_size, other), bytes_fetched=other_bytes)
    results.row(Row(section, "cat_first", "cat rootfs/etc/os-release, empty cache", cat, "s", cat / full,
                    "of pull+unpack's time"))
    results.row(Row(section, "cat_first_bytes", "downloaded for that cat", cat_bytes / MiB, "MiB",
                    cat_bytes / image.compressed, "of the image", target="<= 1x the image",
                    met=cat_bytes <= image.compressed))
    results.row(Row(section, "cat_other", f"then cat of a {image.other_size / MiB:.0f} MiB file of a layer",
                    mib_s(image.other_size, other), "MiB/s", note=f"{other_bytes} B fetched",
                    target="0 bytes", met=other_bytes == 0))

    rss = {"mounted_mib": rss_mounted, "first_ls_mib": rss_first, "remount_mib": rss_remount, "cat_mib": rss_cat}
    if slow is not None:
        # Through the throttling proxy: the reference and the first look, cold.
        slow_pull = timed(lambda: run("skopeo", "copy", "--quiet", "--src-tls-verify=false",
                                      f"docker://{slow.host}/{reference}", f"oci:{pulled}:{ROOTFS_TAG}"))
        shutil.rmtree(pulled, ignore_errors=True)
        mounted = session.mount(f"{slow.host}/bench", "--read-only", cache=work / "cache-rootfs-throttled")
        tag_dir = mounted.path / ROOTFS_REPO.removeprefix("bench/") / ROOTFS_TAG
        os.listdir(tag_dir)
        settle(slow)
        blobs = f"/v2/{ROOTFS_REPO}/blobs/.*"
        before, connections = slow.bytes_sent("GET", blobs), slow.connections
        slow_first = list_recursively(tag_dir / "rootfs")
        settle(slow)
        slow_bytes = slow.bytes_sent("GET", blobs) - before
        slow_connections = slow.connections - connections
        rss["throttled_mib"] = peak_rss_mib(mounted)
        session.unmount(mounted)
        results.record(section, "throttled", latency_ms=slow.latency * 1000, rate_mib_s=(slow.rate or 0) / MiB,
                       pull_seconds=slow_pull, first_ls_seconds=slow_first.seconds, first_ls_names=slow_first.names,
                       bytes_fetched=slow_bytes, connections=slow_connections,
                       ratio_pull=slow_first.seconds / slow_pull)
        results.row(Row(section, "throttled_pull", "skopeo copy, throttled", slow_pull, "s", note="baseline"))
        results.row(Row(section, "throttled_ls_first", "first ls -R rootfs/, throttled", slow_first.seconds, "s",
                        slow_first.seconds / slow_pull, f"of skopeo's, {slow_bytes / MiB:.0f} MiB"))
    peak = max((value for value in rss.values() if value == value), default=float("nan"))
    results.record(section, "rss", **rss, peak_mib=peak)
    results.row(Row(section, "rss", "daemon peak RSS (indexing included)", peak, "MiB",
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
    option("--rootfs-size", type=int, metavar="MIB",
           help="the container image whose rootfs/ is listed, compressed (default 200)")
    option("--skip-loopback", action="store_true", help="no loopback reads, uploads or walk")
    option("--skip-throttled", action="store_true", help="nothing through the throttling proxy")
    option("--skip-rootfs", action="store_true", help="no container image root filesystem figures")
    option("--quick", action="store_true",
           help="small sizes (16, 8, 32 MiB; a 10 x 3 walk; a 4 MiB image): a smoke run of every figure")
    option("--json", type=Path, default=Path("bench-results.json"), metavar="PATH",
           help="where to write the results (default ./bench-results.json)")
    args = parser.parse_args(argv)
    defaults = (dict(size=16, throttled_size=8, probe_size=32, repos=10, tags=3, rootfs_size=4) if args.quick else
                dict(size=512, throttled_size=128, probe_size=256, repos=200, tags=10, rootfs_size=200))
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
    loop: ReadSet | None = None
    far: ReadSet | None = None
    if not (args.skip_loopback and args.skip_throttled):
        # The walk's many small requests wait on round trips, the blobs on bandwidth: both at once.
        stop = threading.Event()
        with ThreadPoolExecutor(1) as background:
            walk = background.submit(push_walk, server, args.repos, args.tags, stop)
            try:
                if not args.skip_loopback:
                    loop = make_reads(maker, client, args.size, args.probe_size, "loop", first_mib)
                if not args.skip_throttled:
                    far = make_reads(maker, client, args.throttled_size, args.probe_size, "far", first_mib)
            except BaseException:
                stop.set()  # Ctrl-C or a failure: do not wait for the rest of the walk's content
                raise
            blobs = time.perf_counter() - started
            walk.result()
        results.record("setup", "content", seconds=time.perf_counter() - started, blobs_seconds=blobs)
    image: Image | None = None
    if not args.skip_rootfs:
        image = build_image(work, maker, args.rootfs_size)
        pushed = timed(lambda: push_image(server.host, image))
        results.record("setup", "image", build_seconds=image.build_seconds, push_seconds=pushed)
    print(f"  {time.perf_counter() - started:.1f} s", flush=True)

    slow: FaultProxy | None = None
    throttled = f"throttled ({args.latency:.0f} ms round trip, {args.rate:.0f} MiB/s per connection)"
    if not args.skip_throttled:
        slow = session.proxy(server.host, latency=latency, rate=rate)

    if loop is not None:
        section = "loopback"
        counter = session.proxy(server.host)  # counts bytes and requests; no throttle
        mounted = read_section(results, session, server, loop, section=section, host=server.host,
                               counter=counter, throttled=False)
        warm_section(results, session, server, mounted, loop.big, work / "cache-loopback-read", section)
        push_section(results, session, server, maker, args.size * MiB, section)
        walk_section(results, session, counter, args.repos, args.tags, section, "loopback", 0.0)
        rss_row(results, section)

    if image is not None:
        rootfs_section(results, session, server, image, "rootfs", slow)

    if far is not None and slow is not None:
        section = throttled
        results.params["throttled_section"] = section
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
        "rootfs_size_mib": None if args.skip_rootfs else args.rootfs_size,
        "sections": [name for name, skipped in (("loopback", args.skip_loopback), ("rootfs", args.skip_rootfs),
                                                ("throttled", args.skip_throttled)) if not skipped],
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
