"""Manifest edits (ocifs/write/edits.py): the pure layer edits, and the TagEditor against the
real registry, without a mount.

The editor's contract (DESIGN.md section 3): each round reads the tag as it is now, applies
every queued change of this mount and PUTs once; `edit()` returns once a manifest holding the
change was PUT and checked; a change that needs the tag (`must_exist`) on a missing tag is
NotFound; an image or index is never modified (EPERM); nothing changed means no PUT; after the
PUT the tag is looked at again and a change another writer's PUT undid is applied again, for a
bounded number of rounds.
"""

from __future__ import annotations

import errno
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ocifs.digest import Digest
from ocifs.errors import NotFound, PushFailed, Refused
from ocifs.metadata import Metadata
from ocifs.model import (
    ANNOTATION_CREATED,
    ANNOTATION_TITLE,
    EMPTY_DESCRIPTOR,
    OCI_CONFIG,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_LAYER_TAR,
    OCI_LAYER_TAR_GZIP,
    OCI_MANIFEST,
    UNKNOWN_ARTIFACT,
    Descriptor,
    encode_json,
)
from ocifs.reference import Source
from ocifs.registry import RegistryClient
from ocifs.store import BlobStore
from ocifs.write.edits import (
    MAX_ROUNDS,
    TagEditor,
    artifact_type_change,
    drop_change,
    drop_if_present,
    drop_layer,
    has_layer,
    move_change,
    put_change,
    put_layer,
)

from .conftest import make_client
from .content import push_blob, push_layers
from .helpers import layer_titles, manifest_of
from .registry_server import RunningRegistry

# ---- pure edits -------------------------------------------------------------------------------------


def layer(title: str | None, data: bytes, media_type: str = OCI_LAYER_TAR) -> Descriptor:
    return Descriptor.for_bytes(media_type, data, {ANNOTATION_TITLE: title} if title is not None else {})


A, B, C = layer("a", b"1"), layer("b", b"2"), layer("c", b"3")


def test_put_layer() -> None:
    """In place of `old`; else in place of the first layer with its title; else appended.
    The input list is not changed."""
    layers = [A, B]
    new_a = layer("a", b"new")
    assert put_layer(layers, new_a, A) == [new_a, B]
    assert put_layer(layers, new_a, None) == [new_a, B]  # by title
    assert put_layer(layers, C, None) == [A, B, C]
    assert put_layer(layers, C, layer("gone", b"x")) == [A, B, C]  # `old` not there, title new: appended
    untitled = layer(None, b"u")
    assert put_layer([untitled], layer(None, b"v"), None) == [untitled, layer(None, b"v")]
    retitled = layer("z", b"1")  # A's bytes under another title, in A's place
    assert put_layer(layers, retitled, A) == [retitled, B]
    assert layers == [A, B]


def test_put_layer_replaces_only_the_first_of_a_title() -> None:
    dup = layer("a", b"dup")
    new_a = layer("a", b"new")
    assert put_layer([A, B, dup], new_a, None) == [new_a, B, dup]
    assert put_layer([A, B, dup], new_a, dup) == [A, B, new_a]  # `old` wins over the title


def test_drop_layer() -> None:
    """Drops the very layer; else the layer of its title (changed elsewhere); else NotFound."""
    assert drop_layer([A, B], A) == [B]
    changed_a = layer("a", b"changed elsewhere")
    assert drop_layer([changed_a, B], A) == [B]
    with pytest.raises(NotFound):
        drop_layer([B], A)
    with pytest.raises(NotFound):
        drop_layer([B], layer(None, b"untitled"))
    layers = [A, B]
    drop_layer(layers, A)
    assert layers == [A, B]


def test_drop_if_present_and_has_layer() -> None:
    assert drop_if_present([A, B], B) == [A]
    assert drop_if_present([A], B) == [A]
    assert has_layer([A, B], A)
    assert not has_layer([B], A)
    # The same bytes with another title or media type are another layer.
    assert not has_layer([layer("other", b"1")], A)
    assert not has_layer([layer("a", b"1", OCI_LAYER_TAR_GZIP)], A)


