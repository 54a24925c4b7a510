"""Uploads that start while a file is written (issue 9, item 3): a big file written in order
from offset 0 goes up in the background as it is written, so that close() only sends the
rest, the PUT that names the digest, and the manifest. Anything else falls back to the upload
at close, and an abandoned or interrupted upload never becomes a blob or a layer.

Observed at a fault proxy in front of the real registry (`proxy.arrived`, `proxy.seen`); the
bytes that land are checked with oras-py and ocifs' own client. No test relies on timing: a
writer holds the file open until the proxy has seen what it waits for."""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ocifs.digest import Digest
from ocifs.errors import RegistryError
from ocifs.registry import RegistryClient
from ocifs.write.streaming import PIECE_SIZE, STREAM_FROM

from .clients import oras_client
from .conftest import Mounter
from .content import push_artifact, push_blob
from .faultproxy import FaultProxy
from .helpers import layer_titles, wait_gone, wait_until
from .mounts import daemon_pid
from .registry_server import RunningRegistry
from .test_write_integrity import assert_never_pushed, status_of

MiB = 1024 * 1024
SIZE = 40 * MiB  # two whole pieces of 16 MiB (PATCHes before close) and a tail (with the PUT)
STARTED = PIECE_SIZE + 4 * MiB  # a piece and more: the stream has begun


def uploads(repo: str) -> str:
    """The paths of upload sessions of `repo` (POST opens one; PATCH, PUT, DELETE use one)."""
    return rf"/v2/{re.escape(repo)}/blobs/uploads/[^/]*"


def sessions(repo: str) -> str:
    """The paths of one upload session (not the POST that opens it)."""
    return rf"/v2/{re.escape(repo)}/blobs/uploads/[^/]+"


def body_bytes(proxy: FaultProxy, method: str, repo: str) -> int:
    """Bytes the proxy received in `method` requests to `repo`'s upload sessions."""
    return sum(int(headers.get("Content-Length") or 0) for headers in proxy.arrivals(method, sessions(repo)))


def content_ranges(proxy: FaultProxy, repo: str) -> list[tuple[int, int]]:
    """(first, last) byte of each PATCH that arrived, in order."""
    found = []
    for headers in proxy.arrivals("PATCH", sessions(repo)):
        first, last = (headers.get("Content-Range") or "").split("-")
        found.append((int(first), int(last)))
    return found


def pull_with_oras(registry: RunningRegistry, repo: str, tag: str, name: str, out: Path) -> bytes:
    oras_client(registry).pull(target=f"{registry.host}/{repo}:{tag}", outdir=str(out))
    return (out / name).read_bytes()


@contextmanager
def writing(path: Path) -> Iterator[int]:
    """A descriptor open for writing (created, unbuffered); closed at the end, where a failed
    close (the push) raises."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        yield fd
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise
    os.close(fd)


def write_at(fd: int, data: bytes, offset: int, block: int = MiB) -> None:
    """`data` at `offset`, in blocks of `block` bytes (as cp writes), each written in full."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view[:block], offset)
        view, offset = view[written:], offset + written


@pytest.fixture
def tag(client: RegistryClient, repo: str) -> str:
    push_artifact(client, repo, "t", {"old.txt": b"old"})
    return "t"


# ---- the stream ---------------------------------------------------------------------------------


