"""What the mount shows of writes in progress, failed pushes and removed directories
(DESIGN.md sections 2 and 3): stat and readdir agree, names follow the registry once it
answers again, `rmdir` never claims success for a directory that stays, and a push that
failed is reported, retried in the background and holds back a plain unmount."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ocifs.digest import Digest
from ocifs.model import Manifest
from ocifs.registry import RegistryClient

from .conftest import Mounter, make_client
from .content import push_artifact, push_helm_chart
from .faultproxy import FaultProxy
from .mounts import is_mounted, ocifs
from .registry_server import RunningRegistry, start_registry
from .test_mount_write_failures import layer_titles


def run(*command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def errno_of(action: Callable[[], object]) -> int | None:
    try:
        action()
    except OSError as exc:
        return exc.errno
    return None


def scandir_inode(directory: Path, name: str) -> int:
    """The inode readdir gives `name` (d_ino), as `ls -i` and `find -inum` see it."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name == name:
                return entry.inode()
    raise AssertionError(f"{name} not listed in {directory}: {os.listdir(directory)}")


# ---- 1. stat and readdir agree on inodes --------------------------------------------------------


def test_stat_and_readdir_agree_on_the_inode_of_a_file_being_rewritten(
        client: RegistryClient, registry: RunningRegistry, repo: str, mounter: Mounter) -> None:
    """A file staged for rewrite (open for writing, not closed) has one inode: what stat(2)
    says is what readdir says, or `find -inum`, `ls -i` and tar's hard-link detection break."""
    push_artifact(client, repo, "t", {"a.txt": b"original", "other": b"o"})
    mnt = mounter(f"{registry.host}/{repo}")
    tag = mnt / "t"
    assert sorted(os.listdir(tag)) == ["a.txt", "other"]
    fd = os.open(tag / "a.txt", os.O_WRONLY)
    try:
        os.pwrite(fd, b"O", 0)  # a write invalidates the kernel's cached attributes
        assert os.stat(tag / "a.txt").st_ino == scandir_inode(tag, "a.txt")
    finally:
        os.close(fd)


