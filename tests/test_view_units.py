"""The view (ocifs/view.py) with the tree and the writer against the real registry, without
FUSE: built as `ocifs mount` builds them (cli.cmd_mount), on a whole-registry SOURCE.

The contract (view.py's precedence rule, DESIGN.md sections 2 and 3): `.ocifs/` is the
mount's own and not listed at the root; a staged file at a path hides the registry's file
there (attributes, listing and xattrs all come from it, with one inode); then the registry's
node; then directories made here with mkdir, whose files go to the tag they name. A handle
returned by `create`/`open` pushes on flush; rmdir of a tag directory that lists files is
ENOTEMPTY; unlink of a registry file drops its layer; a staged file whose push failed stays
visible and is listed in `.ocifs/status`.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ocifs.digest import Digest
from ocifs.errors import NetworkError, NotFound, PushFailed, Refused
from ocifs.layout import BlobFile, ManifestDir, inode_number
from ocifs.metadata import Metadata
from ocifs.model import OCI_LAYER_TAR
from ocifs.reference import Registry, Source
from ocifs.registry import ClientOptions, RegistryClient, TransportOptions
from ocifs.store import BlobStore
from ocifs.tree import Tree
from ocifs.view import Attributes, ControlNode, Listed, View
from ocifs.write import StagedFile, WriteHandle, Writer

from .conftest import make_client
from .content import push_layers
from .fakeserver import closed_port
from .faultproxy import FaultProxy
from .helpers import layer_titles, manifest_of, wait_until
from .registry_server import RunningRegistry


@dataclass
class Mount:
    """What `ocifs mount` wires up, minus FUSE."""

    view: View
    tree: Tree
    writer: Writer | None
    metadata: Metadata
    store: BlobStore


class Mounts:
    """Builds mounts of the registry (each with its own cache) and takes them down."""

    def __init__(self, registry: RunningRegistry, tmp_path: Path) -> None:
        self.registry = registry
        self.tmp_path = tmp_path
        self.made: list[Mount] = []

    def __call__(self, *, push_client: RegistryClient | None = None, read_only: bool = False,
                 cache: str | None = None) -> Mount:
        """A mount; `push_client` is what its writer pushes with (an unreachable registry, say);
        `cache` names a cache directory to share with an earlier mount."""
        source = Source.parse(self.registry.host)
        client = make_client(self.registry)
        store = BlobStore(self.tmp_path / (cache or f"cache{len(self.made)}"))
        metadata = Metadata(source, client, store)
        tree = Tree(source, metadata)
        writer = None
        if not read_only:
            writer = Writer(metadata, push_client or client, store, source=str(source),
                            open_blob=tree.open, on_pushed=tree.note_file_time)
        view = View(tree, writer, status=lambda: {"source": str(source)})
        mount = Mount(view, tree, writer, metadata, store)
        self.made.append(mount)
        return mount

    def close(self) -> None:
        for mount in self.made:
            if mount.writer is not None:
                mount.writer.pusher.retries.stop()
                for staged in mount.writer.overlay.files():
                    staged.close_fd()
            mount.store.close()


@pytest.fixture
def mounts(registry: RunningRegistry, tmp_path: Path) -> Iterator[Mounts]:
    made = Mounts(registry, tmp_path)
    yield made
    made.close()


def listed(view: View, path: str) -> dict[str, Listed]:
    return {entry.name: entry for entry in view.children(path)}


def read_all(view: View, path: str) -> bytes:
    handle = view.open(path, write=False, truncate=False).handle
    try:
        return bytes(handle.read(0, 1 << 20))
    finally:
        handle.close()


def check_agree(view: View, path: str) -> Attributes:
    """attributes() and the parent's children() say the same of `path` (kind and inode)."""
    attributes = view.attributes(path)
    parent, _, name = path.rpartition("/")
    entry = listed(view, parent)[name]
    assert (entry.is_dir, entry.inode) == (attributes.is_dir, attributes.inode), path
    return attributes


def count_puts(client: RegistryClient) -> list[str]:
    """Record every manifest PUT `client` makes from now on."""
    puts: list[str] = []
    real = client.put_manifest

    def put(repository: str, reference: str, raw: bytes, media_type: str) -> Digest:
        puts.append(f"{repository}:{reference}")
        return real(repository, reference, raw, media_type)

    client.put_manifest = put  # type: ignore[method-assign]
    return puts