def test_a_sequential_write_uploads_while_the_file_is_still_open(
        client: RegistryClient, registry: RunningRegistry, repo: str, tag: str, proxy: FaultProxy,
        mounter: Mounter, tmp_path: Path) -> None:
    """PATCHes reach the registry while the writer still holds the file; nothing is committed
    before close; at close the rest goes up once, and the artifact pulls back identical."""
    data = os.urandom(SIZE)
    mnt = mounter(f"{proxy.host}/{repo}")
    with writing(mnt / tag / "big.bin") as fd:
        most = SIZE - 4 * MiB
        write_at(fd, data[:most], 0)
        # Most of the file is written and the file is open: pieces have reached the registry.
        pieces = most // PIECE_SIZE
        assert wait_until(lambda: proxy.requests("PATCH", sessions(repo)).count(202) == pieces,
                          timeout=60), proxy.seen
        assert proxy.arrivals("PUT", sessions(repo)) == []  # nothing committed before close
        assert layer_titles(client, repo, tag) == {"old.txt": Digest.of(b"old")}
        write_at(fd, data[most:], most)
    digest = Digest.of(data)
    assert layer_titles(client, repo, tag) == {"old.txt": Digest.of(b"old"), "big.bin": digest}
    # One session, its pieces in order from 0, every byte sent exactly once.
    assert len(proxy.arrivals("POST", uploads(repo))) == 1
    ranges = content_ranges(proxy, repo)
    assert ranges[0][0] == 0
    assert all(last + 1 == next_first for (_, last), (next_first, _) in itertools.pairwise(ranges))
    assert all(last - first + 1 == PIECE_SIZE for first, last in ranges)
    assert body_bytes(proxy, "PATCH", repo) + body_bytes(proxy, "PUT", repo) == SIZE
    assert len(proxy.arrivals("PUT", sessions(repo))) == 1
    assert proxy.arrivals("DELETE", sessions(repo)) == []
    assert pull_with_oras(registry, repo, tag, "big.bin", tmp_path / "pulled") == data


def test_cp_of_a_big_file_sends_each_byte_once_and_pulls_back_identical(
        registry: RunningRegistry, repo: str, tag: str, proxy: FaultProxy, mounter: Mounter,
        tmp_path: Path) -> None:
    """A real `cp` (its size not a multiple of the piece size): PATCHes, then the tail with the
    PUT; the blob is uploaded once; oras-py pulls the same bytes."""
    data = os.urandom(SIZE + 12345)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    mnt = mounter(f"{proxy.host}/{repo}")
    subprocess.run(["cp", str(source), f"{mnt}/{tag}/"], check=True, timeout=300)
    assert proxy.arrivals("PATCH", sessions(repo)), proxy.seen
    assert len(proxy.arrivals("POST", uploads(repo))) == 1
    assert body_bytes(proxy, "PATCH", repo) + body_bytes(proxy, "PUT", repo) == len(data)
    assert proxy.requests("PUT", sessions(repo)) == [201]
    assert pull_with_oras(registry, repo, tag, "big.bin", tmp_path / "pulled") == data
    assert (mnt / tag / "big.bin").read_bytes() == data


def test_cp_over_a_registry_file_streams_too(
        client: RegistryClient, repo: str, proxy: FaultProxy, mounter: Mounter, tmp_path: Path) -> None:
    """`cp` over a file the tag already has writes it from scratch (O_TRUNC): it streams, and
    the layer is replaced."""
    push_artifact(client, repo, "t", {"big.bin": b"the old content"})
    data = os.urandom(SIZE)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    mnt = mounter(f"{proxy.host}/{repo}")
    subprocess.run(["cp", str(source), f"{mnt}/t/big.bin"], check=True, timeout=300)
    assert layer_titles(client, repo, "t") == {"big.bin": Digest.of(data)}
    assert proxy.arrivals("PATCH", sessions(repo))
    assert body_bytes(proxy, "PATCH", repo) + body_bytes(proxy, "PUT", repo) == SIZE


def test_a_small_file_opens_no_session_before_close(
        client: RegistryClient, repo: str, tag: str, proxy: FaultProxy, mounter: Mounter) -> None:
    """Below one piece, a file goes up in one PUT at close, as before: no session to open and
    cancel for nothing."""
    data = os.urandom(STREAM_FROM - 1)
    mnt = mounter(f"{proxy.host}/{repo}")
    with writing(mnt / tag / "small.bin") as fd:
        write_at(fd, data, 0)
        assert proxy.arrivals("POST", uploads(repo)) == []
    assert proxy.arrivals("PATCH", sessions(repo)) == []
    assert layer_titles(client, repo, tag)["small.bin"] == Digest.of(data)


