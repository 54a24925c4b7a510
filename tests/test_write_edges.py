"""Edges of the write path and of the FUSE adapter, through real mounts and real programs
(DESIGN.md sections 3 and 5): concurrency, other clients, random writes, renames and removals
of open or staged files, nested titles, refusals and errnos."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ocifs.digest import Digest
from ocifs.model import (
    ANNOTATION_TITLE,
    EMPTY_DIGEST,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    Descriptor,
    encode_json,
)
from ocifs.registry import RegistryClient

from .clients import oras_client, oras_push
from .conftest import Mounter
from .content import push_artifact, push_blob, push_index, push_layers
from .helpers import errno_of, manifest_of, run
from .helpers import layer_titles as titles
from .registry_server import RunningRegistry

EMPTY_FILE_DIGEST = Digest.of(b"")


def blob(client: RegistryClient, repo: str, digest: Digest) -> bytes:
    return b"".join(client.fetch_blob(repo, digest))


def add_layer_elsewhere(client: RegistryClient, repo: str, tag: str, title: str, data: bytes) -> None:
    """Another client edits the tag: the manifest as it is now, with one more (or a replaced) layer."""
    manifest = manifest_of(client, repo, tag)
    push_blob(client, repo, data)
    doc = json.loads(manifest.raw)
    layers = [layer for layer in doc["layers"]
              if layer.get("annotations", {}).get(ANNOTATION_TITLE) != title]
    layers.append(Descriptor.for_bytes(OCI_LAYER_TAR, data, {ANNOTATION_TITLE: title}).to_dict())
    doc["layers"] = layers
    client.put_manifest(repo, tag, encode_json(doc), OCI_MANIFEST)


def revisions(registry: RunningRegistry, repo: str) -> set[str]:
    """Every manifest ever PUT into `repo` (the registry's own bookkeeping)."""
    path = registry.root / "docker/registry/v2/repositories" / repo / "_manifests/revisions/sha256"
    return set(os.listdir(path)) if path.exists() else set()


def tag_link_mtime(registry: RunningRegistry, repo: str, tag: str) -> int:
    """Rewritten by the registry on every manifest PUT to the tag, even of the same bytes."""
    path = registry.root / "docker/registry/v2/repositories" / repo / "_manifests/tags" / tag / "current/link"
    return path.stat().st_mtime_ns


# ---- concurrency and other clients ------------------------------------------------------------


def test_concurrent_cp_into_one_tag_keeps_every_file(client: RegistryClient, registry: RunningRegistry,
                                                     repo: str, tmp_path: Path, mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"base.txt": b"base"})
    src = tmp_path / "src"
    src.mkdir()
    files = {f"f{i}.bin": os.urandom(1000 + 37 * i) for i in range(10)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    mnt = mounter(f"{registry.host}/{repo}")
    tag = mnt / "t"
    names = sorted(files)
    results: list[subprocess.CompletedProcess[str]] = []

    def copy(name: str) -> None:
        results.append(run("cp", str(src / name), str(tag) + "/", check=False))

    # Six cp processes at once, and one cp of four files at the same time.
    threads = [threading.Thread(target=copy, args=(name,)) for name in names[:6]]
    for thread in threads:
        thread.start()
    multi = run("cp", *(str(src / n) for n in names[6:]), str(tag) + "/", check=False)
    for thread in threads:
        thread.join(60)
    assert multi.returncode == 0, multi.stderr
    assert [r.returncode for r in results] == [0] * 6, [r.stderr for r in results]
    expected = {name: Digest.of(data) for name, data in files.items()} | {"base.txt": Digest.of(b"base")}
    assert titles(client, repo, "t") == expected
    assert sorted(os.listdir(tag)) == sorted(expected)
    for name, data in files.items():
        assert (tag / name).read_bytes() == data


def test_edit_by_another_client_between_closes_is_kept(client: RegistryClient, registry: RunningRegistry,
                                                       repo: str, tmp_path: Path, mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"a.txt": b"a"})
    # A long TTL: the mount's own view goes stale, edits must still start from a HEAD.
    mnt = mounter(f"{registry.host}/{repo}", "--ttl", "600")
    tag = mnt / "t"
    assert os.listdir(tag) == ["a.txt"]
    (tag / "b.txt").write_bytes(b"b")
    add_layer_elsewhere(client, repo, "t", "z.txt", b"from elsewhere")
    (tag / "c.txt").write_bytes(b"c")
    assert titles(client, repo, "t") == {"a.txt": Digest.of(b"a"), "b.txt": Digest.of(b"b"),
                                         "z.txt": Digest.of(b"from elsewhere"), "c.txt": Digest.of(b"c")}
    # One handle, two flushes, with an edit elsewhere between them.
    with open(tag / "d.txt", "wb") as file:
        file.write(b"d1")
        file.flush()
        os.close(os.dup(file.fileno()))  # a flush: pushes "d1"
        assert titles(client, repo, "t")["d.txt"] == Digest.of(b"d1")
        add_layer_elsewhere(client, repo, "t", "y.txt", b"y")
        file.write(b"d2")
    assert titles(client, repo, "t") == {"a.txt": Digest.of(b"a"), "b.txt": Digest.of(b"b"),
                                         "z.txt": Digest.of(b"from elsewhere"), "c.txt": Digest.of(b"c"),
                                         "d.txt": Digest.of(b"d1d2"), "y.txt": Digest.of(b"y")}
    # oras-py replaces the whole manifest; the next close edits what it pushed.
    src = tmp_path / "o"
    src.mkdir()
    (src / "oras.txt").write_bytes(b"by oras")
    oras_push(registry, f"{repo}:t", [src / "oras.txt"])
    (tag / "e.txt").write_bytes(b"e")
    assert titles(client, repo, "t") == {"oras.txt": Digest.of(b"by oras"), "e.txt": Digest.of(b"e")}
    os.unlink(tag / "e.txt")
    assert titles(client, repo, "t") == {"oras.txt": Digest.of(b"by oras")}