def client_at(host: str) -> RegistryClient:
    """A client of `host` that gives up quickly (no retries)."""
    return RegistryClient(Registry.parse(host), ClientOptions(
        transport=TransportOptions(connect_timeout=2, read_timeout=5, retries=0, backoff=0.01)))


def unreachable_client() -> RegistryClient:
    return client_at(f"127.0.0.1:{closed_port()}")


CUSTOM = "application/x-custom-layer"


# ---- precedence: a staged file hides the registry's --------------------------------------------------


def test_a_staged_file_hides_the_registry_file(client: RegistryClient, repo: str, mounts: Mounts) -> None:
    """While a registry file is rewritten, its path shows the staged file everywhere (size,
    listing, inode, xattrs: no digest of the old bytes); after the push, the registry's new
    file, again the same in attributes() and children()."""
    push_layers(client, repo, "t", [("a.txt", b"old", CUSTOM), ("b.txt", b"bee")])
    view = mounts().view
    path = f"{repo}/t/a.txt"
    before = check_agree(view, path)
    assert (before.is_dir, before.size, before.inode) == (False, 3, inode_number(path, Digest.of(b"old")))
    assert view.xattrs(path)["user.oci.digest"] == str(Digest.of(b"old")).encode()

    handle = view.open(path, write=True, truncate=True).handle
    assert isinstance(handle, WriteHandle)
    handle.write(b"new content", 0)
    assert isinstance(view.lookup(path), StagedFile)
    staged = check_agree(view, path)
    assert (staged.is_dir, staged.size, staged.inode) == (False, 11, inode_number(path, None))
    assert view.xattrs(path) == {"user.oci.mediatype": CUSTOM.encode()}
    assert read_all(view, path) == b"new content"
    assert set(listed(view, f"{repo}/t")) == {"a.txt", "b.txt"}
    assert layer_titles(client, repo, "t")["a.txt"] == Digest.of(b"old")  # not pushed yet

    handle.flush()
    handle.close()
    manifest = manifest_of(client, repo, "t")
    assert [(item.title, item.digest, item.media_type) for item in manifest.layers] == [
        ("a.txt", Digest.of(b"new content"), CUSTOM), ("b.txt", Digest.of(b"bee"), OCI_LAYER_TAR)]
    assert isinstance(view.lookup(path), BlobFile)
    after = check_agree(view, path)
    assert (after.size, after.inode) == (11, inode_number(path, Digest.of(b"new content")))
    assert view.xattrs(path)["user.oci.digest"] == str(Digest.of(b"new content")).encode()
    assert read_all(view, path) == b"new content"


def test_a_registry_file_opened_for_writing_starts_with_its_bytes(client: RegistryClient, repo: str,
                                                                 mounts: Mounts) -> None:
    push_layers(client, repo, "t", [("log.txt", b"line 1\n")])
    view = mounts().view
    path = f"{repo}/t/log.txt"
    handle = view.open(path, write=True, truncate=False).handle
    assert handle.read(0, 100) == b"line 1\n"
    handle.write(b"line 2\n", 7)
    handle.flush()
    handle.close()
    assert layer_titles(client, repo, "t") == {"log.txt": Digest.of(b"line 1\nline 2\n")}
    assert read_all(view, path) == b"line 1\nline 2\n"


def test_a_staged_file_keeps_its_directory(client: RegistryClient, repo: str, mounts: Mounts) -> None:
    push_layers(client, repo, "t", [("docs/a", b"a"), ("top", b"t")])
    view = mounts().view
    handle = view.create(f"{repo}/t/docs/b", truncate=True).handle
    handle.write(b"being written", 0)
    try:
        view.unlink(f"{repo}/t/docs/a")
        assert "docs" in listed(view, f"{repo}/t")
        assert view.attributes(f"{repo}/t/docs").is_dir
        assert [entry.name for entry in view.children(f"{repo}/t/docs")] == ["b"]
    finally:
        handle.close()


