"""Staged files and their recovery records (ocifs/write/staging.py) on a temporary cache
directory, without mounts or a registry.

The contract (DESIGN.md section 3): a staged file becomes recoverable only once a close or
fsync sealed it (`seal()`), and its record then holds size and digest. A later StagingArea of
the same SOURCE takes back sealed files whose bytes still match; everything else that was not
pushed (never sealed, written after sealing, bytes changed) is a fragment: moved with its
record to `staging/fragments/`, reported, never pushed. Pushed records are discarded, scratch
files are discarded without a report, files of another SOURCE or owned (flock'ed) by a live
mount are left alone.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ocifs.digest import Digest
from ocifs.errors import Refused
from ocifs.model import OCI_LAYER_TAR_GZIP, Descriptor
from ocifs.write.staging import COMPLETE, INCOMPLETE, PUSHED, WRITING, Fragment, StagedFile, StagingArea
from ocifs.write.targets import HelmTarget, LayerTarget, ScratchTarget, Target

SOURCE = "127.0.0.1:5000/team"
TARGET = LayerTarget("team/app", "1.0", "docs/a.txt")


@pytest.fixture
def opened() -> Iterator[list[StagedFile]]:
    """Staged files a test made or recovered; their descriptors are closed at the end."""
    files: list[StagedFile] = []
    yield files
    for staged in files:
        try:
            staged.close_fd()
        except OSError:
            pass


def stage(root: Path, opened: list[StagedFile], data: bytes = b"", *, path: str = "team/app/1.0/docs/a.txt",
          target: Target = TARGET, source: str = SOURCE, replaces: Descriptor | None = None) -> StagedFile:
    """A new staged file with `data` written sequentially, not sealed."""
    staged = StagingArea(root, source).new(path, target, replaces=replaces)
    opened.append(staged)
    if data:
        staged.write(data, 0)
    return staged


def recover(root: Path, opened: list[StagedFile], source: str = SOURCE) -> tuple[list[StagedFile], list[Fragment]]:
    recovered, fragments = StagingArea(root, source).recover()
    opened.extend(recovered)
    return recovered, fragments


def record_of(staged: StagedFile) -> dict[str, Any]:
    data = json.loads(staged.record_path.read_text())
    assert isinstance(data, dict)
    return data


def staging_files(root: Path) -> set[str]:
    """Names directly in staging/ (not fragments/)."""
    return {p.name for p in (root / "staging").iterdir() if p.is_file()}


# ---- what is taken back --------------------------------------------------------------------------


def test_a_sealed_file_is_recovered_by_a_later_area_of_the_same_source(root: Path, opened: list[StagedFile]) -> None:
    """Sealed, then the daemon stops: a new StagingArea of the same SOURCE takes it back with
    its path, target, size, digest and replaced layer, and owes a push."""
    data = b"hello, staged world\n"
    replaces = Descriptor(OCI_LAYER_TAR_GZIP, Digest.of(b"old"), 3, {"org.opencontainers.image.title": "docs/a.txt"})
    staged = stage(root, opened, data, replaces=replaces)
    assert staged.seal() == Digest.of(data)
    record = record_of(staged)
    assert record["state"] == COMPLETE and record["size"] == len(data) and record["digest"] == str(Digest.of(data))
    assert record["source"] == SOURCE
    staged.close_fd()  # the daemon is gone: its flock with it

    recovered, fragments = recover(root, opened)
    assert fragments == []
    assert len(recovered) == 1
    back = recovered[0]
    assert (back.path, back.target, back.size, back.state) == ("team/app/1.0/docs/a.txt", TARGET, len(data), COMPLETE)
    assert back.digest() == Digest.of(data)
    assert back.replaces == replaces and back.media_type == OCI_LAYER_TAR_GZIP
    assert back.pending and back.dirty
    assert back.read(0, 100) == data
    assert back.data_path == staged.data_path


def test_a_recovered_file_is_owned_and_not_recovered_twice(root: Path, opened: list[StagedFile]) -> None:
    """The area that recovered a file holds its lock: another recovery leaves it alone."""
    staged = stage(root, opened, b"once")
    staged.seal()
    staged.close_fd()
    first, _ = recover(root, opened)
    assert len(first) == 1
    second, fragments = recover(root, opened)
    assert second == [] and fragments == []
    assert staged.data_path.exists() and staged.record_path.exists()


@pytest.mark.parametrize("target", [HelmTarget("team"), LayerTarget("r", "t", "x/y/z.bin")])
def test_targets_survive_the_record(root: Path, opened: list[StagedFile], target: Target) -> None:
    staged = stage(root, opened, b"chart bytes", target=target, path="team/demo-1.0.tgz")
    staged.seal()
    staged.close_fd()
    recovered, _ = recover(root, opened)
    assert [s.target for s in recovered] == [target]


def test_a_retargeted_pushed_file_is_owed_again(root: Path, opened: list[StagedFile]) -> None:
    """A rename after the push makes the file complete again (it must be pushed at its new
    place): recovered, with the new path and target."""
    staged = stage(root, opened, b"moved")
    staged.seal()
    staged.mark_pushed(Descriptor.for_bytes("application/octet-stream", b"moved"))
    assert record_of(staged)["state"] == PUSHED
    new_target = LayerTarget("team/app", "1.0", "b.txt")
    staged.retarget(staged.path, "team/app/1.0/b.txt", new_target, None)
    assert record_of(staged)["state"] == COMPLETE
    staged.close_fd()
    recovered, fragments = recover(root, opened)
    assert fragments == []
    assert [(s.path, s.target) for s in recovered] == [("team/app/1.0/b.txt", new_target)]


# ---- fragments ------------------------------------------------------------------------------------


def check_fragment(root: Path, staged: StagedFile, fragments: list[Fragment], data: bytes, reason_part: str) -> None:
    """`staged` was set aside: its data and record moved to staging/fragments/, its record
    saying source, path and reason; nothing of it left in staging/."""
    assert len(fragments) == 1
    fragment = fragments[0]
    kept = root / "staging" / "fragments" / staged.data_path.name
    assert (fragment.path, fragment.file) == (staged.path, kept)
    assert reason_part in fragment.reason
    assert kept.read_bytes() == data
    record = json.loads(kept.with_name(kept.name + ".json").read_text())
    assert record["source"] == SOURCE and record["path"] == staged.path and record["reason"] == fragment.reason
    assert not staged.data_path.exists() and not staged.record_path.exists()
    assert StagingArea(root, SOURCE).fragments() == [fragment]


def test_a_file_never_sealed_becomes_a_fragment(root: Path, opened: list[StagedFile]) -> None:
    staged = stage(root, opened, b"half written")
    assert record_of(staged)["state"] == WRITING
    staged.close_fd()
    recovered, fragments = recover(root, opened)
    assert recovered == []
    check_fragment(root, staged, fragments, b"half written", INCOMPLETE)


def test_a_file_written_after_sealing_becomes_a_fragment(root: Path, opened: list[StagedFile]) -> None:
    """A seal is undone by the next write: the record goes back to `writing`, without a digest."""
    staged = stage(root, opened, b"first version")
    staged.seal()
    staged.write(b" and more", len(b"first version"))
    record = record_of(staged)
    assert record["state"] == WRITING and "digest" not in record
    staged.close_fd()
    recovered, fragments = recover(root, opened)
    assert recovered == []
    check_fragment(root, staged, fragments, b"first version and more", INCOMPLETE)


def test_a_file_truncated_after_sealing_becomes_a_fragment(root: Path, opened: list[StagedFile]) -> None:
    staged = stage(root, opened, b"to be cut")
    staged.seal()
    staged.truncate(2)
    staged.close_fd()
    recovered, fragments = recover(root, opened)
    assert recovered == []
    check_fragment(root, staged, fragments, b"to", INCOMPLETE)


@pytest.mark.parametrize("change", ["same size", "longer", "shorter"])
def test_a_file_whose_bytes_changed_after_sealing_becomes_a_fragment(root: Path, opened: list[StagedFile],
                                                                    change: str) -> None:
    """The data file edited behind the record's back: its digest or size no longer matches."""
    staged = stage(root, opened, b"sealed content")
    staged.seal()
    staged.close_fd()
    new = {"same size": b"SEALED content", "longer": b"sealed content!", "shorter": b"sealed"}[change]
    staged.data_path.write_bytes(new)
    recovered, fragments = recover(root, opened)
    assert recovered == []
    check_fragment(root, staged, fragments, new, "no longer matches")


