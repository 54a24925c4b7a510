"""Never stuck, never fooled (issue 8, cases 2, 4, 5, 6, 10, 11 and 12): an endless catalog,
a cache directory on a full or read-only file system, names created by another client,
HTTPS on loopback, `ocifs umount` of what is not an ocifs mount, a registry that wants
credentials, and a registry that lies in Docker-Content-Digest for tags.

Real registries (Debian's docker-registry, with TLS where needed) and real mounts; what no
real registry does on purpose comes from FakeServers. Every wait is a poll with a deadline:
a program inside a FUSE request cannot even be killed until the daemon answers, so programs
that may get stuck run in the background and are released at teardown by killing the
daemon that holds them.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import requests

from ocifs.digest import Digest
from ocifs.model import ANNOTATION_TITLE, EMPTY_DESCRIPTOR, EMPTY_JSON, OCI_LAYER_TAR, OCI_MANIFEST
from ocifs.reference import Registry
from ocifs.registry import ClientOptions, Credentials, RegistryClient, TransportOptions

from .conftest import TEST_PASSWORD, TEST_USER, Mounter, make_client
from .content import push_artifact
from .fakeserver import FakeServer, Reply, Request, error_reply
from .helpers import errno_of, process_alive, run, wait_until
from .mounts import daemon_pid, force_unmount, is_mounted, mount_entry, ocifs
from .registry_server import REGISTRY_BINARY, RunningRegistry, free_port

MiB = 1024 * 1024


# ---- programs that may get stuck in a FUSE request ---------------------------------------------


class Background:
    """A real program running in the background, output in files (no pipe to fill up)."""

    def __init__(self, *argv: str) -> None:
        self.argv = argv
        self._out = tempfile.TemporaryFile()
        self._err = tempfile.TemporaryFile()
        self.started = time.monotonic()
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err)
        self.elapsed: float | None = None

    def done(self) -> bool:
        if self.process.poll() is None:
            return False
        if self.elapsed is None:
            self.elapsed = time.monotonic() - self.started
        return True

    def wait(self, limit: float) -> bool:
        """Whether it ended within `limit` seconds of its start (never blocks longer)."""
        return wait_until(self.done, max(0.0, self.started + limit - time.monotonic()), 0.02)

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def _read(self, file: Any) -> str:
        file.seek(0)
        return str(file.read().decode(errors="replace"))

    @property
    def stdout(self) -> str:
        return self._read(self._out)

    @property
    def stderr(self) -> str:
        return self._read(self._err)

    def describe(self) -> str:
        state = f"exit {self.returncode} after {self.elapsed:.1f} s" if self.done() else \
            f"still running after {time.monotonic() - self.started:.1f} s"
        return f"{' '.join(self.argv)}: {state}; stderr: {self.stderr.strip()[-300:]!r}"


class Reaper:
    """Releases what a stuck daemon holds: the daemon is killed (its requests then fail with
    ENOTCONN and the programs in them return), then the programs, then the mount is detached."""

    def __init__(self) -> None:
        self.daemons: list[tuple[int, Path]] = []
        self.programs: list[Background] = []

    def watch(self, mountpoint: Path) -> int:
        pid = daemon_pid(mountpoint)
        self.daemons.append((pid, mountpoint))
        return pid

    def start(self, *argv: str) -> Background:
        program = Background(*argv)
        self.programs.append(program)
        return program

    def reap(self) -> None:
        for pid, _ in self.daemons:
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
        for pid, _ in self.daemons:
            wait_until(partial(gone, pid), 10)
        for program in self.programs:
            if program.process.poll() is None:
                program.process.kill()
        for program in self.programs:
            wait_until(program.done, 10)
        for _, mountpoint in self.daemons:
            force_unmount(mountpoint)


def gone(pid: int) -> bool:
    return not process_alive(pid)


@pytest.fixture
def reaper(mounter: Mounter) -> Iterator[Reaper]:
    """Torn down before `mounter`, whose unmount would wait on a stuck daemon."""
    instance = Reaper()
    try:
        yield instance
    finally:
        instance.reap()


# ---- a scripted registry ------------------------------------------------------------------------


def manifest_bytes(files: dict[str, bytes]) -> bytes:
    layers = [{"mediaType": OCI_LAYER_TAR, "digest": str(Digest.of(data)), "size": len(data),
               "annotations": {ANNOTATION_TITLE: title}} for title, data in files.items()]
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "artifactType": "application/vnd.unknown.artifact.v1",
                       "config": EMPTY_DESCRIPTOR.to_dict(), "layers": layers}).encode()


HeaderHook = Callable[[str, str, str, dict[str, str]], dict[str, str]]


class ScriptedRegistry:
    """Repositories of tags -> manifest bytes, blobs by digest, a catalog handler, and a hook
    that may rewrite the headers of a manifest answer: hook(method, repo, reference, headers)."""

    def __init__(self) -> None:
        self.server = FakeServer()
        self.manifests: dict[str, dict[str, bytes]] = {}
        self.tags: dict[str, list[str]] = {}
        self.blobs: dict[str, bytes] = {str(Digest.of(EMPTY_JSON)): EMPTY_JSON}
        self.catalog: Callable[[Request], Reply] | None = None
        self.header_hook: HeaderHook | None = None
        self.server.route("*", "/v2/.*", self._dispatch)

    @property
    def host(self) -> str:
        return self.server.host

    def add_artifact(self, repo: str, tag: str | None, files: dict[str, bytes]) -> tuple[Digest, bytes]:
        for data in files.values():
            self.blobs[str(Digest.of(data))] = data
        raw = manifest_bytes(files)
        digest = Digest.of(raw)
        refs = self.manifests.setdefault(repo, {})
        refs[str(digest)] = raw
        if tag is not None:
            refs[tag] = raw
            self.tags.setdefault(repo, []).append(tag)
        return digest, raw

    def catalog_requests(self) -> int:
        return len(self.server.seen("GET", "/v2/_catalog"))

    def _dispatch(self, request: Request) -> Reply:
        path = request.path
        if path == "/v2/":
            return Reply(200, {})
        if path == "/v2/_catalog":
            return self.catalog(request) if self.catalog else error_reply(404, "UNSUPPORTED")
        match = re.fullmatch(r"/v2/(.+)/tags/list", path)
        if match:
            if match.group(1) not in self.tags:
                return error_reply(404, "NAME_UNKNOWN", "repository name not known to registry")
            return Reply(200, {"name": match.group(1), "tags": self.tags[match.group(1)]})
        match = re.fullmatch(r"/v2/(.+)/manifests/([^/]+)", path)
        if match:
            repo, reference = match.groups()
            raw = self.manifests.get(repo, {}).get(reference)
            if raw is None:
                return error_reply(404, "MANIFEST_UNKNOWN", "manifest unknown")
            headers = {"Content-Type": OCI_MANIFEST, "Content-Length": str(len(raw)),
                       "Docker-Content-Digest": str(Digest.of(raw))}
            if self.header_hook is not None:
                headers = self.header_hook(request.method, repo, reference, headers)
            return Reply(200, b"" if request.method == "HEAD" else raw, headers)
        match = re.fullmatch(r"/v2/(.+)/blobs/([^/]+)", path)
        if match:
            data = self.blobs.get(match.group(2))
            if data is None:
                return error_reply(404, "BLOB_UNKNOWN", "blob unknown")
            return Reply(200, b"" if request.method == "HEAD" else data,
                         {"Content-Length": str(len(data)), "Content-Type": "application/octet-stream"})
        return error_reply(404, "NOT_FOUND")

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def scripted() -> Iterator[ScriptedRegistry]:
    registry = ScriptedRegistry()
    try:
        yield registry
    finally:
        registry.close()


# ---- case 2: a catalog that pages forever -------------------------------------------------------


def endless_catalog(request: Request) -> Reply:
    """Page k lists z<k>/r0..r2 (the first page also a/b) and links to page k+1, forever."""
    last = request.query.get("last", [""])[0]
    page = int(last[1:7]) + 1 if re.fullmatch(r"z\d{6}/r\d", last) else 0
    names = [f"z{page:06d}/r{i}" for i in range(3)]
    if page == 0:
        names.insert(0, "a/b")
    return Reply(200, {"repositories": names}, {"Link": f'</v2/_catalog?last={names[-1]}&n=3>; rel="next"'})


@pytest.fixture
def endless(scripted: ScriptedRegistry) -> ScriptedRegistry:
    scripted.add_artifact("a/b", "t", {"f.txt": b"found by name"})
    scripted.catalog = endless_catalog
    return scripted


def mount_endless(endless: ScriptedRegistry, mounter: Mounter, reaper: Reaper) -> tuple[Path, int]:
    mnt = mounter(endless.host, "--read-only", "--timeout", "5")
    return mnt, reaper.watch(mnt)


def test_an_endless_catalog_does_not_hold_a_lookup_by_name(endless: ScriptedRegistry, mounter: Mounter,
                                                           reaper: Reaper) -> None:
    mnt, _ = mount_endless(endless, mounter, reaper)
    looked_up = reaper.start("stat", str(mnt / "a" / "b" / "t"))
    assert looked_up.wait(5), f"{looked_up.describe()}; {endless.catalog_requests()} catalog pages asked"
    assert looked_up.returncode == 0, looked_up.describe()
    read = reaper.start("cat", str(mnt / "a" / "b" / "t" / "f.txt"))
    assert read.wait(5), f"{read.describe()}; {endless.catalog_requests()} catalog pages asked"
    assert read.returncode == 0 and read.stdout == "found by name", read.describe()


def test_an_endless_catalog_lists_what_it_found_in_bounded_time(endless: ScriptedRegistry, mounter: Mounter,
                                                                reaper: Reaper) -> None:
    mnt, _ = mount_endless(endless, mounter, reaper)
    listing = reaper.start("ls", str(mnt))
    assert listing.wait(15), f"{listing.describe()}; {endless.catalog_requests()} catalog pages asked"
    assert listing.returncode == 0, listing.describe()
    assert "a" in listing.stdout.split(), listing.stdout[:500]


def test_umount_ends_a_mount_listing_an_endless_catalog(endless: ScriptedRegistry, mounter: Mounter,
                                                        reaper: Reaper) -> None:
    mnt, _ = mount_endless(endless, mounter, reaper)
    listing = reaper.start("ls", str(mnt))
    assert wait_until(lambda: endless.catalog_requests() >= 3, 5), "the listing never started"
    umount = reaper.start(*ocifs_argv("umount", str(mnt)))
    assert umount.wait(10), f"{umount.describe()}; {endless.catalog_requests()} catalog pages asked"
    if umount.returncode != 0:
        # The `ls` may still hold the root open (busy, as umount(8) says); it must end soon
        # (the listing's budget), and then the mount goes.
        assert "busy" in umount.stderr.lower(), umount.describe()
        assert listing.wait(15), listing.describe()
        again = reaper.start(*ocifs_argv("umount", str(mnt)))
        assert again.wait(10) and again.returncode == 0, again.describe()
    assert not is_mounted(mnt)


def test_sigterm_ends_a_daemon_listing_an_endless_catalog(endless: ScriptedRegistry, mounter: Mounter,
                                                          reaper: Reaper) -> None:
    mnt, pid = mount_endless(endless, mounter, reaper)
    reaper.start("ls", str(mnt))
    assert wait_until(lambda: endless.catalog_requests() >= 3, 5), "the listing never started"
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not process_alive(pid), 10), (
        f"the daemon still runs {time.monotonic() - started:.1f} s after SIGTERM; "
        f"{endless.catalog_requests()} catalog pages asked")
    assert wait_until(lambda: not is_mounted(mnt), 5)


def ocifs_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "ocifs", *args]


# ---- case 4: the cache directory on a full or read-only file system -----------------------------


@contextmanager
def tmpfs(path: Path, size: str = "16m") -> Iterator[Path]:
    """A small tmpfs mounted by the test; always unmounted at the end."""
    path.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "ocifs-test-tmpfs", str(path))
    try:
        yield path
    finally:
        # The daemon that used it may take a moment to go; then detach it lazily.
        wait_until(lambda: not is_mounted(path) or subprocess.run(
            ["umount", str(path)], capture_output=True).returncode == 0, 10, 0.2)
        if is_mounted(path):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def used_bytes(path: Path) -> int:
    vfs = os.statvfs(path)
    return (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize


def free_bytes(path: Path) -> int:
    vfs = os.statvfs(path)
    return vfs.f_bavail * vfs.f_frsize


def fill(filesystem: Path, leave: int = 0) -> Path:
    """Fill `filesystem` with one fallocated file, leaving about `leave` bytes free."""
    filler = filesystem / f"filler{len(list(filesystem.glob('filler*')))}"
    for _ in range(20):
        # The mount may still be writing (metadata goes to the cache in the background):
        # what was free a moment ago may not be any more.
        if run("fallocate", "-l", str(free_bytes(filesystem) - leave), str(filler),
               check=False).returncode == 0:
            return filler
        time.sleep(0.05)
    raise AssertionError(f"cannot fill {filesystem}")


def test_a_cache_on_a_full_disk_still_serves_a_small_file(client: RegistryClient, registry: RunningRegistry,
                                                          repo: str, mounter: Mounter, tmp_path: Path) -> None:
    push_artifact(client, repo, "t", {"six.txt": b"6bytes", "other.bin": os.urandom(100_000)})
    with tmpfs(tmp_path / "small") as disk:
        try:
            mnt = mounter(f"{registry.host}/{repo}", "--read-only", "--log-file", str(tmp_path / "log"),
                          cache_dir=disk / "cache")
            assert sorted(os.listdir(mnt / "t")) == ["other.bin", "six.txt"]  # metadata known
            fill(disk)
            assert free_bytes(disk) < 8192
            result = run("cat", str(mnt / "t" / "six.txt"), check=False, timeout=30)
            assert result.returncode == 0 and result.stdout == "6bytes", result.stderr
        finally:
            mounter.unmount_all()


def test_a_failed_download_on_a_full_disk_leaves_nothing_behind(client: RegistryClient,
                                                                registry: RunningRegistry, repo: str,
                                                                mounter: Mounter, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)
    push_artifact(client, repo, "t", {"big.bin": data})
    with tmpfs(tmp_path / "small") as disk:
        try:
            mnt = mounter(f"{registry.host}/{repo}", "--read-only", "--log-file", str(tmp_path / "log"),
                          cache_dir=disk / "cache")
            assert os.listdir(mnt / "t") == ["big.bin"]
            fill(disk, leave=MiB)  # room for a third of the blob
            before = used_bytes(disk)
            result = subprocess.run(["cat", str(mnt / "t" / "big.bin")], capture_output=True, timeout=60,
                                    check=False)
            # Whatever was cached of it on the way, nothing of a download that failed stays.
            assert wait_until(lambda: used_bytes(disk) - before <= 64 * 1024, 5), (
                f"{used_bytes(disk) - before} bytes more used after the read "
                f"(exit {result.returncode}: {result.stderr.decode(errors='replace').strip()})")
            assert result.returncode == 0, result.stderr.decode(errors="replace")
            assert result.stdout == data  # served from the network
        finally:
            mounter.unmount_all()


def test_a_read_only_cache_still_serves_what_it_holds(client: RegistryClient, registry: RunningRegistry,
                                                      repo: str, mounter: Mounter, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    push_artifact(client, repo, "t", {"kept.bin": data})
    blob = Digest.of(data)
    with tmpfs(tmp_path / "disk") as disk:
        cache = disk / "cache"
        try:
            options = ("--read-only", "--log-file", str(tmp_path / "log"))
            mnt = mounter(f"{registry.host}/{repo}", *options, cache_dir=cache)
            assert (mnt / "t" / "kept.bin").read_bytes() == data
            assert wait_until(lambda: (cache / "blobs" / blob.algorithm / blob.hex).is_file(), 5)
            # remount,ro fails (EBUSY) while a file on it is open for writing: the daemon may
            # still be closing the finished download (FUSE release is asynchronous).
            tries: list[subprocess.CompletedProcess[str]] = []
            assert wait_until(lambda: tries.append(run("mount", "-o", "remount,ro", str(disk), check=False))
                              or tries[-1].returncode == 0, 5, 0.2), \
                f"cannot make the cache read-only under the mount: {tries[-1].stderr.strip()}"
            entry = mount_entry(disk)
            assert entry is not None and "ro" in entry.options.split(",")
            # The same mount, a new open of the cached file: the cache is read, never written.
            result = subprocess.run(["cat", str(mnt / "t" / "kept.bin")], capture_output=True, timeout=30,
                                    check=False)
            assert result.returncode == 0, \
                f"cached file on a read-only cache: {result.stderr.decode(errors='replace').strip()}"
            assert result.stdout == data
            mounter.unmount_all()
            # A new mount on the read-only cache: it serves the cached file, or it refuses in one
            # clear line that names the cache and says it is read-only.
            again = tmp_path / "again"
            again.mkdir()
            mounter.mounted.append(again)
            started = ocifs("mount", "--cache-dir", str(cache), *options, f"{registry.host}/{repo}", str(again),
                            timeout=60)
            if started.returncode == 0:
                assert (again / "t" / "kept.bin").read_bytes() == data
            else:
                lines = started.stderr.strip().splitlines()
                assert len(lines) == 1 and str(cache) in lines[0] and "read-only" in lines[0].lower(), \
                    started.stderr
                assert not is_mounted(again)
        finally:
            mounter.unmount_all()


def test_the_cache_has_a_default_bound() -> None:
    result = ocifs("mount", "--help", timeout=30)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    match = re.search(r"^\s+--cache-size\b.*?(?=^\s+-)", text, re.MULTILINE | re.DOTALL)
    assert match is not None, text
    help_text = " ".join(match.group(0).split())
    assert "default" in help_text and "unbounded" not in help_text, help_text


# ---- case 5: names created by another client ----------------------------------------------------


def poll_stat(path: Path, limit: float = 5.0) -> float | None:
    """Seconds until `path` could be stat'ed, or None if not within `limit`."""
    started = time.monotonic()
    if wait_until(lambda: errno_of(lambda: os.stat(path)) is None, limit, 0.1):
        return time.monotonic() - started
    return None