def test_create_write_flush_pushes_and_a_second_flush_pushes_nothing(client: RegistryClient, repo: str,
                                                                     mounts: Mounts) -> None:
    push_layers(client, repo, "t", [("old", b"o")])
    mount = mounts()
    view = mount.view
    puts = count_puts(mount.metadata.client)
    path = f"{repo}/t/docs/new.md"
    with pytest.raises(NotFound):  # no directory `docs` yet
        view.create(path, truncate=True)
    view.mkdir(f"{repo}/t/docs")
    opened = view.create(path, truncate=True)
    assert opened.digest is None
    handle = opened.handle
    handle.write(b"# new\n", 0)
    assert "docs/new.md" not in layer_titles(client, repo, "t")
    assert listed(view, f"{repo}/t")["docs"].is_dir
    check_agree(view, path)
    handle.flush()
    assert layer_titles(client, repo, "t") == {"old": Digest.of(b"o"), "docs/new.md": Digest.of(b"# new\n")}
    assert puts == [f"{repo}:t"]
    handle.flush()  # nothing new
    assert puts == [f"{repo}:t"]
    handle.close()
    assert mount.writer is not None and mount.writer.overlay.files() == []
    assert isinstance(view.lookup(path), BlobFile)
    assert read_all(view, path) == b"# new\n"


# ---- directories made here -----------------------------------------------------------------------------


def test_a_mkdired_tag_is_listed_and_its_files_go_to_that_tag(client: RegistryClient, repo: str,
                                                              mounts: Mounts) -> None:
    push_layers(client, repo, "t", [("f", b"f")])
    view = mounts().view
    tag_dir = f"{repo}/new"
    view.mkdir(tag_dir)
    assert set(listed(view, repo)) == {"t", "new"}
    assert check_agree(view, tag_dir).is_dir
    assert view.children(tag_dir) == []
    with pytest.raises(Refused) as caught:
        view.mkdir(tag_dir)
    assert caught.value.errno == errno.EEXIST
    view.set_xattr(tag_dir, "user.oci.artifacttype", "application/vnd.docker.volume.v1+tar.gz")
    assert view.xattrs(tag_dir) == {"user.oci.artifacttype": b"application/vnd.docker.volume.v1+tar.gz"}
    view.mkdir(f"{tag_dir}/docs")
    assert check_agree(view, f"{tag_dir}/docs").is_dir
    handle = view.create(f"{tag_dir}/docs/a.md", truncate=True).handle
    handle.write(b"a", 0)
    handle.flush()
    handle.close()
    manifest = manifest_of(client, repo, "new")
    assert layer_titles(client, repo, "new") == {"docs/a.md": Digest.of(b"a")}
    assert manifest.artifact_type == "application/vnd.docker.volume.v1+tar.gz"
    assert layer_titles(client, repo, "t") == {"f": Digest.of(b"f")}
    assert isinstance(view.lookup(tag_dir), ManifestDir)
    assert [entry.name for entry in view.children(f"{tag_dir}/docs")] == ["a.md"]


def test_a_mkdired_repository_and_tag(client: RegistryClient, repo: str, mounts: Mounts) -> None:
    """mkdir of a new repository beside an existing one, then of a tag in it."""
    push_layers(client, repo, "t", [("f", b"f")])
    view = mounts().view
    new_repo = f"{repo}-made"
    view.mkdir(new_repo)
    view.mkdir(f"{new_repo}/v1")
    assert check_agree(view, new_repo).is_dir and check_agree(view, f"{new_repo}/v1").is_dir
    handle = view.create(f"{new_repo}/v1/x.txt", truncate=True).handle
    handle.write(b"x", 0)
    handle.flush()
    handle.close()
    assert layer_titles(client, new_repo, "v1") == {"x.txt": Digest.of(b"x")}
    assert list(client.tags(new_repo)) == ["v1"]


def test_an_ambiguous_chain_of_new_directories(client: RegistryClient, repo: str, mounts: Mounts) -> None:
    push_layers(client, repo, "t", [("f", b"f")])
    view = mounts().view
    top = f"{repo}-amb"  # a new directory in an existing namespace: a repository, or not?
    view.mkdir(top)
    view.mkdir(f"{top}/app")
    view.mkdir(f"{top}/app/1.0")
    handle = view.create(f"{top}/app/1.0/f.txt", truncate=True).handle
    handle.write(b"f", 0)
    try:
        handle.flush()
    finally:
        handle.close()
    assert layer_titles(client, f"{top}/app", "1.0") == {"f.txt": Digest.of(b"f")}