def test_changes_say_whether_they_still_hold() -> None:
    new_a = layer("a", b"new")
    change = put_change(new_a, A)
    assert change.apply([A, B]) == [new_a, B]
    assert change.holds is not None and change.holds([new_a]) and not change.holds([A])
    assert not change.must_exist
    drop = drop_change(A)
    assert drop.must_exist and drop.holds is not None and drop.holds([B]) and not drop.holds([A, B])
    moved = layer("c", b"1")
    move = move_change(A, moved, B)  # `a` becomes `c`, over... B (the replaced layer)
    assert move.apply([A, B]) == [moved]
    assert move.must_exist and move.holds is not None
    assert move.holds([moved]) and not move.holds([A, moved]) and not move.holds([A])
    artifact = artifact_type_change("application/x-kind")
    assert artifact.apply([A]) == [A] and artifact.artifact_type == "application/x-kind" and artifact.must_exist


# ---- the editor against the registry -----------------------------------------------------------------


class Counted:
    """Counts (and optionally intercepts) one client's manifest PUTs."""

    def __init__(self, client: RegistryClient,
                 after_put: Callable[[int, str, str], None] | None = None) -> None:
        self.client = client
        self.real = client.put_manifest
        self.puts: list[tuple[str, str]] = []
        self.after_put = after_put
        self._mutex = threading.Lock()
        client.put_manifest = self.put  # type: ignore[method-assign]

    def put(self, repository: str, reference: str, raw: bytes, media_type: str) -> Digest:
        digest = self.real(repository, reference, raw, media_type)
        with self._mutex:
            self.puts.append((repository, reference))
            count = len(self.puts)
        if self.after_put is not None:
            self.after_put(count, repository, reference)
        return digest


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Callable[[], BlobStore]]:
    made: list[BlobStore] = []

    def make() -> BlobStore:
        store = BlobStore(tmp_path / f"cache{len(made)}")
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


EditorFactory = Callable[..., TagEditor]


@pytest.fixture
def make_editor(registry: RunningRegistry, stores: Callable[[], BlobStore]) -> EditorFactory:
    """An editor as one mount has it: its own client (unless given), Metadata and cache."""

    def make(client: RegistryClient | None = None,
             pending: Callable[[str, str], str | None] = lambda repository, tag: None) -> TagEditor:
        client = client or make_client(registry)
        metadata = Metadata(Source.parse(registry.host), client, stores())
        return TagEditor(client, metadata, artifact_type=UNKNOWN_ARTIFACT, pending_artifact_type=pending)

    return make


def pushed_layer(client: RegistryClient, repo: str, title: str, data: bytes,
                 media_type: str = OCI_LAYER_TAR) -> Descriptor:
    """A layer whose blob is in `repo`."""
    push_blob(client, repo, data)
    return layer(title, data, media_type)


def digests(client: RegistryClient, repo: str, tag: str) -> dict[str, Digest]:
    return layer_titles(client, repo, tag)


def test_put_change_makes_a_new_tag_as_oras_would(client: RegistryClient, repo: str,
                                                   make_editor: EditorFactory) -> None:
    editor = make_editor(client)
    counted = Counted(client)
    a = pushed_layer(client, repo, "a.txt", b"alpha")
    editor.edit(repo, "new", put_change(a, None))
    manifest = manifest_of(client, repo, "new")
    assert manifest.media_type == OCI_MANIFEST and manifest.artifact_type == UNKNOWN_ARTIFACT
    assert manifest.config is not None and manifest.config.media_type == OCI_EMPTY
    assert ANNOTATION_CREATED in manifest.annotations
    assert manifest.layers == (a,)
    assert counted.puts == [(repo, "new")]
    # The editor's Metadata shows what it PUT without asking again.
    assert editor.metadata.resolve(repo, "new").digest == manifest.digest


def test_a_pending_artifact_type_goes_into_a_new_tag(client: RegistryClient, repo: str,
                                                     make_editor: EditorFactory) -> None:
    editor = make_editor(client, pending=lambda r, t: "application/vnd.docker.volume.v1+tar.gz"
                         if (r, t) == (repo, "vol") else None)
    editor.edit(repo, "vol", put_change(pushed_layer(client, repo, "v", b"v"), None))
    assert manifest_of(client, repo, "vol").artifact_type == "application/vnd.docker.volume.v1+tar.gz"


def test_put_change_replaces_in_place_and_keeps_the_rest(client: RegistryClient, repo: str,
                                                         make_editor: EditorFactory) -> None:
    """Only the layers change: media type, config, artifactType and annotations are kept."""
    push_layers(client, repo, "t", [("a", b"old a"), ("b", b"b")],
                artifact_type="application/x-kept", annotations={"keep": "me"})
    before = manifest_of(client, repo, "t")
    editor = make_editor(client)
    new_a = pushed_layer(client, repo, "a", b"new a")
    editor.edit(repo, "t", put_change(new_a, before.layers[0]))
    after = manifest_of(client, repo, "t")
    assert after.layers == (new_a, before.layers[1])
    assert after.artifact_type == "application/x-kept" and after.annotations == {"keep": "me"}
    assert after.config == before.config


