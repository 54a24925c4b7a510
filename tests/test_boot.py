"""Mounting at boot: the real `mount -t fuse.ocifs` and fstab lines (through fuse3's
mount.fuse3 and through our mount.fuse.ocifs helper), `ocifs SOURCE MNT -o OPTS`, and
`ocifs umount -z`."""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ocifs.mountopts import MountOptionError, parse_helper_argv, parse_mount_form
from ocifs.registry import RegistryClient

from .conftest import TEST_PASSWORD, TEST_USER, Mounter
from .content import push_artifact
from .helpers import errno_of, run, wait_gone
from .mounts import daemon_pid, force_unmount, is_mounted, mount_entry, ocifs
from .registry_server import RunningRegistry

ROOT = Path(__file__).resolve().parent.parent
MARK = "# ocifs test wrapper (tests/test_boot.py), removed after the test"
# mount(8) runs helpers with PATH reset to the standard one: what it finds must be there.
OCIFS_ON_STANDARD_PATH = Path("/usr/local/bin/ocifs")
HELPER = Path("/sbin/mount.fuse.ocifs")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) of a FUSE type needs root")


# ---- the option mapping (no process needed) ---------------------------------------------------


def test_fstab_options_map_to_ocifs_mount_arguments() -> None:
    command = parse_mount_form([
        "reg:5000/ns", "/mnt/x", "-o",
        "ro,allow_other,cache_dir=/var/cache/ocifs,ttl=30,timeout=5,cache_size=1G,offline,verify=full,"
        "log_file=/var/log/ocifs.log,debug,docker_config=/etc/ocifs/docker,rw,dev,suid,nofail,_netdev,"
        "noauto,user,defaults,x-systemd.requires=network-online.target,x-systemd.automount,noexec,max_read=65536",
    ])
    assert command.argv == [
        "--read-only", "--allow-other", "--cache-dir", "/var/cache/ocifs", "--ttl", "30", "--timeout", "5",
        "--cache-size", "1G", "--offline", "--verify", "full", "--log-file", "/var/log/ocifs.log", "--debug",
        "-o", "noexec,max_read=65536", "reg:5000/ns", "/mnt/x",
    ]
    assert command.environ == {"DOCKER_CONFIG": "/etc/ocifs/docker"}


def test_secrets_and_bad_helper_arguments_are_refused() -> None:
    for options in ("username=me", "password=x", "cache_dir="):
        with pytest.raises(MountOptionError):
            parse_mount_form(["reg/ns", "/mnt/x", "-o", options])
    helper = parse_helper_argv(["reg/ns", "/mnt/x", "-n", "-v", "-o", "ro,_netdev", "-t", "fuse.ocifs"])
    assert helper.argv == ["--read-only", "reg/ns", "/mnt/x"] and not helper.fake
    assert parse_helper_argv(["reg/ns", "/mnt/x", "-f"]).fake
    for argv in (["reg/ns"], ["reg/ns", "/mnt/x", "-t", "fuse.sshfs"], ["reg/ns", "/mnt/x", "-N", "1"]):
        with pytest.raises(MountOptionError):
            parse_helper_argv(argv)


def test_mount_form_errors_are_one_line(tmp_path: Path) -> None:
    result = ocifs("reg.example/ns", str(tmp_path), "-o", "ro,username=me")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "username=" in lines[0] and "docker login" in lines[0], result.stderr


# ---- real mount(8) ------------------------------------------------------------------------------


@contextmanager
def _installed(path: Path, text: str) -> Iterator[None]:
    """`text` as an executable at `path` for the duration; never replaces what someone installed."""
    if (path.exists() or path.is_symlink()) and MARK not in path.read_text(errors="replace"):
        pytest.skip(f"{path} exists: the test does not replace what is installed")
    path.write_text(text)
    path.chmod(0o755)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


