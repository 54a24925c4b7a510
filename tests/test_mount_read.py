"""The read-only tree through a real mount, with real programs (DESIGN.md section 2)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from ocifs.digest import Digest
from ocifs.model import DOCKER_VOLUME, OCI_LAYER_TAR_GZIP
from ocifs.registry import RegistryClient

from .clients import build_umoci_image, oras_push, skopeo_copy
from .conftest import Mounter
from .content import push_artifact, push_helm_chart, push_index, push_layers
from .helpers import allocated_bytes
from .registry_server import RunningRegistry


def run(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout


def getfattr(path: Path, name: str) -> str:
    return os.getxattr(path, name).decode()


def test_oras_artifact_names_sizes_bytes_modes(client: RegistryClient, registry: RunningRegistry,
                                               repo: str, tmp_path: Path, mounter: Mounter) -> None:
    files = {"hello.txt": b"hello world\n", "héllo wörld.txt": "ünïcode\n".encode(),
             "with space.bin": os.urandom(100_000)}
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    oras_push(registry, f"{repo}:v1", [src / n for n in files])
    mnt = mounter(f"{registry.host}/{repo}")
    assert sorted(os.listdir(mnt)) == ["v1"]
    assert sorted(os.listdir(mnt / "v1")) == sorted(files)
    for name, data in files.items():
        path = mnt / "v1" / name
        st = path.stat()
        assert st.st_size == len(data)
        assert stat.S_IMODE(st.st_mode) == 0o644 and stat.S_ISREG(st.st_mode)
        assert st.st_uid == os.getuid()
        assert path.read_bytes() == data
        assert getfattr(path, "user.oci.digest") == str(Digest.of(data))
        assert getfattr(path, "user.oci.mediatype") == "application/vnd.oci.image.layer.v1.tar"
    assert stat.S_IMODE((mnt / "v1").stat().st_mode) == 0o755
    # cp out equals what oras-py pushed.
    out = tmp_path / "out"
    run("cp", "-r", str(mnt / "v1"), str(out))
    assert sorted(os.listdir(out)) == sorted(files)
    assert all((out / n).read_bytes() == d for n, d in files.items())


def test_hidden_manifest_and_config_and_tag_xattrs(client: RegistryClient, registry: RunningRegistry,
                                                   repo: str, mounter: Mounter) -> None:
    digest = push_layers(client, repo, "vol", [("data.txt", b"volume data")], artifact_type=DOCKER_VOLUME,
                         annotations={"org.opencontainers.image.created": "2024-01-02T03:04:05Z"})
    mnt = mounter(f"{registry.host}/{repo}")
    tag = mnt / "vol"
    assert os.listdir(tag) == ["data.txt"]  # hidden files are not listed
    raw = (tag / ".manifest.json").read_bytes()
    assert Digest.of(raw) == digest
    assert json.loads(raw)["artifactType"] == DOCKER_VOLUME
    assert (tag / ".config.json").read_bytes() == b"{}"
    assert getfattr(tag, "user.oci.digest") == str(digest)
    assert getfattr(tag, "user.oci.mediatype") == "application/vnd.oci.image.manifest.v1+json"
    assert getfattr(tag, "user.oci.artifacttype") == DOCKER_VOLUME
    assert set(os.listxattr(tag)) == {"user.oci.digest", "user.oci.mediatype", "user.oci.artifacttype"}
    expected = 1704164645  # the created annotation
    assert int((tag / "data.txt").stat().st_mtime) == expected
    assert int(tag.stat().st_mtime) == expected
    # Other attribute names are answered at once: ENODATA on get, ENOTSUP on set.
    with pytest.raises(OSError) as caught:
        os.getxattr(tag / "data.txt", "security.capability")
    assert caught.value.errno == errno.ENODATA
    with pytest.raises(OSError) as caught:
        os.setxattr(tag / "data.txt", "trusted.x", b"1")
    assert caught.value.errno in (errno.ENOTSUP, errno.EPERM)


def test_nested_unsafe_and_duplicate_titles(client: RegistryClient, registry: RunningRegistry,
                                            repo: str, mounter: Mounter) -> None:
    layers = [
        ("docs/guide/a.md", b"nested"),
        ("../escape", b"dotdot"),
        ("/etc/passwd", b"absolute"),
        ("", b"empty title"),
        (".manifest.json", b"reserved"),
        ("dup.txt", b"first"),
        ("dup.txt", b"second"),
        ("x", b"file x"),
        ("x/y", b"under a file"),
        (None, b"untitled", OCI_LAYER_TAR_GZIP),
        ("./dot", b"dot component"),
    ]
    push_layers(client, repo, "t", layers)
    mnt = mounter(f"{registry.host}/{repo}")
    tag = mnt / "t"

    def name(data: bytes, ext: str = ".tar") -> str:
        return Digest.of(data).filename + ext

    expected = {"docs", "dup.txt", "x", name(b"dotdot"), name(b"absolute"), name(b"empty title"),
                name(b"reserved"), name(b"second"), name(b"under a file"),
                name(b"untitled", ".tar.gz"), name(b"dot component")}
    assert set(os.listdir(tag)) == expected
    assert (tag / "docs" / "guide" / "a.md").read_bytes() == b"nested"
    assert stat.S_ISDIR((tag / "docs" / "guide").stat().st_mode)
    assert (tag / "dup.txt").read_bytes() == b"first"
    assert (tag / name(b"second")).read_bytes() == b"second"
    assert (tag / ".manifest.json").read_bytes() != b"reserved"
    # Nothing resolves outside the tag directory.
    found = run("find", str(tag), "-type", "f").split()
    assert all(p.startswith(str(tag) + "/") for p in found)
    assert len(found) == len(layers)  # every layer is reachable, under some name


def test_helm_chart_named_from_metadata(client: RegistryClient, registry: RunningRegistry, repo: str,
                                        mounter: Mounter) -> None:
    chart = os.urandom(5000)
    push_helm_chart(client, f"{repo}/demo", "demo", "0.1.0+build", chart)
    mnt = mounter(f"{registry.host}/{repo}")
    assert os.listdir(mnt) == ["demo"]
    assert os.listdir(mnt / "demo") == ["0.1.0_build"]
    assert os.listdir(mnt / "demo" / "0.1.0_build") == ["demo-0.1.0+build.tgz"]
    assert (mnt / "demo" / "0.1.0_build" / "demo-0.1.0+build.tgz").read_bytes() == chart


def test_image_from_umoci_and_skopeo(client: RegistryClient, registry: RunningRegistry, repo: str,
                                     tmp_path: Path, mounter: Mounter) -> None:
    layout = tmp_path / "layout"
    build_umoci_image(layout, "latest", {"hello.txt": b"hello from umoci\n"})
    skopeo_copy(layout, "latest", registry, f"{repo}:img")
    mnt = mounter(f"{registry.host}/{repo}", "--read-only")
    manifest = client.get_manifest(repo, "img")
    names = os.listdir(mnt / "img")
    assert names == [layer.digest.filename + ".tar.gz" for layer in manifest.layers]  # type: ignore[union-attr]
    layer = manifest.layers[0]  # type: ignore[union-attr]
    data = (mnt / "img" / names[0]).read_bytes()
    assert data == (layout / "blobs" / "sha256" / layer.digest.hex).read_bytes()
    config = json.loads((mnt / "img" / ".config.json").read_bytes())
    assert config["config"]["Cmd"] == ["/bin/sh"]
    assert stat.S_IMODE((mnt / "img" / names[0]).stat().st_mode) == 0o444
    assert stat.S_IMODE((mnt / "img").stat().st_mode) == 0o555


def test_index_platform_directories(client: RegistryClient, registry: RunningRegistry, repo: str,
                                    mounter: Mounter) -> None:
    amd = push_artifact(client, repo, "amd", {"arch.txt": b"amd64"})
    arm = push_artifact(client, repo, "arm", {"arch.txt": b"arm64 v8"})
    attestation = push_artifact(client, repo, "att", {"sbom.json": b"{}"})
    bare = push_artifact(client, repo, "bare", {"f": b"no platform"})
    index = push_index(client, repo, "multi", [
        (amd, {"os": "linux", "architecture": "amd64"}, None),
        (arm, {"os": "linux", "architecture": "arm64", "variant": "v8"}, None),
        (attestation, {"os": "unknown", "architecture": "unknown"},
         {"vnd.docker.reference.type": "attestation-manifest"}),
        (bare, None, None),
    ])
    mnt = mounter(f"{registry.host}/{repo}")
    multi = mnt / "multi"
    assert sorted(os.listdir(multi)) == sorted(["linux-amd64", "linux-arm64-v8", bare.filename])
    assert (multi / "linux-arm64-v8" / "arch.txt").read_bytes() == b"arm64 v8"
    assert getfattr(multi, "user.oci.digest") == str(index)
    assert getfattr(multi, "user.oci.mediatype") == "application/vnd.oci.image.index.v1+json"
    assert getfattr(multi / "linux-amd64", "user.oci.digest") == str(amd)
    # sha256:<hex> resolves in a repository directory without being listed.
    by_digest = mnt / str(arm)
    assert os.listdir(by_digest) == ["arch.txt"]
    assert str(arm) not in os.listdir(mnt)


def test_catalog_and_namespaces_across_pages(client: RegistryClient, registry: RunningRegistry,
                                             repo: str, mounter: Mounter) -> None:
    names = [f"{repo}/ns/r{i}" for i in range(7)] + [f"{repo}/ns/deep/er"]
    for name in names:
        push_artifact(client, name, "latest", {"f": name.encode()})
    mnt = mounter(registry.host)  # the whole registry, from its catalog (pages of 3)
    top = repo.split("/")[0]
    assert top in os.listdir(mnt)
    ns = mnt / repo / "ns"
    assert sorted(os.listdir(ns)) == sorted([f"r{i}" for i in range(7)] + ["deep"])
    assert (ns / "deep" / "er" / "latest" / "f").read_bytes() == f"{repo}/ns/deep/er".encode()
    found = run("find", str(mnt / repo), "-name", "f").split()
    assert len(found) == len(names)


def test_tag_list_and_tags_win_over_components(client: RegistryClient, registry: RunningRegistry,
                                               repo: str, mounter: Mounter) -> None:
    tags = [f"v{i}" for i in range(8)]
    for tag in tags:
        push_artifact(client, repo, tag, {"tag.txt": tag.encode()})
    push_artifact(client, f"{repo}/v1", "x", {"child": b"repo under a tag name"})
    mnt = mounter(f"{registry.host}/{repo}")
    assert sorted(os.listdir(mnt)) == sorted(tags)
    assert (mnt / "v1" / "tag.txt").read_bytes() == b"v1"  # the tag wins


def test_ttl_refresh_after_a_tag_moves(client: RegistryClient, registry: RunningRegistry, repo: str,
                                       mounter: Mounter) -> None:
    push_artifact(client, repo, "moving", {"f.txt": b"old content"})
    mnt = mounter(f"{registry.host}/{repo}", "--ttl", "1")
    path = mnt / "moving" / "f.txt"
    assert path.read_bytes() == b"old content"
    before = path.stat()
    push_artifact(client, repo, "moving", {"f.txt": b"new content!"})
    time.sleep(2.5)  # the TTL and the kernel's attribute cache (1 s)
    assert path.read_bytes() == b"new content!"
    after = path.stat()
    assert after.st_size == len(b"new content!")
    assert after.st_ino != before.st_ino
    assert after.st_mtime != before.st_mtime


def test_partial_read_fetches_only_what_it_needs(client: RegistryClient, registry: RunningRegistry,
                                                 repo: str, mounter: Mounter, tmp_path: Path) -> None:
    big = os.urandom(64 * 1024 * 1024)
    push_artifact(client, repo, "big", {"big.bin": big})
    mnt = mounter(f"{registry.host}/{repo}")
    with open(mnt / "big" / "big.bin", "rb") as file:
        file.seek(10 * 1024 * 1024)
        assert file.read(4096) == big[10 * 1024 * 1024:10 * 1024 * 1024 + 4096]
    allocated = allocated_bytes(tmp_path / "cache")
    assert allocated < 16 * 1024 * 1024, f"{allocated} bytes cached for a 4 KiB read"
    # A whole read then completes the blob in the cache, verified.
    assert hashlib.sha256((mnt / "big" / "big.bin").read_bytes()).digest() == hashlib.sha256(big).digest()
    assert (tmp_path / "cache" / "blobs" / "sha256" / Digest.of(big).hex).stat().st_size == len(big)


def test_tampered_blob_fails_with_eio_and_is_not_cached(client: RegistryClient, registry: RunningRegistry,
                                                        repo: str, mounter: Mounter, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024)
    push_artifact(client, repo, "bad", {"bad.bin": data})
    digest = Digest.of(data)
    stored = registry.root / "docker/registry/v2/blobs/sha256" / digest.hex[:2] / digest.hex / "data"
    tampered = bytearray(data)
    tampered[1_000_000] ^= 0xFF
    stored.write_bytes(bytes(tampered))
    mnt = mounter(f"{registry.host}/{repo}")
    result = subprocess.run(["cat", str(mnt / "bad" / "bad.bin")], capture_output=True)
    assert result.returncode != 0
    assert b"Input/output error" in result.stderr
    assert not (tmp_path / "cache" / "blobs" / "sha256" / digest.hex).exists()
    # Once the registry serves the right bytes again, the file reads correctly.
    stored.write_bytes(data)
    assert (mnt / "bad" / "bad.bin").read_bytes() == data


def test_errors_are_real_errnos(client: RegistryClient, registry: RunningRegistry, repo: str,
                                mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f.txt": b"x"})
    mnt = mounter(f"{registry.host}/{repo}", "--read-only")
    cases = [
        (lambda: os.stat(mnt / "nope"), errno.ENOENT),
        (lambda: os.stat(mnt / "Not_A-Name!"), errno.ENOENT),
        (lambda: os.stat(mnt / "t" / "missing"), errno.ENOENT),
        (lambda: os.listdir(mnt / "t" / "f.txt"), errno.ENOTDIR),
        (lambda: open(mnt / "t" / "f.txt", "wb"), errno.EROFS),
        (lambda: os.mkdir(mnt / "new"), errno.EROFS),
        (lambda: os.unlink(mnt / "t" / "f.txt"), errno.EROFS),
        (lambda: os.stat(mnt / "sha256:1234"), errno.ENOENT),
    ]
    for action, code in cases:
        with pytest.raises(OSError) as caught:
            action()
        assert caught.value.errno == code, (action, caught.value)


def test_pinned_sources(client: RegistryClient, registry: RunningRegistry, repo: str,
                        mounter: Mounter) -> None:
    digest = push_artifact(client, repo, "pin", {"a.txt": b"pinned"})
    by_tag = mounter(f"{registry.host}/{repo}:pin")
    assert os.listdir(by_tag) == ["a.txt"]
    by_digest = mounter(f"{registry.host}/{repo}@{digest}")
    assert (by_digest / "a.txt").read_bytes() == b"pinned"
    assert getfattr(by_digest, "user.oci.digest") == str(digest)


def test_docker_hub_namespace_listed_through_the_hub_api(client: RegistryClient, registry: RunningRegistry,
                                                         mounter: Mounter) -> None:
    from .fakeserver import FakeServer, Reply, Request

    namespace = f"hubns{os.getpid()}"
    names = [f"app{i}" for i in range(5)]
    for name in names:
        push_artifact(client, f"{namespace}/{name}", "latest", {"name.txt": name.encode()})
    hub = FakeServer()
    base = f"{hub.origin}/v2/namespaces/{namespace}/repositories"

    def page(request: Request) -> Reply:
        number = int(request.query.get("page", ["1"])[0])
        chunk = names[(number - 1) * 2:number * 2]
        more = number * 2 < len(names)
        return Reply(200, {"count": len(names), "next": f"{base}?page={number + 1}" if more else None,
                           "results": [{"name": n, "namespace": namespace} for n in chunk]})

    hub.route("GET", f"/v2/namespaces/{namespace}/repositories", page)
    try:
        mnt = mounter(f"docker.io/{namespace}", "--mirror", registry.url, "--hub-url", hub.origin)
        assert sorted(os.listdir(mnt)) == names
        assert len(hub.seen("GET")) == 3  # three pages
        assert (mnt / "app3" / "latest" / "name.txt").read_bytes() == b"app3"
    finally:
        hub.close()


def test_credentials_from_docker_config_and_eacces_without(auth_registry: RunningRegistry, repo: str,
                                                          tmp_path: Path, mounter: Mounter,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    from ocifs.registry import Credentials

    from .conftest import make_client

    writer = make_client(auth_registry, credentials=Credentials(auth_registry.username or "",
                                                                auth_registry.password or ""))
    push_artifact(writer, repo, "secret", {"s.txt": b"members only"})
    # Without credentials, a registry that wants them is not mounted (EACCES at every read
    # would be an empty-looking tree).
    with pytest.raises(AssertionError, match="requires credentials"):
        mounter(f"{auth_registry.host}/{repo}", "--read-only")
    config = tmp_path / "docker"
    config.mkdir()
    token = base64.b64encode(f"{auth_registry.username}:{auth_registry.password}".encode()).decode()
    (config / "config.json").write_text(json.dumps({"auths": {auth_registry.host: {"auth": token}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    mnt = mounter(f"{auth_registry.host}/{repo}", "--read-only")
    assert os.listdir(mnt) == ["secret"]
    assert (mnt / "secret" / "s.txt").read_bytes() == b"members only"
