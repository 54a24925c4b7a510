"""Unit tests for ocifs.model: manifests, indexes and descriptors from the exact bytes served."""

from __future__ import annotations

import errno
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocifs import errors
from ocifs.digest import Digest
from ocifs.errors import IntegrityError, ManifestError, ManifestTooLarge
from ocifs.model import (
    ANNOTATION_CREATED,
    ANNOTATION_TITLE,
    DOCKER_CONFIG,
    DOCKER_LAYER_TAR_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    EMPTY_DESCRIPTOR,
    EMPTY_DIGEST,
    HELM_CHART,
    HELM_CONFIG,
    HELM_PROVENANCE,
    MANIFEST_ACCEPT,
    MAX_MANIFEST_SIZE,
    OCI_ARTIFACT_MANIFEST,
    OCI_CONFIG,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_LAYER_TAR,
    OCI_LAYER_TAR_GZIP,
    OCI_MANIFEST,
    UNKNOWN_ARTIFACT,
    UNKNOWN_CONFIG,
    Descriptor,
    Index,
    Manifest,
    Platform,
    base_media_type,
    build_manifest,
    encode_json,
    is_empty_descriptor,
    parse_manifest,
    replace_layers,
)

EMPTY_SHA = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


def d(n: int) -> str:
    """A distinct, well-formed sha256 digest string."""
    return "sha256:" + f"{n:064x}"


def desc(media_type: str, n: int, size: int, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": d(n), "size": size, **extra}


def dumps(data: Any) -> bytes:
    return json.dumps(data, indent=3).encode()


OCI_IMAGE = {
    "schemaVersion": 2,
    "mediaType": OCI_MANIFEST,
    "config": desc(OCI_CONFIG, 1, 1469),
    "layers": [desc(OCI_LAYER_TAR_GZIP, 2, 3370706), desc(OCI_LAYER_TAR_GZIP, 3, 12)],
    "annotations": {"org.opencontainers.image.source": "https://example.com/x"},
}

OCI_IMAGE_INDEX = {
    "schemaVersion": 2,
    "mediaType": OCI_INDEX,
    "manifests": [
        desc(OCI_MANIFEST, 10, 1000, platform={"architecture": "amd64", "os": "linux"}),
        desc(
            OCI_MANIFEST,
            11,
            1001,
            platform={"architecture": "arm", "os": "linux", "variant": "v7"},
        ),
        desc(
            OCI_MANIFEST,
            12,
            1002,
            platform={"architecture": "unknown", "os": "unknown"},
            annotations={
                "vnd.docker.reference.type": "attestation-manifest",
                "vnd.docker.reference.digest": d(10),
            },
        ),
    ],
    "annotations": {"a": "b"},
}

DOCKER_V2 = {
    "schemaVersion": 2,
    "mediaType": DOCKER_MANIFEST,
    "config": desc(DOCKER_CONFIG, 20, 7023),
    "layers": [desc(DOCKER_LAYER_TAR_GZIP, 21, 32654), desc(DOCKER_LAYER_TAR_GZIP, 22, 16724)],
}

DOCKER_LIST = {
    "schemaVersion": 2,
    "mediaType": DOCKER_MANIFEST_LIST,
    "manifests": [
        desc(DOCKER_MANIFEST, 30, 7143, platform={"architecture": "ppc64le", "os": "linux"}),
        desc(
            DOCKER_MANIFEST,
            31,
            7682,
            platform={
                "architecture": "amd64",
                "os": "windows",
                "os.version": "10.0.17763.1",
                "os.features": ["win32k"],
            },
        ),
    ],
}

HELM = {
    "schemaVersion": 2,
    "config": desc(HELM_CONFIG, 40, 117),
    "layers": [desc(HELM_CHART, 41, 3573), desc(HELM_PROVENANCE, 42, 900)],
    "annotations": {
        "org.opencontainers.image.title": "mychart",
        "org.opencontainers.image.version": "0.1.0",
    },
}


# --------------------------------------------------------------------------- parsing


def test_parse_oci_manifest() -> None:
    raw = dumps(OCI_IMAGE)
    manifest = parse_manifest(raw)
    assert isinstance(manifest, Manifest)
    assert manifest.media_type == OCI_MANIFEST
    assert manifest.raw == raw
    assert manifest.digest == Digest.of(raw)
    assert manifest.config is not None
    assert manifest.config.media_type == OCI_CONFIG
    assert manifest.config.digest == Digest.parse(d(1))
    assert manifest.config.size == 1469
    assert [layer.digest for layer in manifest.layers] == [Digest.parse(d(2)), Digest.parse(d(3))]
    assert [layer.size for layer in manifest.layers] == [3370706, 12]
    assert all(layer.media_type == OCI_LAYER_TAR_GZIP for layer in manifest.layers)
    assert manifest.annotations == {"org.opencontainers.image.source": "https://example.com/x"}
    assert manifest.artifact_type is None
    assert manifest.subject is None
    assert manifest.is_image is True
    assert manifest.effective_artifact_type == OCI_CONFIG


def test_parse_oci_index() -> None:
    raw = dumps(OCI_IMAGE_INDEX)
    index = parse_manifest(raw)
    assert isinstance(index, Index)
    assert index.media_type == OCI_INDEX
    assert index.raw == raw
    assert index.digest == Digest.of(raw)
    assert len(index.manifests) == 3
    assert index.manifests[0].platform == Platform("linux", "amd64")
    assert index.manifests[1].platform == Platform("linux", "arm", "v7")
    assert index.manifests[2].platform == Platform("unknown", "unknown")
    assert index.manifests[2].annotations["vnd.docker.reference.type"] == "attestation-manifest"
    assert [m.size for m in index.manifests] == [1000, 1001, 1002]
    assert index.annotations == {"a": "b"}


def test_parse_docker_v2_manifest() -> None:
    manifest = parse_manifest(dumps(DOCKER_V2), content_type=DOCKER_MANIFEST)
    assert isinstance(manifest, Manifest)
    assert manifest.media_type == DOCKER_MANIFEST
    assert manifest.config is not None and manifest.config.media_type == DOCKER_CONFIG
    assert manifest.is_image is True
    assert [layer.media_type for layer in manifest.layers] == [DOCKER_LAYER_TAR_GZIP] * 2
    assert [layer.size for layer in manifest.layers] == [32654, 16724]


def test_parse_docker_manifest_list() -> None:
    index = parse_manifest(dumps(DOCKER_LIST))
    assert isinstance(index, Index)
    assert index.media_type == DOCKER_MANIFEST_LIST
    assert [m.media_type for m in index.manifests] == [DOCKER_MANIFEST] * 2
    assert index.manifests[0].platform == Platform("linux", "ppc64le")
    assert index.manifests[1].platform == Platform("windows", "amd64", None, "10.0.17763.1")


def test_empty_index() -> None:
    index = parse_manifest(dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}))
    assert isinstance(index, Index)
    assert index.manifests == ()


