"""Manifest edits: pure changes to a tag's layers, and the per-tag editor that applies them.

The registry API has no compare-and-swap: a PUT replaces whatever another writer PUT since
we read the tag. The editor narrows that window as far as the API allows:
  - each round reads the tag as it is now (HEAD, ignoring the TTL), applies every queued
    change of this mount to it, and PUTs once (concurrent closes in one tag share a PUT);
  - after the PUT it waits a little (one to two times what the round took, with jitter) and
    resolves the tag again; when another writer's PUT replaced ours without one of our
    changes, the missing changes are applied again, for at most MAX_ROUNDS rounds.
What remains: another writer that read the tag before our PUT and PUTs only after our check
(its read-modify-write took longer than our wait) still drops our change unnoticed. See
docs/writing.md.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..digest import Digest
from ..errors import IntegrityError, NotFound, PushFailed, Refused
from ..helm import now_rfc3339
from ..metadata import Metadata
from ..model import (
    ANNOTATION_CREATED,
    EMPTY_DESCRIPTOR,
    EMPTY_JSON,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    build_manifest,
    encode_json,
    is_placeholder_layer,
    parse_manifest,
    replace_layers,
)
from ..registry.client import RegistryClient
from .dockermodel import ModelConfigs, is_model_type

log = logging.getLogger(__name__)

MAX_ROUNDS = 6
# The wait before checking a PUT: at least this, at most SETTLE_MAX.
SETTLE_MIN = 0.02
SETTLE_MAX = 2.0

Layers = list[Descriptor]


# ---- pure layer edits -------------------------------------------------------------------------


def same_layer(a: Descriptor, b: Descriptor) -> bool:
    return a.digest == b.digest and a.size == b.size and a.title == b.title and a.media_type == b.media_type


def put_layer(layers: Sequence[Descriptor], layer: Descriptor, old: Descriptor | None) -> Layers:
    """`layer` in place of `old` (or of the first layer with its title), else added at the end.
    Other layers are kept, even one that shares the title (it is listed by digest)."""
    out = list(layers)
    for i, current in enumerate(out):
        if old is not None and same_layer(current, old):
            out[i] = layer
            return out
    for i, current in enumerate(out):
        if layer.title is not None and current.title == layer.title:
            out[i] = layer
            return out
    out.append(layer)
    return out


def drop_layer(layers: Sequence[Descriptor], layer: Descriptor) -> Layers:
    """`layers` without `layer`; when another client changed it meanwhile, without the layer
    of the same title. NotFound when neither is there (nothing to PUT)."""
    out = list(layers)
    for i, current in enumerate(out):
        if same_layer(current, layer):
            del out[i]
            return out
    if layer.title is not None:
        for i, current in enumerate(out):
            if current.title == layer.title:
                del out[i]
                return out
    raise NotFound(f"{layer.title or layer.digest} is no longer in the manifest")


def drop_if_present(layers: Sequence[Descriptor], layer: Descriptor) -> Layers:
    try:
        return drop_layer(layers, layer)
    except NotFound:
        return list(layers)


def has_layer(layers: Sequence[Descriptor], layer: Descriptor) -> bool:
    return any(same_layer(current, layer) for current in layers)


@dataclass(frozen=True)
class Change:
    """One change to a tag: `apply(layers)`, and `holds(layers)`, which says whether the change
    is still in effect in a manifest seen after our PUT (None: nothing to check)."""

    apply: Callable[[Layers], Layers]
    holds: Callable[[Layers], bool] | None = None
    artifact_type: str | None = None
    must_exist: bool = False
    # Makes the tag a model: every file it holds is typed and checked as a file put there now.
    makes_model: bool = False


def put_change(layer: Descriptor, old: Descriptor | None, drops: Sequence[Descriptor] = ()) -> Change:
    """`layer` in place of `old` (or added); `drops` (earlier names of a renamed file) go,
    only as they were: a new file written since under an old name stays."""

    def apply(layers: Layers) -> Layers:
        layers = [current for current in layers if not any(same_layer(current, d) for d in drops)]
        return put_layer(layers, layer, old)

    def holds(layers: Layers) -> bool:
        return has_layer(layers, layer) and not any(has_layer(layers, dropped) for dropped in drops)

    return Change(apply, holds)


def drop_change(layer: Descriptor, *, exact: bool = False) -> Change:
    """`layer` goes; when another client replaced it meanwhile, the layer of its title goes
    (rm of what the user sees), unless `exact` (an earlier name of a renamed file)."""
    if exact:
        return Change(lambda layers: [current for current in layers if not same_layer(current, layer)],
                      lambda layers: not has_layer(layers, layer), must_exist=True)
    return Change(lambda layers: drop_layer(layers, layer),
                  lambda layers: not has_layer(layers, layer), must_exist=True)


def move_change(old: Descriptor, new: Descriptor, replaced: Descriptor | None) -> Change:
    """A layer retitled inside its tag, over `replaced` if a layer had the new title."""

    def apply(layers: Layers) -> Layers:
        kept = drop_if_present(layers, replaced) if replaced is not None else layers
        return put_layer(kept, new, old)

    return Change(apply, lambda layers: has_layer(layers, new) and not has_layer(layers, old),
                  must_exist=True)


def artifact_type_change(value: str) -> Change:
    """The tag's artifact type. Docker's model type makes the tag a model: the round types
    its files as model files, each checked (a `.gguf` that is none: EINVAL), and gives it a
    model config."""
    return Change(list, artifact_type=value, must_exist=True, makes_model=is_model_type(value))


# ---- the editor ---------------------------------------------------------------------------------


class _Request:
    def __init__(self, change: Change) -> None:
        self.change = change
        self.done = False
        self.lead = False  # asked to commit the tag's queue
        self.wake = threading.Event()  # set when done, or when asked to lead
        self.error: BaseException | None = None

    def finish(self, error: BaseException | None = None) -> None:
        if not self.done:
            self.error = error
            self.done = True
            self.wake.set()


class TagEditor:
    """Applies changes to tags, serialised per tag inside the mount and batched: whoever
    finds a tag idle commits every change queued for it meanwhile, until its own change is
    done; then the oldest waiting request takes over (no caller commits for others forever)."""

    def __init__(self, client: RegistryClient, metadata: Metadata, *, artifact_type: str,
                 pending_artifact_type: Callable[[str, str], str | None],
                 models: ModelConfigs | None = None) -> None:
        self.client = client
        self.metadata = metadata
        self.artifact_type = artifact_type
        self.pending_artifact_type = pending_artifact_type
        self.models = models or ModelConfigs(client)
        self._mutex = threading.Lock()
        self._queues: dict[tuple[str, str], list[_Request]] = {}
        self._busy: set[tuple[str, str]] = set()

    def edit(self, repository: str, tag: str, change: Change) -> None:
        """Apply `change` to `repository:tag`; returns once a manifest holding it was PUT
        (and checked), raises what stopped it otherwise."""
        key = (repository, tag)
        request = _Request(change)
        with self._mutex:
            self._queues.setdefault(key, []).append(request)
            if key not in self._busy:
                self._busy.add(key)
                request.lead = True
        while not request.done:
            if request.lead:
                self._lead(key, request)
            else:
                request.wake.wait()
        if request.error is not None:
            raise request.error

    def _lead(self, key: tuple[str, str], own: _Request) -> None:
        """Commit batches until `own` is done, then hand the tag to the oldest waiter."""
        try:
            while not own.done:
                with self._mutex:
                    batch = self._queues.pop(key, [])
                try:
                    self._commit(key[0], key[1], batch)
                except BaseException as exc:  # noqa: BLE001 - every waiter must hear of it
                    for request in batch:
                        request.finish(exc)
                for request in batch:
                    request.finish()
        finally:
            with self._mutex:
                waiting = self._queues.get(key)
                if waiting:
                    waiting[0].lead = True
                    waiting[0].wake.set()
                else:
                    self._busy.discard(key)

    def _commit(self, repository: str, tag: str, live: list[_Request]) -> None:
        for _ in range(MAX_ROUNDS):
            started = time.monotonic()
            manifest = self._editable(repository, tag)
            layers = [] if manifest is None else _file_layers(manifest)
            # A model tag's files are typed as model files in every round (a file moved in from
            # another tag, one pushed by a mount whose view of the tag was stale): what it held
            # leniently (a file that is not what its name says keeps its type), what a change
            # puts there now strictly (EINVAL for that change).
            setting = [r.change.artifact_type for r in live if r.change.artifact_type and manifest is not None]
            expected = self._model_type(repository, tag, manifest, setting[-1] if setting else None)
            retyped: dict[str, Descriptor] = {}
            if expected is not None and self._model_type(repository, tag, manifest, None) is not None:
                layers = self._typed(repository, layers, layers, retyped, strict=False)
            applied = []
            for request in live:
                if manifest is None and request.change.must_exist:
                    request.finish(NotFound(f"{repository}:{tag} does not exist"))
                    continue
                try:
                    changed = request.change.apply(layers)
                    if expected is not None:
                        changed = self._typed(repository, layers, changed, retyped,
                                              strict=request.change.makes_model)
                except (NotFound, Refused) as exc:
                    request.finish(exc)
                    continue
                layers = changed
                applied.append(request)
            live = applied
            if not live:
                return
            artifact_type = next((r.change.artifact_type for r in reversed(live) if r.change.artifact_type), None)
            model_type = self._model_type(repository, tag, manifest, artifact_type)
            if (model_type is None) != (expected is None):
                continue  # the change that made it a model was refused: the round again without it
            if model_type is not None:
                # Split weights in shard order; the config describes these layers, so it is
                # made again each round.
                layers = self.models.ordered(repository, layers)
                model_raw = self._model_manifest(repository, manifest, layers, model_type)
                if model_raw is None:
                    return  # already as asked
                raw = model_raw
                media_type = OCI_MANIFEST if manifest is None else manifest.media_type
            elif manifest is not None:
                if _unchanged(manifest, layers, artifact_type):
                    return  # already as asked: a PUT would only re-encode the manifest
                raw = replace_layers(manifest, layers, artifact_type=artifact_type)
                media_type = manifest.media_type
            else:
                self._ensure_blob(repository, EMPTY_JSON)
                raw = build_manifest(
                    layers, annotations={ANNOTATION_CREATED: now_rfc3339()},
                    artifact_type=artifact_type or self.pending_artifact_type(repository, tag) or self.artifact_type)
                media_type = OCI_MANIFEST
            self.client.put_manifest(repository, tag, raw, media_type)
            pushed = parse_manifest(raw, content_type=media_type)
            self.metadata.note_pushed(repository, tag, pushed)
            live = self._lost(repository, tag, pushed, live, time.monotonic() - started, retyped)
            if not live:
                return
            log.warning("%s:%s: another writer replaced the tag without %d change(s) of this mount; "
                        "applying them again", repository, tag, len(live))
        for request in live:
            request.finish(PushFailed(f"{repository}:{tag} kept changing under other writers: "
                                      f"gave up after {MAX_ROUNDS} rounds"))

    # ---- models ---------------------------------------------------------------------------

    def _typed(self, repository: str, before: Layers, layers: Layers, retyped: dict[str, Descriptor], *,
               strict: bool) -> Layers:
        """`layers` typed as model files; a file not in `before` (or every file, `strict`)
        that is not what its new type says is refused. `retyped` learns what each typed layer
        was before, for `_lost` to recognise a change in its typed form."""
        typed = self.models.typed(repository, layers,
                                  lambda layer: strict or not has_layer(before, layer))
        for old, new in zip(layers, typed, strict=True):
            if new is not old and new.to_dict() != old.to_dict():
                retyped[_key(new)] = old
        return typed

    def model_type(self, repository: str, tag: str) -> str | None:
        """The model config type of `repository:tag` as this mount knows it now (within the
        TTL), None when it is no model: what a file pushed there becomes is decided by it."""
        try:
            found = self.metadata.tag_manifest(repository, tag)
        except NotFound:
            found = None
        if found is None:
            return self._model_type(repository, tag, None, None)
        manifest = found[1]
        return self._model_type(repository, tag, manifest, None) if isinstance(manifest, Manifest) else None

    def _model_type(self, repository: str, tag: str, manifest: Manifest | None,
                    artifact_type: str | None) -> str | None:
        """The model config type the tag gets in this round, or None: the type being set now;
        else an existing tag's config type (or its artifactType, set before ocifs made models);
        else, for a new tag, the type set on its directory or the mount's --artifact-type."""
        if artifact_type is not None:
            wanted: str | None = artifact_type
        elif manifest is not None:
            config_type = manifest.config.media_type if manifest.config is not None else None
            wanted = config_type if is_model_type(config_type) else manifest.artifact_type
        else:
            wanted = self.pending_artifact_type(repository, tag) or self.artifact_type
        return wanted if is_model_type(wanted) else None

    def _model_manifest(self, repository: str, manifest: Manifest | None, layers: Layers,
                        model_type: str) -> bytes | None:
        """The manifest of a model tag holding `layers`, laid out as `docker model package`
        lays it out (a config of type `model_type`, no artifactType); its config blob is
        pushed first. None when the tag is already so."""
        if manifest is not None and manifest.config is not None and manifest.config.media_type == model_type \
                and _unchanged(manifest, layers, None):
            return None
        config = self.models.build(repository, layers, manifest)
        self._ensure_blob(repository, config)
        if not layers:
            self._ensure_blob(repository, EMPTY_JSON)  # the placeholder layer of a tag without files
        descriptor = Descriptor.for_bytes(model_type, config)
        if manifest is None:
            return build_manifest(layers, config=descriptor, artifact_type=None,
                                  annotations={ANNOTATION_CREATED: now_rfc3339()})
        try:
            data = json.loads(manifest.raw)
        except ValueError as exc:  # parse_manifest accepted it: a programming error
            raise IntegrityError(f"manifest {manifest.digest} no longer parses: {exc}") from None
        data["config"] = descriptor.to_dict()
        data["layers"] = [layer.to_dict() for layer in layers] or [EMPTY_DESCRIPTOR.to_dict()]
        if not is_model_type(data.get("artifactType")):
            data.pop("artifactType", None)  # a tag made a model: its type is its config's now
        return encode_json(data)

    def _lost(self, repository: str, tag: str, pushed: Manifest | Index, live: list[_Request],
              elapsed: float, retyped: dict[str, Descriptor]) -> list[_Request]:
        """After our PUT, wait a little and look again: the changes another writer's PUT undid."""
        time.sleep(min(SETTLE_MAX, max(SETTLE_MIN, elapsed) * random.uniform(1.0, 2.0)))
        now = self.metadata.resolve_now(repository, tag)
        if now is not None and now.digest == pushed.digest:
            return []
        try:
            seen = self._editable(repository, tag)
        except Refused:
            raise PushFailed(f"{repository}:{tag} was replaced by another writer with an image") from None
        layers = [] if seen is None else _file_layers(seen)
        # A layer this mount typed as a model file stands for the layer its change put.
        layers += [retyped[key] for layer in layers if (key := _key(layer)) in retyped]
        return [r for r in live if r.change.holds is not None and not r.change.holds(layers)]

    def _editable(self, repository: str, tag: str) -> Manifest | None:
        """The tag's manifest as it is now (None: no such tag); EPERM for what never changes."""
        found = self.metadata.tag_manifest(repository, tag, fresh=True)
        if found is None:
            return None
        manifest = found[1]
        if isinstance(manifest, Index):
            raise Refused(f"{repository}:{tag} is an image index", errno.EPERM)
        if manifest.is_image:
            raise Refused(f"{repository}:{tag} is a container image: never modified", errno.EPERM)
        return manifest

    def _ensure_blob(self, repository: str, data: bytes) -> Digest:
        digest = Digest.of(data)
        self.client.push_blob(repository, io.BytesIO(data), digest, len(data))
        return digest


def _unchanged(manifest: Manifest, layers: Layers, artifact_type: str | None) -> bool:
    before = [layer.to_dict() for layer in _file_layers(manifest)]
    return before == [layer.to_dict() for layer in layers] and \
        (artifact_type is None or artifact_type == manifest.artifact_type)


def _key(layer: Descriptor) -> str:
    return json.dumps(layer.to_dict(), sort_keys=True)


def _file_layers(manifest: Manifest) -> Layers:
    return [layer for layer in manifest.layers if not is_placeholder_layer(layer)]

