"""Integrity of the write path (DESIGN.md section 3): a fragment (a file whose writes never all
succeeded: the daemon killed mid-write, a disk full) is never pushed, it is kept aside and
reported; concurrent writers, in one mount or in several, lose nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from ocifs.digest import Digest
from ocifs.registry import RegistryClient

from .conftest import Mounter
from .content import push_artifact
from .mounts import is_mounted, ocifs
from .registry_server import RunningRegistry
from .test_mount_lifecycle import daemon_pid, wait_gone
from .test_mount_write_failures import layer_titles

MiB = 1024 * 1024


def random_file(path: Path, size: int) -> None:
    """`size` random bytes at `path`, written in blocks."""
    with open(path, "wb") as file:
        left = size
        while left:
            block = os.urandom(min(8 * MiB, left))
            file.write(block)
            left -= len(block)


def size_of(path: Path) -> int:
    """The size of `path`, 0 once it is gone (staged files move)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def loose_staged_files(cache: Path) -> list[Path]:
    """Data files of files being staged (`staging/stage-*`, not their records)."""
    staging = cache / "staging"
    if not staging.is_dir():
        return []
    return [p for p in staging.glob("stage-*") if p.is_file() and not p.name.endswith((".json", ".tmp"))]


def is_prefix_of(fragment: Path, source: Path) -> bool:
    """Whether `fragment` holds the first bytes of `source`, exactly."""
    with open(fragment, "rb") as part, open(source, "rb") as whole:
        while block := part.read(8 * MiB):
            if whole.read(len(block)) != block:
                return False
    return True