def test_index_with_subject_and_artifact_type() -> None:
    data = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "artifactType": "application/x.sbom",
        "manifests": [],
        "subject": desc(OCI_MANIFEST, 5, 500),
    }
    index = parse_manifest(dumps(data))
    assert isinstance(index, Index)
    assert index.artifact_type == "application/x.sbom"
    assert index.subject is not None
    assert index.subject.digest == Digest.parse(d(5))
    assert index.subject.size == 500


def test_body_media_type_wins_over_content_type() -> None:
    manifest = parse_manifest(dumps(DOCKER_V2), content_type=OCI_MANIFEST)
    assert manifest.media_type == DOCKER_MANIFEST


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (OCI_MANIFEST, OCI_MANIFEST),
        (f"{OCI_MANIFEST}; charset=utf-8", OCI_MANIFEST),
        (f"{DOCKER_MANIFEST} ;charset=utf-8", DOCKER_MANIFEST),
        ("Application/Vnd.OCI.Image.Manifest.v1+JSON", OCI_MANIFEST),
    ],
)
def test_manifest_media_type_from_content_type(content_type: str, expected: str) -> None:
    data = {key: value for key, value in OCI_IMAGE.items() if key != "mediaType"}
    manifest = parse_manifest(dumps(data), content_type=content_type)
    assert isinstance(manifest, Manifest)
    assert manifest.media_type == expected


@pytest.mark.parametrize(
    "content_type", [OCI_INDEX, f"{OCI_INDEX}; charset=utf-8", f"{DOCKER_MANIFEST_LIST}; q=1"]
)
def test_index_media_type_from_content_type(content_type: str) -> None:
    data = {key: value for key, value in OCI_IMAGE_INDEX.items() if key != "mediaType"}
    index = parse_manifest(dumps(data), content_type=content_type)
    assert isinstance(index, Index)
    assert index.media_type == content_type.split(";")[0].strip()


