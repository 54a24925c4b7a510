"""Names of AI model layers without I/O (issue 12): `ocifs.layout.build_layout` with the
media-type table `KNOWN_TYPES` and the `org.cncf.model.filepath` annotation, for Docker's
model layout, ModelPack and Ollama. Manifests are laid out as the specs' examples lay them
out (docker/model-spec spec.md, modelpack/model-spec docs/spec.md, a real Ollama manifest)."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocifs.digest import Digest
from ocifs.layout import (
    ANNOTATION_MODEL_FILEPATH_LEGACY,
    DOCKER_AI_MODEL_FILE,
    KNOWN_TYPES,
    NAME_MAX,
    RESERVED_NAMES,
    Layout,
    build_layout,
    digest_name,
    is_gguf,
    is_ollama_model,
    known_type,
)
from ocifs.model import (
    ANNOTATION_MODEL_FILEPATH,
    ANNOTATION_TITLE,
    DOCKER_AI_CHAT_TEMPLATE,
    DOCKER_AI_DDUF,
    DOCKER_AI_DIR_TAR,
    DOCKER_AI_GGUF,
    DOCKER_AI_GGUF_LORA,
    DOCKER_AI_GGUF_MMPROJ,
    DOCKER_AI_LICENSE,
    DOCKER_AI_MMPROJ,
    DOCKER_AI_SAFETENSORS,
    DOCKER_AI_VLLM_CONFIG_TAR,
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    DOCKER_MODEL_CONFIG,
    OCI_LAYER_TAR,
    OCI_LAYER_TAR_GZIP,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    parse_manifest,
)

MP = "application/vnd.cncf.model."
OLLAMA = "application/vnd.ollama.image."


def blob(media_type: str, data: bytes, filepath: str | None = None, title: str | None = None,
         **annotations: str) -> dict[str, Any]:
    item: dict[str, Any] = {"mediaType": media_type, "digest": str(Digest.of(data)), "size": len(data)}
    notes = dict(annotations)
    if filepath is not None:
        notes[ANNOTATION_MODEL_FILEPATH] = filepath
    if title is not None:
        notes[ANNOTATION_TITLE] = title
    if notes:
        item["annotations"] = notes
    return item


def model_manifest(layers: Sequence[dict[str, Any]], config: str = DOCKER_MODEL_CONFIG,
                   media_type: str = OCI_MANIFEST) -> Manifest:
    raw = json.dumps({"schemaVersion": 2, "mediaType": media_type,
                      "config": {"mediaType": config, "digest": str(Digest.of(b"{}")), "size": 2},
                      "layers": list(layers)}).encode()
    parsed = parse_manifest(raw)
    assert isinstance(parsed, Manifest)
    return parsed


def names(layout: Layout) -> dict[str, bytes | str]:
    """Each listed path (`a/b`) -> which layer it is, by the data the test made it from."""
    return {"/".join(path): descriptor.digest.hex[:12] for path, descriptor in layout.files.items()}


def h(data: bytes) -> str:
    return Digest.of(data).hex[:12]


def dn(data: bytes, media_type: str) -> str:
    return digest_name(Descriptor(media_type, Digest.of(data), len(data)))


# ---- Docker ---------------------------------------------------------------------------------------


def test_a_docker_gguf_model_as_the_spec_example_plus_a_template() -> None:
    """docker/model-spec's example (one GGUF, one license) and a chat template: the names
    `docker model` unpacks them as; each digest name still reaches its layer, unlisted."""
    layout = build_layout(model_manifest([blob(DOCKER_AI_GGUF, b"weights"), blob(DOCKER_AI_LICENSE, b"MIT"),
                                          blob(DOCKER_AI_CHAT_TEMPLATE, b"{{ messages }}")]))
    assert names(layout) == {"model.gguf": h(b"weights"), "LICENSE": h(b"MIT"),
                             "template.jinja": h(b"{{ messages }}")}
    assert layout.aliases == {(dn(b"weights", DOCKER_AI_GGUF),): ("model.gguf",),
                              (dn(b"MIT", DOCKER_AI_LICENSE),): ("LICENSE",),
                              (dn(b"{{ messages }}", DOCKER_AI_CHAT_TEMPLATE),): ("template.jinja",)}
    assert layout.packed == frozenset() and layout.dirs == frozenset()


def test_shards_licenses_and_projectors_are_numbered_in_manifest_order() -> None:
    layout = build_layout(model_manifest([
        blob(DOCKER_AI_LICENSE, b"license one"),
        blob(DOCKER_AI_GGUF, b"shard 1"), blob(DOCKER_AI_GGUF, b"shard 2"),
        blob(DOCKER_AI_MMPROJ, b"projector"),
        blob(DOCKER_AI_GGUF, b"shard 3"),
        blob(DOCKER_AI_LICENSE, b"license two"), blob(DOCKER_AI_LICENSE, b"license three"),
    ]))
    assert names(layout) == {
        "model-00001-of-00003.gguf": h(b"shard 1"), "model-00002-of-00003.gguf": h(b"shard 2"),
        "model-00003-of-00003.gguf": h(b"shard 3"), "mmproj.gguf": h(b"projector"),
        "LICENSE": h(b"license one"), "LICENSE-2": h(b"license two"), "LICENSE-3": h(b"license three"),
    }


@pytest.mark.parametrize(("media_type", "name"), [
    (DOCKER_AI_GGUF, "model.gguf"),
    (DOCKER_AI_GGUF_MMPROJ, "mmproj.gguf"),
    (DOCKER_AI_MMPROJ, "mmproj.gguf"),
    (DOCKER_AI_GGUF_LORA, "adapter.gguf"),
    (DOCKER_AI_LICENSE, "LICENSE"),
    (DOCKER_AI_CHAT_TEMPLATE, "template.jinja"),
    (DOCKER_AI_SAFETENSORS, "model.safetensors"),
    (DOCKER_AI_DDUF, "model.dduf"),
    (OLLAMA + "model", "model.gguf"),
    (OLLAMA + "projector", "mmproj.gguf"),
    (OLLAMA + "adapter", "adapter.gguf"),
    (OLLAMA + "license", "LICENSE"),
    (OLLAMA + "template", "template"),
    (OLLAMA + "template; name=tools", "template"),  # parameters do not matter
    (OLLAMA + "system", "system"),
    (OLLAMA + "params", "params.json"),
    (OLLAMA + "messages", "messages.json"),
    ("APPLICATION/VND.DOCKER.AI.GGUF.V3", "model.gguf"),  # media types are case-insensitive
])
def test_the_table(media_type: str, name: str) -> None:
    assert names(build_layout(model_manifest([blob(media_type, b"x")]))) == {name: h(b"x")}


@pytest.mark.parametrize("media_type", [
    DOCKER_AI_MODEL_FILE, MP + "weight.v1.raw", MP + "doc.v1.raw", OLLAMA + "tensor; name=x",
    "application/vnd.docker.ai.something.new", "application/octet-stream",
])
def test_types_without_a_name_of_their_own_are_named_by_digest(media_type: str) -> None:
    layout = build_layout(model_manifest([blob(media_type, b"x")]))
    assert names(layout) == {dn(b"x", media_type): h(b"x")} and layout.aliases == {}


def test_two_projector_types_share_one_name() -> None:
    layout = build_layout(model_manifest([blob(DOCKER_AI_GGUF_MMPROJ, b"a"), blob(DOCKER_AI_MMPROJ, b"b"),
                                          blob(DOCKER_AI_GGUF_LORA, b"c"), blob(DOCKER_AI_GGUF_LORA, b"d"),
                                          blob(DOCKER_AI_CHAT_TEMPLATE, b"e"), blob(DOCKER_AI_CHAT_TEMPLATE, b"f")]))
    assert names(layout) == {"mmproj.gguf": h(b"a"), "mmproj-2.gguf": h(b"b"), "adapter.gguf": h(b"c"),
                             "adapter-2.gguf": h(b"d"), "template.jinja": h(b"e"), "template-2.jinja": h(b"f")}


def test_safetensors_by_filepath_else_by_type() -> None:
    """Docker's newer packaging annotates each file with its path (nested ones make directories);
    older models have none: `model.safetensors`, or shards as `docker model` names them."""
    annotated = build_layout(model_manifest([
        blob(DOCKER_AI_SAFETENSORS, b"s1", "model-00001-of-00002.safetensors"),
        blob(DOCKER_AI_SAFETENSORS, b"s2", "model-00002-of-00002.safetensors"),
        blob(DOCKER_AI_SAFETENSORS, b"te", "text_encoder/model.safetensors"),
        blob(DOCKER_AI_MODEL_FILE, b"{}", "config.json"),
    ], config="application/vnd.docker.ai.model.config.v0.2+json"))
    assert names(annotated) == {"model-00001-of-00002.safetensors": h(b"s1"),
                                "model-00002-of-00002.safetensors": h(b"s2"),
                                "text_encoder/model.safetensors": h(b"te"), "config.json": h(b"{}")}
    assert annotated.dirs == frozenset({("text_encoder",)})
    assert annotated.aliases[(dn(b"te", DOCKER_AI_SAFETENSORS),)] == ("text_encoder", "model.safetensors")
    bare = build_layout(model_manifest([blob(DOCKER_AI_SAFETENSORS, b"s1"), blob(DOCKER_AI_SAFETENSORS, b"s2")]))
    assert names(bare) == {"model-00001-of-00002.safetensors": h(b"s1"),
                           "model-00002-of-00002.safetensors": h(b"s2")}
    single = build_layout(model_manifest([blob(DOCKER_AI_SAFETENSORS, b"s1")]))
    assert names(single) == {"model.safetensors": h(b"s1")}


def test_the_filepath_comes_before_the_table_and_the_title_before_both() -> None:
    """`docker model package` sets the filepath to the file's base name: that is the name."""
    layout = build_layout(model_manifest([
        blob(DOCKER_AI_GGUF, b"w", "SmolLM2-360M-Q4_K_M.gguf"),
        blob(DOCKER_AI_LICENSE, b"l", "LICENSE.txt", title="COPYING"),
    ]))
    assert names(layout) == {"SmolLM2-360M-Q4_K_M.gguf": h(b"w"), "COPYING": h(b"l")}
    # a titled layer is never named by its digest alias: as before issue 12
    assert set(layout.aliases) == {(dn(b"w", DOCKER_AI_GGUF),)}