# ---- fallbacks: what was streamed is never published ------------------------------------------------


def test_a_rewrite_at_offset_0_publishes_only_the_final_bytes(
        client: RegistryClient, registry: RunningRegistry, repo: str, tag: str, proxy: FaultProxy,
        mounter: Mounter, tmp_path: Path) -> None:
    """A piece streamed, then the writer goes back to offset 0: the session is cancelled, and the
    manifest gets the file as it is at close, uploaded then."""
    first = os.urandom(STARTED)
    mnt = mounter(f"{proxy.host}/{repo}")
    with writing(mnt / tag / "big.bin") as fd:
        write_at(fd, first, 0)
        assert proxy.wait_for("PATCH", sessions(repo), timeout=60), proxy.seen
        head = os.urandom(4 * MiB)
        write_at(fd, head, 0)  # a rewrite of bytes already sent
        assert proxy.wait_for("DELETE", sessions(repo), timeout=60), proxy.seen  # the session is dropped
        rest = os.urandom(12 * MiB)
        write_at(fd, rest, len(first))
    final = head + first[len(head):] + rest
    assert layer_titles(client, repo, tag)["big.bin"] == Digest.of(final)
    assert pull_with_oras(registry, repo, tag, "big.bin", tmp_path / "pulled") == final
    # The cancelled session is not the one committed; nothing of the first content is a blob.
    cancelled = [path for method, path, _ in proxy.seen if method == "DELETE"]
    committed = [path for method, path, status in proxy.seen if method == "PUT" and status == 201
                 and "/blobs/uploads/" in path]
    assert len(committed) == 1 and committed[0] not in cancelled
    for end in range(PIECE_SIZE, len(first) + 1, PIECE_SIZE):
        assert client.blob_size(repo, Digest.of(first[:end])) is None


def test_a_truncate_midway_publishes_only_the_final_bytes(
        client: RegistryClient, registry: RunningRegistry, repo: str, tag: str, proxy: FaultProxy,
        mounter: Mounter, tmp_path: Path) -> None:
    first = os.urandom(PIECE_SIZE + 8 * MiB)
    mnt = mounter(f"{proxy.host}/{repo}")
    with writing(mnt / tag / "big.bin") as fd:
        write_at(fd, first, 0)
        assert proxy.wait_for("PATCH", sessions(repo), timeout=60), proxy.seen
        os.ftruncate(fd, 10 * MiB)
        rest = os.urandom(20 * MiB)
        write_at(fd, rest, 10 * MiB)
    final = first[:10 * MiB] + rest
    assert layer_titles(client, repo, tag)["big.bin"] == Digest.of(final)
    assert pull_with_oras(registry, repo, tag, "big.bin", tmp_path / "pulled") == final
    assert proxy.arrivals("DELETE", sessions(repo))
    for end in range(PIECE_SIZE, len(first) + 1, PIECE_SIZE):
        assert client.blob_size(repo, Digest.of(first[:end])) is None


def test_a_file_opened_again_for_writing_goes_up_at_close(
        client: RegistryClient, repo: str, tag: str, proxy: FaultProxy, mounter: Mounter) -> None:
    """A second writer (here: appending after the first close) does not stream: the file is
    uploaded at its close, whole, the usual way."""
    first = os.urandom(STARTED)
    mnt = mounter(f"{proxy.host}/{repo}")
    path = mnt / tag / "big.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        write_at(fd, first, 0)
        assert proxy.wait_for("POST", uploads(repo), timeout=60), proxy.seen  # streaming
        more = os.urandom(12 * MiB)
        again = os.open(path, os.O_WRONLY)  # a second writer while the first still holds it
        try:
            assert proxy.wait_for("DELETE", sessions(repo), timeout=60), proxy.seen  # not any more
            write_at(again, more, len(first))
        finally:
            os.close(again)
    finally:
        os.close(fd)
    final = first + more
    assert layer_titles(client, repo, tag)["big.bin"] == Digest.of(final)
    assert client.blob_size(repo, Digest.of(first)) is None
    with open(path, "ab") as file:  # reopened after the push: edited, not written from scratch
        file.write(b"tail")
    assert layer_titles(client, repo, tag)["big.bin"] == Digest.of(final + b"tail")


