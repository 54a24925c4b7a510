"""`ocifs status`: what each live mount is doing, from its hidden `.ocifs/status` file.

The daemon builds that file's JSON with `daemon_status` (each open of the file takes a fresh
snapshot; the file is served with direct_io, so `cat` reads it whole whatever size `stat` saw).
The command finds the live ocifs mounts in /proc/self/mountinfo (type `fuse.ocifs`), reads each
one's file with a time limit (a stuck daemon must not hang `ocifs status`), and prints it.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from .cachetool import human
from .layout import CONTROL_DIR
from .registry.transport import Transport
from .store import BlobStore

# How long `ocifs status` waits for one mount's answer.
READ_WAIT = 5.0
FSTYPE = "fuse.ocifs"

_ESCAPE = re.compile(rb"\\([0-7]{3})")


def daemon_status(*, source: str, cache_dir: Path, log_file: str | None, read_only: bool,
                  store: BlobStore, transport: Transport) -> dict[str, Any]:
    """The mount's own part of `.ocifs/status` (the writer adds `staged` and `fragments`)."""
    try:
        usage: int | None = store.usage()
    except OSError:
        usage = None
    except Exception:  # noqa: BLE001 - a status read must not fail on a scan of the cache
        usage = None
    return {
        "source": source, "pid": os.getpid(), "cache_dir": str(cache_dir), "log_file": log_file,
        "read_only": read_only,
        "cache": {"usage": usage, "max_bytes": store.max_bytes},
        "store": store.stats(),
        "registry": {"rate_limit": transport.rate_limit()},
    }


def ocifs_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str]]:
    """(mount point, SOURCE) of each ocifs mount this process sees."""
    found: list[tuple[str, str]] = []
    try:
        with open(mountinfo, "rb") as lines:
            for line in lines:
                fields = line.rstrip(b"\n").split(b" ")
                try:
                    dash = fields.index(b"-", 6)
                except ValueError:
                    continue
                if len(fields) > dash + 2 and fields[dash + 1] == FSTYPE.encode():
                    found.append((_unescape(fields[4]), _unescape(fields[dash + 2])))
    except OSError:
        pass
    return found


def _unescape(field: bytes) -> str:
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def read(mountpoint: Path, wait: float = READ_WAIT) -> dict[str, Any]:
    """The mount's status JSON; {"error": why} when it cannot be read in time."""
    result: list[dict[str, Any]] = []

    def reader() -> None:
        try:
            data = json.loads((mountpoint / CONTROL_DIR / "status").read_bytes())
        except OSError as exc:
            result.append({"error": exc.strerror or str(exc)})
            return
        except ValueError as exc:
            result.append({"error": f"unreadable status: {exc}"})
            return
        result.append(data if isinstance(data, dict) else {"error": "unreadable status"})

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(wait)
    return result[0] if result else {"error": f"no answer within {wait:.0f} s"}


def collect(mountpoint: str | None = None) -> list[dict[str, Any]]:
    """One entry per live ocifs mount (or only `mountpoint`): mountpoint, source, status."""
    mounts = ocifs_mounts()
    if mountpoint is not None:
        target = os.path.realpath(mountpoint)
        mounts = [m for m in mounts if m[0] == target][-1:]
        if not mounts:
            raise LookupError(f"{mountpoint}: not an ocifs mount")
    return [{"mountpoint": point, "source": source, "status": read(Path(point))}
            for point, source in mounts]


# ---- printing ---------------------------------------------------------------------------------


def format_mount(entry: dict[str, Any]) -> str:
    status: dict[str, Any] = entry.get("status") or {}
    lines = [f"{entry['mountpoint']}: {status.get('source') or entry.get('source')}"]
    if "error" in status:
        lines.append(f"  not answering: {status['error']}")
        return "\n".join(lines) + "\n"
    cache = status.get("cache") or {}
    limit = cache.get("max_bytes")
    lines.append(f"  cache:     {status.get('cache_dir')} ({human(cache.get('usage'))}"
                 + (f" of {human(limit)})" if limit is not None else ")"))
    store = status.get("store") or {}
    lines.append(f"  fetched:   {human(store.get('fetched', 0))} from the registry; "
                 f"served {human(store.get('served', 0))} to readers")
    lines.append(f"  reads:     {store.get('reads_in_flight', 0)} in flight, "
                 f"{store.get('open_blobs', 0)} cached blob(s) open")
    for blob in store.get("fetching") or []:
        size, done = blob.get("size") or 0, blob.get("on_disk") or 0
        percent = f"{100 * done // size}%" if size else "-"
        lines.append(f"  fetching:  {blob.get('digest')} {human(done)} / {human(size)} ({percent})")
    staged = status.get("staged") or []
    pending = [s for s in staged if s.get("state") in ("pending", "writing")]
    failed = [s for s in staged if s.get("state") == "failed"]
    fragments = [s for s in staged if s.get("state") == "fragment"] + list(status.get("fragments") or [])
    lines.append(f"  pushes:    {len(pending)} pending, {len(failed)} failed, {len(fragments)} kept aside")
    for item in failed:
        lines.append(f"    failed:  {item.get('path')}: {item.get('error')}")
    for item in fragments:
        lines.append(f"    kept:    {item.get('path')}: {item.get('reason') or item.get('error')}")
    rate = (status.get("registry") or {}).get("rate_limit") or {}
    if rate:
        lines.append(f"  rate limit: {rate.get('ratelimit-remaining', '?')} remaining of "
                     f"{rate.get('ratelimit-limit', '?')}")
    return "\n".join(lines) + "\n"


def format_all(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "no ocifs mounts\n"
    return "\n".join(format_mount(entry) for entry in entries)