def test_a_complete_record_without_a_digest_is_a_fragment(root: Path, opened: list[StagedFile]) -> None:
    staged = stage(root, opened, b"x")
    staged.seal()
    staged.close_fd()
    record = record_of(staged)
    del record["digest"]
    staged.record_path.write_text(json.dumps(record))
    recovered, fragments = recover(root, opened)
    assert recovered == []
    check_fragment(root, staged, fragments, b"x", "no size or digest")


def test_a_failed_write_makes_a_fragment_and_refuses_to_seal(root: Path, opened: list[StagedFile]) -> None:
    """A write that fails (here: on a closed descriptor) is reported with its errno; the file
    can no longer be sealed, and after the daemon stops it is a fragment."""
    staged = stage(root, opened, b"before")
    staged.seal()
    staged.close_fd()
    with pytest.raises(Refused) as caught:
        staged.write(b"lost", 6)
    assert caught.value.errno == errno.EBADF and staged.write_error == errno.EBADF
    assert not staged.pending
    with pytest.raises(Refused) as caught:
        staged.seal()
    assert caught.value.errno == errno.EBADF
    assert record_of(staged)["state"] == WRITING
    recovered, fragments = recover(root, opened)
    assert recovered == []
    check_fragment(root, staged, fragments, b"before", INCOMPLETE)


