"""Real mounts for tests: run the `ocifs` command, always unmount in teardown."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as mounts:
        return any(line.split()[4] == target for line in mounts if len(line.split()) > 4)


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


def unmount(mountpoint: Path) -> None:
    if not is_mounted(mountpoint):
        return
    try:
        ocifs("umount", str(mountpoint), timeout=30)
    except subprocess.TimeoutExpired:
        pass  # detached below
    deadline = time.monotonic() + 10
    while is_mounted(mountpoint) and time.monotonic() < deadline:
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)
        time.sleep(0.1)


def fuse_mounts_under(root: Path) -> list[Path]:
    root_text = os.path.realpath(root)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 4 and fields[4].startswith(root_text) and "fuse" in line:
                found.append(Path(fields[4]))
    return found
