"""Filling a registry by copying: files written into the mount become OCI artifacts
(DESIGN.md section 3), checked with oras-py, skopeo and raw API calls."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from ocifs.digest import Digest
from ocifs.model import (
    ANNOTATION_CREATED,
    ANNOTATION_TITLE,
    DOCKER_VOLUME,
    EMPTY_DIGEST,
    OCI_EMPTY,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    UNKNOWN_ARTIFACT,
)
from ocifs.registry import RegistryClient

from .clients import build_umoci_image, oras_client, oras_push, skopeo_copy
from .conftest import Mounter
from .content import push_artifact, push_layers
from .helpers import allocated_bytes, manifest_of, run
from .helpers import manifest_titles as titles
from .registry_server import RunningRegistry


def oras_pull(registry: RunningRegistry, target: str, outdir: Path) -> dict[str, bytes]:
    outdir.mkdir(parents=True, exist_ok=True)
    oras_client(registry).pull(target=f"{registry.host}/{target}", outdir=str(outdir))
    return {str(p.relative_to(outdir)): p.read_bytes() for p in outdir.rglob("*") if p.is_file()}


def test_generic_file_flow(client: RegistryClient, registry: RunningRegistry, repo: str,
                           tmp_path: Path, mounter: Mounter) -> None:
    """Docker Hub's generic artifact: `oras push ... myartifact.txt`, as `cp`."""
    source = tmp_path / "myartifact.txt"
    source.write_bytes(b"my artifact\n")
    mnt = mounter(f"{registry.host}/{repo}")
    os.mkdir(mnt / "demo")
    os.mkdir(mnt / "demo" / "0.0.1")
    run("cp", str(source), str(mnt / "demo" / "0.0.1/"))
    manifest = manifest_of(client, f"{repo}/demo", "0.0.1")
    assert manifest.media_type == OCI_MANIFEST
    assert manifest.artifact_type == UNKNOWN_ARTIFACT
    assert manifest.config is not None and manifest.config.media_type == OCI_EMPTY
    assert manifest.config.digest == EMPTY_DIGEST
    assert [(layer.media_type, layer.title) for layer in manifest.layers] == [(OCI_LAYER_TAR, "myartifact.txt")]
    assert ANNOTATION_CREATED in manifest.annotations
    # oras-py pulls it back byte for byte; the mount shows it at once.
    assert oras_pull(registry, f"{repo}/demo:0.0.1", tmp_path / "pulled") == {"myartifact.txt": b"my artifact\n"}
    assert (mnt / "demo" / "0.0.1" / "myartifact.txt").read_bytes() == b"my artifact\n"
    assert os.listdir(mnt / "demo" / "0.0.1") == ["myartifact.txt"]


def test_volume_flow(client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path,
                     mounter: Mounter) -> None:
    """Docker Hub's volume artifact: mkdir, setfattr artifacttype, cp."""
    source = tmp_path / "myvolume.txt"
    source.write_bytes(b"volume content\n")
    mnt = mounter(f"{registry.host}/{repo}")
    tag = mnt / "demo" / "0.0.1"
    os.makedirs(tag)
    run("setfattr", "-n", "user.oci.artifacttype", "-v", DOCKER_VOLUME, str(tag))
    assert os.getxattr(tag, "user.oci.artifacttype") == DOCKER_VOLUME.encode()
    run("cp", str(source), str(tag) + "/")
    manifest = manifest_of(client, f"{repo}/demo", "0.0.1")
    assert manifest.artifact_type == DOCKER_VOLUME
    assert titles(manifest) == {"myvolume.txt": Digest.of(b"volume content\n")}
    assert os.getxattr(tag, "user.oci.artifacttype") == DOCKER_VOLUME.encode()
    # After the fact too: setfattr on an existing tag pushes an updated manifest.
    run("setfattr", "-n", "user.oci.artifacttype", "-v", "application/x-other", str(tag))
    assert manifest_of(client, f"{repo}/demo", "0.0.1").artifact_type == "application/x-other"


