"""Real mounts for tests: run the `ocifs` command, always unmount in teardown, read
/proc/self/mountinfo, find the daemon serving a mount."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

MOUNTINFO = "/proc/self/mountinfo"
_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


class MountEntry(NamedTuple):
    """One line of mountinfo (proc(5)), unescaped. Names are bytes to the kernel: they are
    decoded as Python decodes file names (os.fsdecode), so any name round-trips to a path."""

    mount_point: str
    options: str  # per-mount options: "rw,nosuid,..."
    fstype: str  # "fuse.ocifs", "tmpfs", ...
    source: str
    super_options: str  # per-superblock options


def _unescape(field: bytes) -> str:
    """The kernel writes space, tab, newline and backslash as octal escapes (\\040 ...), and
    every other byte as it is: not necessarily UTF-8."""
    return os.fsdecode(_OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def parse_mountinfo_line(line: bytes) -> MountEntry:
    """`36 35 98:0 /root /mnt/point rw,noatime master:1 - ext3 /dev/root rw,errors=continue`:
    optional fields (master:1 ...) run up to the "-" separator. Fields are separated by one
    space; other whitespace (\\r, \\v, \\f) in names is not escaped, so split on spaces only."""
    fields = line.rstrip(b"\n").split(b" ")
    dash = fields.index(b"-", 6)
    return MountEntry(_unescape(fields[4]), _unescape(fields[5]), _unescape(fields[dash + 1]),
                      _unescape(fields[dash + 2]), _unescape(fields[dash + 3]))


def mountinfo_lines() -> list[bytes]:
    with open(MOUNTINFO, "rb") as mounts:
        return [line for line in mounts.read().split(b"\n") if line.strip()]


def mount_entries() -> list[MountEntry]:
    """Every mount this process sees, in mount order."""
    return [parse_mountinfo_line(line) for line in mountinfo_lines()]


def mount_entry(path: Path) -> MountEntry | None:
    """The mount on `path` (the last one, when mounts are stacked), or None."""
    target = os.path.realpath(path)
    found = [entry for entry in mount_entries() if entry.mount_point == target]
    return found[-1] if found else None


def is_mounted(path: Path) -> bool:
    return mount_entry(path) is not None


def fuse_mounts_under(root: Path) -> list[Path]:
    """The FUSE mounts on `root` or below it."""
    root_text = os.path.realpath(root)
    return [Path(entry.mount_point) for entry in mount_entries()
            if entry.fstype.split(".")[0] in ("fuse", "fuseblk")
            and (entry.mount_point == root_text or entry.mount_point.startswith(root_text.rstrip("/") + "/"))]


def ocifs(*args: str, timeout: float = 90, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ocifs", *args], capture_output=True, text=True,
                          timeout=timeout, input=stdin)


def mount(source: str, mountpoint: Path, *options: str, cache_dir: Path) -> Path:
    mountpoint.mkdir(parents=True, exist_ok=True)
    result = ocifs("mount", "--cache-dir", str(cache_dir), *options, source, str(mountpoint))
    if result.returncode != 0:
        raise AssertionError(f"ocifs mount failed ({result.returncode}): {result.stderr.strip()}")
    assert is_mounted(mountpoint), "mount returned 0 but nothing is mounted"
    return mountpoint


def force_unmount(mountpoint: Path, timeout: float = 5) -> None:
    """Detach `mountpoint` (lazily: busy or stale mounts too), waiting until it is gone."""
    deadline = time.monotonic() + timeout
    while is_mounted(mountpoint) and time.monotonic() < deadline:
        subprocess.run(["fusermount3", "-uz", os.fsencode(mountpoint)], capture_output=True, check=False)
        time.sleep(0.1)


def unmount(mountpoint: Path) -> None:
    if not is_mounted(mountpoint):
        return
    try:
        ocifs("umount", str(mountpoint), timeout=30)
    except subprocess.TimeoutExpired:
        pass  # detached below
    force_unmount(mountpoint, timeout=10)


def daemon_pid(mountpoint: Path) -> int:
    """The ocifs daemon serving `mountpoint` (its command line names the mountpoint)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"ocifs" in b" ".join(cmdline) and os.fsencode(mountpoint) in cmdline:
            return int(entry)
    raise AssertionError(f"no daemon for {mountpoint}")