def test_a_tag_pushed_elsewhere_is_reachable_by_name_at_once(client: RegistryClient, registry: RunningRegistry,
                                                             repo: str, mounter: Mounter) -> None:
    namespace = repo
    push_artifact(client, f"{namespace}/app", "v1", {"a.txt": b"one"})
    mnt = mounter(f"{registry.host}/{namespace}", "--read-only", "--ttl", "60")
    assert os.listdir(mnt / "app") == ["v1"]  # the tag list is cached now, for 60 s
    assert errno_of(lambda: os.stat(mnt / "app" / "v2")) == errno.ENOENT
    push_artifact(client, f"{namespace}/app", "v2", {"b.txt": b"two"})
    took = poll_stat(mnt / "app" / "v2")
    assert took is not None, "a tag pushed by another client is not reachable by name within 5 s"
    assert (mnt / "app" / "v2" / "b.txt").read_bytes() == b"two"


def test_a_repository_pushed_elsewhere_is_reachable_by_name_at_once(client: RegistryClient,
                                                                    registry: RunningRegistry, repo: str,
                                                                    mounter: Mounter) -> None:
    namespace = repo
    push_artifact(client, f"{namespace}/app", "v1", {"a.txt": b"one"})
    mnt = mounter(f"{registry.host}/{namespace}", "--read-only", "--ttl", "60")
    assert os.listdir(mnt) == ["app"]  # the catalog is cached now, for 60 s
    assert errno_of(lambda: os.stat(mnt / "other")) == errno.ENOENT  # `cd` before it exists
    push_artifact(client, f"{namespace}/other", "v1", {"o.txt": b"other"})
    took = poll_stat(mnt / "other")
    assert took is not None, "a repository pushed by another client is not reachable by name within 5 s"
    assert (mnt / "other" / "v1" / "o.txt").read_bytes() == b"other"


