"""`ocifs cache info|prune|clear`: the cache directory seen from outside a mount.

Everything that decides what may go is the store's (BlobStore.prune/clear, the same scan and
removal rules as a mount's own eviction); this module only measures, calls and prints.

Safe beside live mounts:
  - staged files (CACHE/staging: written through a mount, not pushed yet, or kept aside as
    fragments) are never touched;
  - `prune` removes least recently opened blobs and partials first and spares what is in use:
    a complete blob a live mount holds open (the daemon takes a shared flock on every blob fd
    it opens; prune unlinks only under an exclusive, non-blocking flock) and a partial being
    downloaded (its chunk flock, or its files changed within BUSY_GRACE seconds);
  - `clear` removes every blob and partial, open or not: a mount reading a removed blob keeps
    reading through its open fd, and a download in progress is published from its own fds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import OcifsError, StoreError
from .store import BlobStore
from .store.blobstore import BUSY_GRACE, PruneResult
from .write.staging import StagingArea


@dataclass
class Count:
    count: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.count += 1
        self.bytes += size


@dataclass
class CacheInfo:
    location: str
    exists: bool
    size: int = 0  # every file under the location, by allocated blocks
    blobs: Count = field(default_factory=Count)
    partials: Count = field(default_factory=Count)
    staged: Count = field(default_factory=Count)
    fragments: Count = field(default_factory=Count)
    metadata: Count = field(default_factory=Count)  # refs/: last-known tags and catalogs

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _files(folder: Path) -> Iterator[os.stat_result]:
    """stat of each regular file directly in `folder` (none when it does not exist)."""
    try:
        listing = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    for item in listing:
        try:
            if item.is_file(follow_symlinks=False):
                yield item.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue


def _data_files(folder: Path) -> Iterator[int]:
    """Sizes of staged data files in `folder` (their `.json` records are not counted apart)."""
    try:
        listing = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    for item in listing:
        if item.name.endswith((".json", ".tmp")):
            continue
        try:
            if item.is_file(follow_symlinks=False):
                yield item.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            continue


def _tree_size(root: Path) -> int:
    total = 0
    for folder, _, _ in os.walk(root):
        for stat in _files(Path(folder)):
            total += stat.st_blocks * 512
    return total


def _open_store(cache_dir: Path) -> BlobStore:
    # No max_bytes: opening a store to look at it must not evict anything.
    try:
        return BlobStore(cache_dir, workers=1)
    except (OSError, OcifsError) as exc:
        raise StoreError(f"cache directory {cache_dir}: {exc}") from None


def info(cache_dir: Path) -> CacheInfo:
    result = CacheInfo(str(cache_dir), cache_dir.is_dir())
    if not result.exists:
        return result  # `info` never creates a cache
    store = _open_store(cache_dir)
    try:
        for entry in store.entries():
            (result.partials if entry.partial else result.blobs).add(entry.size)
    finally:
        store.close()
    staging = StagingArea(cache_dir, source="")
    for size in _data_files(staging.dir):
        result.staged.add(size)
    for size in _data_files(staging.fragments_dir):
        result.fragments.add(size)
    for folder, _, _ in os.walk(cache_dir / "refs"):
        for stat in _files(Path(folder)):
            result.metadata.add(stat.st_size)
    result.size = _tree_size(cache_dir)
    return result


def prune(cache_dir: Path, max_size: int, *, busy_grace: float = BUSY_GRACE) -> PruneResult:
    if not cache_dir.is_dir():
        return PruneResult()
    store = _open_store(cache_dir)
    try:
        return store.prune(max_size, busy_grace=busy_grace)
    finally:
        store.close()


def clear(cache_dir: Path) -> PruneResult:
    if not cache_dir.is_dir():
        return PruneResult()
    store = _open_store(cache_dir)
    try:
        result = store.clear()
    finally:
        store.close()
    # Last-known tags and catalogs (only an --offline fallback): files only, so that a live
    # mount's directories stay (its writes there are atomic renames).
    for folder, _, _ in os.walk(cache_dir / "refs"):
        for item in list(os.scandir(folder)):
            if item.is_file(follow_symlinks=False):
                try:
                    size = item.stat(follow_symlinks=False).st_size
                    os.unlink(item.path)
                except FileNotFoundError:
                    continue
                result.removed += 1
                result.freed += size
    return result


# ---- printing ---------------------------------------------------------------------------------


def human(size: int | None) -> str:
    """1536 -> 1.5 KiB."""
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_info(data: CacheInfo) -> str:
    if not data.exists:
        return f"cache: {data.location} (none yet)\n"
    lines = [f"cache:      {data.location}", f"size:       {human(data.size)}"]
    for label, count in (("blobs", data.blobs), ("partial", data.partials), ("staged", data.staged),
                         ("fragments", data.fragments), ("metadata", data.metadata)):
        lines.append(f"{label + ':':<11} {count.count} ({human(count.bytes)})")
    return "\n".join(lines) + "\n"


def format_result(verb: str, result: PruneResult) -> str:
    busy = f"; {result.busy} in use, kept" if result.busy else ""
    return (f"{verb} {result.removed} item(s), {human(result.freed)}; "
            f"blobs and partials now use {human(result.usage)}{busy}\n")