def test_media_type_from_shape() -> None:
    manifest_data = {key: value for key, value in OCI_IMAGE.items() if key != "mediaType"}
    manifest = parse_manifest(dumps(manifest_data))
    assert isinstance(manifest, Manifest)
    assert manifest.media_type == OCI_MANIFEST
    index_data = {key: value for key, value in OCI_IMAGE_INDEX.items() if key != "mediaType"}
    index = parse_manifest(dumps(index_data))
    assert isinstance(index, Index)
    assert index.media_type == OCI_INDEX
    # A generic Content-Type does not hide the shape.
    index2 = parse_manifest(dumps(index_data), content_type="application/json")
    assert isinstance(index2, Index)


def test_base_media_type() -> None:
    assert base_media_type(None) is None
    assert base_media_type("") is None
    assert base_media_type(" ; charset=utf-8") is None
    assert base_media_type("application/json; charset=utf-8") == "application/json"
    assert base_media_type(" Application/JSON ") == "application/json"


def test_helm_manifest() -> None:
    raw = dumps(HELM)
    manifest = parse_manifest(raw)
    assert isinstance(manifest, Manifest)
    assert manifest.media_type == OCI_MANIFEST
    assert manifest.config is not None
    assert manifest.config.media_type == HELM_CONFIG
    assert manifest.is_image is False
    assert manifest.effective_artifact_type == HELM_CONFIG
    assert [layer.media_type for layer in manifest.layers] == [HELM_CHART, HELM_PROVENANCE]
    assert [layer.title for layer in manifest.layers] == [None, None]
    assert manifest.annotations[ANNOTATION_TITLE] == "mychart"
    assert manifest.digest == Digest.of(raw)


def test_unknown_layer_media_types_carried() -> None:
    data = dict(OCI_IMAGE)
    data["layers"] = [
        desc("application/x.custom+zip", 50, 10, annotations={ANNOTATION_TITLE: "a.zip"}),
        desc("application/vnd.example.thing.v1", 51, 0),
    ]
    manifest = parse_manifest(dumps(data))
    assert isinstance(manifest, Manifest)
    assert [layer.media_type for layer in manifest.layers] == [
        "application/x.custom+zip",
        "application/vnd.example.thing.v1",
    ]
    assert manifest.layers[0].title == "a.zip"
    assert manifest.layers[1].size == 0


def test_unknown_manifest_media_type_with_layers() -> None:
    data = dict(OCI_IMAGE)
    data["mediaType"] = "application/vnd.example.manifest.v9+json"
    manifest = parse_manifest(dumps(data))
    assert isinstance(manifest, Manifest)
    assert manifest.media_type == "application/vnd.example.manifest.v9+json"
    assert len(manifest.layers) == 2


def test_unknown_manifest_media_type_with_manifests_is_index() -> None:
    data = dict(OCI_IMAGE_INDEX)
    data["mediaType"] = "application/vnd.example.index.v9+json"
    index = parse_manifest(dumps(data))
    assert isinstance(index, Index)
    assert index.media_type == "application/vnd.example.index.v9+json"


def test_withdrawn_artifact_manifest_blobs_are_layers() -> None:
    data = {
        "mediaType": OCI_ARTIFACT_MANIFEST,
        "artifactType": "application/x.sig",
        "blobs": [desc("application/x.blob", 60, 3)],
    }
    manifest = parse_manifest(dumps(data))
    assert isinstance(manifest, Manifest)
    assert manifest.media_type == OCI_ARTIFACT_MANIFEST
    assert manifest.config is None
    assert [layer.digest for layer in manifest.layers] == [Digest.parse(d(60))]
    assert manifest.effective_artifact_type == "application/x.sig"


def test_manifest_with_subject_and_artifact_type() -> None:
    data = dict(OCI_IMAGE)
    data["artifactType"] = "application/x.sig"
    data["config"] = EMPTY_DESCRIPTOR.to_dict()
    data["subject"] = desc(OCI_MANIFEST, 70, 700)
    manifest = parse_manifest(dumps(data))
    assert isinstance(manifest, Manifest)
    assert manifest.artifact_type == "application/x.sig"
    assert manifest.effective_artifact_type == "application/x.sig"
    assert manifest.subject is not None and manifest.subject.digest == Digest.parse(d(70))
    assert manifest.is_image is False