def test_a_file_removed_while_streaming_is_never_published(
        client: RegistryClient, repo: str, tag: str, proxy: FaultProxy, mounter: Mounter) -> None:
    mnt = mounter(f"{proxy.host}/{repo}")
    path = mnt / tag / "big.bin"
    data = os.urandom(SIZE)
    with writing(path) as fd:
        write_at(fd, data[:STARTED], 0)
        assert proxy.wait_for("PATCH", sessions(repo), timeout=60), proxy.seen
        os.unlink(path)
        assert proxy.wait_for("DELETE", sessions(repo), timeout=60), proxy.seen
        write_at(fd, data[STARTED:], STARTED)
    assert set(layer_titles(client, repo, tag)) == {"old.txt"}
    assert proxy.arrivals("PUT", sessions(repo)) == []


def test_a_file_moved_to_another_repository_while_streaming_lands_there(
        client: RegistryClient, repo: str, tag: str, proxy: FaultProxy, mounter: Mounter) -> None:
    """The session belongs to the first repository: it is cancelled, and the file is uploaded
    into the other one at close."""
    other = f"{repo}-other"
    push_artifact(client, other, "u", {"z.txt": b"z"})
    mnt = mounter(proxy.host)
    data = os.urandom(SIZE)
    with writing(mnt / repo / tag / "big.bin") as fd:
        write_at(fd, data[:STARTED], 0)
        assert proxy.wait_for("PATCH", sessions(repo), timeout=60), proxy.seen
        os.rename(mnt / repo / tag / "big.bin", mnt / other / "u" / "big.bin")
        assert proxy.wait_for("DELETE", sessions(repo), timeout=60), proxy.seen
        write_at(fd, data[STARTED:], STARTED)
    assert layer_titles(client, other, "u") == {"z.txt": Digest.of(b"z"), "big.bin": Digest.of(data)}
    assert set(layer_titles(client, repo, tag)) == {"old.txt"}
    assert proxy.arrivals("PUT", sessions(repo)) == []


def test_writes_never_wait_for_the_upload(
        client: RegistryClient, repo: str, tag: str, proxy: FaultProxy, mounter: Mounter) -> None:
    """The registry holds the first PATCH without answering: every write still returns (the
    sender is stuck, not the writer); once the connection is cut, the file goes up at close."""
    proxy.stall("PATCH", sessions(repo))
    data = os.urandom(SIZE)
    mnt = mounter(f"{proxy.host}/{repo}")
    with writing(mnt / tag / "big.bin") as fd:
        write_at(fd, data[:PIECE_SIZE], 0)
        assert proxy.wait_for("PATCH", sessions(repo), timeout=60), proxy.seen
        write_at(fd, data[PIECE_SIZE:], PIECE_SIZE)
        # All written while the only PATCH sent is still held, unanswered.
        assert len(proxy.arrivals("PATCH", sessions(repo))) == 1
        assert proxy.requests("PATCH", sessions(repo)) == []
        proxy.heal()  # the held PATCH's connection is cut: the stream fails
    assert layer_titles(client, repo, tag)["big.bin"] == Digest.of(data)
    assert client.blob_size(repo, Digest.of(data)) == SIZE