def test_fragments_are_listed_per_source_and_never_recovered(root: Path, opened: list[StagedFile]) -> None:
    ours = stage(root, opened, b"ours", path="a")
    theirs = stage(root, opened, b"theirs", path="b", source="other:5000")
    ours.close_fd()
    theirs.close_fd()
    _, fragments = recover(root, opened)
    _, their_fragments = recover(root, opened, "other:5000")
    assert [f.path for f in fragments] == ["a"] and [f.path for f in their_fragments] == ["b"]
    assert [f.path for f in StagingArea(root, SOURCE).fragments()] == ["a"]
    assert [f.path for f in StagingArea(root, "other:5000").fragments()] == ["b"]
    # A later recovery finds nothing more: fragments are never taken back.
    assert recover(root, opened) == ([], [])
    assert StagingArea(root, "third").fragments() == []


def test_no_fragments_without_a_staging_directory(root: Path) -> None:
    assert StagingArea(root, SOURCE).fragments() == []
    assert StagingArea(root, SOURCE).recover() == ([], [])


# ---- what is left alone or discarded ---------------------------------------------------------------


def test_a_file_of_another_source_is_left_alone(root: Path, opened: list[StagedFile]) -> None:
    sealed = stage(root, opened, b"sealed elsewhere", path="s", source="elsewhere:5000")
    sealed.seal()
    unsealed = stage(root, opened, b"unsealed elsewhere", path="u", source="elsewhere:5000")
    for staged in (sealed, unsealed):
        staged.close_fd()
    before = staging_files(root)
    assert recover(root, opened) == ([], [])
    assert staging_files(root) == before
    assert not (root / "staging" / "fragments").exists()
    # Its own SOURCE takes it back.
    recovered, fragments = recover(root, opened, "elsewhere:5000")
    assert [s.path for s in recovered] == ["s"] and [f.path for f in fragments] == ["u"]


@pytest.mark.parametrize("sealed", [True, False])
def test_a_file_owned_by_a_live_mount_is_left_alone(root: Path, opened: list[StagedFile], sealed: bool) -> None:
    """The first StagedFile stays open (its flock held, as by a live daemon): a recovery of
    the same SOURCE neither takes it nor sets it aside, and the owner keeps working."""
    staged = stage(root, opened, b"in use")
    if sealed:
        staged.seal()
    before = staging_files(root)
    assert recover(root, opened) == ([], [])
    assert staging_files(root) == before
    staged.write(b"!", 6)
    assert staged.read(0, 10) == b"in use!"
    assert staged.seal() == Digest.of(b"in use!")


def test_a_pushed_record_is_discarded(root: Path, opened: list[StagedFile]) -> None:
    staged = stage(root, opened, b"already in the registry")
    staged.seal()
    staged.mark_pushed(Descriptor.for_bytes("application/octet-stream", b"already in the registry"))
    assert record_of(staged)["state"] == PUSHED
    assert not staged.dirty and not staged.pending
    staged.close_fd()
    assert recover(root, opened) == ([], [])
    assert not staged.data_path.exists() and not staged.record_path.exists()
    assert StagingArea(root, SOURCE).fragments() == []