def test_effective_artifact_type_empty_config() -> None:
    data = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": EMPTY_DESCRIPTOR.to_dict(),
            "layers": []}
    manifest = parse_manifest(dumps(data))
    assert isinstance(manifest, Manifest)
    assert manifest.effective_artifact_type is None
    assert manifest.layers == ()


def test_manifest_without_config() -> None:
    manifest = parse_manifest(dumps({"mediaType": OCI_MANIFEST, "layers": []}))
    assert isinstance(manifest, Manifest)
    assert manifest.config is None
    assert manifest.is_image is False
    assert manifest.effective_artifact_type is None


@pytest.mark.parametrize("version", [1, 1.0])
def test_schema1_refused(version: Any) -> None:
    data = {
        "schemaVersion": version,
        "name": "library/ubuntu",
        "tag": "latest",
        "architecture": "amd64",
        "fsLayers": [{"blobSum": d(1)}],
        "history": [],
        "signatures": [],
    }
    with pytest.raises(ManifestError, match="schema 1"):
        parse_manifest(dumps(data), content_type="application/vnd.docker.distribution.manifest.v1+prettyjws")


def test_raw_bytes_kept_exactly() -> None:
    # Odd whitespace, key order and escapes: the digest is over these bytes, never re-serialised.
    raw = (
        b'{ "layers" : [ ],\n\t"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        b'"schemaVersion":2, "annotations":{"k":"\\u00e9"} }  \n'
    )
    manifest = parse_manifest(raw)
    assert isinstance(manifest, Manifest)
    assert manifest.raw == raw
    assert manifest.digest == Digest.of(raw)
    assert manifest.digest != Digest.of(encode_json(json.loads(raw)))
    assert manifest.annotations == {"k": "é"}


def test_digest_given_and_matching() -> None:
    raw = dumps(OCI_IMAGE)
    manifest = parse_manifest(raw, digest=Digest.of(raw))
    assert manifest.digest == Digest.of(raw)


def test_digest_mismatch() -> None:
    raw = dumps(OCI_IMAGE)
    with pytest.raises(IntegrityError) as info:
        parse_manifest(raw, digest=Digest.of(raw + b" "))
    assert info.value.errno == errno.EIO


def test_oversize() -> None:
    raw = b" " * (MAX_MANIFEST_SIZE + 1)
    with pytest.raises(ManifestTooLarge) as info:
        parse_manifest(raw)
    assert info.value.errno == errno.EFBIG
    assert isinstance(info.value, ManifestError)


def test_oversize_checked_before_digest() -> None:
    raw = b" " * (MAX_MANIFEST_SIZE + 1)
    with pytest.raises(ManifestTooLarge):
        parse_manifest(raw, digest=Digest.of(b"other"))


def test_exactly_max_size_accepted() -> None:
    body = dumps({"mediaType": OCI_MANIFEST, "layers": []})
    raw = body + b" " * (MAX_MANIFEST_SIZE - len(body))
    assert len(raw) == MAX_MANIFEST_SIZE
    manifest = parse_manifest(raw)
    assert isinstance(manifest, Manifest)
    assert manifest.digest == Digest.of(raw)


# --------------------------------------------------------------------------- malformed input


def _with_layer(layer: Any) -> bytes:
    return dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                  "config": desc(OCI_CONFIG, 1, 2), "layers": [layer]})