def test_drop_change_down_to_the_placeholder(client: RegistryClient, repo: str,
                                             make_editor: EditorFactory) -> None:
    push_layers(client, repo, "t", [("a", b"a"), ("b", b"b")])
    a, b = manifest_of(client, repo, "t").layers
    editor = make_editor(client)
    editor.edit(repo, "t", drop_change(a))
    assert digests(client, repo, "t") == {"b": Digest.of(b"b")}
    editor.edit(repo, "t", drop_change(b))
    manifest = manifest_of(client, repo, "t")
    assert manifest.layers == (EMPTY_DESCRIPTOR,)  # the tag stays, with no files
    with pytest.raises(NotFound):
        editor.edit(repo, "t", drop_change(b))  # already gone


def test_move_change_retitles_and_replaces(client: RegistryClient, repo: str, make_editor: EditorFactory) -> None:
    push_layers(client, repo, "t", [("a", b"a"), ("b", b"b")])
    a, b = manifest_of(client, repo, "t").layers
    editor = make_editor(client)
    moved = replace(a, annotations={ANNOTATION_TITLE: "dir/c"})
    editor.edit(repo, "t", move_change(a, moved, None))
    assert digests(client, repo, "t") == {"dir/c": Digest.of(b"a"), "b": Digest.of(b"b")}
    over_b = replace(moved, annotations={ANNOTATION_TITLE: "b"})
    editor.edit(repo, "t", move_change(moved, over_b, b))
    assert digests(client, repo, "t") == {"b": Digest.of(b"a")}


def test_artifact_type_change(client: RegistryClient, repo: str, make_editor: EditorFactory) -> None:
    push_layers(client, repo, "t", [("a", b"a")])
    before = manifest_of(client, repo, "t")
    make_editor(client).edit(repo, "t", artifact_type_change("application/x-new-kind"))
    after = manifest_of(client, repo, "t")
    assert after.artifact_type == "application/x-new-kind" and after.layers == before.layers


def test_nothing_changed_means_no_put(client: RegistryClient, repo: str, make_editor: EditorFactory) -> None:
    """A layer already there as asked, or the artifact type it already has: no PUT, the tag's
    digest unchanged; a drop of what is not there is NotFound, also without a PUT."""
    digest = push_layers(client, repo, "t", [("a", b"a"), ("b", b"b")], artifact_type="application/x-same")
    a = manifest_of(client, repo, "t").layers[0]
    editor = make_editor(client)
    counted = Counted(client)
    editor.edit(repo, "t", put_change(a, a))
    editor.edit(repo, "t", put_change(a, None))
    editor.edit(repo, "t", artifact_type_change("application/x-same"))
    with pytest.raises(NotFound):
        editor.edit(repo, "t", drop_change(layer("never", b"there")))
    assert counted.puts == []
    assert client.resolve(repo, "t").digest == digest


def test_nothing_changed_means_no_put_whatever_the_manifests_formatting(
        client: RegistryClient, repo: str, make_editor: EditorFactory) -> None:
    a = pushed_layer(client, repo, "a", b"a")
    push_blob(client, repo, b"{}")
    raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/x-same",
                      "config": EMPTY_DESCRIPTOR.to_dict(), "layers": [a.to_dict()],
                      "annotations": {"org.opencontainers.image.description": "a <b> & c"}},
                     indent=2).encode()
    digest = client.put_manifest(repo, "t", raw, OCI_MANIFEST)
    editor = make_editor(client)
    counted = Counted(client)
    editor.edit(repo, "t", put_change(a, a))
    editor.edit(repo, "t", artifact_type_change("application/x-same"))
    assert counted.puts == []
    assert client.resolve(repo, "t").digest == digest


@pytest.mark.parametrize("make_change", [
    lambda: drop_change(A),
    lambda: move_change(A, layer("z", b"1"), None),
    lambda: artifact_type_change("application/x-kind"),
])
def test_a_change_that_needs_the_tag_on_a_missing_tag(client: RegistryClient, repo: str,
                                                      make_editor: EditorFactory,
                                                      make_change: Callable[[], Any]) -> None:
    counted = Counted(client)
    with pytest.raises(NotFound):
        make_editor(client).edit(repo, "missing", make_change())
    assert counted.puts == []
    with pytest.raises(NotFound):
        client.resolve(repo, "missing")