def test_rmdir_of_a_tag_directory(client: RegistryClient, repo: str, mounts: Mounts) -> None:
    """ENOTEMPTY while it lists files (the tag stays); once emptied, the tag is deleted. A
    tag made here and never pushed just disappears."""
    digest = push_layers(client, repo, "t", [("a", b"a")])
    view = mounts().view
    with pytest.raises(Refused) as caught:
        view.rmdir(f"{repo}/t")
    assert caught.value.errno == errno.ENOTEMPTY
    assert client.resolve(repo, "t").digest == digest
    view.unlink(f"{repo}/t/a")
    assert view.children(f"{repo}/t") == []
    view.rmdir(f"{repo}/t")
    with pytest.raises(NotFound):
        client.resolve(repo, "t")
    view.mkdir(f"{repo}/local")
    view.rmdir(f"{repo}/local")
    with pytest.raises(NotFound):
        view.lookup(f"{repo}/local")


def test_unlink_of_a_registry_file_drops_its_layer(client: RegistryClient, repo: str, mounts: Mounts) -> None:
    push_layers(client, repo, "t", [("a", b"a"), ("docs/b", b"b"), ("c", b"c")])
    view = mounts().view
    view.unlink(f"{repo}/t/docs/b")
    assert layer_titles(client, repo, "t") == {"a": Digest.of(b"a"), "c": Digest.of(b"c")}
    assert set(listed(view, f"{repo}/t")) == {"a", "c"}
    with pytest.raises(NotFound):
        view.lookup(f"{repo}/t/docs/b")
    with pytest.raises(Refused) as caught:
        view.unlink(f"{repo}/t/.manifest.json")
    assert caught.value.errno == errno.EPERM
    assert set(layer_titles(client, repo, "t")) == {"a", "c"}


def test_rename_inside_a_tag_moves_the_title(client: RegistryClient, repo: str, mounts: Mounts) -> None:
    push_layers(client, repo, "t", [("a", b"a"), ("b", b"b")])
    view = mounts().view
    view.mkdir(f"{repo}/t/sub")
    view.rename(f"{repo}/t/a", f"{repo}/t/sub/z")
    assert layer_titles(client, repo, "t") == {"sub/z": Digest.of(b"a"), "b": Digest.of(b"b")}
    assert set(listed(view, f"{repo}/t")) == {"sub", "b"}
    check_agree(view, f"{repo}/t/sub/z")


# ---- the mount's own directory ---------------------------------------------------------------------------


def test_the_control_directory_is_not_listed_at_the_root(client: RegistryClient, repo: str, mounts: Mounts) -> None:
    push_layers(client, repo, "t", [("a", b"a")])
    view = mounts().view
    names = {entry.name for entry in view.children("")}
    assert ".ocifs" not in names and repo.split("/")[0] in names
    assert isinstance(view.lookup(".ocifs"), ControlNode)
    assert view.attributes(".ocifs").is_dir
    assert view.children(".ocifs") == [Listed("status", False, inode_number(".ocifs/status", None))]
    assert view.attributes(".ocifs/status").inode == inode_number(".ocifs/status", None)
    with pytest.raises(NotFound):
        view.lookup(".ocifs/other")
    for action, expected in ((lambda: view.create(".ocifs/x", truncate=True), errno.EPERM),
                             (lambda: view.unlink(".ocifs/status"), errno.EPERM),
                             (lambda: view.open(".ocifs/status", write=True, truncate=False), errno.EACCES),
                             (lambda: view.mkdir(".ocifs"), errno.EEXIST)):
        with pytest.raises(Refused) as caught:
            action()
        assert caught.value.errno == expected