@pytest.mark.parametrize("order", ["titled first", "titled last"])
def test_a_title_wins_over_a_name_the_table_made_up(order: str) -> None:
    titled = blob("text/plain", b"notes", title="model.gguf")
    typed = blob(DOCKER_AI_GGUF, b"weights")
    layout = build_layout(model_manifest([titled, typed] if order == "titled first" else [typed, titled]))
    assert names(layout) == {"model.gguf": h(b"notes"), dn(b"weights", DOCKER_AI_GGUF): h(b"weights")}
    assert layout.aliases == {}  # the digest name is listed: no alias needed


def test_clashing_filepaths_fall_back_to_digest_names() -> None:
    """The first layer keeps the name; a later one with the same filepath (or one the filepath
    makes a directory of) is named by its digest; and so is a shard whose table name a
    filepath took."""
    layout = build_layout(model_manifest([
        blob(MP + "doc.v1.raw", b"a", "README.md"),
        blob(MP + "doc.v1.raw", b"b", "README.md"),
        blob(MP + "weight.v1.raw", b"c", "sub"),
        blob(MP + "weight.v1.raw", b"d", "sub/x"),
        blob(DOCKER_AI_GGUF, b"e", "model-00001-of-00002.gguf"),
        blob(DOCKER_AI_GGUF, b"f"), blob(DOCKER_AI_GGUF, b"g"),
    ]))
    assert names(layout) == {"README.md": h(b"a"), dn(b"b", MP + "doc.v1.raw"): h(b"b"),
                             "sub": h(b"c"), dn(b"d", MP + "weight.v1.raw"): h(b"d"),
                             "model-00001-of-00002.gguf": h(b"e"), dn(b"f", DOCKER_AI_GGUF): h(b"f"),
                             "model-00002-of-00002.gguf": h(b"g")}