def test_helm_flow(client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path,
                   mounter: Mounter) -> None:
    """Docker Hub's Helm chart: a chart made and packaged by Helm, copied into a namespace
    directory, pulled back by Helm byte for byte; a chart Helm pushed is browsable."""
    import helm_python as helm

    helm.Chart.create("demo", tmp_path)
    archive = Path(helm.package(tmp_path / "demo", destination=tmp_path, version="0.1.0+build.1"))
    mnt = mounter(f"{registry.host}/{repo}")
    run("cp", str(archive), str(mnt) + "/")
    assert os.listdir(mnt) == ["demo"]  # the chart left the namespace directory
    assert os.listdir(mnt / "demo") == ["0.1.0_build.1"]
    assert (mnt / "demo" / "0.1.0_build.1" / archive.name).read_bytes() == archive.read_bytes()
    manifest = manifest_of(client, f"{repo}/demo", "0.1.0_build.1")
    assert manifest.config is not None and manifest.config.media_type == "application/vnd.cncf.helm.config.v1+json"
    assert [layer.media_type for layer in manifest.layers] == ["application/vnd.cncf.helm.chart.content.v1.tar+gzip"]
    config = json.loads(b"".join(client.fetch_blob(f"{repo}/demo", manifest.config.digest)))
    assert config["name"] == "demo" and config["version"] == "0.1.0+build.1"
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    helm.pull(f"oci://{registry.host}/{repo}/demo", version="0.1.0+build.1", destination=str(pulled),
              plain_http=True)
    assert (pulled / archive.name).read_bytes() == archive.read_bytes()
    # A chart that Helm pushed shows up as <name>/<version>/<name>-<version>.tgz.
    (tmp_path / "o").mkdir()
    helm.Chart.create("other", tmp_path / "o")
    other = Path(helm.package(tmp_path / "o" / "other", destination=tmp_path))
    helm.push(other, f"oci://{registry.host}/{repo}", plain_http=True)
    import time
    time.sleep(1.2)
    assert (mnt / "other" / "0.1.0" / "other-0.1.0.tgz").read_bytes() == other.read_bytes()
    # A file that is not a chart fails close() with EINVAL.
    bogus = tmp_path / "bogus.tgz"
    bogus.write_bytes(b"not a chart")
    result = run("cp", str(bogus), str(mnt) + "/", check=False)
    assert result.returncode != 0 and "Invalid argument" in result.stderr


def test_overwrite_remove_and_nested_titles(client: RegistryClient, registry: RunningRegistry, repo: str,
                                            tmp_path: Path, mounter: Mounter) -> None:
    mnt = mounter(f"{registry.host}/{repo}")
    tag = mnt / "r" / "t1"
    os.makedirs(tag)  # a new repository, and a tag in it
    repo = f"{repo}/r"
    (tag / "a.txt").write_bytes(b"first")
    os.makedirs(tag / "docs" / "guide")
    (tag / "docs" / "guide" / "g.md").write_bytes(b"# guide")
    assert set(titles(manifest_of(client, repo, "t1"))) == {"a.txt", "docs/guide/g.md"}
    (tag / "a.txt").write_bytes(b"second version")  # overwrite replaces the layer
    manifest = manifest_of(client, repo, "t1")
    assert titles(manifest) == {"a.txt": Digest.of(b"second version"),
                                "docs/guide/g.md": Digest.of(b"# guide")}
    assert (tag / "a.txt").read_bytes() == b"second version"
    with open(tag / "a.txt", "ab") as file:  # append: the old content is kept
        file.write(b"+more")
    assert (tag / "a.txt").read_bytes() == b"second version+more"
    os.unlink(tag / "a.txt")
    assert set(titles(manifest_of(client, repo, "t1"))) == {"docs/guide/g.md"}
    assert sorted(os.listdir(tag)) == ["docs"]
    assert oras_pull(registry, f"{repo}:t1", tmp_path / "p") == {"docs/guide/g.md": b"# guide"}
    os.unlink(tag / "docs" / "guide" / "g.md")
    manifest = manifest_of(client, repo, "t1")
    assert [layer.digest for layer in manifest.layers] == [EMPTY_DIGEST]  # the placeholder stays
    assert os.listdir(tag) == ["docs"]  # made with mkdir: it stays, as on any file system
    os.rmdir(tag / "docs" / "guide")
    os.rmdir(tag / "docs")
    assert os.listdir(tag) == []
    # An echo through a shell, which flushes a duplicated descriptor before writing.
    run("sh", "-c", f"echo hello > '{tag}/echo.txt'")
    assert titles(manifest_of(client, repo, "t1")) == {"echo.txt": Digest.of(b"hello\n")}