def push_image(client: RegistryClient, repo: str, tag: str) -> Digest:
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    return push_layers(client, repo, tag, [(None, b"layer bytes", OCI_LAYER_TAR_GZIP)],
                       config=(OCI_CONFIG, config), artifact_type=None)


def test_an_image_or_index_is_never_modified(client: RegistryClient, repo: str, make_editor: EditorFactory) -> None:
    image = push_image(client, repo, "image")
    assert manifest_of(client, repo, "image").is_image
    raw = encode_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": str(image), "size": client.resolve(repo, "image").size,
         "platform": {"os": "linux", "architecture": "amd64"}}]})
    index = client.put_manifest(repo, "index", raw, OCI_INDEX)
    editor = make_editor(client)
    counted = Counted(client)
    a = pushed_layer(client, repo, "a", b"a")
    for tag, change in (("image", put_change(a, None)), ("image", artifact_type_change("x/y")),
                        ("index", put_change(a, None))):
        with pytest.raises(Refused) as caught:
            editor.edit(repo, tag, change)
        assert caught.value.errno == errno.EPERM
    assert counted.puts == []
    assert client.resolve(repo, "image").digest == image and client.resolve(repo, "index").digest == index


def test_queued_changes_share_one_put_and_fail_alone(client: RegistryClient, repo: str,
                                                    make_editor: EditorFactory) -> None:
    """While a PUT of a tag is under way, changes queue; the next round applies them all in
    one PUT. A change that cannot apply (a drop of what is not there) fails alone."""
    push_layers(client, repo, "t", [("keep", b"k")])
    release = threading.Event()
    first_put = threading.Event()

    def hold_first(count: int, repository: str, tag: str) -> None:
        if count == 1:
            first_put.set()
            release.wait(10)

    counted = Counted(client, after_put=hold_first)
    editor = make_editor(client)
    layers = {name: pushed_layer(client, repo, name, name.encode()) for name in ("x", "y", "z")}
    errors: dict[str, BaseException | None] = {}

    def edit(name: str, change: Any) -> None:
        try:
            editor.edit(repo, "t", change)
            errors[name] = None
        except BaseException as exc:
            errors[name] = exc

    first = threading.Thread(target=edit, args=("x", put_change(layers["x"], None)))
    first.start()
    assert first_put.wait(10)
    queued = [threading.Thread(target=edit, args=(name, change)) for name, change in (
        ("y", put_change(layers["y"], None)), ("gone", drop_change(layer("gone", b"?"))),
        ("z", put_change(layers["z"], None)))]
    for thread in queued:
        thread.start()
    # The queued edits are waiting for the tag (they cannot finish before the first PUT does).
    queued[-1].join(0.2)
    assert all(thread.is_alive() for thread in queued)
    release.set()
    for thread in [first, *queued]:
        thread.join(20)
        assert not thread.is_alive()
    assert errors["x"] is None and errors["y"] is None and errors["z"] is None
    assert isinstance(errors["gone"], NotFound)
    assert len(counted.puts) == 2
    assert set(digests(client, repo, "t")) == {"keep", "x", "y", "z"}


def undo_after(client: RegistryClient, other: RegistryClient, repo: str, tag: str, times: int,
               raw_of_other: Callable[[], bytes] | None = None) -> Counted:
    """After each of the first `times` PUTs of `client`, another writer (`other`) PUTs the
    manifest the tag had before it (or `raw_of_other()`): as if its PUT landed just after ours."""
    state: dict[str, bytes] = {"before": manifest_of(other, repo, tag).raw}

    def undo(count: int, repository: str, reference: str) -> None:
        if count <= times:
            raw = raw_of_other() if raw_of_other is not None else state["before"]
            other.put_manifest(repo, tag, raw, OCI_MANIFEST)

    return Counted(client, after_put=undo)


def test_a_change_another_writer_undid_is_applied_again(client: RegistryClient,
                                                       repo: str, make_editor: EditorFactory) -> None:
    push_layers(client, repo, "t", [("theirs", b"t")])
    editor = make_editor()
    counted = undo_after(editor.client, client, repo, "t", times=1)
    ours = pushed_layer(client, repo, "ours", b"o")
    editor.edit(repo, "t", put_change(ours, None))
    assert len(counted.puts) == 2
    assert digests(client, repo, "t") == {"theirs": Digest.of(b"t"), "ours": Digest.of(b"o")}