def test_rm_after_another_client_replaced_the_file(client: RegistryClient, registry: RunningRegistry,
                                                   repo: str, mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"a.txt": b"old", "keep.txt": b"k"})
    mnt = mounter(f"{registry.host}/{repo}", "--ttl", "600")
    tag = mnt / "t"
    assert (tag / "a.txt").read_bytes() == b"old"
    add_layer_elsewhere(client, repo, "t", "a.txt", b"new from elsewhere")
    result = run("rm", str(tag / "a.txt"), check=False)
    now = titles(client, repo, "t")
    if result.returncode == 0:
        # rm said the file is gone: it must be gone from the registry.
        assert now == {"keep.txt": Digest.of(b"k")}
    else:
        assert "Invalid argument" not in result.stderr
        assert now["a.txt"] == Digest.of(b"new from elsewhere")


# ---- random writes, truncation ------------------------------------------------------------------


def test_dd_random_writes_push_the_right_digest(client: RegistryClient, registry: RunningRegistry, repo: str,
                                               tmp_path: Path, mounter: Mounter) -> None:
    original = os.urandom(300_000)
    push_artifact(client, repo, "t", {"existing.bin": original})
    mnt = mounter(f"{registry.host}/{repo}")
    tag = mnt / "t"
    local_new, local_existing = tmp_path / "new.bin", tmp_path / "existing.bin"
    local_existing.write_bytes(original)
    chunk = tmp_path / "chunk"
    chunk.write_bytes(os.urandom(8192))
    # Out of order, holes, overwrites of what was written: the same dd runs locally and in the mount.
    runs = [("seek=20", "bs=4096", "count=1"), ("seek=3", "bs=4096", "count=2"),
            ("seek=0", "bs=100", "count=1"), ("seek=21", "bs=4096", "count=2")]
    for target_local, target_mnt in ((local_new, tag / "new.bin"), (local_existing, tag / "existing.bin")):
        for args in runs:
            for out in (target_local, target_mnt):
                result = run("dd", f"if={chunk}", f"of={out}", "conv=notrunc", "status=none", *args, check=False)
                assert result.returncode == 0, result.stderr
    expected_new, expected_existing = local_new.read_bytes(), local_existing.read_bytes()
    now = titles(client, repo, "t")
    assert now == {"new.bin": Digest.of(expected_new), "existing.bin": Digest.of(expected_existing)}
    assert blob(client, repo, now["new.bin"]) == expected_new
    assert (tag / "new.bin").read_bytes() == expected_new
    assert (tag / "existing.bin").stat().st_size == len(expected_existing)
    # dd without conv=notrunc truncates at the seek point (ftruncate on an open handle).
    for out in (local_existing, tag / "existing.bin"):
        run("dd", f"if={chunk}", f"of={out}", "bs=1000", "seek=5", "count=1", "status=none")
    expected = local_existing.read_bytes()
    assert len(expected) == 6000
    assert titles(client, repo, "t")["existing.bin"] == Digest.of(expected)
    assert (tag / "existing.bin").read_bytes() == expected


def test_truncate_without_an_open_handle_pushes_at_once(client: RegistryClient, registry: RunningRegistry,
                                                       repo: str, mounter: Mounter) -> None:
    data = os.urandom(50_000)
    push_artifact(client, repo, "t", {"f.bin": data, "other": b"o"})
    mnt = mounter(f"{registry.host}/{repo}")
    path = mnt / "t" / "f.bin"
    os.truncate(path, 1000)
    assert titles(client, repo, "t") == {"f.bin": Digest.of(data[:1000]), "other": Digest.of(b"o")}
    assert path.stat().st_size == 1000
    run("truncate", "-s", "3000", str(path))  # extends with zeros
    expected = data[:1000] + b"\0" * 2000
    assert titles(client, repo, "t")["f.bin"] == Digest.of(expected)
    assert path.read_bytes() == expected
    os.truncate(path, 0)
    manifest = manifest_of(client, repo, "t")
    layer = next(layer for layer in manifest.layers if layer.title == "f.bin")
    assert (layer.digest, layer.size) == (EMPTY_FILE_DIGEST, 0)
    assert path.stat().st_size == 0
    # truncate(1) on a new name creates it.
    run("truncate", "-s", "10", str(mnt / "t" / "new.bin"))
    assert titles(client, repo, "t")["new.bin"] == Digest.of(b"\0" * 10)


def test_empty_files_are_pushed(client: RegistryClient, registry: RunningRegistry, repo: str,
                                tmp_path: Path, mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f": b"x"})
    mnt = mounter(f"{registry.host}/{repo}")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    run("cp", str(empty), str(mnt / "t") + "/")
    run("touch", str(mnt / "t" / "touched"))
    assert sorted(os.listdir(mnt / "t")) == ["empty.txt", "f", "touched"]
    assert titles(client, repo, "t") == {"f": Digest.of(b"x"), "empty.txt": EMPTY_FILE_DIGEST,
                                         "touched": EMPTY_FILE_DIGEST}


def test_nothing_new_pushes_nothing_and_o_trunc_pushes_once(client: RegistryClient, registry: RunningRegistry,
                                                            repo: str, mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f.txt": b"content", "g.txt": b"g"})
    mnt = mounter(f"{registry.host}/{repo}")
    tag = mnt / "t"
    before_revisions = revisions(registry, repo)
    before_link = tag_link_mtime(registry, repo, "t")
    time.sleep(0.05)
    run("cat", str(tag / "f.txt"))
    run("ls", "-l", str(tag))
    run("touch", str(tag / "f.txt"))  # opens for writing, writes nothing
    with open(tag / "f.txt", "r+b") as file:
        assert file.read() == b"content"
    run("getfattr", "-d", str(tag / "f.txt"))
    assert tag_link_mtime(registry, repo, "t") == before_link
    # O_TRUNC on open (atomic on libfuse 3): one new manifest, no empty intermediate version.
    with open(tag / "f.txt", "wb") as file:
        file.write(b"replaced\n")
    new = revisions(registry, repo) - before_revisions
    assert len(new) == 1
    assert titles(client, repo, "t")["f.txt"] == Digest.of(b"replaced\n")


# ---- renames and removals of open and staged files ----------------------------------------------


def test_rename_of_staged_files(client: RegistryClient, registry: RunningRegistry, repo: str,
                                mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"keep": b"k"})
    mnt = mounter(f"{registry.host}/{repo}")
    tag = mnt / "t"
    # Renamed while still open and never pushed: arrives under the new name only.
    with open(tag / "draft.txt", "wb") as file:
        file.write(b"draft")
        os.rename(tag / "draft.txt", tag / "final.txt")
        file.write(b" done")
    assert titles(client, repo, "t") == {"keep": Digest.of(b"k"), "final.txt": Digest.of(b"draft done")}
    assert sorted(os.listdir(tag)) == ["final.txt", "keep"]
    # An editor's scratch file (never pushed) renamed to a real name is pushed then.
    (tag / "notes~").write_bytes(b"notes")
    assert "notes~" not in titles(client, repo, "t")
    os.rename(tag / "notes~", tag / "notes.txt")
    assert titles(client, repo, "t")["notes.txt"] == Digest.of(b"notes")
    assert "notes~" not in os.listdir(tag)
    assert (tag / "notes.txt").read_bytes() == b"notes"
    # A staged file moved to another tag of the repository before its first push.
    os.mkdir(mnt / "u")
    with open(tag / "mover.txt", "wb") as file:
        file.write(b"moving")
        os.rename(tag / "mover.txt", mnt / "u" / "mover.txt")
    assert titles(client, repo, "u") == {"mover.txt": Digest.of(b"moving")}
    assert "mover.txt" not in titles(client, repo, "t")


def test_rename_of_an_open_pushed_file_inside_its_tag(client: RegistryClient, registry: RunningRegistry,
                                                      repo: str, mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"keep": b"k"})
    mnt = mounter(f"{registry.host}/{repo}")
    tag = mnt / "t"
    with open(tag / "a.txt", "wb") as file:
        file.write(b"first")
        file.flush()
        os.fsync(file.fileno())  # pushed as a.txt
        assert "a.txt" in titles(client, repo, "t")
        os.rename(tag / "a.txt", tag / "b.txt")
        file.write(b"+second")
    assert sorted(os.listdir(tag)) == ["b.txt", "keep"]
    assert titles(client, repo, "t") == {"keep": Digest.of(b"k"), "b.txt": Digest.of(b"first+second")}