def test_status_lists_a_staged_file_whose_push_failed(client: RegistryClient, repo: str, mounts: Mounts) -> None:
    """A push to an unreachable registry: flush fails with EIO, the file stays staged and
    visible, and `.ocifs/status` (read through the view) reports it as failed, with why."""
    push_layers(client, repo, "t", [("a", b"a")])
    mount = mounts(push_client=unreachable_client())
    view = mount.view
    path = f"{repo}/t/stuck.txt"
    handle = view.create(path, truncate=True).handle
    handle.write(b"not yet in the registry", 0)
    with pytest.raises(PushFailed) as caught:
        handle.flush()
    assert caught.value.errno == errno.EIO
    handle.close()
    assert isinstance(view.lookup(path), StagedFile)
    assert "stuck.txt" in listed(view, f"{repo}/t")
    assert "stuck.txt" not in layer_titles(client, repo, "t")

    opened = view.open(".ocifs/status", write=False, truncate=False)
    assert opened.direct and opened.digest is None
    text = opened.handle.read(0, 1 << 20)
    opened.handle.close()
    status = json.loads(text)
    assert status["source"] == str(mount.tree.source)
    [entry] = status["staged"]
    assert entry["path"] == path and entry["state"] == "failed" and entry["size"] == 23
    assert entry["error"]
    assert status["fragments"] == []
    assert view.attributes(".ocifs/status").size == len(text)


def test_the_next_mount_takes_back_what_a_stopped_daemon_left(client: RegistryClient, repo: str,
                                                              mounts: Mounts) -> None:
    """A file whose push failed (complete) and one still being written when the daemon
    stopped: the next mount on the same cache shows the complete one at its path, reports the
    other as a fragment in `.ocifs/status`, and pushes the complete one (never the fragment)."""
    push_layers(client, repo, "t", [("a", b"a")])
    first = mounts(push_client=unreachable_client(), cache="shared")
    assert first.writer is not None
    done = first.view.create(f"{repo}/t/done.txt", truncate=True).handle
    done.write(b"complete", 0)
    with pytest.raises(PushFailed):
        done.flush()
    done.close()
    half = first.view.create(f"{repo}/t/half.txt", truncate=True).handle
    half.write(b"half", 0)
    # The daemon dies: no more retries, its locks go with its descriptors.
    first.writer.pusher.retries.stop()
    for staged in first.writer.overlay.files():
        staged.close_fd()

    second = mounts(cache="shared")
    assert second.writer is not None
    taken, fragments = second.writer.recover()
    assert [staged.path for staged in taken] == [f"{repo}/t/done.txt"]
    assert [fragment.path for fragment in fragments] == [f"{repo}/t/half.txt"]
    view = second.view
    assert isinstance(view.lookup(f"{repo}/t/done.txt"), StagedFile)
    with pytest.raises(NotFound):
        view.lookup(f"{repo}/t/half.txt")
    status = json.loads(read_all(view, ".ocifs/status"))
    assert [(entry["path"], entry["state"]) for entry in status["staged"]] == [(f"{repo}/t/done.txt", "pending")]
    assert [entry["path"] for entry in status["fragments"]] == [f"{repo}/t/half.txt"]
    second.writer.push_pending()
    assert layer_titles(client, repo, "t") == {"a": Digest.of(b"a"), "done.txt": Digest.of(b"complete")}
    assert isinstance(view.lookup(f"{repo}/t/done.txt"), BlobFile)
    assert read_all(view, f"{repo}/t/done.txt") == b"complete"
    assert json.loads(read_all(view, ".ocifs/status"))["staged"] == []


def test_a_failed_push_is_retried_when_the_registry_answers_again(registry: RunningRegistry, client: RegistryClient,
                                                                 repo: str, mounts: Mounts) -> None:
    """Uploads refused (503) through a proxy: flush fails with EIO and the file stays staged;
    once the registry answers again the background retry pushes it, and the file leaves the
    overlay for the registry's."""
    push_layers(client, repo, "t", [("a", b"a")])
    proxy = FaultProxy(registry.host)
    try:
        proxy.fail("POST", r"/v2/.*/blobs/uploads/", 503)
        mount = mounts(push_client=client_at(proxy.host))
        view = mount.view
        path = f"{repo}/t/later.txt"
        handle = view.create(path, truncate=True).handle
        handle.write(b"pushed on retry", 0)
        with pytest.raises(PushFailed):
            handle.flush()
        handle.close()
        assert isinstance(view.lookup(path), StagedFile)
        proxy.heal()
        assert wait_until(lambda: isinstance(view.lookup(path), BlobFile), timeout=15)
        assert layer_titles(client, repo, "t") == {"a": Digest.of(b"a"), "later.txt": Digest.of(b"pushed on retry")}
        assert json.loads(read_all(view, ".ocifs/status"))["staged"] == []
    finally:
        proxy.close()