def test_stat_and_readdir_agree_on_the_inode_of_a_new_file_while_open(
        client: RegistryClient, registry: RunningRegistry, repo: str, mounter: Mounter) -> None:
    """A new file keeps one inode while it is open: before its first push, and after a
    fsync pushed it while it stays open for more writes."""
    push_artifact(client, repo, "t", {"other": b"o"})
    mnt = mounter(f"{registry.host}/{repo}")
    tag = mnt / "t"
    fd = os.open(tag / "new.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, b"first")
        before_push = (os.stat(tag / "new.txt").st_ino, scandir_inode(tag, "new.txt"))
        os.fsync(fd)  # pushed now; still open
        assert "new.txt" in layer_titles(client, repo, "t")
        os.write(fd, b" second")
        after_push = (os.stat(tag / "new.txt").st_ino, scandir_inode(tag, "new.txt"))
    finally:
        os.close(fd)
    assert before_push[0] == before_push[1], "before the first push"
    assert after_push[0] == after_push[1], "after a push, while still open"


# ---- 2. Helm chart names once the config can be read -------------------------------------------


def test_helm_chart_gets_its_name_once_its_config_can_be_read(
        client: RegistryClient, repo: str, proxy: FaultProxy, mounter: Mounter) -> None:
    """A chart whose config blob failed to download is shown by digest for a while, not
    forever: once the registry serves the config, the tag lists `<name>-<version>.tgz`."""
    chart = os.urandom(3000)
    push_helm_chart(client, repo, "demo", "0.1.0", chart)
    manifest = client.get_manifest(repo, "0.1.0")
    assert isinstance(manifest, Manifest) and manifest.config is not None
    config_path = f"/v2/{repo}/blobs/{manifest.config.digest}"
    proxy.fail("GET", config_path, 500)
    mnt = mounter(f"{proxy.host}/{repo}", "--ttl", "1", "--timeout", "2")
    by_digest = Digest.of(chart).filename + ".tar.gz"
    assert run("ls", str(mnt / "0.1.0")).stdout.split() == [by_digest]
    assert 500 in proxy.requests("GET", config_path), "the config was never asked for"
    proxy.heal()
    listing: list[str] = []

    def named() -> bool:
        listing[:] = run("ls", str(mnt / "0.1.0")).stdout.split()
        return listing == ["demo-0.1.0.tgz"]

    assert wait_for(named, 20, interval=0.5), f"still {listing} 20 s after the registry healed"
    assert (mnt / "0.1.0" / "demo-0.1.0.tgz").read_bytes() == chart


# ---- 3. rmdir of a repository --------------------------------------------------------------------


def assert_rm_rf_does_not_lie(mnt: Path, name: str, result: subprocess.CompletedProcess[str]) -> None:
    """Exit 0 means the repository is gone from the mount (not listed, stat ENOENT); a
    failure says why and leaves the directory in place."""
    listed = name in os.listdir(mnt)
    stat_errno = errno_of(lambda: os.stat(mnt / name))
    if result.returncode == 0:
        assert not listed, f"rm -rf exited 0 but {name} is still listed"
        assert stat_errno == errno.ENOENT, f"rm -rf exited 0 but {name} can still be stat'ed ({stat_errno})"
    else:
        assert result.stderr.strip(), "rm -rf failed without saying why"
        assert listed and stat_errno is None, f"rm -rf failed but {name} is gone"


def test_rmdir_of_a_repository_never_succeeds_with_the_directory_still_there(
        client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path, mounter: Mounter) -> None:
    """`rmdir` of a repository: ENOTEMPTY while it has tags; `rm -rf` of one either exits 0
    and the repository is gone from the mount, or fails with a message and it stays (exit 0
    with the directory still listed is the bug); one made by `mkdir` and never pushed
    disappears."""
    namespace, name = repo.rsplit("/", 1)
    elsewhere, made_here, never_pushed = f"{name}-e", f"{name}-m", f"{name}-n"
    push_artifact(client, f"{namespace}/{elsewhere}", "t", {"f.txt": b"x"})
    mnt = mounter(f"{registry.host}/{namespace}")
    assert elsewhere in os.listdir(mnt)
    # (a) A repository with tags.
    assert errno_of(lambda: os.rmdir(mnt / elsewhere)) == errno.ENOTEMPTY
    assert elsewhere in os.listdir(mnt)
    assert list(client.tags(f"{namespace}/{elsewhere}")) == ["t"]
    # (b) A repository made and pushed through the mount, then removed with rm -rf.
    source = tmp_path / "f.txt"
    source.write_bytes(b"pushed by the mount\n")
    os.mkdir(mnt / made_here)
    os.mkdir(mnt / made_here / "1.0")
    copied = run("cp", str(source), f"{mnt}/{made_here}/1.0/")
    assert copied.returncode == 0, copied.stderr
    assert list(client.tags(f"{namespace}/{made_here}")) == ["1.0"]
    assert made_here in os.listdir(mnt)
    assert_rm_rf_does_not_lie(mnt, made_here, run("rm", "-rf", str(mnt / made_here)))
    # (b) The same for a repository pushed by another client.
    assert_rm_rf_does_not_lie(mnt, elsewhere, run("rm", "-rf", str(mnt / elsewhere)))
    # (c) A repository made by mkdir and never pushed disappears on rmdir.
    os.mkdir(mnt / never_pushed)
    assert stat.S_ISDIR(os.stat(mnt / never_pushed).st_mode)
    assert never_pushed in os.listdir(mnt)
    os.rmdir(mnt / never_pushed)
    assert never_pushed not in os.listdir(mnt)
    assert errno_of(lambda: os.stat(mnt / never_pushed)) == errno.ENOENT


# ---- 4. failed pushes are not forgotten --------------------------------------------------------


LATE = b"hello\n"


@dataclass
class FailedPush:
    """A mount of `p/repo` on its own registry, stopped; `late.txt` failed to push into tag t."""

    workdir: Path
    port: int
    server: RunningRegistry
    client: RegistryClient
    mnt: Path
    result: subprocess.CompletedProcess[str]

    def restart(self) -> None:
        self.server = start_registry(self.workdir, port=self.port)


@pytest.fixture
def failed_push(tmp_path: Path, mounter: Mounter) -> Iterator[FailedPush]:
    workdir = tmp_path / "reg"
    server = start_registry(workdir)
    port = int(server.host.rsplit(":", 1)[1])
    state: FailedPush | None = None
    try:
        client = make_client(server)
        push_artifact(client, "p/repo", "t", {"old.txt": b"old"})
        mnt = mounter(f"{server.host}/p/repo", "--timeout", "2")
        assert os.listdir(mnt / "t") == ["old.txt"]
        server.stop()
        # The shell ignores close()'s error: its exit status may well be 0.
        result = run("sh", "-c", f"echo hello > '{mnt}/t/late.txt'")
        assert (mnt / "t" / "late.txt").read_bytes() == LATE  # staged, visible in the mount
        state = FailedPush(workdir, port, server, client, mnt, result)
        yield state
    finally:
        try:
            mounter.unmount_all()
        finally:
            (state.server if state is not None else server).stop()


def read_status(mnt: Path) -> dict[str, object]:
    data = json.loads((mnt / ".ocifs" / "status").read_bytes())
    assert isinstance(data, dict)
    return data


def failed_entries(mnt: Path) -> list[dict[str, object]]:
    staged = read_status(mnt).get("staged")
    assert isinstance(staged, list), staged
    return [entry for entry in staged
            if str(entry.get("path", "")).endswith("late.txt") and entry.get("state") == "failed"]


def test_a_failed_push_is_reported_in_the_status_file(failed_push: FailedPush) -> None:
    """`MNT/.ocifs/status` (JSON) lists the staged file whose push failed, with the error."""
    mnt = failed_push.mnt
    entries: list[dict[str, object]] = []

    def reported() -> bool:
        entries[:] = failed_entries(mnt)
        return bool(entries)

    # A background retry may be under way at any moment: wait for the failed state.
    assert wait_for(reported, 10), read_status(mnt)
    assert entries[0].get("error"), entries[0]
    assert (mnt / "t" / "late.txt").read_bytes() == LATE


def test_umount_refuses_while_a_push_failed_then_succeeds_once_pushed(failed_push: FailedPush) -> None:
    """`ocifs umount` of a mount holding a file that could not be pushed exits 1, names the
    file and leaves the mount up; once the file is pushed, it unmounts (exit 0)."""
    mnt = failed_push.mnt
    refused = ocifs("umount", str(mnt), timeout=60)
    assert refused.returncode == 1, (refused.returncode, refused.stderr)
    assert "late.txt" in refused.stderr
    assert is_mounted(mnt)
    assert (mnt / "t" / "late.txt").read_bytes() == LATE
    failed_push.restart()
    assert wait_for(lambda: "late.txt" in layer_titles(failed_push.client, "p/repo", "t"), 45, interval=0.5)
    # Pushed: a plain umount works now (a few seconds' grace for the daemon's bookkeeping).
    outcomes: list[subprocess.CompletedProcess[str]] = []

    def unmounted() -> bool:
        outcomes.append(ocifs("umount", str(mnt), timeout=60))
        return outcomes[-1].returncode == 0

    assert wait_for(unmounted, 5, interval=0.5), outcomes[-1].stderr
    assert not is_mounted(mnt)


def test_a_failed_push_is_retried_in_the_background(failed_push: FailedPush) -> None:
    """Without anyone touching the file again, a failed push is retried (backoff up to
    30 s) and lands once the registry answers."""
    client = failed_push.client
    failed_push.restart()
    assert wait_for(lambda: "late.txt" in layer_titles(client, "p/repo", "t"), 45, interval=0.5), \
        "late.txt was not pushed within 45 s of the registry coming back"
    assert layer_titles(client, "p/repo", "t") == {"old.txt": Digest.of(b"old"), "late.txt": Digest.of(LATE)}


def test_umount_force_unmounts_with_a_failed_file(failed_push: FailedPush) -> None:
    """`ocifs umount --force` unmounts even while a file could not be pushed."""
    mnt = failed_push.mnt
    result = ocifs("umount", "--force", str(mnt), timeout=60)
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert wait_for(lambda: not is_mounted(mnt), 10)


def test_the_daemon_logs_to_the_cache_directory_by_default(failed_push: FailedPush, mounter: Mounter) -> None:
    """Without --log-file the background daemon logs to `<cache-dir>/ocifs.log`, private
    (0600): a failed push can be read about afterwards."""
    log_file = mounter.cache_dir / "ocifs.log"
    assert wait_for(lambda: log_file.exists() and "late.txt" in log_file.read_text(errors="replace"), 10), \
        f"{log_file}: {'missing' if not log_file.exists() else log_file.read_text(errors='replace')[-2000:]}"
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