def test_a_failing_patch_falls_back_to_the_upload_at_close(
        client: RegistryClient, registry: RunningRegistry, repo: str, tag: str, proxy: FaultProxy,
        mounter: Mounter, tmp_path: Path) -> None:
    """The registry fails a PATCH: the stream stops (its session cancelled) and the file still
    lands, uploaded at close."""
    proxy.fail("PATCH", sessions(repo), 500)
    data = os.urandom(SIZE)
    mnt = mounter(f"{proxy.host}/{repo}")
    with writing(mnt / tag / "big.bin") as fd:
        write_at(fd, data[:STARTED], 0)
        assert wait_until(lambda: 500 in proxy.requests("PATCH", sessions(repo)), timeout=60), proxy.seen
        assert proxy.wait_for("DELETE", sessions(repo), timeout=60), proxy.seen
        proxy.heal()
        write_at(fd, data[STARTED:], STARTED)
    assert layer_titles(client, repo, tag)["big.bin"] == Digest.of(data)
    assert pull_with_oras(registry, repo, tag, "big.bin", tmp_path / "pulled") == data
    assert len(proxy.arrivals("POST", uploads(repo))) == 2  # the stream's, then the upload at close


def test_a_patch_that_never_answers_falls_back_to_the_upload_at_close(
        client: RegistryClient, repo: str, tag: str, proxy: FaultProxy, mounter: Mounter) -> None:
    """The connection of a PATCH hangs: the sender gives up after its read timeout (--timeout)
    and the file lands through the upload at close."""
    proxy.stall("PATCH", sessions(repo), times=1)
    data = os.urandom(SIZE)
    mnt = mounter(f"{proxy.host}/{repo}", "--timeout", "2")
    with writing(mnt / tag / "big.bin") as fd:
        write_at(fd, data[:STARTED], 0)
        assert proxy.wait_for("DELETE", sessions(repo), timeout=60), proxy.seen  # gave up, cancelled
        write_at(fd, data[STARTED:], STARTED)
    assert layer_titles(client, repo, tag)["big.bin"] == Digest.of(data)
    assert client.blob_size(repo, Digest.of(data)) == SIZE


def test_a_blob_the_registry_has_is_not_committed_again(
        client: RegistryClient, repo: str, tag: str, proxy: FaultProxy, mounter: Mounter,
        tmp_path: Path) -> None:
    """The registry has the blob (HEAD says so at close): the streamed session is cancelled, no
    upload is committed, and the layer points at the blob that was there."""
    data = os.urandom(SIZE)
    digest = push_blob(client, repo, data)
    source = tmp_path / "again.bin"
    source.write_bytes(data)
    mnt = mounter(f"{proxy.host}/{repo}")
    subprocess.run(["cp", str(source), f"{mnt}/{tag}/"], check=True, timeout=300)
    assert layer_titles(client, repo, tag)["again.bin"] == digest
    assert proxy.arrivals("PUT", sessions(repo)) == []  # nothing uploaded: no session committed
    opened = len(proxy.arrivals("POST", uploads(repo)))
    assert len(proxy.arrivals("DELETE", sessions(repo))) == opened  # each session opened is dropped


