"""Pushing staged files: the blob (skipped when the registry has it), then the tag's manifest
with the layer added or replaced; chart packages as `helm push` pushes them. Complete files
whose push failed are retried in the background, with backoff, until they land or go away.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import threading
import time
from collections.abc import Callable

from ..digest import Digest
from ..errors import NotFound, OcifsError, PushFailed, Refused
from ..helm import MAX_CHART_SIZE, Chart
from ..metadata import Metadata
from ..model import ANNOTATION_TITLE, HELM_CHART, OCI_LAYER_TAR, OCI_MANIFEST, Descriptor, parse_manifest
from ..registry.client import RegistryClient
from ..store.files import pread_all
from .dockermodel import check_model_file, layer_annotations, layer_media_type
from .edits import TagEditor, drop_change, put_change
from .referrers import attach, referrer_layer
from .staging import StagedFile
from .streaming import StreamingUpload
from .targets import HelmTarget, LayerTarget, ReferrerTarget, ScratchTarget

log = logging.getLogger(__name__)

# What ORAS puts on a directory's tarball layer; wrong once the content is replaced.
ORAS_CONTENT_ANNOTATIONS = ("io.deis.oras.content.digest", "io.deis.oras.content.unpack")
RETRY_FIRST = 1.0
RETRY_MAX = 30.0


class Pusher:
    def __init__(self, client: RegistryClient, metadata: Metadata, editor: TagEditor, *,
                 on_pushed: Callable[[StagedFile, Digest], None],
                 after_retry: Callable[[StagedFile], None]) -> None:
        self.client = client
        self.metadata = metadata
        self.editor = editor
        self._on_pushed = on_pushed
        self.retries = RetryQueue(self, after_retry)

    def push(self, staged: StagedFile, *, background: bool = False) -> None:
        """Push `staged` if a push is owed (close, fsync, a retry). A file a write failed on is
        never pushed (Refused with that write's errno); a registry failure raises PushFailed
        (EIO) and leaves the file staged, queued for a retry. A `background` push (a retry,
        a rename, unmount) leaves a file open for writing alone: it is not complete yet, and
        its writer's close pushes it."""
        with staged.mutex:
            if staged.removed or not staged.dirty or (background and staged.writers > 0):
                return
            if isinstance(staged.target, ScratchTarget):
                if staged.write_error is None:
                    staged.seal()  # stays local, but survives a crash (an editor's swap file)
                return
            staged.seal()
            try:
                if isinstance(staged.target, HelmTarget):
                    layer = self._push_chart(staged, staged.target)
                elif isinstance(staged.target, ReferrerTarget):
                    layer = self._push_referrer(staged, staged.target)
                else:
                    layer = self._push_layer(staged, staged.target)
            except Refused:
                raise  # EINVAL (not a chart), EPERM (an image tag): the caller's mistake
            except OcifsError as exc:
                staged.push_error = str(exc)
                log.warning("push of %s failed, kept staged and retried later: %s", staged.path, exc)
                self.retries.schedule(staged)
                raise PushFailed(f"{staged.path}: push failed, kept staged: {exc}") from None
            staged.mark_pushed(layer)
        self._on_pushed(staged, layer.digest)
        self.retries.kick()  # the registry answers: what failed before may go now

    def _push_layer(self, staged: StagedFile, target: LayerTarget) -> Descriptor:
        media_type = staged.media_type or OCI_LAYER_TAR
        header = None
        model_type = self.editor.model_type(target.repository, target.tag)
        if model_type is not None:
            # A model tag (write/dockermodel.py): the file's name gives its media type, and a
            # weights file must be what its name says, checked on its first bytes before
            # anything is uploaded (a stream of it is dropped, never committed).
            media_type = layer_media_type(target.title, staged.media_type)
            try:
                header = check_model_file(media_type, staged.read, staged.size, staged.path)
            except Refused:
                staged.stop_streaming("not a model file")
                raise
        digest = staged.digest()
        if header is not None:
            self.editor.models.note(digest, header)  # the editor's round builds the config from it
        stream = staged.take_stream()
        if stream is None or not self._finish_stream(stream, target.repository, digest, staged.size):
            with open(staged.data_path, "rb") as file:
                self.client.push_blob(target.repository, file, digest, staged.size)
        annotations = dict(staged.replaces.annotations) if staged.replaces else {}
        for stale in ORAS_CONTENT_ANNOTATIONS:  # they describe the old content
            annotations.pop(stale, None)
        annotations[ANNOTATION_TITLE] = target.title
        if model_type is not None:
            annotations = layer_annotations(annotations, target.title, staged.size, os.fstat(staged.fd).st_mtime)
        layer = Descriptor(media_type, digest, staged.size, annotations,
                           raw=staged.replaces.raw if staged.replaces else {})
        tag = (target.repository, target.tag)
        here = [drop.layer for drop in staged.drops if (drop.target.repository, drop.target.tag) == tag]
        self.editor.edit(target.repository, target.tag, put_change(layer, staged.pushed or staged.replaces, here))
        for drop in staged.drops:  # the file was renamed here from another tag
            if (drop.target.repository, drop.target.tag) != tag:
                try:
                    self.editor.edit(drop.target.repository, drop.target.tag, drop_change(drop.layer, exact=True))
                except NotFound:
                    pass  # already gone
        staged.replaces = layer
        return layer

    def _finish_stream(self, stream: StreamingUpload, repository: str, digest: Digest, size: int) -> bool:
        """Make the blob exist through the upload that streamed during the writes: True when
        it exists now. A blob the registry already has is not committed again (the session is
        cancelled). False when the stream cannot finish: the caller uploads the file."""
        try:
            if stream.repository != repository:
                stream.cancel()
                return False
            if self.client.blob_size(repository, digest) is not None:
                stream.cancel()
                return True
        except BaseException:
            stream.cancel()
            raise
        return stream.finish(digest, size)

    def _push_referrer(self, staged: StagedFile, target: ReferrerTarget) -> Descriptor:
        """A file in `.referrers/<type>/`: its blob, then a new manifest that refers to the
        subject (write/referrers.py). Every push of it attaches the content as it is then."""
        digest = staged.digest()
        with open(staged.data_path, "rb") as file:
            self.client.push_blob(target.repository, file, digest, staged.size)
        layer = referrer_layer(target, digest, staged.size, staged.media_type)
        attach(self.client, target, layer)
        self.metadata.forget_referrers(target.repository, target.subject.digest)
        return layer

    def _push_chart(self, staged: StagedFile, target: HelmTarget) -> Descriptor:
        if staged.size > MAX_CHART_SIZE:
            raise Refused(f"{staged.path}: too big for a Helm chart", errno.EINVAL)
        chart = Chart.from_package(pread_all(staged.fd, staged.size, 0), target.namespace, staged.path)
        self.client.push_blob(chart.repository, io.BytesIO(chart.config),
                              Digest.of(chart.config), len(chart.config))
        digest = staged.digest()
        with open(staged.data_path, "rb") as file:
            self.client.push_blob(chart.repository, file, digest, staged.size)
        raw = chart.manifest(digest, staged.size)
        self.client.put_manifest(chart.repository, chart.tag, raw, OCI_MANIFEST)
        self.metadata.note_pushed(chart.repository, chart.tag, parse_manifest(raw, content_type=OCI_MANIFEST))
        log.info("pushed Helm chart %s %s as %s:%s", chart.name, chart.version, chart.repository, chart.tag)
        return Descriptor(HELM_CHART, digest, staged.size)


class RetryQueue:
    """Complete files whose push failed, pushed again in the background: after 1 s, then
    doubling up to 30 s, and at once when another push succeeds (the registry is back)."""

    def __init__(self, pusher: Pusher, after_retry: Callable[[StagedFile], None]) -> None:
        self._pusher = pusher
        self._after_retry = after_retry
        self._cond = threading.Condition()
        self._due: dict[StagedFile, tuple[float, float]] = {}  # file -> (when, next delay)
        self._thread: threading.Thread | None = None
        self._stopped = False

    def schedule(self, staged: StagedFile) -> None:
        with self._cond:
            if self._stopped:
                return
            _, delay = self._due.get(staged, (0.0, RETRY_FIRST))
            self._due[staged] = (time.monotonic() + delay, min(RETRY_MAX, delay * 2))
            if self._thread is None:  # started in the daemon, after the fork
                self._thread = threading.Thread(target=self._run, name="ocifs-retry", daemon=True)
                self._thread.start()
            self._cond.notify()

    def kick(self) -> None:
        with self._cond:
            if not self._due:
                return
            now = time.monotonic()
            self._due = {staged: (now, delay) for staged, (_, delay) in self._due.items()}
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._due.clear()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    now = time.monotonic()
                    due = [s for s, (when, _) in self._due.items() if when <= now]
                    if due:
                        break
                    wait = min((when for when, _ in self._due.values()), default=now + 60) - now
                    self._cond.wait(max(0.05, wait))
                if self._stopped:
                    return
            for staged in due:
                self._retry(staged)

    def _retry(self, staged: StagedFile) -> None:
        if not staged.pending or staged.writers > 0:  # gone, pushed, or its writer's close pushes it
            with self._cond:
                self._due.pop(staged, None)
            return
        try:
            self._pusher.push(staged, background=True)  # on failure, push() schedules the next try
        except (OcifsError, OSError) as exc:
            log.info("retry of %s failed: %s", staged.path, exc)
            if isinstance(exc, Refused) or not isinstance(exc, PushFailed):
                with self._cond:
                    self._due.pop(staged, None)
            return
        except Exception:
            log.exception("retry of %s failed", staged.path)
            with self._cond:
                self._due.pop(staged, None)
            return
        with self._cond:
            self._due.pop(staged, None)
        log.warning("pushed %s on retry", staged.path)
        self._after_retry(staged)