BAD_BODIES = [
    b"",
    b"not json",
    b"{",
    b'{"layers": [}',
    b"\xff\xfe\x00garbage",
    b"\x80\x81",
    b"[]",
    b"[1, 2]",
    b'"a string"',
    b"42",
    b"null",
    b"true",
    b"{}",
    b'{"schemaVersion": 2}',
    b'{"mediaType": "application/vnd.oci.image.manifest.v1+json", "layers": null}',
    b'{"mediaType": "application/vnd.oci.image.manifest.v1+json", "layers": {}}',
    b'{"mediaType": "application/vnd.oci.image.index.v1+json", "manifests": "x"}',
    b'{"layers": [], "annotations": []}',
    b'{"layers": [], "annotations": {"a": 1}}',
    b'{"layers": [], "subject": "x"}',
    b'{"layers": [], "config": 5}',
    _with_layer({"mediaType": OCI_LAYER_TAR, "size": 1}),  # missing digest
    _with_layer({"mediaType": OCI_LAYER_TAR, "digest": d(1), "size": -1}),  # negative size
    _with_layer({"mediaType": OCI_LAYER_TAR, "digest": d(1), "size": True}),  # bool size
    _with_layer({"mediaType": OCI_LAYER_TAR, "digest": d(1), "size": 1.5}),
    _with_layer({"mediaType": OCI_LAYER_TAR, "digest": d(1), "size": "1"}),
    _with_layer({"mediaType": OCI_LAYER_TAR, "digest": d(1)}),  # missing size
    _with_layer({"digest": d(1), "size": 1}),  # missing mediaType
    _with_layer({"mediaType": 7, "digest": d(1), "size": 1}),
    _with_layer({"mediaType": OCI_LAYER_TAR, "digest": "sha256:abc", "size": 1}),
    _with_layer({"mediaType": OCI_LAYER_TAR, "digest": 1, "size": 1}),
    _with_layer({"mediaType": OCI_LAYER_TAR, "digest": d(1), "size": 1, "annotations": "x"}),
    _with_layer({"mediaType": OCI_LAYER_TAR, "digest": d(1), "size": 1,
                 "annotations": {"k": None}}),
    _with_layer({"mediaType": OCI_LAYER_TAR, "digest": d(1), "size": 1, "annotations": {"k": ["v"]}}),
    _with_layer("not an object"),
    _with_layer(None),
]


@pytest.mark.parametrize("raw", BAD_BODIES)
def test_malformed_manifest(raw: bytes) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(raw)
    assert type(info.value) is ManifestError
    assert info.value.errno == errno.EIO


def test_bad_config_descriptor() -> None:
    data = dict(OCI_IMAGE)
    data["config"] = {"mediaType": OCI_CONFIG, "digest": d(1), "size": -5}
    with pytest.raises(ManifestError, match="config"):
        parse_manifest(dumps(data))


def test_bad_index_entry() -> None:
    data = dict(OCI_IMAGE_INDEX)
    data["manifests"] = [desc(OCI_MANIFEST, 1, 1), {"mediaType": OCI_MANIFEST, "size": 1}]
    with pytest.raises(ManifestError, match=r"manifests\[1\]"):
        parse_manifest(dumps(data))


def test_deeply_nested_json_is_manifest_error() -> None:
    depth = 100_000  # 200 kB: well below MAX_MANIFEST_SIZE
    with pytest.raises(ManifestError):
        parse_manifest(b"[" * depth + b"]" * depth)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)

_keys = st.sampled_from(
    ["mediaType", "schemaVersion", "config", "layers", "manifests", "blobs", "annotations",
     "subject", "artifactType", "digest", "size", "platform", "os", "architecture"]
)

# JSON shaped like manifests, so that the interesting branches are reached.
manifest_like = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(
        [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_EMPTY, d(1), EMPTY_SHA,
         "sha256:abc", "x"]
    ),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_keys, children, max_size=6),
    max_leaves=30,
)


def _parse_only_expected_errors(raw: bytes, content_type: str | None = None) -> None:
    try:
        result = parse_manifest(raw, content_type=content_type)
    except (ManifestError, IntegrityError):
        return
    assert isinstance(result, (Manifest, Index))
    assert result.raw == raw
    assert result.digest == Digest.of(raw)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes(raw: bytes) -> None:
    _parse_only_expected_errors(raw)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_values, st.sampled_from([None, OCI_MANIFEST, OCI_INDEX, "application/json", "x; y"]))
def test_arbitrary_json(value: Any, content_type: str | None) -> None:
    _parse_only_expected_errors(json.dumps(value).encode(), content_type)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, manifest_like, max_size=7),
       st.sampled_from([None, OCI_MANIFEST, DOCKER_MANIFEST_LIST, "application/json"]))
def test_arbitrary_manifest_shaped_json(value: dict[str, Any], content_type: str | None) -> None:
    _parse_only_expected_errors(json.dumps(value).encode(), content_type)


# --------------------------------------------------------------------------- descriptors


def test_descriptor_from_dict_and_to_dict_round_trip() -> None:
    data = desc(OCI_LAYER_TAR, 80, 42, annotations={ANNOTATION_TITLE: "dir/file.txt"},
                artifactType="application/x.y", urls=["https://example.com/blob"])
    descriptor = Descriptor.from_dict(data)
    assert descriptor.media_type == OCI_LAYER_TAR
    assert descriptor.digest == Digest.parse(d(80))
    assert descriptor.size == 42
    assert descriptor.title == "dir/file.txt"
    assert descriptor.artifact_type == "application/x.y"
    assert descriptor.platform is None
    # Unknown fields (urls) survive.
    assert descriptor.to_dict() == data


