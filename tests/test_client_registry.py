"""The registry client against a real registry (Debian's docker-registry)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from ocifs.digest import Digest
from ocifs.errors import AuthError, NotFound, RegistryError, Unauthorized
from ocifs.model import (
    ANNOTATION_TITLE,
    EMPTY_DESCRIPTOR,
    EMPTY_JSON,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    build_manifest,
    encode_json,
)
from ocifs.registry import Credentials, RegistryClient

from .clients import build_umoci_image, oras_push, skopeo_copy
from .conftest import TEST_PASSWORD, TEST_USER, make_client
from .content import push_artifact
from .registry_server import CATALOG_MAX_ENTRIES, RunningRegistry


def fetch(client: RegistryClient, repo: str, digest: Digest, size: int | None = None) -> bytes:
    return b"".join(client.fetch_blob(repo, digest, size))


def test_ping(client: RegistryClient) -> None:
    client.ping()


def test_monolithic_upload_and_exact_read(client: RegistryClient, repo: str) -> None:
    data = os.urandom(300_000)
    digest = Digest.of(data)
    assert client.blob_size(repo, digest) is None
    client.upload_monolithic(repo, data, digest)
    assert client.blob_size(repo, digest) == len(data)
    assert fetch(client, repo, digest, len(data)) == data


def test_range_reads_return_exactly_the_range(client: RegistryClient, repo: str) -> None:
    data = os.urandom(1_000_003)
    digest = Digest.of(data)
    client.upload_monolithic(repo, data, digest)
    for offset, length in [(0, 1), (0, 4096), (123_457, 65_536), (len(data) - 5, 5),
                           (999_000, None), (0, None), (500_000, 500_003)]:
        got = b"".join(client.fetch_blob_range(repo, digest, offset, length))
        expected = data[offset:] if length is None else data[offset:offset + length]
        assert got == expected, (offset, length)


def test_chunked_upload_tracks_offsets(client: RegistryClient, repo: str, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 12_345)
    path = tmp_path / "big"
    path.write_bytes(data)
    digest = Digest.of(data)
    with open(path, "rb") as file:
        client.upload_chunked(repo, file, digest, len(data), chunk_size=1024 * 1024)
    assert client.blob_size(repo, digest) == len(data)
    assert fetch(client, repo, digest, len(data)) == data


def test_single_post_upload(client: RegistryClient, repo: str) -> None:
    data = b"single post " * 1000
    digest = Digest.of(data)
    client.upload_single_post(repo, data, digest)
    assert fetch(client, repo, digest) == data


def test_upload_with_wrong_digest_is_refused(client: RegistryClient, repo: str) -> None:
    data = b"these bytes"
    wrong = Digest.of(b"other bytes")
    with pytest.raises(RegistryError) as caught:
        client.upload_monolithic(repo, data, wrong)
    assert caught.value.code == "DIGEST_INVALID"
    assert client.blob_size(repo, wrong) is None


def test_push_blob_skips_existing_and_mounts_across_repositories(
    client: RegistryClient, repo: str, tmp_path: Path
) -> None:
    data = os.urandom(10_000)
    digest = Digest.of(data)
    source = tmp_path / "blob"
    source.write_bytes(data)
    with open(source, "rb") as file:
        client.push_blob(repo, file, digest, len(data))
        client.push_blob(repo, file, digest, len(data))  # already there: nothing to do
    other = repo + "-other"
    assert client.mount_blob(other, digest, repo) is True
    assert fetch(client, other, digest) == data
    # Mounting what the source does not have falls back to an upload.
    missing = Digest.of(b"not anywhere")
    assert client.mount_blob(other, missing, repo) is False


def test_manifest_by_tag_and_digest(client: RegistryClient, repo: str) -> None:
    files = {"hello.txt": b"hello\n", "docs/readme.md": b"# readme\n"}
    digest = push_artifact(client, repo, "v1", files)
    resolved = client.resolve(repo, "v1")
    assert resolved.digest == digest
    assert resolved.media_type == OCI_MANIFEST
    by_tag = client.get_manifest(repo, "v1")
    by_digest = client.get_manifest(repo, str(digest))
    assert isinstance(by_tag, Manifest)
    assert by_tag.raw == by_digest.raw
    assert Digest.of(by_tag.raw) == digest
    assert [layer.title for layer in by_tag.layers] == ["hello.txt", "docs/readme.md"]
    for layer in by_tag.layers:
        assert fetch(client, repo, layer.digest, layer.size) == files[layer.title or ""]


def test_unknown_media_types_are_carried(client: RegistryClient, repo: str) -> None:
    data = b"payload"
    client.upload_monolithic(repo, data, Digest.of(data))
    client.upload_monolithic(repo, EMPTY_JSON, EMPTY_DESCRIPTOR.digest)
    layer = Descriptor.for_bytes("application/x-ocifs-test+weird", data, {ANNOTATION_TITLE: "w"})
    raw = build_manifest([layer], artifact_type="application/x-ocifs-artifact")
    client.put_manifest(repo, "weird", raw, OCI_MANIFEST)
    manifest = client.get_manifest(repo, "weird")
    assert isinstance(manifest, Manifest)
    assert manifest.layers[0].media_type == "application/x-ocifs-test+weird"
    assert manifest.artifact_type == "application/x-ocifs-artifact"


def test_index_round_trip(client: RegistryClient, repo: str) -> None:
    amd = push_artifact(client, repo, "amd", {"a": b"amd64"})
    arm = push_artifact(client, repo, "arm", {"a": b"arm64"})
    entries = []
    for digest, arch in ((amd, "amd64"), (arm, "arm64")):
        size = client.resolve(repo, str(digest)).size
        entries.append({"mediaType": OCI_MANIFEST, "digest": str(digest), "size": size,
                        "platform": {"os": "linux", "architecture": arch}})
    raw = encode_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    client.put_manifest(repo, "multi", raw, OCI_INDEX)
    index = client.get_manifest(repo, "multi")
    assert isinstance(index, Index)
    assert [m.platform.architecture for m in index.manifests if m.platform] == ["amd64", "arm64"]


def test_tags_list_all(client: RegistryClient, repo: str) -> None:
    digest = push_artifact(client, repo, "t0", {"f": b"x"})
    raw = client.get_manifest(repo, str(digest)).raw
    wanted = {f"t{i}" for i in range(9)}
    for tag in wanted - {"t0"}:
        client.put_manifest(repo, tag, raw, OCI_MANIFEST)
    assert set(client.tags(repo)) == wanted
    paged = make_client_like(client, page_size=2)
    assert sorted(paged.tags(repo)) == sorted(wanted)


def make_client_like(client: RegistryClient, *, page_size: int) -> RegistryClient:
    from ocifs.registry import ClientOptions

    return RegistryClient(client.registry, ClientOptions(base_url=client.base_url, page_size=page_size))


def test_catalog_spans_several_pages(client: RegistryClient, repo: str) -> None:
    names = [f"{repo}/c{i}" for i in range(2 * CATALOG_MAX_ENTRIES + 1)]
    for name in names:
        push_artifact(client, name, "v", {"f": name.encode()})
    listed = list(client.catalog())
    assert set(names) <= set(listed)
    assert len(listed) == len(set(listed)) > CATALOG_MAX_ENTRIES
    # An `n` above the server's maximum is refused by distribution; the client pages anyway.
    assert set(names) <= set(make_client_like(client, page_size=50).catalog())
    # An `n` below it makes more, smaller pages.
    assert set(names) <= set(make_client_like(client, page_size=2).catalog())


def test_delete_manifest_and_blob(client: RegistryClient, repo: str) -> None:
    digest = push_artifact(client, repo, "gone", {"f": b"delete me"})
    with pytest.raises(RegistryError):
        client.delete_manifest(repo, "gone")  # distribution 2.8 refuses deletes by tag
    client.delete_manifest(repo, str(digest))
    with pytest.raises(NotFound) as caught:
        client.resolve(repo, "gone")
    assert caught.value.errno == errno.ENOENT
    blob = Digest.of(b"delete me")
    client.delete_blob(repo, blob)
    assert client.blob_size(repo, blob) is None


def test_missing_things_are_not_found(client: RegistryClient, repo: str) -> None:
    with pytest.raises(NotFound):
        client.get_manifest(repo, "nope")
    with pytest.raises(NotFound):
        list(client.tags(repo + "-never"))
    with pytest.raises(NotFound):
        list(client.fetch_blob(repo, Digest.of(b"never pushed")))


def test_reads_what_oras_py_pushed(client: RegistryClient, registry: RunningRegistry, repo: str,
                                   tmp_path: Path) -> None:
    files = {"notes.txt": b"oras notes\n", "data.bin": os.urandom(70_000)}
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    oras_push(registry, f"{repo}:oras", paths)
    manifest = client.get_manifest(repo, "oras")
    assert isinstance(manifest, Manifest)
    titles = {layer.title: layer for layer in manifest.layers}
    assert set(titles) == set(files)
    for title, data in files.items():
        assert fetch(client, repo, titles[title].digest, titles[title].size) == data


def test_reads_an_image_built_by_umoci_and_copied_by_skopeo(
    client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    build_umoci_image(layout, "latest", {"hello.txt": b"hello from umoci\n"})
    skopeo_copy(layout, "latest", registry, f"{repo}:img")
    manifest = client.get_manifest(repo, "img")
    assert isinstance(manifest, Manifest)
    assert manifest.is_image
    # The bytes match the layout's own manifest, which skopeo copied unchanged.
    index = json.loads((layout / "index.json").read_text())
    local = Digest.parse(index["manifests"][0]["digest"])
    assert manifest.digest == local
    assert manifest.raw == (layout / "blobs" / "sha256" / local.hex).read_bytes()
    config = fetch(client, repo, manifest.config.digest, manifest.config.size)
    assert json.loads(config)["config"]["Cmd"] == ["/bin/sh"]
    for layer in manifest.layers:
        blob = fetch(client, repo, layer.digest, layer.size)
        assert blob == (layout / "blobs" / "sha256" / layer.digest.hex).read_bytes()


# ---- htpasswd registry -----------------------------------------------------------------------


def test_authenticated_push_and_pull(auth_client: RegistryClient, repo: str) -> None:
    auth_client.ping()
    digest = push_artifact(auth_client, repo, "v1", {"secret.txt": b"for members only"})
    assert auth_client.resolve(repo, "v1").digest == digest
    layer = auth_client.get_manifest(repo, "v1").layers[0]  # type: ignore[union-attr]
    assert fetch(auth_client, repo, layer.digest) == b"for members only"
    assert "v1" in list(auth_client.tags(repo))


def test_wrong_password_is_refused(auth_registry: RunningRegistry) -> None:
    bad = make_client(auth_registry, credentials=Credentials(TEST_USER, "wrong"))
    with pytest.raises(AuthError) as caught:
        bad.ping()
    assert caught.value.errno == errno.EACCES


def test_anonymous_access_to_protected_registry_is_eacces(auth_registry: RunningRegistry, repo: str) -> None:
    anonymous = make_client(auth_registry)
    with pytest.raises(AuthError) as refused:  # Basic auth and no credentials: say so at once
        anonymous.ping()
    assert refused.value.errno == errno.EACCES and "requires credentials" in str(refused.value)
    with pytest.raises(Unauthorized) as caught:
        list(anonymous.tags(repo))
    assert caught.value.errno == errno.EACCES


def test_oras_py_and_skopeo_with_credentials(auth_client: RegistryClient, auth_registry: RunningRegistry,
                                             repo: str, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"authenticated oras")
    oras_push(auth_registry, f"{repo}:oras", [tmp_path / "a.txt"])
    layer = auth_client.get_manifest(repo, "oras").layers[0]  # type: ignore[union-attr]
    assert fetch(auth_client, repo, layer.digest) == b"authenticated oras"
    layout = tmp_path / "layout"
    build_umoci_image(layout, "v", {"f": b"image"})
    skopeo_copy(layout, "v", auth_registry, f"{repo}:img")
    assert auth_client.get_manifest(repo, "img").is_image  # type: ignore[union-attr]


def test_credentials_are_not_in_logs(auth_registry: RunningRegistry, repo: str,
                                     caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    client = make_client(auth_registry, credentials=Credentials(TEST_USER, TEST_PASSWORD))
    push_artifact(client, repo, "v", {"f": b"x"})
    text = caplog.text
    assert TEST_PASSWORD not in text
    import base64
    assert base64.b64encode(f"{TEST_USER}:{TEST_PASSWORD}".encode()).decode() not in text
    assert repr(Credentials(TEST_USER, TEST_PASSWORD)).count(TEST_PASSWORD) == 0
