"""ocifs against curl and oras-py, in one run, on a local registry (see scripts/bench).

Reads: curl of the blob (the wire), oras-py pull, and `cat` through ocifs cold (empty cache),
from the kernel's page cache, and from ocifs' disk cache after a remount. Writes: oras-py push
and `cp` into the mount. Memory: the daemon's peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ocifs.digest import Digest
from tests.clients import oras_client
from tests.conftest import make_client
from tests.content import push_artifact
from tests.faultproxy import FaultProxy
from tests.helpers import peak_rss_kib
from tests.mounts import daemon_pid, mount, unmount
from tests.registry_server import start_registry


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def cat(path: Path) -> None:
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def peak_rss_mib(mountpoint: Path) -> float:
    try:
        return peak_rss_kib(daemon_pid(mountpoint)) / 1024
    except (AssertionError, OSError):
        return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512, help="blob size in MiB (default 512)")
    parser.add_argument("--repos", type=int, default=50, help="repositories of the ls -lR walk (default 50)")
    parser.add_argument("--tags", type=int, default=4, help="tags per repository of the walk (default 4)")
    args = parser.parse_args()
    size = args.size * 1024 * 1024
    work = Path(tempfile.mkdtemp(prefix="ocifs-bench-"))
    server = start_registry(work / "registry")
    rows: list[tuple[str, float, str]] = []
    try:
        client = make_client(server)
        source = work / "blob.bin"
        hasher = hashlib.sha256()
        with open(source, "wb") as file:
            for _ in range(size // (8 << 20) or 1):
                block = os.urandom(min(8 << 20, size))
                hasher.update(block)
                file.write(block)
        size = source.stat().st_size
        digest = Digest("sha256", hasher.hexdigest())
        push_artifact(client, "bench/read", "v1", {"blob.bin": source.read_bytes()})
        mib = size / (1 << 20)
        url = f"{server.url}/v2/bench/read/blobs/{digest}"

        curl = timed(lambda: subprocess.run(["curl", "-sf", "-o", "/dev/null", url], check=True))
        rows.append(("curl GET blob (the wire)", mib / curl, "1.00x"))
        pulled = work / "pulled"
        oras = timed(lambda: oras_client(server).pull(target=f"{server.host}/bench/read:v1", outdir=str(pulled)))
        rows.append(("oras-py pull", mib / oras, f"{curl / oras:.2f}x"))

        mnt = mount(f"{server.host}/bench/read", work / "mnt", cache_dir=work / "cache")
        path = mnt / "v1" / "blob.bin"
        cold = timed(lambda: cat(path))
        rows.append(("ocifs cat, cold", mib / cold, f"{curl / cold:.2f}x"))
        warm = timed(lambda: cat(path))
        rows.append(("ocifs cat, page cache", mib / warm, f"{curl / warm:.2f}x"))
        read_rss = peak_rss_mib(mnt)
        unmount(mnt)
        mnt = mount(f"{server.host}/bench/read", work / "mnt", cache_dir=work / "cache")
        disk = timed(lambda: cat(mnt / "v1" / "blob.bin"))
        rows.append(("ocifs cat, disk cache after remount", mib / disk, f"{curl / disk:.2f}x"))
        unmount(mnt)

        fresh = work / "upload.bin"
        with open(fresh, "wb") as file:
            for _ in range(size // (8 << 20) or 1):
                file.write(os.urandom(min(8 << 20, size)))
        oras_push = timed(lambda: oras_client(server).push(target=f"{server.host}/bench/oras:v1",
                                                           files=[str(fresh)], disable_path_validation=True))
        rows.append(("oras-py push", mib / oras_push, "1.00x (push baseline)"))
        again = work / "upload2.bin"
        with open(again, "wb") as file:
            for _ in range(size // (8 << 20) or 1):
                file.write(os.urandom(min(8 << 20, size)))
        mnt = mount(f"{server.host}", work / "mnt", cache_dir=work / "cache")
        os.makedirs(mnt / "bench" / "cp" / "v1")
        push = timed(lambda: subprocess.run(["cp", str(again), str(mnt / "bench" / "cp" / "v1") + "/"], check=True))
        rows.append(("ocifs cp into a tag (push)", mib / push, f"{oras_push / push:.2f}x oras-py"))
        write_rss = peak_rss_mib(mnt)
        unmount(mnt)

        for r in range(args.repos):
            for t in range(args.tags):
                push_artifact(client, f"walk/r{r}", f"t{t}", {"f.txt": f"{r}:{t}".encode()})
        proxy = FaultProxy(server.host)  # counts what the walk asks
        try:
            mnt = mount(f"{proxy.host}/walk", work / "mnt", "--read-only", cache_dir=work / "walk-cache")
            walk = timed(lambda: subprocess.run(["ls", "-lR", str(mnt)], stdout=subprocess.DEVNULL, check=True))
            cold_requests = len(proxy.seen)
            rewalk = timed(lambda: subprocess.run(["ls", "-lR", str(mnt)], stdout=subprocess.DEVNULL, check=True))
            warm_requests = len(proxy.seen) - cold_requests
            unmount(mnt)
        finally:
            proxy.close()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"ocifs benchmark, {mib:.0f} MiB blob, local docker-registry on 127.0.0.1, {os.cpu_count()} cores")
    print(f"{'what':40} {'MiB/s':>8}  ratio")
    for name, rate, ratio in rows:
        print(f"{name:40} {rate:8.0f}  {ratio}")
    print(f"daemon peak RSS: {read_rss:.0f} MiB after reading, {write_rss:.0f} MiB after pushing")
    print(f"ls -lR of {args.repos} repositories x {args.tags} tags: {walk:.2f} s and {cold_requests} "
          f"requests cold; {rewalk:.2f} s and {warm_requests} requests again within the TTL")


if __name__ == "__main__":
    main()