def test_round_trip_keeps_what_oras_py_wrote(client: RegistryClient, registry: RunningRegistry, repo: str,
                                             tmp_path: Path, mounter: Mounter) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "one.txt").write_bytes(b"one")
    oras_push(registry, f"{repo}:rt", [src / "one.txt"])
    before = manifest_of(client, repo, "rt")
    mnt = mounter(f"{registry.host}/{repo}")
    (mnt / "rt" / "two.txt").write_bytes(b"two")
    after = manifest_of(client, repo, "rt")
    old, new = json.loads(before.raw), json.loads(after.raw)
    assert new["config"] == old["config"]
    assert new.get("annotations") == old.get("annotations")
    assert new.get("mediaType") == old.get("mediaType")
    assert new["layers"][0] == old["layers"][0]
    assert new["layers"][1]["annotations"] == {ANNOTATION_TITLE: "two.txt"}
    assert oras_pull(registry, f"{repo}:rt", tmp_path / "p") == {"one.txt": b"one", "two.txt": b"two"}


def test_rename_within_and_across_tags(client: RegistryClient, registry: RunningRegistry, repo: str,
                                       mounter: Mounter) -> None:
    push_artifact(client, repo, "a", {"x.txt": b"x content", "y.txt": b"y content"})
    push_artifact(client, f"{repo}-other", "b", {"z.txt": b"z"})
    mnt = mounter(f"{registry.host}")
    base = mnt / repo
    os.rename(base / "a" / "x.txt", base / "a" / "renamed.txt")
    assert titles(manifest_of(client, repo, "a")) == {"renamed.txt": Digest.of(b"x content"),
                                                      "y.txt": Digest.of(b"y content")}
    os.rename(base / "a" / "renamed.txt", base / "a" / "y.txt")  # over an existing title: one layer
    assert titles(manifest_of(client, repo, "a")) == {"y.txt": Digest.of(b"x content")}
    # To another repository: mounted across, no download, removed from the source.
    other = mnt / f"{repo}-other" / "b"
    os.rename(base / "a" / "y.txt", other / "moved.txt")
    assert titles(manifest_of(client, f"{repo}-other", "b")) == {"z.txt": Digest.of(b"z"),
                                                                  "moved.txt": Digest.of(b"x content")}
    assert titles(manifest_of(client, repo, "a")) == {"": EMPTY_DIGEST}
    assert (other / "moved.txt").read_bytes() == b"x content"
    with pytest.raises(OSError) as caught:
        os.rename(base / "a", base / "renamed-tag")
    assert caught.value.errno == errno.EXDEV
    # mv falls back to copy + remove for directories, which works.
    run("mv", str(other), str(mnt / f"{repo}-other" / "c"))
    assert set(titles(manifest_of(client, f"{repo}-other", "c"))) == {"z.txt", "moved.txt"}


def test_rmdir_of_tags(client: RegistryClient, registry: RunningRegistry, repo: str, mounter: Mounter) -> None:
    push_layers(client, repo, "full", [("f", b"x")], annotations={"which": "full"})
    digest = push_layers(client, repo, "empty", [])
    client.put_manifest(repo, "twin", client.get_manifest(repo, str(digest)).raw, OCI_MANIFEST)
    mnt = mounter(f"{registry.host}/{repo}")
    with pytest.raises(OSError) as caught:
        os.rmdir(mnt / "full")
    assert caught.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as caught:
        os.rmdir(mnt / "empty")  # "twin" shares the manifest: a digest delete would take it too
    assert caught.value.errno == errno.EBUSY
    os.mkdir(mnt / "never-pushed")
    os.rmdir(mnt / "never-pushed")
    os.unlink(mnt / "full" / "f")
    os.rmdir(mnt / "full")
    assert "full" not in client.tags(repo)
    assert "full" not in os.listdir(mnt)