@contextmanager
def _system_lock() -> Iterator[None]:
    """The wrappers live in system directories: one test at a time, across test runs."""
    with open("/run/lock/ocifs-test-boot.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _wrapper(python_code: str | None) -> str:
    """A script running this checkout's ocifs (not whatever is installed)."""
    run_it = f"-c '{python_code}'" if python_code else "-m ocifs"
    return f'#!/bin/sh\n{MARK}\nPYTHONPATH="{ROOT}" exec "{sys.executable}" {run_it} "$@"\n'


@pytest.fixture
def via_mount_fuse3() -> Iterator[None]:
    """`ocifs` on the standard PATH, no helper: mount(8) runs /sbin/mount.fuse (fuse3), which
    runs `ocifs SOURCE MNT -o OPTS`."""
    with _system_lock():
        if HELPER.exists():
            pytest.skip(f"{HELPER} exists: mount(8) would use it instead of mount.fuse3")
        with _installed(OCIFS_ON_STANDARD_PATH, _wrapper(None)):
            yield


@pytest.fixture
def via_helper() -> Iterator[None]:
    """/sbin/mount.fuse.ocifs (what the console script is linked as), and no `ocifs` on the
    standard PATH: mount(8) runs the helper directly."""
    with _system_lock():
        if OCIFS_ON_STANDARD_PATH.exists() and MARK not in OCIFS_ON_STANDARD_PATH.read_text(errors="replace"):
            pytest.skip(f"{OCIFS_ON_STANDARD_PATH} exists: the helper would not be the only route")
        with _installed(HELPER, _wrapper("import sys; from ocifs.cli import mount_helper; sys.exit(mount_helper())")):
            yield


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        yield mnt
    finally:
        if is_mounted(mnt):
            ocifs("umount", "--force", str(mnt), timeout=30)
        force_unmount(mnt)


def _check_read_only_mount(mnt: Path) -> None:
    entry = mount_entry(mnt)
    assert entry is not None and entry.fstype == "fuse.ocifs", entry
    assert "ro" in entry.options.split(","), entry
    assert "nosuid" in entry.options.split(",") and "nodev" in entry.options.split(","), entry
    assert "allow_other" in entry.super_options.split(","), entry
    assert (mnt / "t" / "f.txt").read_bytes() == b"booted"
    assert errno_of(lambda: (mnt / "t" / "new.txt").write_bytes(b"x")) == errno.EROFS


@needs_root
def test_mount_t_fuse_ocifs_through_mount_fuse3(client: RegistryClient, registry: RunningRegistry, repo: str,
                                                tmp_path: Path, mountpoint: Path, via_mount_fuse3: None) -> None:
    push_artifact(client, repo, "t", {"f.txt": b"booted"})
    cache = tmp_path / "cache"
    result = run("mount", "-t", "fuse.ocifs", f"{registry.host}/{repo}", str(mountpoint), "-o",
                 f"ro,allow_other,cache_dir={cache},ttl=5,_netdev,nofail,"
                 "x-systemd.requires=network-online.target", check=False)
    assert result.returncode == 0, result.stderr
    _check_read_only_mount(mountpoint)
    assert (cache / "ocifs.log").exists()  # the daemon logs into the cache dir, as `ocifs mount` does
    assert ocifs("umount", str(mountpoint)).returncode == 0
    assert not is_mounted(mountpoint)


@needs_root
def test_fstab_line_through_the_helper(client: RegistryClient, registry: RunningRegistry, repo: str,
                                       tmp_path: Path, mountpoint: Path, via_helper: None) -> None:
    push_artifact(client, repo, "t", {"f.txt": b"booted"})
    fstab = tmp_path / "fstab"
    log_file = tmp_path / "logs" / "ocifs.log"
    log_file.parent.mkdir()
    fstab.write_text(
        "# a line as in /etc/fstab\n"
        f"{registry.host}/{repo} {mountpoint} fuse.ocifs ro,allow_other,noauto,nofail,_netdev,"
        f"cache_dir={tmp_path / 'cache'},log_file={log_file},x-systemd.requires=network-online.target 0 0\n")
    # `mount MOUNTPOINT` with the line looked up in a private fstab (-T), as `mount /mnt/x` at boot.
    result = run("mount", "-T", str(fstab), str(mountpoint), check=False)
    assert result.returncode == 0, result.stderr
    _check_read_only_mount(mountpoint)
    assert log_file.exists()
    # umount(8) works on it too (the kernel's unmount; the daemon ends).
    pid = daemon_pid(mountpoint)
    assert run("umount", str(mountpoint), check=False).returncode == 0
    wait_gone(pid)
    assert not is_mounted(mountpoint)


@needs_root
def test_mount_failure_through_mount_is_reported(registry: RunningRegistry, tmp_path: Path, mountpoint: Path,
                                                 via_helper: None) -> None:
    result = run("mount", "-t", "fuse.ocifs", f"{registry.host}/no/such:tag", str(mountpoint), "-o",
                 f"ro,cache_dir={tmp_path / 'cache'}", check=False)
    assert result.returncode != 0
    assert "no/such" in result.stderr, result.stderr
    assert not is_mounted(mountpoint)


# ---- the mount form and credentials without secrets in fstab ------------------------------------


def test_docker_config_option_gives_the_credentials(auth_registry: RunningRegistry, auth_client: RegistryClient,
                                                    repo: str, tmp_path: Path, mountpoint: Path) -> None:
    push_artifact(auth_client, repo, "t", {"f.txt": b"private"})
    config = tmp_path / "docker"
    config.mkdir()
    token = base64.b64encode(f"{TEST_USER}:{TEST_PASSWORD}".encode()).decode()
    (config / "config.json").write_text(json.dumps({"auths": {auth_registry.host: {"auth": token}}}))
    source = f"{auth_registry.host}/{repo}"
    refused = ocifs(source, str(mountpoint), "-o", f"ro,cache_dir={tmp_path / 'cache'}")
    assert refused.returncode == 1 and not is_mounted(mountpoint)
    result = ocifs(source, str(mountpoint), "-o", f"ro,cache_dir={tmp_path / 'cache'},docker_config={config}")
    assert result.returncode == 0, result.stderr
    assert (mountpoint / "t" / "f.txt").read_bytes() == b"private"
    assert ocifs("umount", str(mountpoint)).returncode == 0


# ---- lazy unmount ------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["-z", "--lazy"])
def test_lazy_umount_of_a_busy_mount(flag: str, client: RegistryClient, registry: RunningRegistry, repo: str,
                                     mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f": b"held open"})
    mnt = mounter(f"{registry.host}/{repo}")
    pid = daemon_pid(mnt)
    holder = subprocess.Popen(["sh", "-c", 'exec 3<"$1"; read line; cat <&3', "sh", str(mnt / "t" / "f")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert ocifs("umount", str(mnt)).returncode == 1  # busy: a plain umount keeps it
        assert is_mounted(mnt)
        result = ocifs("umount", flag, str(mnt))
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mnt)
        # The open file still reads; the daemon ends once it is closed.
        out, _ = holder.communicate(b"go\n", timeout=30)
        assert out == b"held open"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    wait_gone(pid, timeout=20)