def test_a_small_blob_the_registry_has_is_not_uploaded(
        client: RegistryClient, repo: str, tag: str, proxy: FaultProxy, mounter: Mounter, tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    digest = push_blob(client, repo, data)
    source = tmp_path / "small.bin"
    source.write_bytes(data)
    mnt = mounter(f"{proxy.host}/{repo}")
    subprocess.run(["cp", str(source), f"{mnt}/{tag}/"], check=True, timeout=300)
    assert layer_titles(client, repo, tag)["small.bin"] == digest
    assert proxy.arrivals("POST", uploads(repo)) == []
    assert proxy.arrivals("PATCH", sessions(repo)) == []


# ---- a daemon killed mid-stream ----------------------------------------------------------------------


def test_a_daemon_killed_while_streaming_leaves_a_fragment_never_a_layer(
        client: RegistryClient, registry: RunningRegistry, repo: str, tag: str, proxy: FaultProxy,
        mounter: Mounter, tmp_path: Path) -> None:
    """kill -9 while the writer holds the file and pieces are on their way: no blob of partial
    data, no manifest entry; the next mount keeps the file aside as a fragment, as before."""
    data = os.urandom(SIZE)
    source = f"{proxy.host}/{repo}"
    cache = mounter.cache_dir
    mnt = mounter(source)
    pid = daemon_pid(mnt)
    written = 2 * PIECE_SIZE + MiB
    fd = os.open(mnt / tag / "big.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        write_at(fd, data[:written], 0)
        assert proxy.wait_for("PATCH", sessions(repo), count=2, timeout=60), proxy.seen
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO), exc
    mounter.unmount_all()
    assert proxy.arrivals("PUT", sessions(repo)) == []
    for end in range(PIECE_SIZE, written + 1, PIECE_SIZE):
        assert client.blob_size(repo, Digest.of(data[:end])) is None

    mnt2 = mounter(source)
    assert_never_pushed(client, repo, tag, "big.bin", cache)
    assert set(layer_titles(client, repo, tag)) == {"old.txt"}
    fragments = status_of(mnt2).get("fragments", [])
    assert any(str(entry.get("path", "")).endswith("big.bin") for entry in fragments), fragments
    assert not [path for method, path, _ in proxy.seen if method == "PUT" and "/blobs/uploads/" in path]


def test_a_daemon_killed_while_committing_a_complete_file_is_pushed_by_the_next_mount(
        client: RegistryClient, registry: RunningRegistry, repo: str, tag: str, proxy: FaultProxy,
        mounter: Mounter, tmp_path: Path) -> None:
    """kill -9 while close() waits for the PUT that commits the stream: the file was complete
    (its record says so), so the next mount pushes it, the usual way, and it lands whole."""
    data = os.urandom(SIZE + 4321)
    source_file = tmp_path / "big.bin"
    source_file.write_bytes(data)
    proxy.stall("PUT", sessions(repo))
    source = f"{proxy.host}/{repo}"
    mnt = mounter(source)
    pid = daemon_pid(mnt)
    cp = subprocess.Popen(["cp", str(source_file), f"{mnt}/{tag}/"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    try:
        assert proxy.wait_for("PUT", sessions(repo), timeout=120), proxy.seen
        records = [json.loads(p.read_text()) for p in (mounter.cache_dir / "staging").glob("stage-*.json")]
        assert [r["state"] for r in records if r["path"].endswith("big.bin")] == ["complete"]
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
    finally:
        cp.wait(60)
    assert cp.returncode != 0
    mounter.unmount_all()
    proxy.heal()
    assert client.blob_size(repo, Digest.of(data)) is None  # the held PUT never reached the registry

    mounter(source)
    assert wait_until(lambda: "big.bin" in layer_titles(client, repo, tag), timeout=60, interval=0.2)
    assert layer_titles(client, repo, tag)["big.bin"] == Digest.of(data)
    assert pull_with_oras(registry, repo, tag, "big.bin", tmp_path / "pulled") == data


# ---- the client's upload session -------------------------------------------------------------------


def test_an_upload_session_commits_only_the_digest_of_what_it_received(client: RegistryClient, repo: str) -> None:
    """The registry checks the PUT's digest against every byte of the session: a session whose
    bytes are not the file's is refused and leaves no blob."""
    data = os.urandom(3 * MiB)
    session = client.open_upload(repo)
    session.append(data[:MiB])
    session.append(data[MiB:2 * MiB])
    assert session.offset == 2 * MiB
    session.finish(Digest.of(data), data[2 * MiB:])
    assert client.blob_size(repo, Digest.of(data)) == len(data)

    other = os.urandom(2 * MiB)
    session = client.open_upload(repo)
    session.append(other[:MiB])
    with pytest.raises(RegistryError):
        session.finish(Digest.of(other), b"")  # the registry holds only half of it
    assert client.blob_size(repo, Digest.of(other)) is None
    assert client.blob_size(repo, Digest.of(other[:MiB])) is None


def test_a_cancelled_upload_session_is_gone(client: RegistryClient, repo: str) -> None:
    data = os.urandom(MiB)
    session = client.open_upload(repo)
    session.append(data)
    session.cancel()
    with pytest.raises(RegistryError):
        session.append(data)
    with pytest.raises(RegistryError):
        session.finish(Digest.of(data))
    assert client.blob_size(repo, Digest.of(data)) is None