@pytest.mark.parametrize("filepath", [
    "../x", "/etc/passwd", "a/../../b", "a//b", "", ".", "new\nline", "tab\t", "bidi\u202etxt",
    ".manifest.json", ".config.json", ".ocifs/status", ".referrers", "x" * (NAME_MAX + 1), "bad\ud800",
])
def test_unsafe_filepaths_are_not_used(filepath: str) -> None:
    """The title rules: such a layer falls to its media type's name, else its digest name."""
    layout = build_layout(model_manifest([blob(MP + "weight.v1.raw", b"w", filepath),
                                          blob(DOCKER_AI_GGUF, b"g", filepath)]))
    assert names(layout) == {dn(b"w", MP + "weight.v1.raw"): h(b"w"), "model.gguf": h(b"g")}


def test_a_filepath_spelled_like_a_digest_name_is_not_used() -> None:
    other = Digest.of(b"someone else")
    layout = build_layout(model_manifest([blob(MP + "weight.v1.raw", b"w", other.filename),
                                          blob(DOCKER_AI_LICENSE, b"l", other.filename + "/LICENSE")]))
    assert names(layout) == {dn(b"w", MP + "weight.v1.raw"): h(b"w"), dn(b"l", DOCKER_AI_LICENSE): h(b"l")}