def test_rename_of_a_registry_file_open_for_writing(client: RegistryClient, registry: RunningRegistry,
                                                    repo: str, mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"a.txt": b"original", "keep": b"k"})
    mnt = mounter(f"{registry.host}/{repo}")
    tag = mnt / "t"
    with open(tag / "a.txt", "r+b") as file:
        file.seek(0, os.SEEK_END)
        file.write(b"+edit")
        file.flush()
        os.rename(tag / "a.txt", tag / "b.txt")
        assert sorted(os.listdir(tag)) == ["b.txt", "keep"]
    assert titles(client, repo, "t") == {"keep": Digest.of(b"k"), "b.txt": Digest.of(b"original+edit")}


def test_rm_of_a_file_open_for_reading_keeps_the_handle_working(client: RegistryClient,
                                                                 registry: RunningRegistry, repo: str,
                                                                 mounter: Mounter) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    push_artifact(client, repo, "t", {"big.bin": data, "keep": b"k"})
    mnt = mounter(f"{registry.host}/{repo}")
    path = mnt / "t" / "big.bin"
    with open(path, "rb", buffering=0) as file:
        head = file.read(4096)
        run("rm", str(path))
        assert not path.exists()
        assert "big.bin" not in os.listdir(mnt / "t")
        rest = b""
        while block := file.read(1 << 20):
            rest += block
    assert head + rest == data
    assert titles(client, repo, "t") == {"keep": Digest.of(b"k")}
    # A staged file removed while open for writing: writes still work, nothing is pushed.
    with open(mnt / "t" / "tmp.txt", "wb", buffering=0) as file:
        file.write(b"scratch data")
        os.unlink(mnt / "t" / "tmp.txt")
        assert file.write(b"+more") == 5
        os.fsync(file.fileno())
    assert titles(client, repo, "t") == {"keep": Digest.of(b"k")}
    assert os.listdir(mnt / "t") == ["keep"]


def test_reading_back_an_open_removed_file_after_writing(client: RegistryClient, registry: RunningRegistry,
                                                         repo: str, mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"keep": b"k"})
    mnt = mounter(f"{registry.host}/{repo}")
    with open(mnt / "t" / "tmp.txt", "w+b", buffering=0) as file:
        file.write(b"scratch data")
        os.unlink(mnt / "t" / "tmp.txt")
        file.write(b"+more")
        file.seek(0)
        assert file.read() == b"scratch data+more"
    assert titles(client, repo, "t") == {"keep": Digest.of(b"k")}


def test_ftruncate_of_an_open_removed_file(client: RegistryClient, registry: RunningRegistry, repo: str,
                                           mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"keep": b"k"})
    mnt = mounter(f"{registry.host}/{repo}")
    path = mnt / "t" / "tmp.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"0123456789")
        os.unlink(path)
        os.ftruncate(fd, 4)
        assert os.pread(fd, 100, 0) == b"0123"
    finally:
        os.close(fd)


def test_rm_of_a_registry_file_open_for_writing(client: RegistryClient, registry: RunningRegistry, repo: str,
                                                mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"a.txt": b"original", "keep": b"k"})
    mnt = mounter(f"{registry.host}/{repo}")
    path = mnt / "t" / "a.txt"
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, b"partial")
        os.unlink(path)
        assert not path.exists()
    finally:
        os.close(fd)
    assert os.listdir(mnt / "t") == ["keep"]
    assert titles(client, repo, "t") == {"keep": Digest.of(b"k")}


# ---- directories -----------------------------------------------------------------------------------