def test_refusals(client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path,
                  mounter: Mounter) -> None:
    layout = tmp_path / "layout"
    build_umoci_image(layout, "latest", {"hello.txt": b"hi"})
    skopeo_copy(layout, "latest", registry, f"{repo}:image")
    digest = push_artifact(client, repo, "art", {"f": b"x"})
    mnt = mounter(f"{registry.host}/{repo}")
    cases = [
        (lambda: open(mnt / "image" / "new.txt", "wb"), errno.EPERM),
        (lambda: os.mkdir(mnt / "Bad:Tag!"), errno.EINVAL),
        (lambda: open(mnt / "art" / ".manifest.json", "wb"), errno.EPERM),
        (lambda: open(mnt / "art" / ".config.json", "wb"), errno.EPERM),
        (lambda: open(mnt / str(digest) / "g", "wb"), errno.EPERM),
        (lambda: open(mnt / "loose.txt", "wb"), errno.EPERM),
    ]
    for action, code in cases:
        with pytest.raises(OSError) as caught:
            action()
        assert caught.value.errno == code, (action, caught.value)
    assert skopeo_inspect_layers(registry, f"{repo}:image") == 1  # the image is untouched
    # chmod, chown and utimens succeed so that cp -p / cp -a work.
    source = tmp_path / "keep.txt"
    source.write_bytes(b"kept")
    run("cp", "-p", str(source), str(mnt / "art") + "/")
    run("cp", "-a", str(source), str(mnt / "art" / "keep2.txt"))
    assert set(titles(manifest_of(client, repo, "art"))) == {"f", "keep.txt", "keep2.txt"}


def skopeo_inspect_layers(registry: RunningRegistry, target: str) -> int:
    out = run("skopeo", "inspect", "--tls-verify=false", f"docker://{registry.host}/{target}").stdout
    return len(json.loads(out)["Layers"])