def test_directory_archives_are_packed_directories() -> None:
    """`dir.tar` by its filepath (an archive extension dropped: its raw tar keeps it); the
    vLLM config archive as `config/` (raw `config.tar`); a dir.tar without a filepath stays a
    file under its digest name, as a packed directory needs a name."""
    layout = build_layout(model_manifest([
        blob(DOCKER_AI_SAFETENSORS, b"w"),
        blob(DOCKER_AI_DIR_TAR, b"dir", "text_encoder.tar"),
        blob(DOCKER_AI_DIR_TAR, b"dir2", "tokenizer"),
        blob(DOCKER_AI_VLLM_CONFIG_TAR, b"vllm"),
        blob(DOCKER_AI_DIR_TAR, b"nameless"),
        blob(DOCKER_AI_DIR_TAR, b"only an extension", ".tar"),
    ]))
    assert names(layout) == {"model.safetensors": h(b"w"), "text_encoder": h(b"dir"), "tokenizer": h(b"dir2"),
                             "config": h(b"vllm"), dn(b"nameless", DOCKER_AI_DIR_TAR): h(b"nameless"),
                             dn(b"only an extension", DOCKER_AI_DIR_TAR): h(b"only an extension")}
    assert layout.packed == frozenset({("text_encoder",), ("tokenizer",), ("config",)})
    assert layout.aliases[("text_encoder.tar",)] == ("text_encoder",)
    assert layout.aliases[("config.tar",)] == ("config",)
    assert layout.aliases[(dn(b"dir", DOCKER_AI_DIR_TAR),)] == ("text_encoder",)
    assert dn(b"nameless", DOCKER_AI_DIR_TAR).endswith(".tar")


# ---- ModelPack ------------------------------------------------------------------------------------