def mount_capturing(source: str, mountpoint: Path, cache: Path, mounter: Mounter) -> str:
    """Mount with the real `ocifs mount` command (unmounted by `mounter` at the end); its stderr."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    mounter.mounted.append(mountpoint)
    result = ocifs("mount", "--cache-dir", str(cache), source, str(mountpoint))
    assert result.returncode == 0, f"ocifs mount failed ({result.returncode}): {result.stderr.strip()}"
    assert is_mounted(mountpoint)
    return result.stderr


def assert_never_pushed(client: RegistryClient, repo: str, tag: str, title: str, cache: Path,
                        *, settle: float = 60, window: float = 5) -> None:
    """`title` never reaches `repo:tag`: wait until the mount has dealt with what was staged (no
    loose staged file left: pushed and adopted, or kept aside), then watch the tag a while longer."""
    def check() -> None:
        pushed = layer_titles(client, repo, tag).get(title)
        if pushed is not None:
            raise AssertionError(f"the fragment {title} was pushed to {repo}:{tag} as {pushed} "
                                 f"({client.blob_size(repo, pushed)} bytes)")

    deadline = time.monotonic() + settle
    while loose_staged_files(cache) and time.monotonic() < deadline:
        check()
        time.sleep(0.2)
    deadline = time.monotonic() + window
    while True:
        check()
        if time.monotonic() >= deadline:
            return
        time.sleep(0.2)


def runs(data: bytes) -> str:
    """`data` as runs of one byte, for messages: "b'a' x 1048576 + b'd' x 1048576"."""
    parts: list[str] = []
    start = 0
    while start < len(data):
        end = start + 1
        while end < len(data) and data[end] == data[start]:
            end += 1
        parts.append(f"{bytes([data[start]])!r} x {end - start}")
        if len(parts) > 8:
            return " + ".join(parts) + " + ..."
        start = end
    return " + ".join(parts) or "empty"


def status_of(mnt: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((mnt / ".ocifs" / "status").read_text())


# ---- fragments ------------------------------------------------------------------------------


def test_fragment_left_by_kill_9_is_kept_aside_never_pushed(client: RegistryClient, registry: RunningRegistry,
                                                             repo: str, tmp_path: Path, mounter: Mounter) -> None:
    """A file the daemon was killed in the middle of writing is not a file the user wrote: the
    next mount never pushes it; it keeps its bytes aside and says so (mount's stderr, status)."""
    push_artifact(client, repo, "t", {"old.txt": b"old"})
    source = f"{registry.host}/{repo}"
    cache = mounter.cache_dir
    mnt = mounter(source)
    big = tmp_path / "big.bin"
    random_file(big, 300 * MiB)
    pid = daemon_pid(mnt)
    cp = subprocess.Popen(["cp", str(big), f"{mnt}/t/"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            if any(size_of(p) > 60 * MiB for p in loose_staged_files(cache)):
                break
            assert cp.poll() is None, f"cp ended before 60 MiB were staged: {cp.stderr.read()!r}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "60 MiB never staged"
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
    finally:
        cp.kill()
        cp.wait(30)
    mounter.unmount_all()
    assert not is_mounted(mnt)

    mnt2 = tmp_path / "again"
    stderr = mount_capturing(source, mnt2, cache, mounter)
    assert_never_pushed(client, repo, "t", "big.bin", cache)
    assert layer_titles(client, repo, "t") == {"old.txt": Digest.of(b"old")}
    assert "big.bin" not in os.listdir(mnt2 / "t")
    # Reported, and kept.
    assert "kept aside" in stderr, stderr
    assert "big.bin" in stderr, stderr
    fragments = [p for p in (cache / "staging" / "fragments").rglob("*")
                 if p.is_file() and not p.name.endswith(".json")]
    assert any(p.stat().st_size > 60 * MiB and is_prefix_of(p, big) for p in fragments), fragments
    entries = status_of(mnt2).get("fragments", [])
    assert any(str(entry.get("path", "")).endswith("big.bin") for entry in entries), entries


def test_fragment_left_by_a_full_disk_is_kept_aside_never_pushed(client: RegistryClient, registry: RunningRegistry,
                                                                 repo: str, tmp_path: Path, mounter: Mounter) -> None:
    """A cp that failed with ENOSPC leaves a fragment: neither the unmount nor the next mount of
    the same SOURCE pushes it; the next mount says it was kept aside."""
    push_artifact(client, repo, "t", {"f": b"x"})
    source = f"{registry.host}/{repo}"
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(small)], check=True)
    try:
        cache = small / "cache"
        mnt = mounter(source, cache_dir=cache)
        big = tmp_path / "big.bin"
        random_file(big, 96 * MiB)
        result = subprocess.run(["cp", str(big), f"{mnt}/t/"], capture_output=True, text=True, timeout=120)
        assert result.returncode != 0
        assert "No space left on device" in result.stderr, result.stderr
        assert set(layer_titles(client, repo, "t")) == {"f"}
        # A clean unmount (forced, if the new contract asks for it).
        umount = ocifs("umount", str(mnt), timeout=60)
        if umount.returncode == 1:
            umount = ocifs("umount", "--force", str(mnt), timeout=60)
        assert umount.returncode == 0, umount.stderr
        assert not is_mounted(mnt)
        assert set(layer_titles(client, repo, "t")) == {"f"}, "the unmount pushed the fragment"

        mnt2 = tmp_path / "again"
        stderr = mount_capturing(source, mnt2, cache, mounter)
        assert_never_pushed(client, repo, "t", "big.bin", cache)
        assert set(layer_titles(client, repo, "t")) == {"f"}
        assert "kept aside" in stderr, stderr
        assert "big.bin" in stderr, stderr
    finally:
        mounter.unmount_all()
        subprocess.run(["umount", "-l", str(small)], check=False)


# ---- concurrent writers ---------------------------------------------------------------------


def test_two_mounts_copying_into_one_tag_lose_nothing(client: RegistryClient, registry: RunningRegistry,
                                                      repo: str, tmp_path: Path, mounter: Mounter) -> None:
    """Two mounts (two daemons, two caches) each running six cp into the same tag at once: every
    cp succeeds and the tag ends with every file, each with its own digest."""
    rounds = 3
    for round_no in range(rounds):
        push_artifact(client, repo, f"t{round_no}", {"base.txt": b"base"})
    source = f"{registry.host}/{repo}"
    mounts = [mounter(source, cache_dir=tmp_path / "c1"), mounter(source, cache_dir=tmp_path / "c2")]
    src = tmp_path / "src"
    src.mkdir()
    for round_no in range(rounds):
        tag = f"t{round_no}"
        expected = {"base.txt": Digest.of(b"base")}
        copies: list[tuple[str, Path]] = []  # (file name, the mount it is copied into)
        for which, mnt in enumerate(mounts):
            for i in range(6):
                name = f"r{round_no}-m{which}-{i}.bin"
                data = os.urandom(2000 + 97 * i + 1000 * which)
                (src / name).write_bytes(data)
                expected[name] = Digest.of(data)
                copies.append((name, mnt))
        jobs = [(name, subprocess.Popen(["cp", str(src / name), f"{mnt}/{tag}/"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
                for name, mnt in copies]
        failed: dict[str, str] = {}
        for name, job in jobs:
            _, err = job.communicate(timeout=120)
            if job.returncode != 0:
                failed[name] = err.decode(errors="replace")
        assert not failed, f"round {round_no}: cp failed: {failed}"
        now = layer_titles(client, repo, tag)
        missing = sorted(set(expected) - set(now))
        assert not missing, f"round {round_no}: {len(missing)} of {len(expected)} files lost: {missing}"
        assert now == expected, f"round {round_no}"


def two_writers(path: Path, halves: tuple[bytes, bytes]) -> None:
    """Two threads open `path` (O_WRONLY|O_CREAT), both before either writes; each writes its half
    (the first at 0, the second right after) and both close once both have written."""
    barrier = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            barrier.wait()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                barrier.wait()  # both opens happened before any write
                view = memoryview(halves[index])
                offset = index * len(halves[0])
                while view:
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written
                barrier.wait()  # both wrote before either closes
            finally:
                os.close(fd)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads), "a writer hung"
    assert not errors, errors


def test_concurrent_opens_of_one_path_share_one_file(client: RegistryClient, registry: RunningRegistry,
                                                     repo: str, mounter: Mounter) -> None:
    """POSIX: two opens of one path in one mount name one file. Two writers open the same name
    before either writes, each writes its own half and both close: the pushed file holds both
    halves. Both for a new name and for the same name once it is a file of the tag."""
    push_artifact(client, repo, "t", {"f": b"x"})
    mnt = mounter(f"{registry.host}/{repo}")
    half = MiB
    for attempt in range(5):
        path = mnt / "t" / f"same{attempt}.bin"
        for round_no, halves in enumerate(((b"a" * half, b"b" * half), (b"c" * half, b"d" * half))):
            # Round 0 creates the name; in round 1 it is a file of the tag, opened again by both.
            two_writers(path, halves)
            expected = Digest.of(halves[0] + halves[1])
            pushed = layer_titles(client, repo, "t").get(path.name)
            if pushed != expected:
                content = runs(b"".join(client.fetch_blob(repo, pushed))) if pushed else "nothing"
                raise AssertionError(f"attempt {attempt}, {'new name' if round_no == 0 else 'existing file'}: "
                                     f"{path.name} pushed as {content}, not both halves")
            assert path.read_bytes() == halves[0] + halves[1]