def test_a_scratch_file_is_discarded_quietly(root: Path, opened: list[StagedFile]) -> None:
    staged = stage(root, opened, b"vim swap", path="team/app/1.0/.a.txt.swp", target=ScratchTarget())
    assert not staged.pending
    staged.close_fd()
    assert recover(root, opened) == ([], [])
    assert not staged.data_path.exists() and not staged.record_path.exists()
    assert StagingArea(root, SOURCE).fragments() == []


def test_a_record_whose_data_is_gone_is_dropped(root: Path, opened: list[StagedFile]) -> None:
    """The data was adopted into the cache and only the record outlived it: removed."""
    staged = stage(root, opened, b"adopted")
    staged.seal()
    staged.close_fd()
    staged.data_path.unlink()
    assert recover(root, opened) == ([], [])
    assert not staged.record_path.exists()


def test_an_unreadable_record_does_not_stop_recovery(root: Path, opened: list[StagedFile]) -> None:
    broken = stage(root, opened, b"broken", path="broken")
    broken.close_fd()
    broken.record_path.write_text("{not json")
    good = stage(root, opened, b"good", path="good")
    good.seal()
    good.close_fd()
    recovered, fragments = recover(root, opened)
    assert [s.path for s in recovered] == ["good"] and fragments == []
    assert broken.data_path.exists()  # kept, not pushed, not deleted


# ---- digests ---------------------------------------------------------------------------------------


def sha(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def test_sequential_writes_hash_as_they_go(root: Path, opened: list[StagedFile]) -> None:
    staged = stage(root, opened)
    content = b""
    for block in (b"a" * 1000, b"b" * 4096, b"", b"c"):
        staged.write(block, len(content))
        content += block
        assert staged.digest() == sha(content)
    assert staged.size == len(content)
    assert staged.seal() == sha(content)


@pytest.mark.parametrize("writes", [
    [(b"world", 6), (b"hello ", 0)],  # backwards
    [(b"hello world", 0), (b"W", 6)],  # overwrite inside
    [(b"hello", 0), (b"!", 10)],  # a hole: zeros
    [(b"abc", 3)],  # starts with a hole
    [(b"xyz", 0), (b"xyz", 0), (b"z", 3)],  # the same range twice, then on
])
def test_random_writes_give_the_digest_of_the_content(root: Path, opened: list[StagedFile],
                                                      writes: list[tuple[bytes, int]]) -> None:
    staged = stage(root, opened)
    for data, offset in writes:
        assert staged.write(data, offset) == len(data)
    content = staged.data_path.read_bytes()
    assert staged.size == len(content)
    assert staged.digest() == sha(content)
    assert staged.seal() == sha(content)
    assert record_of(staged)["digest"] == str(sha(content))


def test_truncates_keep_the_digest_right(root: Path, opened: list[StagedFile]) -> None:
    staged = stage(root, opened, b"0123456789")
    staged.truncate(4)
    assert staged.digest() == sha(b"0123")
    staged.write(b"45", 4)
    assert staged.digest() == sha(b"012345")
    staged.truncate(8)  # extends with zeros
    assert staged.digest() == sha(b"012345\0\0")
    staged.truncate(0)  # `>`: hashing starts over
    staged.write(b"fresh", 0)
    assert staged.digest() == sha(b"fresh")
    assert staged.seal() == sha(b"fresh")


def test_a_file_filled_at_creation_hashes_its_content(root: Path, opened: list[StagedFile]) -> None:
    """A registry file staged for editing starts with its old bytes (`fill`)."""
    def fill(fd: int) -> None:
        os.write(fd, b"old bytes")

    staged = StagingArea(root, SOURCE).new("p", TARGET, fill=fill)
    opened.append(staged)
    assert staged.size == 9 and staged.digest() == sha(b"old bytes")
    staged.write(b"new", 9)
    assert staged.digest() == sha(b"old bytesnew")


def test_a_seal_is_kept_until_the_next_change(root: Path, opened: list[StagedFile]) -> None:
    staged = stage(root, opened, b"v1")
    assert staged.seal() == sha(b"v1")
    assert staged.seal() == sha(b"v1")  # sealing again changes nothing
    assert staged.state == COMPLETE
    staged.write(b"2", 1)
    assert staged.state == WRITING
    assert staged.seal() == sha(b"v2")
    assert record_of(staged)["digest"] == str(sha(b"v2"))