def test_read_only_mount_refuses_writes(client: RegistryClient, registry: RunningRegistry, repo: str,
                                        mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f": b"x"})
    mnt = mounter(f"{registry.host}/{repo}", "--read-only")
    for action in (lambda: open(mnt / "t" / "g", "wb"), lambda: os.mkdir(mnt / "u"),
                   lambda: os.unlink(mnt / "t" / "f"), lambda: os.rename(mnt / "t" / "f", mnt / "t" / "h"),
                   lambda: os.setxattr(mnt / "t", "user.oci.artifacttype", b"x/y"),
                   lambda: os.chmod(mnt / "t" / "f", 0o600)):
        with pytest.raises(OSError) as caught:
            action()
        assert caught.value.errno == errno.EROFS


def test_scratch_files_stay_local(client: RegistryClient, registry: RunningRegistry, repo: str,
                                  mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f": b"x"})
    mnt = mounter(f"{registry.host}/{repo}")
    for name in (".f.swp", "f~", "4913", ".#f"):
        (mnt / "t" / name).write_bytes(b"scratch")
        assert (mnt / "t" / name).read_bytes() == b"scratch"
    assert set(titles(manifest_of(client, repo, "t"))) == {"f"}
    for name in (".f.swp", "f~", "4913", ".#f"):
        os.unlink(mnt / "t" / name)
    assert os.listdir(mnt / "t") == ["f"]
    # sed -i writes a temporary file and renames it over the original.
    (mnt / "t" / "conf").write_bytes(b"color=red\n")
    run("sed", "-i", "s/red/blue/", str(mnt / "t" / "conf"))
    assert (mnt / "t" / "conf").read_bytes() == b"color=blue\n"
    assert set(titles(manifest_of(client, repo, "t"))) == {"f", "conf"}


def test_rename_flags_are_refused(client: RegistryClient, registry: RunningRegistry, repo: str,
                                  mounter: Mounter) -> None:
    """renameat2 with RENAME_NOREPLACE or RENAME_EXCHANGE: EINVAL, nothing changed."""
    import ctypes

    push_artifact(client, repo, "t", {"a": b"A", "b": b"B"})
    mnt = mounter(f"{registry.host}/{repo}")
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    # RENAME_EXCHANGE reaches ocifs: refused. RENAME_NOREPLACE over an existing name is the
    # kernel's EEXIST; to a new name it reaches ocifs: refused too.
    for new, flag, code in (("b", 2, errno.EINVAL), ("b", 1, errno.EEXIST), ("c", 1, errno.EINVAL)):
        result = libc.renameat2(at_fdcwd, str(mnt / "t" / "a").encode(), at_fdcwd,
                                str(mnt / "t" / new).encode(), flag)
        assert result == -1 and ctypes.get_errno() == code, (new, flag)
    assert titles(manifest_of(client, repo, "t")) == {"a": Digest.of(b"A"), "b": Digest.of(b"B")}


def test_touch_makes_an_empty_file(client: RegistryClient, registry: RunningRegistry, repo: str,
                                   mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"a": b"A"})
    mnt = mounter(f"{registry.host}/{repo}")
    run("touch", str(mnt / "t" / "empty"))
    assert titles(manifest_of(client, repo, "t")) == {"a": Digest.of(b"A"), "empty": Digest.of(b"")}
    assert (mnt / "t" / "empty").stat().st_size == 0
    assert (mnt / "t" / "empty").read_bytes() == b""


def test_the_directory_that_receives_the_first_file_is_the_tag(client: RegistryClient,
                                                                registry: RunningRegistry, repo: str,
                                                                mounter: Mounter) -> None:
    """Issue "Daily use", 7: `mkdir -p MNT/acme/app/1.0` then `cp f MNT/acme/app/1.0/` on a
    namespace mount makes repository acme/app with tag 1.0 (not repository acme, tag app,
    title 1.0/f); directories made inside that tag afterwards are nested titles."""
    mnt = mounter(f"{registry.host}/{repo}")
    os.makedirs(mnt / "acme" / "app" / "1.0")
    (mnt / "acme" / "app" / "1.0" / "f.txt").write_bytes(b"first file")
    assert set(titles(manifest_of(client, f"{repo}/acme/app", "1.0"))) == {"f.txt"}
    assert "1.0" in client.tags(f"{repo}/acme/app")
    assert f"{repo}/acme" not in set(client.catalog())  # no repository made of a middle directory
    os.makedirs(mnt / "acme" / "app" / "1.0" / "docs" / "guide")
    (mnt / "acme" / "app" / "1.0" / "docs" / "guide" / "g.md").write_bytes(b"# g")
    assert set(titles(manifest_of(client, f"{repo}/acme/app", "1.0"))) == {"f.txt", "docs/guide/g.md"}


def test_mv_of_a_tag_directory_prints_no_attribute_errors(client: RegistryClient, registry: RunningRegistry,
                                                          repo: str, mounter: Mounter) -> None:
    """Issue "Daily use", 9: `mv` of a tag directory falls back to copying, and copies the
    directory's `user.oci.digest` and `user.oci.mediatype` (its old manifest's): accepted as
    nothing to do, not errors printed for each."""
    push_artifact(client, f"{repo}/app", "1.0", {"a.txt": b"hello"})
    mnt = mounter(f"{registry.host}/{repo}")
    moved = run("mv", str(mnt / "app" / "1.0"), str(mnt / "app" / "2.0"), check=False)
    assert moved.returncode == 0 and moved.stderr == "", moved.stderr
    assert set(titles(manifest_of(client, f"{repo}/app", "2.0"))) == {"a.txt"}
    os.makedirs(mnt / "other")
    moved = run("mv", str(mnt / "app" / "2.0"), str(mnt / "other" / "2.0"), check=False)
    assert moved.returncode == 0 and moved.stderr == "", moved.stderr
    assert (mnt / "other" / "2.0" / "a.txt").read_bytes() == b"hello"


def test_a_pushed_file_occupies_the_cache_once(registry: RunningRegistry, repo: str, mounter: Mounter,
                                               tmp_path: Path) -> None:
    """Issue "Daily use", 6: the staged file becomes the cached blob once pushed (moved, not
    copied), and reading it back fetches nothing and stores nothing again."""
    MiB = 1024 * 1024
    data = os.urandom(8 * MiB)
    source = tmp_path / "f.bin"
    source.write_bytes(data)
    mnt = mounter(f"{registry.host}/{repo}")
    os.makedirs(mnt / "app" / "1.0")
    run("cp", str(source), str(mnt / "app" / "1.0") + "/")
    assert (mnt / "app" / "1.0" / "f.bin").read_bytes() == data
    cache = mounter.cache_dir

    assert allocated_bytes(cache / "staging") < MiB  # records at most, not the data
    assert len(data) <= allocated_bytes(cache / "blobs") < len(data) + MiB
    assert allocated_bytes(cache / "partial") < MiB