def test_a_modelpack_model_by_filepath() -> None:
    """modctl's default layers (`.raw`, one file each) by their filepath, nested ones in
    directories; tar layers are packed directories unless the filepath ends like an archive."""
    layout = build_layout(model_manifest([
        blob(MP + "weight.v1.raw", b"w1", "model-00001-of-00002.safetensors"),
        blob(MP + "weight.v1.raw", b"w2", "model-00002-of-00002.safetensors"),
        blob(MP + "weight.config.v1.raw", b"c", "config.json"),
        blob(MP + "doc.v1.raw", b"d", "docs/README.md"),
        blob(MP + "code.v1.tar", b"code", "src/utils"),
        blob(MP + "dataset.v1.tar+gzip", b"data", "data"),
        blob(MP + "dataset.v1.tar+zstd", b"zdata", "zdata"),
        blob(MP + "weight.v1.tar", b"archived", "weights.tar"),
    ], config="application/vnd.cncf.model.config.v1+json"))
    assert names(layout) == {"model-00001-of-00002.safetensors": h(b"w1"),
                             "model-00002-of-00002.safetensors": h(b"w2"), "config.json": h(b"c"),
                             "docs/README.md": h(b"d"), "src/utils": h(b"code"), "data": h(b"data"),
                             "zdata": h(b"zdata"), "weights.tar": h(b"archived")}
    assert layout.packed == frozenset({("src", "utils"), ("data",), ("zdata",)})
    assert layout.aliases[("src", "utils.tar")] == ("src", "utils")
    assert layout.aliases[("data.tar.gz",)] == ("data",)
    assert layout.aliases[("zdata.tar.zst",)] == ("zdata",)
    assert ("weights.tar.tar",) not in layout.aliases


def test_the_spec_example_without_filepaths_is_named_by_digest() -> None:
    """modelpack/model-spec's example manifest carries no annotations: nothing names its layers."""
    layers = [blob(MP + "weight.v1.tar", b"a"), blob(MP + "weight.v1.tar", b"b"),
              blob(MP + "weight.config.v1.tar", b"c"), blob(MP + "doc.v1.tar", b"d")]
    layout = build_layout(model_manifest(layers, config="application/vnd.cncf.model.config.v1+json"))
    assert set(names(layout)) == {dn(data, MP + "weight.v1.tar") for data in (b"a", b"b")} | \
        {dn(b"c", MP + "weight.config.v1.tar"), dn(b"d", MP + "doc.v1.tar")}
    assert layout.packed == frozenset()


def test_modctls_older_annotation_and_media_types() -> None:
    old = "application/vnd.cnai.model."
    layout = build_layout(model_manifest([
        blob(old + "weight.v1.raw", b"w", **{ANNOTATION_MODEL_FILEPATH_LEGACY: "model.safetensors"}),
        blob(old + "code.v1.tar", b"c", **{ANNOTATION_MODEL_FILEPATH_LEGACY: "code"}),
    ]))
    assert names(layout) == {"model.safetensors": h(b"w"), "code": h(b"c")}
    assert layout.packed == frozenset({("code",)})


# ---- Ollama -----------------------------------------------------------------------------------------


def test_an_ollama_manifest() -> None:
    """Shaped like registry.ollama.ai's: a Docker v2 manifest with an image config."""
    manifest = model_manifest([
        blob(OLLAMA + "model", b"gguf"), blob(OLLAMA + "projector", b"proj"),
        blob(OLLAMA + "template", b"tmpl"), blob(OLLAMA + "system", b"sys"),
        blob(OLLAMA + "license", b"l1"), blob(OLLAMA + "license", b"l2"),
        blob(OLLAMA + "params", b"{}"),
    ], config=DOCKER_CONFIG, media_type=DOCKER_MANIFEST)
    assert manifest.is_image and is_ollama_model(manifest)
    assert names(build_layout(manifest)) == {
        "model.gguf": h(b"gguf"), "mmproj.gguf": h(b"proj"), "template": h(b"tmpl"), "system": h(b"sys"),
        "LICENSE": h(b"l1"), "LICENSE-2": h(b"l2"), "params.json": h(b"{}")}
    image = model_manifest([blob(OCI_LAYER_TAR_GZIP, b"rootfs")], config=DOCKER_CONFIG, media_type=DOCKER_MANIFEST)
    assert not is_ollama_model(image)


# ---- what is GGUF --------------------------------------------------------------------------------