def test_a_read_only_view_refuses_writes_and_stages_nothing(client: RegistryClient, repo: str,
                                                            mounts: Mounts) -> None:
    push_layers(client, repo, "t", [("a", b"a")])
    view = mounts(read_only=True).view
    for action in (lambda: view.create(f"{repo}/t/b", truncate=True), lambda: view.mkdir(f"{repo}/u"),
                   lambda: view.unlink(f"{repo}/t/a")):
        with pytest.raises(Refused) as caught:
            action()
        assert caught.value.errno == errno.EROFS
    assert read_all(view, f"{repo}/t/a") == b"a"
    assert json.loads(read_all(view, ".ocifs/status"))["staged"] == []


# ---- cases found in review: each was a way to lose or publish the wrong bytes -------------------


class FailingPuts:
    """Makes the next `count` manifest PUTs of a client fail as if the registry were down."""

    def __init__(self, client: RegistryClient, count: int = 1) -> None:
        self.left = count
        self._real = client.put_manifest
        client.put_manifest = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.left > 0:
            self.left -= 1
            raise NetworkError("registry down (test)")
        return self._real(*args, **kwargs)


def status_of(view: View) -> dict[str, Any]:
    return json.loads(read_all(view, ".ocifs/status"))  # type: ignore[no-any-return]


def test_rename_with_only_a_reader_open_pushes_the_new_name(client: RegistryClient, repo: str,
                                                           mounts: Mounts) -> None:
    """`mv f g` while `less f` is open: g is pushed at once (no writer will close it)."""
    push_layers(client, repo, "t", [("keep", b"k")])
    view = mounts().view
    writer = view.create(f"{repo}/t/f", truncate=True).handle
    writer.write(b"data", 0)
    writer.flush()
    reader = view.open(f"{repo}/t/f", write=False, truncate=False).handle
    writer.close()
    view.rename(f"{repo}/t/f", f"{repo}/t/g")
    reader.close()
    assert layer_titles(client, repo, "t") == {"keep": Digest.of(b"k"), "g": Digest.of(b"data")}
    assert status_of(view)["staged"] == []


def test_a_tag_decided_below_keeps_the_directories_above_from_becoming_tags(
        client: RegistryClient, repo: str, mounts: Mounts) -> None:
    """mkdir -p top/app/1.0; cp f top/app/1.0/; cp g top/app/: app is the repository of tag
    1.0 now, so g is refused (EPERM) instead of making app a tag of `top`."""
    push_layers(client, repo, "t", [("f", b"f")])
    view = mounts().view
    top = f"{repo}-amb"
    for path in (top, f"{top}/app", f"{top}/app/1.0"):
        view.mkdir(path)
    first = view.create(f"{top}/app/1.0/f.txt", truncate=True).handle  # cp still running
    first.write(b"x", 0)
    with pytest.raises(Refused) as caught:
        view.create(f"{top}/app/g.txt", truncate=True)
    assert caught.value.errno == errno.EPERM
    first.flush()
    first.close()
    assert list(client.tags(f"{top}/app")) == ["1.0"]
    assert view.lookup(f"{top}/app/1.0/f.txt") is not None


def test_mv_of_a_registry_file_over_a_staged_file_replaces_it(client: RegistryClient, repo: str,
                                                             mounts: Mounts) -> None:
    """`mv a b` while b is open for writing: b is a's bytes, and the tag has one b."""
    push_layers(client, repo, "t", [("a", b"AAA"), ("b", b"old-b")])
    view = mounts().view
    writer = view.open(f"{repo}/t/b", write=True, truncate=True).handle
    writer.write(b"new-b", 0)
    view.rename(f"{repo}/t/a", f"{repo}/t/b")
    assert read_all(view, f"{repo}/t/b") == b"AAA"
    writer.flush()
    writer.close()
    assert layer_titles(client, repo, "t") == {"b": Digest.of(b"AAA")}