def test_descriptor_for_bytes() -> None:
    descriptor = Descriptor.for_bytes(OCI_LAYER_TAR, b"hello", {ANNOTATION_TITLE: "h.txt"})
    assert descriptor.digest == Digest.of(b"hello")
    assert descriptor.size == 5
    assert descriptor.to_dict() == {
        "mediaType": OCI_LAYER_TAR,
        "digest": str(Digest.of(b"hello")),
        "size": 5,
        "annotations": {ANNOTATION_TITLE: "h.txt"},
    }
    assert "annotations" not in Descriptor.for_bytes(OCI_LAYER_TAR, b"x").to_dict()


def test_descriptor_size_zero_allowed() -> None:
    assert Descriptor.from_dict(desc(OCI_LAYER_TAR, 1, 0)).size == 0


@pytest.mark.parametrize(
    "data",
    [
        {"mediaType": OCI_LAYER_TAR, "size": 1},
        {"mediaType": OCI_LAYER_TAR, "digest": d(1), "size": -1},
        {"mediaType": OCI_LAYER_TAR, "digest": d(1), "size": False},
        {"mediaType": OCI_LAYER_TAR, "digest": d(1), "size": 1, "annotations": {"a": 1}},
        {"mediaType": OCI_LAYER_TAR, "digest": d(1), "size": 1, "annotations": [["a", "b"]]},
        [],
        "x",
    ],
)
def test_descriptor_from_dict_invalid(data: Any) -> None:
    with pytest.raises(ManifestError, match=r"^where-it-was"):
        Descriptor.from_dict(data, where="where-it-was")


# --------------------------------------------------------------------------- Platform


def test_platform_from_dict() -> None:
    assert Platform.from_dict({"os": "linux", "architecture": "arm64", "variant": "v8"}) == Platform(
        "linux", "arm64", "v8", None
    )
    windows = Platform.from_dict(
        {"os": "windows", "architecture": "amd64", "os.version": "10.0.20348.1"}
    )
    assert windows is not None
    assert windows.os == "windows"
    assert windows.architecture == "amd64"
    assert windows.variant is None
    assert windows.os_version == "10.0.20348.1"
    # Empty or non-string optional fields become None.
    assert Platform.from_dict(
        {"os": "linux", "architecture": "amd64", "variant": "", "os.version": 3}
    ) == Platform("linux", "amd64")


@pytest.mark.parametrize(
    "data",
    [None, [], "linux/amd64", {}, {"os": "linux"}, {"architecture": "amd64"},
     {"os": 1, "architecture": "amd64"}, {"os": "linux", "architecture": None}],
)
def test_platform_from_dict_invalid(data: Any) -> None:
    assert Platform.from_dict(data) is None


def test_descriptor_with_bad_platform_has_none() -> None:
    descriptor = Descriptor.from_dict(desc(OCI_MANIFEST, 1, 1, platform="linux/amd64"))
    assert descriptor.platform is None


# --------------------------------------------------------------------------- empty descriptor


def test_empty_descriptor_constants() -> None:
    assert str(EMPTY_DIGEST) == EMPTY_SHA
    assert EMPTY_DESCRIPTOR.media_type == OCI_EMPTY == "application/vnd.oci.empty.v1+json"
    assert EMPTY_DESCRIPTOR.size == 2
    assert EMPTY_DESCRIPTOR.digest == Digest.parse(EMPTY_SHA)
    assert EMPTY_DESCRIPTOR.to_dict() == {"mediaType": OCI_EMPTY, "digest": EMPTY_SHA, "size": 2}


def test_is_empty_descriptor() -> None:
    assert is_empty_descriptor(EMPTY_DESCRIPTOR) is True
    # oras-py's config: another media type over the same `{}`.
    assert is_empty_descriptor(Descriptor.for_bytes(UNKNOWN_CONFIG, b"{}")) is True
    assert is_empty_descriptor(Descriptor.from_dict(
        {"mediaType": UNKNOWN_CONFIG, "digest": EMPTY_SHA, "size": 2})) is True
    assert is_empty_descriptor(Descriptor.for_bytes(OCI_EMPTY, b"[]")) is False
    assert is_empty_descriptor(Descriptor.for_bytes(OCI_LAYER_TAR, b"")) is False
    assert is_empty_descriptor(Descriptor(OCI_EMPTY, EMPTY_DIGEST, 3)) is False
    assert is_empty_descriptor(Descriptor(OCI_EMPTY, Digest.of(b"{ }"), 2)) is False