# ---- case 6: HTTPS on loopback ------------------------------------------------------------------


def start_tls_registry(workdir: Path) -> tuple[RunningRegistry, Path]:
    """Debian's docker-registry serving HTTPS on 127.0.0.1 with a self-signed certificate."""
    workdir.mkdir(parents=True, exist_ok=True)
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert))
    port = free_port()
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'storage'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: ocifs-test-secret\n"
        f"  tls:\n    certificate: {cert}\n    key: {key}\n"
    )
    log_path = workdir / "registry.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([REGISTRY_BINARY, "serve", str(config)], stdout=log_file,
                                   stderr=subprocess.STDOUT)
    server = RunningRegistry(f"127.0.0.1:{port}", workdir / "storage", process, log_path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {log_path.read_text()[-2000:]}")
        try:
            if requests.get(f"https://{server.host}/v2/", timeout=1, verify=str(cert)).status_code == 200:
                return server, cert
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    server.stop()
    raise RuntimeError("docker-registry (TLS) did not start within 20 s")


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningRegistry, Path]]:
    server, cert = start_tls_registry(tmp_path_factory.mktemp("tls-registry"))
    try:
        yield server, cert
    finally:
        server.stop()


@pytest.fixture
def tls_repo(tls_registry: tuple[RunningRegistry, Path], repo: str) -> str:
    server, cert = tls_registry
    writer = RegistryClient(Registry.parse(server.host),
                            ClientOptions(base_url=f"https://{server.host}",
                                          transport=TransportOptions(ca_file=str(cert), connect_timeout=5,
                                                                     read_timeout=20, backoff=0.05)))
    push_artifact(writer, repo, "t", {"tls.txt": b"over https"})
    return f"{server.host}/{repo}"


