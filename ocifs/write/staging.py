"""Staged files: what was written through the mount, on local disk until it is pushed, and
the recovery record beside each that says what the file is.

Layout under the cache directory (0700): `staging/stage-XXXX` (the data, flock'ed while a
mount owns it) and `staging/stage-XXXX.json` (its record, replaced atomically). A record is
in one of three states:

    writing    being written, or a write failed: a fragment if the daemon stops now
    complete   a close or fsync saw every write succeed; `size` and `digest` say what the
               whole file is. Only such a file is pushed by a later mount.
    pushed     the registry has it; nothing left to do

A later mount of the same SOURCE takes back complete files whose digest still matches, and
moves everything else that was not pushed to `staging/fragments/` with a reason: kept, shown
to the user, never pushed.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..digest import Digest, update_from_fd
from ..errors import OcifsError, Refused
from ..model import Descriptor
from ..registry.client import RegistryClient
from ..store.files import unlink_quietly
from .streaming import STREAM_FROM, StreamingUpload
from .targets import HelmTarget, LayerTarget, ReferrerTarget, ScratchTarget, Target

log = logging.getLogger(__name__)

RECORD_VERSION = 2
WRITING, COMPLETE, PUSHED = "writing", "complete", "pushed"
INCOMPLETE = "incomplete: it was still being written, or a write failed, when the daemon stopped"
# Refuse to start staging a file when the cache's file system has less free space than this.
MIN_FREE_SPACE = 64 * 1024 * 1024


@dataclass(frozen=True)
class Drop:
    """An earlier name of a renamed staged file: its layer goes with the file's next push,
    and the name is hidden in this mount until then."""

    path: str
    target: LayerTarget
    layer: Descriptor


@dataclass(frozen=True)
class Fragment:
    """A staged file that was never completed: kept aside, never pushed."""

    path: str  # where it was written in the mount
    file: Path  # where its bytes are kept
    reason: str


class StagedFile:
    """One file written through the mount. Thread-safe: `mutex` orders writes, truncates,
    seals and pushes of this file."""

    def __init__(self, path: str, target: Target, data_path: Path, source: str, *,
                 replaces: Descriptor | None = None, media_type: str | None = None) -> None:
        self.path = path
        self.target = target
        self.data_path = data_path
        self.record_path = data_path.with_name(data_path.name + ".json")
        self.source = source
        self.fd = os.open(data_path, os.O_RDWR)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise
        self.size = os.fstat(self.fd).st_size
        self.replaces = replaces  # the registry layer this file overwrites, if any
        self.media_type: str | None = media_type or (replaces.media_type if replaces else None)
        self.pushed: Descriptor | None = None  # the layer this file last became
        # Layers of this file's earlier names (it was renamed), dropped by its next push.
        self.drops: list[Drop] = []
        self.dirty = False  # changed since it was last pushed
        self.removed = False  # unlinked: never pushed again
        self.write_error: int | None = None  # a write failed: the content is a fragment
        self.push_error: str | None = None  # why the last push failed, while it is pending
        self.handles = 0
        self.writers = 0  # handles open for writing
        self.mtime = time.time()
        self.mutex = threading.RLock()
        self._state = WRITING
        self._sealed_digest: Digest | None = None
        self._hasher = hashlib.sha256()
        self._hashed = 0  # bytes hashed so far, while writes are sequential from 0
        self._sequential = self.size == 0
        # Whether an upload may stream during the writes: set by the writer for a file it made
        # empty for its first writer; anything but sequential writes clears it for good.
        self.may_stream = False
        self.stream: StreamingUpload | None = None  # the upload following the writes, if any

    # ---- content --------------------------------------------------------------------------

    def write(self, data: bytes, offset: int) -> int:
        with self.mutex:
            self._unseal()
            sequential = self._sequential and offset == self._hashed
            if not sequential:  # before the bytes change under the sender's feet
                self.stop_streaming("a write out of order")
            try:
                written = os.pwrite(self.fd, data, offset)
            except OSError as exc:
                self.write_error = exc.errno or errno.EIO
                self.stop_streaming("a write failed")
                raise Refused(f"{self.path}: cannot stage: {exc.strerror}", self.write_error) from None
            if sequential:
                self._hasher.update(data[:written])
                self._hashed += written
                if self.stream is not None:
                    self.stream.extend(self._hashed)
            else:
                self._sequential = False
            self.size = max(self.size, offset + written)
            self.dirty = True
            self.mtime = time.time()
            return written

    def truncate(self, length: int) -> None:
        with self.mutex:
            self._unseal()
            self.stop_streaming("truncated")
            os.ftruncate(self.fd, length)
            if length == 0:  # `>` and O_TRUNC: hashing (and a failed write) start over
                self._hasher, self._hashed, self._sequential = hashlib.sha256(), 0, True
                self.write_error = None
            elif length != self._hashed:
                self._sequential = False
            self.size = length
            self.dirty = True
            self.mtime = time.time()

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def digest(self) -> Digest:
        """sha256 of the content: from the hash kept while writing when writes were
        sequential, else by reading the staged file."""
        with self.mutex:
            if self._sealed_digest is not None:
                return self._sealed_digest
            if self._sequential and self._hashed == self.size:
                return Digest("sha256", self._hasher.hexdigest())
            hasher = hashlib.sha256()
            update_from_fd(hasher, self.fd, self.size)
            return Digest("sha256", hasher.hexdigest())

    # ---- the upload that follows the writes ---------------------------------------------------

    def start_streaming(self, client: RegistryClient) -> None:
        """Start uploading during the writes, once a file that may stream holds enough bytes,
        all written in order from 0, for a layer (a chart's repository is known only at close)."""
        with self.mutex:
            target = self.target
            if self.removed or not self._sequential or not isinstance(target, LayerTarget):
                self.may_stream = False
                return
            if not self.may_stream or self.stream is not None or self._hashed < STREAM_FROM:
                return
            self.may_stream = False  # one stream per file: whatever stops it, the file goes up at close
            self.stream = StreamingUpload(client, target.repository, self.data_path, self.path)
            self.stream.start(self._hashed)

    def stop_streaming(self, why: str, *, wait: float | None = 0.0) -> None:
        """No (more) upload during the writes; one in progress is cancelled in the background
        (`wait`: seconds to wait for that, None for as long as it takes)."""
        with self.mutex:
            self.may_stream = False
            stream, self.stream = self.stream, None
        if stream is not None:
            log.debug("%s: streamed upload abandoned: %s", self.path, why)
            stream.abandon(why)
            if wait != 0.0:
                stream.cancel(wait)

    def take_stream(self) -> StreamingUpload | None:
        """The upload that followed the writes, for the push that finishes it (it is no longer
        the file's: later writes go up at their own close)."""
        with self.mutex:
            self.may_stream = False
            stream, self.stream = self.stream, None
            return stream

    # ---- the record -----------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def pending(self) -> bool:
        """A push is owed: changed since its last push, not removed, every write succeeded,
        not an editor's scratch file."""
        return self.dirty and not self.removed and self.write_error is None \
            and not isinstance(self.target, ScratchTarget)

    @property
    def settled(self) -> bool:
        """Nothing left to do: removed, or in the registry as it is (scratch files and files
        a write failed on are never settled: they stay in the mount)."""
        return self.removed or (not self.dirty and self.write_error is None
                                and not isinstance(self.target, ScratchTarget))

    def seal(self) -> Digest:
        """Every write so far succeeded (a close or fsync): record the file as complete,
        with its size and digest, so a later mount may push it. Refused after a failed write."""
        with self.mutex:
            if self.write_error is not None:
                raise Refused(f"{self.path}: a write failed ({os.strerror(self.write_error)}); "
                              "not pushed", self.write_error)
            if self._state != COMPLETE:
                # No fsync: after a machine crash the digest check of recovery catches torn bytes.
                self._sealed_digest = self.digest()
                self._state = COMPLETE
                self.save_record()
            assert self._sealed_digest is not None
            return self._sealed_digest

    def mark_pushed(self, layer: Descriptor) -> None:
        with self.mutex:
            self.pushed = layer
            self.dirty = False
            self.push_error = None
            self.drops = []
            if self._state == COMPLETE:
                self._state = PUSHED
                self.save_record()

    def _unseal(self) -> None:
        """A write after a seal: the file is being written again (a fragment if we stop now)."""
        if self._state != WRITING:
            self._state = WRITING
            self._sealed_digest = None
            self.save_record()

    def retarget(self, old: str, path: str, target: Target, replaces: Descriptor | None) -> None:
        """The file was renamed: it now goes to `target`, and must be pushed there; the layer
        of its old name is dropped by that push."""
        with self.mutex:
            if not isinstance(target, LayerTarget) or not isinstance(self.target, LayerTarget) \
                    or target.repository != self.target.repository:
                self.stop_streaming("moved to another repository")  # its session is in the old one
            previous = self.pushed or self.replaces
            if previous is not None and isinstance(self.target, LayerTarget):
                self.drops.append(Drop(old, self.target, previous))
            self.path = path
            self.target = target
            self.replaces = replaces
            self.pushed = None
            self.dirty = True
            if self._state == PUSHED:
                self._state = COMPLETE
            self.save_record()

    def set_media_type(self, media_type: str) -> None:
        with self.mutex:
            self.media_type = media_type
            self.dirty = True
            if self._state == PUSHED:
                self._state = COMPLETE
            self.save_record()

    def save_record(self) -> None:
        """Write the record atomically. A record that cannot be written leaves the file
        unrecoverable after a crash, which is logged; the mount goes on."""
        record: dict[str, Any] = {
            "version": RECORD_VERSION, "source": self.source, "path": self.path,
            "target": _target_to_json(self.target),
            "replaces": self.replaces.to_dict() if self.replaces else None,
            "media_type": self.media_type, "state": self._state,
            "drops": [{"path": drop.path, "target": _target_to_json(drop.target), "layer": drop.layer.to_dict()}
                      for drop in self.drops],
        }
        if self._state != WRITING and self._sealed_digest is not None:
            record["size"] = self.size
            record["digest"] = str(self._sealed_digest)
        tmp = self.record_path.with_name(self.record_path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.record_path)
        except OSError as exc:
            log.warning("%s: cannot record its state for recovery: %s", self.path, exc)

    # ---- end of life ----------------------------------------------------------------------

    def close_fd(self) -> None:
        """Close the staging descriptor once (a second close could hit a reused number)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def forget_record(self) -> None:
        unlink_quietly(self.record_path)

    def discard(self) -> None:
        self.stop_streaming("discarded")
        try:
            self.close_fd()
        except OSError:
            pass
        for path in (self.data_path, self.record_path):
            unlink_quietly(path)


class StagingArea:
    """The staging directory of one cache: new staged files, recovery, fragments."""

    def __init__(self, root: Path, source: str) -> None:
        self.dir = root / "staging"
        self.fragments_dir = self.dir / "fragments"
        self.source = source

    def check_free_space(self) -> None:
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            vfs = os.statvfs(self.dir)
        except OSError as exc:
            raise Refused(f"cannot stage in {self.dir}: {exc.strerror}", exc.errno or errno.EIO) from None
        if vfs.f_bavail * vfs.f_frsize < MIN_FREE_SPACE:
            raise Refused(f"not enough free space to stage files in {self.dir}", errno.ENOSPC)

    def new(self, path: str, target: Target, *, replaces: Descriptor | None = None,
            fill: Callable[[int], None] | None = None) -> StagedFile:
        """A new staged file for `path`, its content written by `fill(fd)` if given."""
        self.check_free_space()
        fd, name = tempfile.mkstemp(dir=self.dir, prefix="stage-")
        try:
            if fill is not None:
                fill(fd)
        except BaseException:
            os.close(fd)
            os.unlink(name)
            raise
        os.close(fd)
        staged = StagedFile(path, target, Path(name), self.source, replaces=replaces)
        staged.save_record()
        return staged

    def recover(self) -> tuple[list[StagedFile], list[Fragment]]:
        """Files a stopped daemon of this SOURCE left staged: complete ones (digest checked)
        to push again, and fragments, which are moved aside. Files another live mount owns
        (locked) or of another SOURCE are left alone."""
        recovered: list[StagedFile] = []
        fragments: list[Fragment] = []
        try:
            records = sorted(self.dir.glob("stage-*.json"))
        except OSError:
            return [], []
        for record_path in records:
            data_path = record_path.with_name(record_path.name[: -len(".json")])
            try:
                record = json.loads(record_path.read_text())
                if not isinstance(record, dict) or record.get("source") != self.source:
                    continue
                if not data_path.exists():
                    record_path.unlink()  # adopted into the cache; the record outlived it
                    continue
                staged = _from_record(record, data_path, self.source)
            except BlockingIOError:
                continue  # a live mount owns it
            except (OSError, ValueError, KeyError, TypeError, OcifsError) as exc:
                log.warning("staged file %s not recovered: %s", data_path.name, exc)
                continue
            state = record.get("state")
            if state == PUSHED:
                staged.discard()
                continue
            reason = _incomplete_reason(staged, record)
            if reason is None:
                recovered.append(staged)
                continue
            if isinstance(staged.target, ScratchTarget):
                staged.discard()  # an editor's scratch file: never pushed, nothing to report
                continue
            staged.close_fd()
            fragment = self._set_aside(staged, reason)
            if fragment is not None:
                fragments.append(fragment)
        return recovered, fragments

    def fragments(self) -> list[Fragment]:
        """Fragments of this SOURCE kept aside so far."""
        found: list[Fragment] = []
        try:
            records = sorted(self.fragments_dir.glob("*.json"))
        except OSError:
            return []
        for record_path in records:
            try:
                record = json.loads(record_path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and record.get("source") == self.source:
                found.append(Fragment(str(record.get("path")),
                                      record_path.with_name(record_path.name[: -len(".json")]),
                                      str(record.get("reason") or INCOMPLETE)))
        return found

    def _set_aside(self, staged: StagedFile, reason: str) -> Fragment | None:
        """Move a fragment and its record to fragments/ (renames: this works on a full disk),
        then note the reason in its record (best effort)."""
        kept = self.fragments_dir / staged.data_path.name
        kept_record = kept.with_name(kept.name + ".json")
        try:
            self.fragments_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.replace(staged.record_path, kept_record)
            os.replace(staged.data_path, kept)
        except OSError as exc:
            log.warning("%s: cannot set the fragment aside: %s", staged.path, exc)
            return None
        record = {"source": self.source, "path": staged.path, "reason": reason, "time": time.time()}
        tmp = kept_record.with_name(kept_record.name + ".tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, kept_record)
        except OSError:
            unlink_quietly(tmp)  # the moved record still names the source and the path
        log.warning("not pushed, kept aside: %s (%s) in %s", staged.path, reason, kept)
        return Fragment(staged.path, kept, reason)


def _incomplete_reason(staged: StagedFile, record: dict[str, Any]) -> str | None:
    """None when the staged file is the complete file its record describes."""
    if record.get("state") != COMPLETE:
        return INCOMPLETE
    try:
        expected = Digest.parse(str(record["digest"]))
        size = int(record["size"])
    except (KeyError, ValueError, TypeError, OcifsError):
        return "its record has no size or digest"
    if staged.size != size or staged.digest() != expected:
        return "its content no longer matches its record"
    staged._sealed_digest = expected
    staged._state = COMPLETE
    staged.dirty = not isinstance(staged.target, ScratchTarget)
    return None


def _from_record(record: dict[str, Any], data_path: Path, source: str) -> StagedFile:
    target = _target_from_json(record["target"])
    replaces = record.get("replaces")
    staged = StagedFile(str(record["path"]), target, data_path, source,
                        replaces=Descriptor.from_dict(replaces) if replaces else None,
                        media_type=record.get("media_type"))
    for drop in record.get("drops") or []:
        drop_target = _target_from_json(drop["target"])
        if isinstance(drop_target, LayerTarget):
            staged.drops.append(Drop(str(drop["path"]), drop_target, Descriptor.from_dict(drop["layer"])))
    return staged


def _target_to_json(target: Target) -> dict[str, Any]:
    if isinstance(target, LayerTarget):
        return {"kind": "layer", "repository": target.repository, "tag": target.tag, "title": target.title}
    if isinstance(target, HelmTarget):
        return {"kind": "helm", "namespace": target.namespace}
    if isinstance(target, ReferrerTarget):
        return {"kind": "referrer", "repository": target.repository, "subject": target.subject.to_dict(),
                "artifact_type": target.artifact_type, "title": target.title}
    return {"kind": "scratch"}


def _target_from_json(data: dict[str, Any]) -> Target:
    kind = data["kind"]
    if kind == "layer":
        return LayerTarget(str(data["repository"]), str(data["tag"]), str(data["title"]))
    if kind == "helm":
        return HelmTarget(str(data["namespace"]))
    if kind == "scratch":
        return ScratchTarget()
    if kind == "referrer":
        return ReferrerTarget(str(data["repository"]), Descriptor.from_dict(data["subject"]),
                              str(data["artifact_type"]), str(data["title"]))
    raise ValueError(f"unknown target kind {kind!r}")