@pytest.mark.parametrize(("media_type", "name", "expected"), [
    (DOCKER_AI_GGUF, "model-00001-of-00002.gguf", True),
    (DOCKER_AI_GGUF, "sha256-abc", True),  # the digest alias of a GGUF layer
    (DOCKER_AI_MMPROJ, "x", True),
    (DOCKER_AI_GGUF_MMPROJ, "x", True),
    (DOCKER_AI_GGUF_LORA, "x", True),
    (OLLAMA + "model", "model.gguf", True),
    (OLLAMA + "projector", "x", True),
    (OLLAMA + "adapter", "x", True),
    (MP + "weight.v1.raw", "Qwen3-0.6B-Q8_0.GGUF", True),  # by name
    (OCI_LAYER_TAR, "model.gguf", True),
    (DOCKER_AI_SAFETENSORS, "model.safetensors", False),
    (DOCKER_AI_LICENSE, "LICENSE", False),
    (OLLAMA + "template", "template", False),
    (OCI_LAYER_TAR, "model.gguf.txt", False),
])
def test_is_gguf(media_type: str, name: str, expected: bool) -> None:
    assert is_gguf(Descriptor(media_type, Digest.of(b"x"), 1), name) is expected


def test_the_table_is_consistent() -> None:
    """Every entry is a lower-case media type without parameters; names are safe file names;
    only GGUF types are GGUF; shard names are numbered by `docker model`'s pattern."""
    for media_type, known in KNOWN_TYPES.items():
        assert media_type == media_type.lower() and ";" not in media_type
        assert known_type(Descriptor(media_type, Digest.of(b"x"), 1)) is known
        if known.name is not None:
            assert "/" not in known.name and known.name not in RESERVED_NAMES
        assert known.gguf == (known.name is not None and known.name.endswith(".gguf"))


# ---- the property: nothing unsafe, nothing hidden, aliases point where they should -------------------

MODEL_TYPES = [DOCKER_AI_GGUF, DOCKER_AI_LICENSE, DOCKER_AI_SAFETENSORS, DOCKER_AI_DIR_TAR,
               DOCKER_AI_VLLM_CONFIG_TAR, MP + "weight.v1.raw", MP + "code.v1.tar+gzip", OLLAMA + "model",
               OCI_LAYER_TAR_GZIP, "text/plain"]
NAMES = [None, "model.gguf", "LICENSE", "LICENSE-2", "config", "config.tar", "a", "a/b", "a/b.tar", "../x",
         "/abs", "", ".manifest.json", "x.tar.gz", "model-00001-of-00002.gguf", "nul\0", "é" * 128]


@st.composite
def model_layers(draw: st.DrawFn) -> dict[str, Any]:
    data = draw(st.sampled_from([b"1", b"2", b"3", b"4"]))
    media_type = draw(st.sampled_from(MODEL_TYPES))
    filepath = draw(st.sampled_from(NAMES))
    title = draw(st.sampled_from(NAMES))
    if title is None and draw(st.booleans()):  # a name spelled like some layer's digest name
        title = dn(draw(st.sampled_from([b"1", b"2"])), draw(st.sampled_from(MODEL_TYPES)))
    return blob(media_type, data, filepath, title)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(model_layers(), max_size=8))
def test_every_model_name_is_safe_and_every_layer_reachable(layers: list[dict[str, Any]]) -> None:
    layout = build_layout(model_manifest(layers))
    for path in layout.files:
        assert all(part not in ("", ".", "..") and "/" not in part and "\0" not in part
                   and len(part.encode("utf-8", "surrogatepass")) <= NAME_MAX for part in path), path
        assert path[0] not in RESERVED_NAMES
        assert posixpath.normpath(posixpath.join("/tag", *path)).startswith("/tag/")
        assert path not in layout.dirs
    assert layout.packed <= set(layout.files)
    for alias, target in layout.aliases.items():
        assert target in layout.files
        if alias[0].startswith("sha256-") and len(alias) == 1:
            assert alias[0] == digest_name(layout.files[target])  # a digest name names its own digest
    listed = {descriptor.digest for descriptor in layout.files.values()}
    assert listed == {Digest.parse(item["digest"]) for item in layers}