def test_mkdir_p_and_cp_into_deep_titles(client: RegistryClient, registry: RunningRegistry, repo: str,
                                        tmp_path: Path, mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"top.txt": b"top"})
    source = tmp_path / "leaf.txt"
    source.write_bytes(b"leaf")
    mnt = mounter(f"{registry.host}/{repo}")
    run("mkdir", "-p", str(mnt / "t" / "a" / "b" / "c" / "d"))
    run("cp", str(source), str(mnt / "t" / "a" / "b" / "c" / "d") + "/")
    assert titles(client, repo, "t") == {"top.txt": Digest.of(b"top"), "a/b/c/d/leaf.txt": Digest.of(b"leaf")}
    assert (mnt / "t" / "a" / "b" / "c" / "d" / "leaf.txt").read_bytes() == b"leaf"
    run("cp", str(source), str(mnt / "t" / "a" / "b") + "/second.txt")
    assert titles(client, repo, "t")["a/b/second.txt"] == Digest.of(b"leaf")
    # A mkdir -p of what exists already is fine.
    run("mkdir", "-p", str(mnt / "t" / "a" / "b" / "c"))
    # A new repository, a new tag and directories in it, all from one mkdir -p: the first
    # directory that takes a file is the tag, what lies below it holds titles.
    root = mounter(registry.host)
    run("mkdir", "-p", str(root / f"{repo}-new" / "v1" / "x" / "y"))
    run("cp", str(source), str(root / f"{repo}-new" / "v1") + "/")
    run("cp", str(source), str(root / f"{repo}-new" / "v1" / "x" / "y") + "/")
    assert titles(client, f"{repo}-new", "v1") == {"leaf.txt": Digest.of(b"leaf"),
                                                   "x/y/leaf.txt": Digest.of(b"leaf")}
    assert os.listdir(root / f"{repo}-new" / "v1" / "x" / "y") == ["leaf.txt"]
    # Where the first file lands deeper, that directory is the tag.
    run("mkdir", "-p", str(root / f"{repo}-deep" / "app" / "1.0"))
    run("cp", str(source), str(root / f"{repo}-deep" / "app" / "1.0") + "/")
    assert titles(client, f"{repo}-deep/app", "1.0") == {"leaf.txt": Digest.of(b"leaf")}


def test_rm_r_of_a_nested_title_directory(client: RegistryClient, registry: RunningRegistry, repo: str,
                                         mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"docs/a.md": b"a", "docs/sub/b.md": b"b", "keep": b"k"})
    mnt = mounter(f"{registry.host}/{repo}")
    result = run("rm", "-r", str(mnt / "t" / "docs"), check=False)
    assert titles(client, repo, "t") == {"keep": Digest.of(b"k")}
    assert os.listdir(mnt / "t") == ["keep"]
    assert result.returncode == 0, result.stderr