def test_a_drop_another_writer_undid_is_applied_again(client: RegistryClient, repo: str,
                                                     make_editor: EditorFactory) -> None:
    push_layers(client, repo, "t", [("gone", b"g"), ("kept", b"k")])
    gone = manifest_of(client, repo, "t").layers[0]
    editor = make_editor()
    counted = undo_after(editor.client, client, repo, "t", times=1)
    editor.edit(repo, "t", drop_change(gone))
    assert len(counted.puts) == 2
    assert digests(client, repo, "t") == {"kept": Digest.of(b"k")}


def test_another_writers_change_that_keeps_ours_is_not_redone(client: RegistryClient, repo: str,
                                                             make_editor: EditorFactory) -> None:
    """The tag moved after our PUT, but with our layer in it: nothing to apply again."""
    push_layers(client, repo, "t", [("theirs", b"t")])
    editor = make_editor()
    extra = pushed_layer(client, repo, "extra", b"e")

    def theirs_plus_extra() -> bytes:
        current = manifest_of(client, repo, "t")
        data = json.loads(current.raw)
        data["layers"].append(extra.to_dict())
        return encode_json(data)

    counted = undo_after(editor.client, client, repo, "t", times=1, raw_of_other=theirs_plus_extra)
    editor.edit(repo, "t", put_change(pushed_layer(client, repo, "ours", b"o"), None))
    assert len(counted.puts) == 1
    assert set(digests(client, repo, "t")) == {"theirs", "ours", "extra"}


def test_the_editor_gives_up_after_max_rounds(client: RegistryClient, repo: str,
                                              make_editor: EditorFactory) -> None:
    push_layers(client, repo, "t", [("theirs", b"t")])
    editor = make_editor()
    counted = undo_after(editor.client, client, repo, "t", times=MAX_ROUNDS + 5)
    with pytest.raises(PushFailed):
        editor.edit(repo, "t", put_change(pushed_layer(client, repo, "ours", b"o"), None))
    assert len(counted.puts) == MAX_ROUNDS


def test_a_tag_replaced_by_an_image_after_our_put_fails_the_push(client: RegistryClient, repo: str,
                                                                make_editor: EditorFactory) -> None:
    push_layers(client, repo, "t", [("theirs", b"t")])
    push_image(client, repo, "image")
    image_raw = manifest_of(client, repo, "image").raw
    editor = make_editor()
    undo_after(editor.client, client, repo, "t", times=1, raw_of_other=lambda: image_raw)
    with pytest.raises(PushFailed):
        editor.edit(repo, "t", put_change(pushed_layer(client, repo, "ours", b"o"), None))
    assert manifest_of(client, repo, "t").raw == image_raw  # an image is never modified


ROUNDS = 3
THREADS_PER_MOUNT = 4
EDITS_PER_THREAD = 3


def busy_round(editors: list[TagEditor], client: RegistryClient, repo: str, tag: str) -> None:
    """Every thread of every editor adds its files to `tag` at once; all must be there."""
    titles = [f"m{m}/t{t}/f{e}" for m in range(len(editors)) for t in range(THREADS_PER_MOUNT)
              for e in range(EDITS_PER_THREAD)]
    layers = {title: pushed_layer(client, repo, title, f"{tag}:{title}".encode()) for title in titles}
    barrier = threading.Barrier(len(editors) * THREADS_PER_MOUNT)
    failures: list[BaseException] = []

    def work(editor: TagEditor, mount: int, thread: int) -> None:
        try:
            barrier.wait(10)
            for e in range(EDITS_PER_THREAD):
                editor.edit(repo, tag, put_change(layers[f"m{mount}/t{thread}/f{e}"], None))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(editor, m, t))
               for m, editor in enumerate(editors) for t in range(THREADS_PER_MOUNT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    found = digests(client, repo, tag)
    missing = set(titles) - set(found)
    assert not missing, f"{tag}: lost {sorted(missing)}"
    for title in titles:
        assert found[title] == Digest.of(f"{tag}:{title}".encode())


def test_two_mounts_editing_one_tag_from_many_threads_lose_nothing(client: RegistryClient, repo: str,
                                                                   make_editor: EditorFactory) -> None:
    """Two editors (two mounts: own clients, Metadata and caches), several threads each,
    adding distinct files to one tag at once: when every edit has returned, every file is in
    the tag. A few rounds, on fresh tags, new or existing."""
    editors = [make_editor(), make_editor()]
    for round_number in range(ROUNDS):
        tag = f"busy{round_number}"
        if round_number % 2:
            push_layers(client, repo, tag, [("seed", b"seed")])
        busy_round(editors, client, repo, tag)
        if round_number % 2:
            assert "seed" in digests(client, repo, tag)