def test_a_retry_never_pushes_a_file_open_for_writing(client: RegistryClient, repo: str,
                                                     mounts: Mounts) -> None:
    """A failed close queues a retry; `cp` again (O_TRUNC, first block written, more to
    come): the retry must not publish the half-written file."""
    push_layers(client, repo, "t", [("keep", b"k")])
    mount = mounts()
    view = mount.view
    assert mount.writer is not None
    FailingPuts(mount.writer.editor.client)
    path = f"{repo}/t/f"
    handle = view.create(path, truncate=True).handle
    handle.write(b"complete v1", 0)
    with pytest.raises(PushFailed):
        handle.flush()
    handle.close()
    again = view.open(path, write=True, truncate=True).handle
    again.write(b"PART", 0)
    mount.writer.pusher.retries.kick()
    time.sleep(2.5)  # past the first retry (1 s)
    assert "f" not in layer_titles(client, repo, "t")
    again.write(b"-and the rest", 4)
    again.flush()
    again.close()
    assert layer_titles(client, repo, "t")["f"] == Digest.of(b"PART-and the rest")


def test_rm_during_a_push_does_not_bring_the_file_back(client: RegistryClient, repo: str,
                                                      mounts: Mounts) -> None:
    """close() is in its manifest PUT when `rm f` runs in another shell: f is gone after both."""
    push_layers(client, repo, "t", [("keep", b"k")])
    mount = mounts()
    assert mount.writer is not None
    editor_client = mount.writer.editor.client
    real = editor_client.put_manifest

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(1.0)
        return real(*args, **kwargs)

    editor_client.put_manifest = slow  # type: ignore[method-assign]
    path = f"{repo}/t/f"
    handle = mount.view.create(path, truncate=True).handle
    handle.write(b"x", 0)
    closing = threading.Thread(target=lambda: (handle.flush(), handle.close()))
    closing.start()
    time.sleep(0.3)
    mount.view.unlink(path)
    closing.join()
    assert "f" not in layer_titles(client, repo, "t")
    with pytest.raises(NotFound):
        mount.view.lookup(path)


def test_unmount_never_pushes_a_file_still_being_written(client: RegistryClient, repo: str,
                                                         mounts: Mounts) -> None:
    """SIGTERM mid-`cp`: destroy() runs shutdown(), which must not publish the fragment."""
    push_layers(client, repo, "t", [("keep", b"k")])
    mount = mounts()
    assert mount.writer is not None
    handle = mount.view.create(f"{repo}/t/big", truncate=True).handle
    handle.write(b"first block only", 0)
    mount.view.stop()
    assert "big" not in layer_titles(client, repo, "t")


def test_a_rename_whose_push_fails_drops_the_old_name_later(client: RegistryClient, repo: str,
                                                           mounts: Mounts) -> None:
    """`mv f g` of a staged file while the registry is down: once the retry pushes g, f is
    gone from the tag too (never both)."""
    push_layers(client, repo, "t", [("f", b"old")])
    mount = mounts()
    view = mount.view
    assert mount.writer is not None
    failing = FailingPuts(mount.writer.editor.client)
    handle = view.open(f"{repo}/t/f", write=True, truncate=True).handle
    handle.write(b"new", 0)
    with pytest.raises(PushFailed):
        handle.flush()
    handle.close()
    failing.left = 1
    with pytest.raises(PushFailed):
        view.rename(f"{repo}/t/f", f"{repo}/t/g")
    assert wait_until(lambda: layer_titles(client, repo, "t") == {"g": Digest.of(b"new")}, 10)
    assert wait_until(lambda: status_of(view)["staged"] == [], 5)  # the push returns after its check


def test_a_directory_made_here_lists_what_the_registry_has_under_it(client: RegistryClient, repo: str,
                                                                   mounts: Mounts) -> None:
    """mkdir ns/new, then another client pushes ns/new/x:1: `ls ns/new` shows x, and rmdir
    of ns/new is ENOTEMPTY (it would hide the other client's repository)."""
    push_layers(client, repo, "t", [("f", b"f")])
    mount = mounts()
    view = mount.view
    namespace = f"{repo}-ns"
    view.mkdir(namespace)
    push_layers(client, f"{namespace}/x", "1", [("a", b"a")])
    mount.metadata._catalog.invalidate("catalog")  # the TTL passes
    mount.metadata._tags.invalidate(namespace)
    assert [entry.name for entry in view.children(namespace)] == ["x"]
    with pytest.raises(Refused) as caught:
        view.rmdir(namespace)
    assert caught.value.errno == errno.ENOTEMPTY
    assert read_all(view, f"{namespace}/x/1/a") == b"a"