@pytest.mark.parametrize("trust", ["--ca-file", "--insecure"])
def test_https_on_loopback(tls_registry: tuple[RunningRegistry, Path], tls_repo: str, trust: str,
                           mounter: Mounter) -> None:
    options = ["--ca-file", str(tls_registry[1])] if trust == "--ca-file" else ["--insecure"]
    mnt = mounter(tls_repo, "--read-only", "--timeout", "10", *options)
    assert os.listdir(mnt) == ["t"]
    assert (mnt / "t" / "tls.txt").read_bytes() == b"over https"


def test_https_on_loopback_with_an_untrusted_certificate_says_so(tls_repo: str, mounter: Mounter,
                                                                  tmp_path: Path) -> None:
    mnt = tmp_path / "untrusted"
    mnt.mkdir()
    mounter.mounted.append(mnt)
    result = ocifs("mount", "--cache-dir", str(mounter.cache_dir), "--read-only", "--timeout", "10", tls_repo,
                   str(mnt), timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert re.search(r"tls|ssl|certificate", lines[0], re.IGNORECASE), lines[0]
    assert "HTTP 400" not in lines[0], lines[0]
    assert not is_mounted(mnt)


# ---- case 10: `ocifs umount` acts only on ocifs mounts ------------------------------------------


def test_umount_refuses_a_mount_that_is_not_ocifs(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "precious") as disk:
        (disk / "data.txt").write_text("keep me")
        result = ocifs("umount", str(disk), timeout=30)
        entry = mount_entry(disk)
        assert entry is not None and entry.fstype == "tmpfs" and (disk / "data.txt").is_file(), \
            f"ocifs umount unmounted a tmpfs (exit {result.returncode}): {result.stderr.strip()!r}"
        assert (disk / "data.txt").read_text() == "keep me"
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1, result.stderr
        assert str(disk) in lines[0] and re.search(r"not an? (ocifs|fuse\.ocifs) mount", lines[0]), lines[0]


def test_umount_of_a_path_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "mnt"
    result = ocifs("umount", str(missing), timeout=30)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, f"exit 0 for {missing}: {result.stderr!r}"
    assert len(lines) == 1 and str(missing) in lines[0], result.stderr
    assert re.search(r"does not exist|no such", lines[0], re.IGNORECASE), lines[0]


# ---- case 11: a registry that wants credentials -------------------------------------------------


def test_a_registry_that_wants_credentials_is_not_mounted_anonymously(auth_registry: RunningRegistry,
                                                                      repo: str, mounter: Mounter,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    writer = make_client(auth_registry, credentials=Credentials(TEST_USER, TEST_PASSWORD))
    push_artifact(writer, repo, "t", {"secret.txt": b"for members"})
    # A Docker config with no credentials in it (a missing one would be worth a warning line).
    docker_config = tmp_path / "docker-config"
    docker_config.mkdir()
    (docker_config / "config.json").write_text('{"auths": {}}')
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_config))
    mnt = tmp_path / "anonymous"
    mnt.mkdir()
    mounter.mounted.append(mnt)
    result = ocifs("mount", "--cache-dir", str(mounter.cache_dir), "--read-only", "--timeout", "10",
                   f"{auth_registry.host}/{repo}", str(mnt), timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, f"mounted without credentials: {result.stderr.strip()!r}"
    assert not is_mounted(mnt)
    assert len(lines) == 1, result.stderr
    assert auth_registry.host in lines[0], lines[0]
    assert re.search(r"--username|login", lines[0]), lines[0]  # how to give credentials


# ---- case 12: a registry that lies in Docker-Content-Digest for tags ----------------------------


# What this registry announces for tag `t`: a digest it has no manifest under.
LIE = Digest.of(b"the digest this registry wrongly announces")
# A digest under which it serves other bytes (and says they are that digest).
WRONG = Digest.of(b"a digest whose manifest the registry gets wrong")


@pytest.mark.parametrize("head", ["lies-too", "no-digest"])
def test_a_wrong_digest_header_for_a_tag_is_not_trusted(scripted: ScriptedRegistry, head: str,
                                                        mounter: Mounter) -> None:
    """GET of the tag answers with a valid manifest and a Docker-Content-Digest that names
    another digest; HEAD says the same ("lies-too") or gives no digest ("no-digest")."""
    digest, raw = scripted.add_artifact("lie/repo", "t", {"f.txt": b"browsable anyway"})
    scripted.blobs[str(Digest.of(b"other bytes"))] = b"other bytes"
    scripted.manifests["lie/repo"][str(WRONG)] = manifest_bytes({"g.txt": b"other bytes"})

    def lie(method: str, repo: str, reference: str, headers: dict[str, str]) -> dict[str, str]:
        if reference == "t":
            headers = dict(headers, **{"Docker-Content-Digest": str(LIE)})
            if method == "HEAD" and head == "no-digest":
                del headers["Docker-Content-Digest"]
        elif reference == str(WRONG):
            headers = dict(headers, **{"Docker-Content-Digest": str(WRONG)})
        return headers

    scripted.header_hook = lie
    mnt = mounter(f"{scripted.host}/lie/repo", "--read-only", "--timeout", "5")
    assert os.listdir(mnt) == ["t"]
    listed: list[str] | str
    try:
        listed = os.listdir(mnt / "t")
    except OSError as exc:
        listed = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    assert listed == ["f.txt"], f"ls of the tag: {listed}"
    assert (mnt / "t" / "f.txt").read_bytes() == b"browsable anyway"
    assert os.getxattr(mnt / "t", "user.oci.digest").decode() == str(digest)  # the bytes' digest
    assert (mnt / "t" / ".manifest.json").read_bytes() == raw
    # Fetched by digest, the bytes must be that digest, whatever the header says.
    assert errno_of(lambda: os.listdir(mnt / str(WRONG))) == errno.EIO