def test_rmdir_of_tags_created_only_here(client: RegistryClient, registry: RunningRegistry, repo: str,
                                         mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f": b"x"})
    mnt = mounter(f"{registry.host}/{repo}")
    os.mkdir(mnt / "local")
    os.mkdir(mnt / "local" / "sub")
    assert errno_of(lambda: os.rmdir(mnt / "local")) == errno.ENOTEMPTY
    assert errno_of(lambda: os.mkdir(mnt / "local")) == errno.EEXIST
    os.rmdir(mnt / "local" / "sub")
    os.rmdir(mnt / "local")
    assert sorted(os.listdir(mnt)) == ["t"]
    assert errno_of(lambda: os.stat(mnt / "local")) == errno.ENOENT
    assert errno_of(lambda: os.rmdir(mnt / "local")) == errno.ENOENT
    assert "local" not in client.tags(repo)
    # Made, filled, emptied and removed: deleted from the registry.
    os.mkdir(mnt / "used")
    (mnt / "used" / "f").write_bytes(b"f")
    assert "used" in client.tags(repo)
    os.unlink(mnt / "used" / "f")
    os.rmdir(mnt / "used")
    assert "used" not in client.tags(repo)
    assert sorted(os.listdir(mnt)) == ["t"]


def test_rmdir_forgets_a_pending_artifact_type(client: RegistryClient, registry: RunningRegistry, repo: str,
                                               mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f": b"x"})
    mnt = mounter(f"{registry.host}/{repo}")
    os.mkdir(mnt / "n")
    os.setxattr(mnt / "n", "user.oci.artifacttype", b"application/x-first")
    os.rmdir(mnt / "n")
    os.mkdir(mnt / "n")
    assert errno_of(lambda: os.getxattr(mnt / "n", "user.oci.artifacttype")) == errno.ENODATA
    (mnt / "n" / "f").write_bytes(b"f")
    assert manifest_of(client, repo, "n").artifact_type == "application/vnd.unknown.artifact.v1"


def test_cp_r_of_a_directory_tree(client: RegistryClient, registry: RunningRegistry, repo: str,
                                  tmp_path: Path, mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f": b"x"})
    src = tmp_path / "tree"
    files = {"a.txt": b"a", "sub/b.txt": b"bb", "sub/deeper/c.bin": os.urandom(20_000),
             "other dir/ü.txt": "ü".encode()}
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    mnt = mounter(f"{registry.host}/{repo}")
    run("cp", "-r", str(src), str(mnt / "t") + "/")
    expected = {f"tree/{name}": Digest.of(data) for name, data in files.items()} | {"f": Digest.of(b"x")}
    assert titles(client, repo, "t") == expected
    assert run("diff", "-r", str(src), str(mnt / "t" / "tree"), check=False).returncode == 0
    # cp -a too (modes and times are accepted and ignored), into a new tag.
    os.mkdir(mnt / "copy")
    result = run("cp", "-a", str(src) + "/.", str(mnt / "copy") + "/", check=False)
    assert result.returncode == 0, result.stderr
    assert titles(client, repo, "copy") == {name: Digest.of(data) for name, data in files.items()}


# ---- names ---------------------------------------------------------------------------------------


def test_unicode_and_spaces_in_written_names(client: RegistryClient, registry: RunningRegistry, repo: str,
                                             tmp_path: Path, mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f": b"x"})
    mnt = mounter(f"{registry.host}/{repo}")
    names = {"über file.txt": b"1", "日本語 名前.md": b"2", "  leading and trailing  ": b"3",
             "emoji 🎉.bin": b"4", "x" * 250 + ".txt": b"5", "quote'and\"dq": b"6"}
    for name, data in names.items():
        (mnt / "t" / name).write_bytes(data)
    os.mkdir(mnt / "t" / "dir with spaces")
    (mnt / "t" / "dir with spaces" / "ñ.txt").write_bytes(b"7")
    expected = {name: Digest.of(data) for name, data in names.items()}
    expected |= {"f": Digest.of(b"x"), "dir with spaces/ñ.txt": Digest.of(b"7")}
    assert titles(client, repo, "t") == expected
    assert sorted(os.listdir(mnt / "t")) == sorted(set(names) | {"f", "dir with spaces"})
    for name, data in names.items():
        assert (mnt / "t" / name).read_bytes() == data
    # oras-py pulls them back under the same names.
    out = tmp_path / "pulled"
    out.mkdir()
    oras_client(registry).pull(target=f"{registry.host}/{repo}:t", outdir=str(out))
    assert (out / "über file.txt").read_bytes() == b"1"
    assert (out / "dir with spaces" / "ñ.txt").read_bytes() == b"7"


def test_a_name_that_is_not_utf8_is_refused_at_create(client: RegistryClient, registry: RunningRegistry,
                                                      repo: str, mounter: Mounter) -> None:
    """It cannot be a JSON title: refused when created (not EIO at close, after the data was written)."""
    push_artifact(client, repo, "t", {"f": b"x"})
    mnt = mounter(f"{registry.host}/{repo}")
    bad = os.fsencode(mnt / "t") + b"/caf\xe9.txt"
    assert errno_of(lambda: os.close(os.open(bad, os.O_WRONLY | os.O_CREAT, 0o644))) in (errno.EINVAL,
                                                                                         errno.EILSEQ)
    assert os.listdir(mnt / "t") == ["f"]
    assert titles(client, repo, "t") == {"f": Digest.of(b"x")}


def test_a_name_over_name_max_is_refused_at_create(client: RegistryClient, registry: RunningRegistry,
                                                   repo: str, mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f": b"x"})
    mnt = mounter(f"{registry.host}/{repo}")
    long_name = "n" * 256
    code = errno_of(lambda: (mnt / "t" / long_name).write_bytes(b"long"))
    listing = os.listdir(mnt / "t")
    assert code == errno.ENAMETOOLONG, listing
    assert listing == ["f"]


def test_a_file_holding_an_empty_json_object_is_a_file(client: RegistryClient, registry: RunningRegistry,
                                                       repo: str, tmp_path: Path, mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f": b"x"})
    mnt = mounter(f"{registry.host}/{repo}")
    source = tmp_path / "settings.json"
    source.write_bytes(b"{}")
    run("cp", str(source), str(mnt / "t") + "/")
    assert titles(client, repo, "t") == {"f": Digest.of(b"x"), "settings.json": EMPTY_DIGEST}
    (mnt / "t" / "other.txt").write_bytes(b"other")  # the next edit must keep it
    assert titles(client, repo, "t") == {"f": Digest.of(b"x"), "settings.json": EMPTY_DIGEST,
                                         "other.txt": Digest.of(b"other")}
    assert sorted(os.listdir(mnt / "t")) == ["f", "other.txt", "settings.json"]
    assert (mnt / "t" / "settings.json").read_bytes() == b"{}"


# ---- overwriting what others wrote ---------------------------------------------------------------


def test_overwriting_a_file_oras_py_pushed_keeps_the_rest(client: RegistryClient, registry: RunningRegistry,
                                                          repo: str, tmp_path: Path, mounter: Mounter) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "one.txt").write_bytes(b"one")
    (src / "two.txt").write_bytes(b"two")
    oras_push(registry, f"{repo}:rt", [src / "one.txt", src / "two.txt"])
    before = json.loads(manifest_of(client, repo, "rt").raw)
    mnt = mounter(f"{registry.host}/{repo}")
    new = tmp_path / "one.txt"
    new.write_bytes(b"one, rewritten")
    run("cp", str(new), str(mnt / "rt") + "/")
    after = json.loads(manifest_of(client, repo, "rt").raw)
    assert {k: v for k, v in after.items() if k != "layers"} == {k: v for k, v in before.items() if k != "layers"}
    assert len(after["layers"]) == 2
    old_one, old_two = before["layers"]
    new_one, new_two = after["layers"]
    assert new_two == old_two  # untouched, byte for byte
    assert new_one["annotations"] == old_one["annotations"]
    assert new_one["mediaType"] == old_one["mediaType"]
    assert new_one["digest"] == str(Digest.of(b"one, rewritten"))
    assert new_one["size"] == len(b"one, rewritten")
    out = tmp_path / "pulled"
    out.mkdir()
    oras_client(registry).pull(target=f"{registry.host}/{repo}:rt", outdir=str(out))
    assert (out / "one.txt").read_bytes() == b"one, rewritten"
    assert (out / "two.txt").read_bytes() == b"two"


# ---- refusals: digests and platforms ---------------------------------------------------------------


def test_digest_and_platform_directories_refuse_every_write(client: RegistryClient, registry: RunningRegistry,
                                                            repo: str, tmp_path: Path, mounter: Mounter) -> None:
    amd = push_artifact(client, repo, "amd", {"bin": b"amd64 build"})
    arm = push_artifact(client, repo, "arm", {"bin": b"arm64 build"})
    index = push_index(client, repo, "multi", [(amd, {"os": "linux", "architecture": "amd64"}, None),
                                                (arm, {"os": "linux", "architecture": "arm64",
                                                       "variant": "v8"}, None)])
    mnt = mounter(f"{registry.host}/{repo}")
    platform = mnt / "multi" / "linux-amd64"
    by_digest = mnt / str(amd)
    assert os.listdir(platform) == ["bin"]
    assert os.listdir(by_digest) == ["bin"]
    source = tmp_path / "s.txt"
    source.write_bytes(b"s")
    before = {tag: client.resolve(repo, tag).digest for tag in ("amd", "arm", "multi")}

    def writes(where: Path) -> dict[str, Callable[[], object]]:
        actions: dict[str, Callable[[], object]] = {
            "create": lambda: open(where / "new.txt", "wb"),
            "mkdir": lambda: os.mkdir(where / "newdir"),
            "setfattr on dir": lambda: os.setxattr(where, "user.oci.artifacttype", b"a/b"),
        }
        if where != mnt / "multi" and where != mnt / str(index):
            actions |= {
                "open for writing": lambda: open(where / "bin", "r+b"),
                "O_TRUNC": lambda: open(where / "bin", "wb"),
                "unlink": lambda: os.unlink(where / "bin"),
                "rename inside": lambda: os.rename(where / "bin", where / "bin2"),
                "rename out": lambda: os.rename(where / "bin", mnt / "amd" / "stolen"),
                "truncate": lambda: os.truncate(where / "bin", 1),
                "setfattr on file": lambda: os.setxattr(where / "bin", "user.oci.mediatype", b"a/b"),
            }
        return actions

    for where in (platform, by_digest, mnt / "multi", mnt / str(index)):
        for what, action in writes(where).items():
            assert errno_of(action) == errno.EPERM, (where, what)
        result = run("cp", str(source), str(where) + "/", check=False)
        assert result.returncode != 0 and "Operation not permitted" in result.stderr, (where, result.stderr)
    # Into a platform directory from a tag.
    assert errno_of(lambda: os.rename(mnt / "arm" / "bin", platform / "x")) == errno.EPERM
    assert {tag: client.resolve(repo, tag).digest for tag in ("amd", "arm", "multi")} == before
    assert os.listdir(platform) == ["bin"] and (platform / "bin").read_bytes() == b"amd64 build"


# ---- moving between tags, xattrs -----------------------------------------------------------------


def test_mv_between_tags_of_one_repository(client: RegistryClient, registry: RunningRegistry, repo: str,
                                           mounter: Mounter) -> None:
    push_artifact(client, repo, "t1", {"a": b"a content", "b": b"b content", "c": b"c1"})
    push_artifact(client, repo, "t2", {"c": b"c2"})
    mnt = mounter(f"{registry.host}/{repo}")
    run("mv", str(mnt / "t1" / "a"), str(mnt / "t2") + "/")
    assert titles(client, repo, "t1") == {"b": Digest.of(b"b content"), "c": Digest.of(b"c1")}
    assert titles(client, repo, "t2") == {"c": Digest.of(b"c2"), "a": Digest.of(b"a content")}
    run("mv", str(mnt / "t1" / "c"), str(mnt / "t2" / "c"))  # replaces
    assert titles(client, repo, "t2") == {"c": Digest.of(b"c1"), "a": Digest.of(b"a content")}
    assert titles(client, repo, "t1") == {"b": Digest.of(b"b content")}
    os.mkdir(mnt / "t3")
    run("mv", str(mnt / "t1" / "b"), str(mnt / "t3" / "renamed"))
    assert titles(client, repo, "t3") == {"renamed": Digest.of(b"b content")}
    assert titles(client, repo, "t1") == {"": EMPTY_DIGEST}
    assert os.listdir(mnt / "t1") == []
    assert (mnt / "t3" / "renamed").read_bytes() == b"b content"
    assert sorted(os.listdir(mnt / "t2")) == ["a", "c"]


def test_setfattr_mediatype_and_getfattr(client: RegistryClient, registry: RunningRegistry, repo: str,
                                         mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f.txt": b"x", "g.txt": b"g"})
    mnt = mounter(f"{registry.host}/{repo}")
    tag = mnt / "t"
    run("setfattr", "-n", "user.oci.mediatype", "-v", "text/plain", str(tag / "f.txt"))
    layers = {layer.title: layer for layer in manifest_of(client, repo, "t").layers}
    assert layers["f.txt"].media_type == "text/plain" and layers["f.txt"].digest == Digest.of(b"x")
    assert layers["g.txt"].media_type == OCI_LAYER_TAR
    assert os.getxattr(tag / "f.txt", "user.oci.mediatype") == b"text/plain"
    # Overwriting keeps the media type.
    (tag / "f.txt").write_bytes(b"y")
    layers = {layer.title: layer for layer in manifest_of(client, repo, "t").layers}
    assert (layers["f.txt"].media_type, layers["f.txt"].digest) == ("text/plain", Digest.of(b"y"))
    # On a file being written: applied by its push.
    with open(tag / "h.json", "wb") as file:
        file.write(b'{"a": 1}')
        os.setxattr(tag / "h.json", "user.oci.mediatype", b"application/json")
        listing = run("getfattr", "-d", str(tag / "h.json")).stdout
        assert 'user.oci.mediatype="application/json"' in listing
    layers = {layer.title: layer for layer in manifest_of(client, repo, "t").layers}
    assert layers["h.json"].media_type == "application/json"
    assert os.getxattr(tag / "h.json", "user.oci.digest") == str(Digest.of(b'{"a": 1}')).encode()
    # New directories: getfattr -d works and shows what is pending.
    os.mkdir(mnt / "n")
    os.mkdir(tag / "newdir")
    assert run("getfattr", "-d", str(mnt / "n")).returncode == 0
    assert run("getfattr", "-d", str(tag / "newdir")).returncode == 0
    os.setxattr(mnt / "n", "user.oci.artifacttype", b"application/x-n")
    assert 'user.oci.artifacttype="application/x-n"' in run("getfattr", "-d", str(mnt / "n")).stdout
    # Errnos: the digest is what the bytes say; other namespaces are not supported.
    assert errno_of(lambda: os.setxattr(tag / "f.txt", "user.oci.digest", b"sha256:00")) == errno.EPERM
    assert errno_of(lambda: os.setxattr(tag / "f.txt", "user.other", b"v")) == errno.ENOTSUP
    assert errno_of(lambda: os.setxattr(tag / "f.txt", "user.oci.mediatype", b"")) == errno.EINVAL
    assert errno_of(lambda: os.setxattr(tag / "newdir", "user.oci.artifacttype", b"a/b")) == errno.EPERM
    assert errno_of(lambda: os.removexattr(tag / "f.txt", "user.oci.mediatype")) == errno.ENOTSUP


# ---- stat after writing -----------------------------------------------------------------------------


def test_ls_l_right_after_a_write(client: RegistryClient, registry: RunningRegistry, repo: str,
                                  tmp_path: Path, mounter: Mounter) -> None:
    push_artifact(client, repo, "base", {"f": b"x"})
    mnt = mounter(f"{registry.host}/{repo}")
    os.mkdir(mnt / "t")
    started = time.time()
    data = os.urandom(123_457)
    source = tmp_path / "f.bin"
    source.write_bytes(data)
    run("cp", str(source), str(mnt / "t") + "/")
    st = (mnt / "t" / "f.bin").stat()
    assert st.st_size == len(data)
    assert started - 2 <= st.st_mtime <= time.time() + 2
    listing = run("ls", "-l", "--time-style=+%s", str(mnt / "t")).stdout.split()
    assert str(len(data)) in listing and "f.bin" in listing
    # Overwritten with something shorter: the size follows at once.
    (mnt / "t" / "f.bin").write_bytes(b"short")
    assert (mnt / "t" / "f.bin").stat().st_size == 5
    assert os.path.getsize(mnt / "t" / "f.bin") == 5
    # While being written, stat shows the bytes so far.
    with open(mnt / "t" / "g.bin", "wb") as file:
        file.write(b"x" * 1000)
        file.flush()
        assert os.stat(mnt / "t" / "g.bin").st_size == 1000
    assert (mnt / "t" / "g.bin").stat().st_size == 1000


def test_a_new_file_in_an_old_tag_is_not_older_than_its_write(client: RegistryClient, registry: RunningRegistry,
                                                               repo: str, mounter: Mounter) -> None:
    push_layers(client, repo, "t", [("f", b"x")],
                annotations={"org.opencontainers.image.created": "2020-01-01T00:00:00Z"})
    mnt = mounter(f"{registry.host}/{repo}")
    started = time.time()
    with open(mnt / "t" / "new.txt", "wb") as file:
        file.write(b"new")
        file.flush()
        while_open = os.stat(mnt / "t" / "new.txt").st_mtime
    time.sleep(1.2)  # past the kernel's attribute cache
    after = os.stat(mnt / "t" / "new.txt").st_mtime
    assert while_open >= started - 2
    assert after >= started - 2, (while_open, after)


# ---- editors, FUSE flags, errnos --------------------------------------------------------------------


def test_vim_like_save_sequences(client: RegistryClient, registry: RunningRegistry, repo: str,
                                 mounter: Mounter) -> None:
    push_layers(client, repo, "t", [("f.txt", b"line one\n", "text/plain"), ("other", b"o")])
    mnt = mounter(f"{registry.host}/{repo}")
    tag = mnt / "t"
    f = tag / "f.txt"
    # The swap file and the 4913 probe.
    swap = os.open(tag / ".f.txt.swp", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(swap, b"swap" * 1024)
    probe = os.open(tag / "4913", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    os.fchown(probe, os.getuid(), os.getgid())
    os.close(probe)
    os.unlink(tag / "4913")
    # backupcopy=yes: copy to f.txt~, write over the original, fsync, remove the backup.
    (tag / "f.txt~").write_bytes(f.read_bytes())
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, b"line one\nline two\n")
    os.fsync(fd)
    os.close(fd)
    os.unlink(tag / "f.txt~")
    os.close(swap)
    os.unlink(tag / ".f.txt.swp")
    layers = {layer.title: layer for layer in manifest_of(client, repo, "t").layers}
    assert set(layers) == {"f.txt", "other"}
    assert layers["f.txt"].digest == Digest.of(b"line one\nline two\n")
    assert layers["f.txt"].media_type == "text/plain"
    assert sorted(os.listdir(tag)) == ["f.txt", "other"]
    # backupcopy=no: rename the original to the backup name, write a new file.
    code = errno_of(lambda: os.rename(f, tag / "f.txt~"))
    assert code in (None, errno.EXDEV)
    if code == errno.EXDEV:  # vim copies and removes instead
        (tag / "f.txt~").write_bytes(f.read_bytes())
        os.unlink(f)
    assert (tag / "f.txt~").read_bytes() == b"line one\nline two\n"
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, b"v3\n")
    os.fsync(fd)
    os.close(fd)
    os.unlink(tag / "f.txt~")
    assert titles(client, repo, "t") == {"f.txt": Digest.of(b"v3\n"), "other": Digest.of(b"o")}
    assert sorted(os.listdir(tag)) == ["f.txt", "other"]
    # sed -i and tee on a nested title.
    os.mkdir(tag / "etc")
    run("sh", "-c", f"echo 'color=red' | tee '{tag}/etc/conf' > /dev/null")
    run("sed", "-i", "s/red/blue/", str(tag / "etc" / "conf"))
    run("sh", "-c", f"echo 'size=1' | tee -a '{tag}/etc/conf' > /dev/null")
    assert (tag / "etc" / "conf").read_bytes() == b"color=blue\nsize=1\n"
    assert titles(client, repo, "t") == {"f.txt": Digest.of(b"v3\n"), "other": Digest.of(b"o"),
                                         "etc/conf": Digest.of(b"color=blue\nsize=1\n")}


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def test_rename_exchange_is_refused_not_an_overwrite(client: RegistryClient, registry: RunningRegistry,
                                                    repo: str, mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"a": b"aaa", "b": b"bbb"})
    mnt = mounter(f"{registry.host}/{repo}")
    code = errno_of(lambda: renameat2(mnt / "t" / "a", mnt / "t" / "b", RENAME_EXCHANGE))
    now = titles(client, repo, "t")
    if code is None:  # a real exchange would be fine too
        assert now == {"a": Digest.of(b"bbb"), "b": Digest.of(b"aaa")}
    else:
        assert code == errno.EINVAL
        assert now == {"a": Digest.of(b"aaa"), "b": Digest.of(b"bbb")}


def test_errnos_of_odd_operations(client: RegistryClient, registry: RunningRegistry, repo: str,
                                  mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f": b"x", "d/g": b"g"})
    mnt = mounter(f"{registry.host}/{repo}")
    tag = mnt / "t"
    cases = {
        "symlink": (lambda: os.symlink("f", tag / "link"), errno.EPERM),
        "hard link": (lambda: os.link(tag / "f", tag / "hard"), errno.EPERM),
        "fifo": (lambda: os.mkfifo(tag / "fifo"), errno.EPERM),
        "mkdir over a file": (lambda: os.mkdir(tag / "f"), errno.EEXIST),
        "mkdir over a title dir": (lambda: os.mkdir(tag / "d"), errno.EEXIST),
        "rmdir of a non-empty title dir": (lambda: os.rmdir(tag / "d"), errno.ENOTEMPTY),
        "rmdir of a file": (lambda: os.rmdir(tag / "f"), errno.ENOTDIR),
        "unlink of a title dir": (lambda: os.unlink(tag / "d"), errno.EISDIR),
        "rename a file over a dir": (lambda: os.rename(tag / "f", tag / "d"), errno.EISDIR),
        "create under a missing dir": (lambda: open(tag / "missing" / "x", "wb"), errno.ENOENT),
        "create under a file": (lambda: open(tag / "f" / "x", "wb"), errno.ENOTDIR),
        "unlink a missing file": (lambda: os.unlink(tag / "nope"), errno.ENOENT),
        "reserved name in a title dir": (lambda: open(tag / "d" / ".manifest.json", "wb"), errno.EPERM),
        "RENAME_NOREPLACE over a file": (lambda: renameat2(tag / "f", tag / "d" / "g", RENAME_NOREPLACE),
                                         errno.EEXIST),
    }
    for what, (action, expected) in cases.items():
        assert errno_of(action) == expected, what
    assert titles(client, repo, "t") == {"f": Digest.of(b"x"), "d/g": Digest.of(b"g")}
    assert sorted(os.listdir(tag)) == ["d", "f"]
    # chmod / chown / utime succeed and change nothing in the registry.
    os.chmod(tag / "f", 0o600)
    os.utime(tag / "f", (0, 0))
    os.chown(tag / "f", os.getuid(), os.getgid())
    assert titles(client, repo, "t") == {"f": Digest.of(b"x"), "d/g": Digest.of(b"g")}


def test_cp_and_mv_inside_the_mount(client: RegistryClient, registry: RunningRegistry, repo: str,
                                    mounter: Mounter) -> None:
    data = os.urandom(200_000)
    push_artifact(client, repo, "t1", {"a.bin": data, "keep": b"k"})
    push_artifact(client, repo, "t2", {"other": b"o"})
    mnt = mounter(f"{registry.host}/{repo}")
    run("cp", str(mnt / "t1" / "a.bin"), str(mnt / "t1" / "copy.bin"))
    run("cp", str(mnt / "t1" / "a.bin"), str(mnt / "t2") + "/")
    assert titles(client, repo, "t1") == {"a.bin": Digest.of(data), "keep": Digest.of(b"k"),
                                          "copy.bin": Digest.of(data)}
    assert titles(client, repo, "t2") == {"other": Digest.of(b"o"), "a.bin": Digest.of(data)}
    # mv -n to a new name (renameat2 RENAME_NOREPLACE, refused by ocifs: mv falls back).
    result = run("mv", "-n", str(mnt / "t1" / "copy.bin"), str(mnt / "t1" / "moved.bin"), check=False)
    assert result.returncode == 0, result.stderr
    assert titles(client, repo, "t1") == {"a.bin": Digest.of(data), "keep": Digest.of(b"k"),
                                          "moved.bin": Digest.of(data)}
    assert (mnt / "t1" / "moved.bin").read_bytes() == data


def test_mv_of_a_title_directory_inside_a_tag(client: RegistryClient, registry: RunningRegistry, repo: str,
                                             mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"docs/a.md": b"a", "docs/b.md": b"b", "keep": b"k"})
    mnt = mounter(f"{registry.host}/{repo}")
    result = run("mv", str(mnt / "t" / "docs"), str(mnt / "t" / "documentation"), check=False)
    assert titles(client, repo, "t") == {"documentation/a.md": Digest.of(b"a"),
                                         "documentation/b.md": Digest.of(b"b"), "keep": Digest.of(b"k")}
    assert sorted(os.listdir(mnt / "t")) == ["documentation", "keep"]
    assert result.returncode == 0, result.stderr


def test_overwriting_an_oras_directory_layer_drops_its_stale_content_digest(
        client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path, mounter: Mounter) -> None:
    import gzip
    import io
    import tarfile

    from ocifs.model import EMPTY_DESCRIPTOR, EMPTY_JSON, OCI_LAYER_TAR_GZIP, build_manifest

    def targz(files: dict[str, bytes]) -> tuple[bytes, bytes]:
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as archive:
            for name, data in files.items():
                info = tarfile.TarInfo(f"mydir/{name}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        return raw.getvalue(), gzip.compress(raw.getvalue(), mtime=0)

    tar, gz = targz({"a.txt": b"first"})
    push_blob(client, repo, gz)
    push_blob(client, repo, EMPTY_JSON)
    # A packed directory (unpack mark) is now a read-only directory (issue 11): the layer
    # overwritten here is a tarball file that still carries a stale ORAS content digest.
    layer = Descriptor.for_bytes(OCI_LAYER_TAR_GZIP, gz, {
        ANNOTATION_TITLE: "mydir.tgz", "io.deis.oras.content.digest": str(Digest.of(tar))})
    client.put_manifest(repo, "dir", build_manifest([layer], config=EMPTY_DESCRIPTOR), OCI_MANIFEST)
    mnt = mounter(f"{registry.host}/{repo}")
    new_tar, new_gz = targz({"a.txt": b"second", "b.txt": b"more"})
    source = tmp_path / "mydir.tgz"
    source.write_bytes(new_gz)
    run("cp", str(source), str(mnt / "dir") + "/")
    (pushed,) = manifest_of(client, repo, "dir").layers
    assert pushed.digest == Digest.of(new_gz)
    claimed = pushed.annotations.get("io.deis.oras.content.digest")
    assert claimed in (None, str(Digest.of(new_tar))), claimed


def test_rmdir_of_a_tag_another_client_just_filled(client: RegistryClient, registry: RunningRegistry,
                                                   repo: str, mounter: Mounter) -> None:
    push_layers(client, repo, "e", [])  # an artifact without files
    push_artifact(client, repo, "keep", {"f": b"x"})
    mnt = mounter(f"{registry.host}/{repo}", "--ttl", "600")
    assert os.listdir(mnt / "e") == []
    add_layer_elsewhere(client, repo, "e", "precious.txt", b"added elsewhere")
    code = errno_of(lambda: os.rmdir(mnt / "e"))
    assert "e" in client.tags(repo), "the tag and its new file were deleted"
    assert {k: v for k, v in titles(client, repo, "e").items() if k} == {
        "precious.txt": Digest.of(b"added elsewhere")}
    assert code == errno.ENOTEMPTY


def test_overwriting_a_file_keeps_a_clashing_layer_listed_by_digest(client: RegistryClient,
                                                                    registry: RunningRegistry, repo: str,
                                                                    mounter: Mounter) -> None:
    push_layers(client, repo, "t", [("a.txt", b"first"), ("a.txt", b"second")])
    mnt = mounter(f"{registry.host}/{repo}")
    other = Digest.of(b"second").filename + ".tar"
    assert sorted(os.listdir(mnt / "t")) == sorted(["a.txt", other])
    (mnt / "t" / "a.txt").write_bytes(b"first, edited")
    assert sorted(os.listdir(mnt / "t")) == sorted(["a.txt", other])
    digests = [layer.digest for layer in manifest_of(client, repo, "t").layers]
    assert digests == [Digest.of(b"first, edited"), Digest.of(b"second")]