# --------------------------------------------------------------------------- is_image


@pytest.mark.parametrize(
    ("config_type", "expected"),
    [(OCI_CONFIG, True), (DOCKER_CONFIG, True), (HELM_CONFIG, False), (OCI_EMPTY, False),
     (UNKNOWN_CONFIG, False), ("application/vnd.oci.image.config.v1+json+x", False)],
)
def test_is_image(config_type: str, expected: bool) -> None:
    data = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": desc(config_type, 1, 2),
            "layers": []}
    manifest = parse_manifest(dumps(data))
    assert isinstance(manifest, Manifest)
    assert manifest.is_image is expected


# --------------------------------------------------------------------------- build / replace


def test_build_manifest_oras_layout() -> None:
    layer = Descriptor.for_bytes(OCI_LAYER_TAR, b"hello", {ANNOTATION_TITLE: "hello.txt"})
    raw = build_manifest([layer])
    data = json.loads(raw)
    assert data == {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.unknown.artifact.v1",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": EMPTY_SHA, "size": 2},
        "layers": [{"mediaType": OCI_LAYER_TAR, "digest": str(Digest.of(b"hello")), "size": 5,
                    "annotations": {ANNOTATION_TITLE: "hello.txt"}}],
    }
    assert list(data) == ["schemaVersion", "mediaType", "artifactType", "config", "layers"]
    assert raw == encode_json(data)  # compact, like Go
    assert b" " not in raw

    manifest = parse_manifest(raw, digest=Digest.of(raw))
    assert isinstance(manifest, Manifest)
    assert manifest.raw == raw
    assert manifest.media_type == OCI_MANIFEST
    assert manifest.artifact_type == UNKNOWN_ARTIFACT
    assert manifest.config == EMPTY_DESCRIPTOR
    assert manifest.config is not None and is_empty_descriptor(manifest.config)
    assert manifest.layers == (layer,)
    assert manifest.layers[0].title == "hello.txt"
    assert manifest.effective_artifact_type == UNKNOWN_ARTIFACT


def test_build_manifest_no_layers_gets_one_empty_descriptor() -> None:
    raw = build_manifest([])
    data = json.loads(raw)
    assert data["layers"] == [{"mediaType": OCI_EMPTY, "digest": EMPTY_SHA, "size": 2}]
    manifest = parse_manifest(raw)
    assert isinstance(manifest, Manifest)
    assert len(manifest.layers) == 1
    assert is_empty_descriptor(manifest.layers[0])


def test_build_manifest_options() -> None:
    config = Descriptor.for_bytes(HELM_CONFIG, b'{"name":"c","version":"1"}')
    subject = Descriptor.from_dict(desc(OCI_MANIFEST, 90, 900))
    layer = Descriptor.for_bytes(HELM_CHART, b"tgz")
    raw = build_manifest(
        [layer],
        config=config,
        artifact_type=None,
        annotations={ANNOTATION_CREATED: "2024-01-01T00:00:00Z", "x": "é"},
        subject=subject,
    )
    data = json.loads(raw)
    assert "artifactType" not in data
    assert data["config"] == config.to_dict()
    assert data["subject"] == {"mediaType": OCI_MANIFEST, "digest": d(90), "size": 900}
    assert data["annotations"] == {ANNOTATION_CREATED: "2024-01-01T00:00:00Z", "x": "é"}
    assert "é".encode() in raw  # not \u-escaped, as Go writes it
    manifest = parse_manifest(raw)
    assert isinstance(manifest, Manifest)
    assert manifest.config == config
    assert manifest.subject == subject
    assert manifest.annotations[ANNOTATION_CREATED] == "2024-01-01T00:00:00Z"
    assert manifest.effective_artifact_type == HELM_CONFIG


