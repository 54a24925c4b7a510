"""Small helpers shared by the test modules: waiting, processes, errnos, commands, and what a
tag holds in the registry. Mount helpers (mountinfo, the `ocifs` command) are in mounts.py."""

from __future__ import annotations

import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from ocifs.digest import Digest
from ocifs.model import Manifest
from ocifs.registry import RegistryClient

# ---- waiting and processes ------------------------------------------------------------------


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds passed; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not reaped, does not count)."""
    try:
        # The command name, in parentheses, may hold spaces and parentheses: the state follows the last ")".
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_gone(pid: int, timeout: float = 10) -> None:
    if not wait_until(lambda: not process_alive(pid), timeout):
        raise AssertionError(f"process {pid} still alive")


def peak_rss_kib(pid: int) -> int:
    """The peak resident set size of `pid` so far (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for process {pid}")


# ---- programs and errnos --------------------------------------------------------------------


def run(*command: str, check: bool = True, timeout: float = 120, cwd: Path | None = None,
        stdin: int | None = None) -> subprocess.CompletedProcess[str]:
    """A real program, output captured as text; CalledProcessError on failure when `check`."""
    return subprocess.run(command, capture_output=True, text=True, check=check, timeout=timeout, cwd=cwd,
                          stdin=stdin)


def errno_of(action: Callable[..., object]) -> int | None:
    """The errno of the OSError `action` raises; None when it raises nothing."""
    try:
        action()
    except OSError as exc:
        return exc.errno
    return None


# ---- what the registry holds ----------------------------------------------------------------


def manifest_of(client: RegistryClient, repo: str, tag: str) -> Manifest:
    manifest = client.get_manifest(repo, tag)
    assert isinstance(manifest, Manifest)
    return manifest


def manifest_titles(manifest: Manifest) -> dict[str, Digest]:
    """title -> digest of the manifest's layers (an untitled layer, such as the empty
    placeholder, shows as "")."""
    return {layer.title or "": layer.digest for layer in manifest.layers}


def layer_titles(client: RegistryClient, repo: str, tag: str) -> dict[str, Digest]:
    """title -> digest of the tag's layers, as the registry has them now."""
    return manifest_titles(manifest_of(client, repo, tag))


def allocated_bytes(folder: Path) -> int:
    """Disk blocks taken by the files under `folder`, counted while a mount may be adding,
    renaming or evicting files there (one that vanishes between listing and stat counts 0)."""
    total = 0
    for path in folder.rglob("*"):
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            total += st.st_blocks * 512
    return total