def test_replace_layers_keeps_everything_else() -> None:
    original = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/x.custom",
        "config": desc(HELM_CONFIG, 1, 10, annotations={"c": "d"}),
        "layers": [desc(OCI_LAYER_TAR, 2, 3)],
        "annotations": {"a": "b"},
        "subject": desc(OCI_MANIFEST, 3, 4),
        "x-unknown": {"nested": [1, 2, 3]},
    }
    manifest = parse_manifest(dumps(original))
    assert isinstance(manifest, Manifest)
    new_layer = Descriptor.for_bytes(OCI_LAYER_TAR, b"new", {ANNOTATION_TITLE: "n"})
    raw = replace_layers(manifest, [new_layer])
    data = json.loads(raw)
    expected = dict(original)
    expected["layers"] = [new_layer.to_dict()]
    assert data == expected
    reparsed = parse_manifest(raw)
    assert isinstance(reparsed, Manifest)
    assert reparsed.media_type == OCI_MANIFEST
    assert reparsed.artifact_type == "application/x.custom"
    assert reparsed.config == manifest.config
    assert reparsed.annotations == {"a": "b"}
    assert reparsed.subject == manifest.subject
    assert reparsed.layers == (new_layer,)
    assert reparsed.digest != manifest.digest


def test_replace_layers_docker_manifest_keeps_media_type() -> None:
    manifest = parse_manifest(dumps(DOCKER_V2))
    assert isinstance(manifest, Manifest)
    raw = replace_layers(manifest, [])
    data = json.loads(raw)
    assert data["mediaType"] == DOCKER_MANIFEST
    assert data["config"] == DOCKER_V2["config"]
    assert data["layers"] == [EMPTY_DESCRIPTOR.to_dict()]


def test_replace_layers_without_media_type_keeps_it_absent() -> None:
    manifest = parse_manifest(dumps(HELM))
    assert isinstance(manifest, Manifest)
    layer = Descriptor.for_bytes(HELM_CHART, b"chart")
    data = json.loads(replace_layers(manifest, [layer]))
    assert "mediaType" not in data
    assert data["config"] == HELM["config"]
    assert data["annotations"] == HELM["annotations"]
    assert data["layers"] == [layer.to_dict()]


def test_replace_layers_keeps_descriptor_unknown_fields() -> None:
    manifest = parse_manifest(dumps(OCI_IMAGE))
    assert isinstance(manifest, Manifest)
    kept = Descriptor.from_dict(desc(OCI_LAYER_TAR, 9, 9, urls=["https://x/y"]))
    data = json.loads(replace_layers(manifest, [*manifest.layers, kept]))
    assert data["layers"][:2] == OCI_IMAGE["layers"]
    assert data["layers"][2]["urls"] == ["https://x/y"]


# --------------------------------------------------------------------------- constants, errors


def test_manifest_accept_has_all_four() -> None:
    assert set(MANIFEST_ACCEPT) == {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
    assert len(MANIFEST_ACCEPT) == 4


@pytest.mark.parametrize(
    ("cls", "expected", "parent"),
    [
        (errors.OcifsError, errno.EIO, Exception),
        (errors.InvalidReference, errno.EINVAL, errors.OcifsError),
        (errors.IntegrityError, errno.EIO, errors.OcifsError),
        (errors.ManifestError, errno.EIO, errors.OcifsError),
        (errors.ManifestTooLarge, errno.EFBIG, errors.ManifestError),
        (errors.AuthError, errno.EACCES, errors.OcifsError),
        (errors.NetworkError, errno.EHOSTUNREACH, errors.OcifsError),
        (errors.RequestTimeout, errno.ETIMEDOUT, errors.NetworkError),
        (errors.RegistryError, errno.EIO, errors.OcifsError),
        (errors.NotFound, errno.ENOENT, errors.RegistryError),
        (errors.Unauthorized, errno.EACCES, errors.RegistryError),
        (errors.Denied, errno.EACCES, errors.RegistryError),
        (errors.Unsupported, errno.EPERM, errors.RegistryError),
        (errors.TooManyRequests, errno.EAGAIN, errors.RegistryError),
        (errors.RangeError, errno.EIO, errors.RegistryError),
        (errors.ServerError, errno.EIO, errors.RegistryError),
    ],
)
def test_error_errnos(cls: type[errors.OcifsError], expected: int, parent: type) -> None:
    assert issubclass(cls, parent)
    assert cls.errno == expected
    error = cls("boom")
    assert error.errno == expected
    assert error.message == "boom"
    assert str(error) == "boom"


def test_registry_error_details() -> None:
    detail = errors.ErrorDetail("MANIFEST_UNKNOWN", "manifest unknown")
    error = errors.NotFound("missing", status=404, details=(detail, errors.ErrorDetail("X")))
    assert error.status == 404
    assert error.code == "MANIFEST_UNKNOWN"
    assert error.details[1].message == ""
    assert errors.RegistryError("x").code is None
    assert errors.RegistryError("x").status is None
