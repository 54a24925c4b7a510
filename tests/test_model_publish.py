"""Publishing a model by copying (issue 12): GGUF files written by llama.cpp's own `gguf`
package, copied into a tag whose artifact type is Docker's model config type through a real
mount, land in the real registry as `docker model package --push` lays them out; the config
is checked against what llama.cpp's GGUFReader says of the file, and follows every change."""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter, LlamaFileType

from ocifs.digest import Digest
from ocifs.errors import NotFound, Refused
from ocifs.gguf import read_header
from ocifs.metadata import Metadata
from ocifs.model import (
    ANNOTATION_MODEL_FILEPATH,
    ANNOTATION_TITLE,
    DOCKER_AI_CHAT_TEMPLATE,
    DOCKER_AI_DDUF,
    DOCKER_AI_GGUF,
    DOCKER_AI_LICENSE,
    DOCKER_AI_MMPROJ,
    DOCKER_AI_SAFETENSORS,
    DOCKER_MODEL_CONFIG,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    encode_json,
)
from ocifs.reference import Source
from ocifs.registry import RegistryClient
from ocifs.store import BlobStore
from ocifs.write.dockermodel import (
    ANNOTATION_FILE_METADATA,
    config_document,
    config_fields,
    docker_bytes,
    docker_count,
    encode_go_json,
    media_type_for,
    ordered_weights,
    rfc3339_nano,
)
from ocifs.write.edits import TagEditor, put_change

from .conftest import Mounter, make_client
from .content import push_blob, push_layers
from .helpers import errno_of, manifest_of, run
from .models import write_gguf, write_safetensors
from .registry_server import RunningRegistry

MODEL_CONFIG_V02 = "application/vnd.docker.ai.model.config.v0.2+json"
LICENSE_TEXT = b"Apache License\nVersion 2.0, January 2004\n"


def config_of(client: RegistryClient, repo: str, manifest: Manifest) -> dict[str, Any]:
    assert manifest.config is not None
    data = json.loads(b"".join(client.fetch_blob(repo, manifest.config.digest, manifest.config.size)))
    assert isinstance(data, dict)
    return data


def expected_fields(path: Path) -> dict[str, Any]:
    """What the config should say of a GGUF file, from llama.cpp's reader (not from ocifs):
    its metadata as strings, long arrays (the vocabulary) left out as Docker does."""
    reader = GGUFReader(path)
    values = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    architecture = values["general.architecture"]
    return {
        "format": "gguf",
        "quantization": LlamaFileType(values["general.file_type"]).name.removeprefix("MOSTLY_"),
        "parameters": docker_count(sum(int(tensor.n_elements) for tensor in reader.tensors)),
        "architecture": architecture,
        "size": docker_bytes(path.stat().st_size - reader.data_offset),
        "gguf": {name: str(value) for name, value in sorted(values.items())
                 if not isinstance(value, list) or len(value) <= 50},
        "context_size": values[f"{architecture}.context_length"],
    }


def split_gguf(directory: Path) -> list[Path]:
    """A model split by llama.cpp's writer into two shards (one tensor each): only the first
    holds the model's metadata, both hold split.*; the shards, in order."""
    source = directory / "split"
    source.mkdir()
    writer = GGUFWriter(source / "m.gguf", "llama", split_max_tensors=1)
    writer.add_name("split model")
    writer.add_context_length(4096)
    writer.add_file_type(int(LlamaFileType.MOSTLY_F16))
    writer.add_tensor("a", np.zeros((32, 32), dtype=np.float16))
    writer.add_tensor("b", np.ones((32, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shards = sorted(source.iterdir())
    assert [p.name for p in shards] == ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
    return shards


def header_of(path: Path) -> Any:
    data = path.read_bytes()
    return read_header(lambda offset, size: data[offset:offset + size], len(data))


# ---- the rules, without a mount ---------------------------------------------------------------


def test_config_builder_says_what_llama_cpps_reader_says(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    write_gguf(model, arch="qwen2", name="Tiny Qwen", file_type=LlamaFileType.MOSTLY_Q8_0, context_length=32768)
    layer = Descriptor(DOCKER_AI_GGUF, Digest.of(model.read_bytes()), model.stat().st_size)
    license_layer = Descriptor.for_bytes(DOCKER_AI_LICENSE, LICENSE_TEXT)
    fields = config_fields([layer, license_layer], {layer.digest: header_of(model)})
    assert fields == expected_fields(model)
    assert list(fields) == ["format", "quantization", "parameters", "architecture", "size", "gguf",
                            "context_size"]  # Docker's types.Config order
    assert "tokenizer.ggml.tokens" not in fields["gguf"]  # 1000 items: Docker leaves it out
    document = config_document(fields, "2025-05-13T10:00:00Z", [layer.digest, license_layer.digest])
    assert document["rootfs"] == {"type": "rootfs", "diff_ids": [str(layer.digest), str(license_layer.digest)]}
    assert list(document) == ["config", "descriptor", "rootfs"]


def test_config_builder_formats_values_as_docker_does(tmp_path: Path) -> None:
    """The key-value pairs of docker/model-runner's own test (gguf_model_test.go), written
    by llama.cpp's writer, come out as Docker's config has them."""
    path = tmp_path / "dummy.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_uint8("some.parameter.uint8", 0x12)
    writer.add_int8("some.parameter.int8", -0x13)
    writer.add_uint16("some.parameter.uint16", 0x1234)
    writer.add_int16("some.parameter.int16", -0x1235)
    writer.add_uint32("some.parameter.uint32", 0x12345678)
    writer.add_int32("some.parameter.int32", -0x12345679)
    writer.add_float32("some.parameter.float32", 0.123456789)
    writer.add_uint64("some.parameter.uint64", 0x123456789ABCDEF0)
    writer.add_int64("some.parameter.int64", -0x123456789ABCDEF1)
    writer.add_float64("some.parameter.float64", 0.123456789)
    writer.add_bool("some.parameter.bool", True)
    writer.add_string("some.parameter.string", "hello <world> & co")
    writer.add_array("some.parameter.arr.i16", [1, 2, 3, 4])
    writer.add_array("some.parameter.arr.long", list(range(51)))
    writer.add_tensor("blk.0.weight", np.zeros((3, 61), dtype="float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    layer = Descriptor(DOCKER_AI_GGUF, Digest.of(path.read_bytes()), path.stat().st_size)
    fields = config_fields([layer], {layer.digest: header_of(path)})
    assert {key: value for key, value in fields["gguf"].items() if key.startswith("some.")} == {
        "some.parameter.uint8": "18", "some.parameter.int8": "-19", "some.parameter.uint16": "4660",
        "some.parameter.int16": "-4661", "some.parameter.uint32": "305419896",
        "some.parameter.int32": "-305419897", "some.parameter.float32": "0.123457",
        "some.parameter.uint64": "1311768467463790320", "some.parameter.int64": "-1311768467463790321",
        "some.parameter.float64": "0.123457", "some.parameter.bool": "true",
        "some.parameter.string": "hello <world> & co", "some.parameter.arr.i16": "1, 2, 3, 4"}
    assert fields["parameters"] == "183"  # 3 x 61, as in Docker's test
    assert fields["quantization"] == "F32"  # no general.file_type: the weights' tensor type
    assert "context_size" not in fields  # no llama.context_length
    # Go's json.Marshal escapes HTML characters: so does the encoder.
    encoded = encode_go_json({"config": fields})
    assert b"hello \\u003cworld\\u003e \\u0026 co" in encoded and b"<" not in encoded
    assert json.loads(encoded) == {"config": fields}


def test_shards_add_up_and_only_weights_count(tmp_path: Path) -> None:
    first, second, projector = tmp_path / "m-00001-of-00002.gguf", tmp_path / "m-00002-of-00002.gguf", \
        tmp_path / "mmproj.gguf"
    write_gguf(first, tensors={"a": (64, 64)})
    write_gguf(second, tensors={"b": (128, 64)}, seed=1)
    write_gguf(projector, arch="clip", tensors={"p": (512, 512)}, seed=2)
    layers = [Descriptor(media_type_for(p.name) or "", Digest.of(p.read_bytes()), p.stat().st_size)
              for p in (first, second, projector)]
    assert [layer.media_type for layer in layers] == [DOCKER_AI_GGUF, DOCKER_AI_GGUF, DOCKER_AI_MMPROJ]
    headers = {layer.digest: header_of(path) for layer, path in zip(layers, (first, second, projector), strict=True)}
    fields = config_fields(layers, headers)
    weights = sum(p.stat().st_size - GGUFReader(p).data_offset for p in (first, second))
    assert fields["size"] == docker_bytes(weights) and fields["parameters"] == docker_count(64 * 64 + 128 * 64)
    assert fields["architecture"] == "llama"  # the first weights file's, not the projector's
    # A header that could not be read: the format alone (Docker continues without metadata).
    assert config_fields(layers[:1], {}) == {"format": "gguf"}
    # Other weights formats: their format and size; no weights: nothing.
    tensors = Descriptor(DOCKER_AI_SAFETENSORS, Digest.of(b"x"), 3 << 30)
    assert config_fields([tensors], {}) == {"format": "safetensors", "size": "3GiB"}
    assert config_fields([Descriptor(DOCKER_AI_DDUF, Digest.of(b"y"), 5)], {}) == \
        {"format": "diffusers", "size": "5B"}
    assert config_fields([Descriptor.for_bytes(DOCKER_AI_LICENSE, b"l")], {}) == {}


def test_units_and_names_as_docker_writes_them() -> None:
    # gguf-parser-go's scalars after Docker's normalizeUnitString.
    assert docker_count(361_821_120) == "361.82M"
    assert docker_count(8_030_261_248) == "8.03B"
    assert docker_count(1_000_000_000) == "1B"
    assert docker_count(183) == "183" and docker_count(0) == "0"
    assert docker_bytes(268_803_686) == "256.35MiB"
    assert docker_bytes(864) == "864B" and docker_bytes(8192) == "8KiB" and docker_bytes(0) == "0B"
    assert docker_bytes(1_000_000) == "1MB"  # between 10^6 and 2^20 its units are decimal
    assert docker_bytes(3 << 30) == "3GiB"
    assert rfc3339_nano(1_700_000_000.5) == "2023-11-14T22:13:20.5Z"
    assert rfc3339_nano(1_700_000_000) == "2023-11-14T22:13:20Z"
    names = {"model.gguf": DOCKER_AI_GGUF, "Model-Q4_K_M.GGUF": DOCKER_AI_GGUF,
             "mmproj-model-f16.gguf": DOCKER_AI_MMPROJ, "LICENSE": DOCKER_AI_LICENSE,
             "LICENSE.txt": DOCKER_AI_LICENSE, "LICENSE-MIT": DOCKER_AI_LICENSE, "gemma.license": DOCKER_AI_LICENSE,
             "COPYING": DOCKER_AI_LICENSE, "template.jinja": DOCKER_AI_CHAT_TEMPLATE,
             "model.safetensors": DOCKER_AI_SAFETENSORS, "sd.dduf": DOCKER_AI_DDUF, "docs/LICENSE": DOCKER_AI_LICENSE,
             "README.md": None, "config.json": None, "licensed.py": None}
    assert {name: media_type_for(name) for name in names} == names


def test_license_names_are_licenses_and_code_is_not() -> None:
    """A license's name: LICENSE/LICENCE/COPYING/NOTICE bare, with .txt/.md/.rst, or with a
    license id after `-` or `.`; source files that only start so are no licenses."""
    licenses = ["LICENSE", "licence", "COPYING", "NOTICE", "LICENSE.txt", "LICENSE.md", "COPYING.rst",
                "LICENSE-MIT", "LICENSE-APACHE", "LICENSE-Apache-2.0", "LICENSE-MIT.txt", "LICENSE.apache",
                "LICENSE.MIT", "LICENSE.Apache-2.0", "COPYING.LESSER", "LICENSE.gpl-3.0.md", "gemma.license",
                "docs/LICENSE"]
    others = ["license.py", "copying.c", "notice_utils.py", "src/license_check.go", "license-check.py",
              "LICENSE.json", "licenses.py", "notice.h", "LICENSE_MIT", "licensed.py", "COPYING.sh"]
    assert {name: media_type_for(name) for name in licenses} == dict.fromkeys(licenses, DOCKER_AI_LICENSE)
    assert {name: media_type_for(name) for name in others} == dict.fromkeys(others)


def test_the_config_comes_from_the_first_shard_whatever_the_layer_order(tmp_path: Path) -> None:
    """Shards listed out of order (as `cp` may copy them): the config is made from the
    header of the shard with split.no 0, and the shards are ordered by it."""
    shards = split_gguf(tmp_path)
    layers = [Descriptor(DOCKER_AI_GGUF, Digest.of(p.read_bytes()), p.stat().st_size,
                         {ANNOTATION_TITLE: p.name}) for p in reversed(shards)]
    headers = {layer.digest: header_of(path) for layer, path in zip(layers, reversed(shards), strict=True)}
    assert [layer.title for layer in ordered_weights(layers, headers)] == [p.name for p in shards]
    assert [layer.title for layer in ordered_weights(layers, {})] == [p.name for p in shards]  # by name
    fields = config_fields(layers, headers)
    assert (fields["architecture"], fields["context_size"]) == ("llama", 4096)
    assert fields["gguf"]["split.no"] == "0"
    assert fields["parameters"] == docker_count(2 * 32 * 32)


# ---- through a mount ---------------------------------------------------------------------------


def test_publish_a_model_by_copying(client: RegistryClient, registry: RunningRegistry, repo: str,
                                    tmp_path: Path, mounter: Mounter) -> None:
    """mkdir, setfattr the model type, cp model.gguf and LICENSE: Docker's layout, a config
    that says what the file says; browsed back by name; replacing and removing files makes
    the config follow."""
    model = tmp_path / "model.gguf"
    write_gguf(model, arch="llama", name="Tiny Llama", context_length=4096)
    (tmp_path / "LICENSE").write_bytes(LICENSE_TEXT)
    mnt = mounter(f"{registry.host}/{repo}")
    tag = mnt / "smol" / "1.0"
    os.makedirs(tag)
    run("setfattr", "-n", "user.oci.artifacttype", "-v", DOCKER_MODEL_CONFIG, str(tag))
    run("cp", str(model), str(tmp_path / "LICENSE"), str(tag) + "/")

    manifest = manifest_of(client, f"{repo}/smol", "1.0")
    assert manifest.media_type == OCI_MANIFEST
    assert manifest.config is not None and manifest.config.media_type == DOCKER_MODEL_CONFIG
    assert manifest.artifact_type is None  # as docker model package: the config's type says it
    assert [(layer.media_type, layer.annotations[ANNOTATION_MODEL_FILEPATH], layer.title, layer.size)
            for layer in manifest.layers] == [
        (DOCKER_AI_GGUF, "model.gguf", "model.gguf", model.stat().st_size),
        (DOCKER_AI_LICENSE, "LICENSE", "LICENSE", len(LICENSE_TEXT))]
    assert manifest.layers[0].digest == Digest.of(model.read_bytes())
    metadata = json.loads(manifest.layers[0].annotations[ANNOTATION_FILE_METADATA])
    assert (metadata["name"], metadata["size"], metadata["typeflag"]) == ("model.gguf", model.stat().st_size, 0)
    config = config_of(client, f"{repo}/smol", manifest)
    assert config["config"] == expected_fields(model)
    assert config["rootfs"] == {"type": "rootfs", "diff_ids": [str(layer.digest) for layer in manifest.layers]}
    assert config["descriptor"]["created"].endswith("Z")

    # Browsed back: the names it was copied as, the same bytes, the config, the type.
    assert sorted(os.listdir(tag)) == ["LICENSE", "model.gguf"]
    assert (tag / "model.gguf").read_bytes() == model.read_bytes()
    assert (tag / "LICENSE").read_bytes() == LICENSE_TEXT
    assert json.loads((tag / ".config.json").read_bytes()) == config
    assert os.getxattr(tag, "user.oci.artifacttype") == DOCKER_MODEL_CONFIG.encode()
    assert GGUFReader(tag / "model.gguf").fields["general.name"].contents() == "Tiny Llama"

    # Another model in its place (another architecture): the config follows.
    other = tmp_path / "other" / "model.gguf"
    other.parent.mkdir()
    write_gguf(other, arch="qwen2", name="Tiny Qwen", tensors={"token_embd.weight": (96, 32)},
               file_type=LlamaFileType.MOSTLY_Q8_0, context_length=32768, seed=5)
    run("cp", str(other), str(tag) + "/")
    manifest = manifest_of(client, f"{repo}/smol", "1.0")
    assert [(layer.title, layer.digest) for layer in manifest.layers] == [
        ("model.gguf", Digest.of(other.read_bytes())), ("LICENSE", Digest.of(LICENSE_TEXT))]
    config = config_of(client, f"{repo}/smol", manifest)
    assert config["config"] == expected_fields(other)
    assert config["config"]["architecture"] == "qwen2"
    assert config["rootfs"]["diff_ids"] == [str(layer.digest) for layer in manifest.layers]

    # rm LICENSE: the same weights, so the same config but for the layer list.
    os.unlink(tag / "LICENSE")
    manifest = manifest_of(client, f"{repo}/smol", "1.0")
    assert [layer.title for layer in manifest.layers] == ["model.gguf"]
    after = config_of(client, f"{repo}/smol", manifest)
    assert after["rootfs"]["diff_ids"] == [str(Digest.of(other.read_bytes()))]
    assert after["config"] == config["config"] and after["descriptor"] == config["descriptor"]
    assert os.listdir(tag) == ["model.gguf"]


def test_a_gguf_that_is_none_is_refused_and_nothing_is_published(
        client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path, mounter: Mounter) -> None:
    model = tmp_path / "model.gguf"
    write_gguf(model)
    bogus = tmp_path / "weights.gguf"
    # Above 16 MiB: its upload starts while it is written (streaming); it must never be committed.
    bogus.write_bytes(b"this is not a GGUF file\n" * ((20 << 20) // 24))
    mnt = mounter(f"{registry.host}/{repo}")
    tag = mnt / "m" / "1"
    os.makedirs(tag)
    run("setfattr", "-n", "user.oci.artifacttype", "-v", DOCKER_MODEL_CONFIG, str(tag))
    # The first file of a new tag: cp fails, the tag is never made, the blob never uploaded.
    result = run("cp", str(bogus), str(tag) + "/", check=False)
    assert result.returncode != 0 and "Invalid argument" in result.stderr
    with pytest.raises(NotFound):
        client.resolve(f"{repo}/m", "1")
    assert client.blob_size(f"{repo}/m", Digest.of(bogus.read_bytes())) is None
    os.unlink(tag / "weights.gguf")  # it stayed staged, visible, until removed
    # Into an existing model: refused the same way, the manifest left as it was.
    run("cp", str(model), str(tag) + "/")
    before = manifest_of(client, f"{repo}/m", "1")
    result = run("cp", str(bogus), str(tag / "model.gguf"), check=False)
    assert result.returncode != 0 and "Invalid argument" in result.stderr
    assert manifest_of(client, f"{repo}/m", "1").digest == before.digest
    assert client.blob_size(f"{repo}/m", Digest.of(bogus.read_bytes())) is None
    os.unlink(tag / "model.gguf")  # the staged bogus copy, and the model layer with it
    assert [layer.title for layer in manifest_of(client, f"{repo}/m", "1").layers if layer.title] == []


def test_a_mount_with_the_model_type_makes_models(client: RegistryClient, registry: RunningRegistry,
                                                  repo: str, tmp_path: Path, mounter: Mounter) -> None:
    """`--artifact-type` with the model type: every new tag is a model; a chat template, a
    projector and a file Docker has no type for (a plain layer) beside the weights."""
    model, projector = tmp_path / "model.gguf", tmp_path / "mmproj-f16.gguf"
    write_gguf(model, arch="gemma3", context_length=8192)
    write_gguf(projector, arch="clip", tensors={"v.patch_embd.weight": (32, 32)}, seed=3)
    (tmp_path / "template.jinja").write_text("{% for m in messages %}<{{ m.role }}>{% endfor %}")
    (tmp_path / "README.md").write_text("# a tiny model\n")
    mnt = mounter(f"{registry.host}/{repo}", "--artifact-type", MODEL_CONFIG_V02)
    tag = mnt / "ai" / "tiny" / "latest"
    os.makedirs(tag)
    for name in ("model.gguf", "mmproj-f16.gguf", "template.jinja", "README.md"):
        run("cp", str(tmp_path / name), str(tag) + "/")
    manifest = manifest_of(client, f"{repo}/ai/tiny", "latest")
    assert manifest.config is not None and manifest.config.media_type == MODEL_CONFIG_V02
    assert [(layer.title, layer.media_type) for layer in manifest.layers] == [
        ("model.gguf", DOCKER_AI_GGUF), ("mmproj-f16.gguf", DOCKER_AI_MMPROJ),
        ("template.jinja", DOCKER_AI_CHAT_TEMPLATE), ("README.md", OCI_LAYER_TAR)]
    config = config_of(client, f"{repo}/ai/tiny", manifest)
    assert config["config"] == expected_fields(model)  # the projector is no part of the weights
    assert config["rootfs"]["diff_ids"] == [str(layer.digest) for layer in manifest.layers]
    assert sorted(os.listdir(tag)) == ["README.md", "mmproj-f16.gguf", "model.gguf", "template.jinja"]
    assert (tag / "mmproj-f16.gguf").read_bytes() == projector.read_bytes()
    # A tag of another type is not a model: a .gguf there is an ordinary file.
    plain = mnt / "ai" / "tiny" / "plain"
    os.makedirs(plain)
    run("setfattr", "-n", "user.oci.artifacttype", "-v", "application/vnd.example.thing", str(plain))
    run("cp", str(model), str(plain) + "/")
    other = manifest_of(client, f"{repo}/ai/tiny", "plain")
    assert other.artifact_type == "application/vnd.example.thing"
    assert [(layer.title, layer.media_type) for layer in other.layers] == [("model.gguf", OCI_LAYER_TAR)]


def test_setting_the_model_type_on_an_existing_tag_makes_it_a_model(
        client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path, mounter: Mounter) -> None:
    """An ORAS artifact holding model.gguf and LICENSE becomes a model when its type is set:
    the header is read from the registry (the first bytes of the blob only). A model's type
    cannot be set to something that is not a model."""
    model = tmp_path / "model.gguf"
    write_gguf(model, arch="phi3", context_length=131072)
    push_layers(client, repo, "v1", [("model.gguf", model.read_bytes()), ("LICENSE", LICENSE_TEXT)])
    mnt = mounter(f"{registry.host}/{repo}")
    tag = mnt / "v1"
    run("setfattr", "-n", "user.oci.artifacttype", "-v", DOCKER_MODEL_CONFIG, str(tag))
    manifest = manifest_of(client, repo, "v1")
    assert manifest.config is not None and manifest.config.media_type == DOCKER_MODEL_CONFIG
    assert manifest.artifact_type is None
    assert [(layer.title, layer.media_type, layer.annotations[ANNOTATION_MODEL_FILEPATH])
            for layer in manifest.layers] == [("model.gguf", DOCKER_AI_GGUF, "model.gguf"),
                                              ("LICENSE", DOCKER_AI_LICENSE, "LICENSE")]
    assert all(ANNOTATION_FILE_METADATA in layer.annotations for layer in manifest.layers)
    assert json.loads(manifest.layers[0].annotations[ANNOTATION_FILE_METADATA])["size"] == model.stat().st_size
    assert config_of(client, repo, manifest)["config"] == expected_fields(model)
    assert errno_of(lambda: os.setxattr(tag, "user.oci.artifacttype", b"application/vnd.example.thing")) \
        == errno.EINVAL
    assert manifest_of(client, repo, "v1").digest == manifest.digest


def test_setting_the_model_type_checks_the_weights(client: RegistryClient, registry: RunningRegistry, repo: str,
                                                   tmp_path: Path, mounter: Mounter) -> None:
    """A tag whose `.gguf` is no GGUF file does not become a model: EINVAL, the tag as it was."""
    before = push_layers(client, repo, "v1", [("notes.gguf", b"not a model\n"), ("LICENSE", LICENSE_TEXT)])
    mnt = mounter(f"{registry.host}/{repo}")
    assert errno_of(lambda: os.setxattr(mnt / "v1", "user.oci.artifacttype", DOCKER_MODEL_CONFIG.encode())) \
        == errno.EINVAL
    assert client.resolve(repo, "v1").digest == before


def test_a_staged_file_in_a_model_tag_shows_the_media_type_it_will_get(
        client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path, mounter: Mounter) -> None:
    mnt = mounter(f"{registry.host}/{repo}", "--artifact-type", DOCKER_MODEL_CONFIG)
    tag = mnt / "m" / "1"
    os.makedirs(tag)
    model = tmp_path / "model.gguf"
    write_gguf(model)
    with open(tag / "model.gguf", "wb") as file, open(tag / "README.md", "wb") as readme:
        file.write(model.read_bytes())
        readme.write(b"# hi\n")
        assert os.getxattr(tag / "model.gguf", "user.oci.mediatype") == DOCKER_AI_GGUF.encode()
        assert os.getxattr(tag / "README.md", "user.oci.mediatype") == OCI_LAYER_TAR.encode()
    assert os.getxattr(tag / "model.gguf", "user.oci.mediatype") == DOCKER_AI_GGUF.encode()


def test_shards_copied_out_of_order_are_published_in_split_order(
        client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path, mounter: Mounter) -> None:
    """`cp -r` copies in readdir order: the second shard may land first. The tag lists the
    shards in split.no order (Docker Model Runner names them by it; llama.cpp needs it) and
    the config is made from the first shard."""
    shards = split_gguf(tmp_path)
    mnt = mounter(f"{registry.host}/{repo}")
    tag = mnt / "split" / "v1"
    os.makedirs(tag)
    run("setfattr", "-n", "user.oci.artifacttype", "-v", DOCKER_MODEL_CONFIG, str(tag))
    (tmp_path / "LICENSE").write_bytes(LICENSE_TEXT)
    run("cp", str(tmp_path / "LICENSE"), str(tag) + "/")
    run("cp", str(shards[1]), str(tag) + "/")
    run("cp", str(shards[0]), str(tag) + "/")
    manifest = manifest_of(client, f"{repo}/split", "v1")
    assert [layer.title for layer in manifest.layers] == ["LICENSE", shards[0].name, shards[1].name]
    config = config_of(client, f"{repo}/split", manifest)["config"]
    assert (config["architecture"], config["context_size"], config["quantization"]) == ("llama", 4096, "F16")
    assert config["gguf"]["general.name"] == "split model"
    assert config["parameters"] == docker_count(2 * 32 * 32)
    assert config_of(client, f"{repo}/split", manifest)["rootfs"]["diff_ids"] == \
        [str(layer.digest) for layer in manifest.layers]


def test_a_gguf_moved_in_from_another_tag_becomes_the_weights(
        client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path, mounter: Mounter) -> None:
    """mv of a `.gguf` from a plain tag into a model: it gets the weights' media type and the
    file annotations, and the config describes it; a `.gguf` that is none is refused (EINVAL)."""
    model = tmp_path / "model.gguf"
    write_gguf(model, arch="qwen2", context_length=8192)
    mnt = mounter(f"{registry.host}/{repo}")
    plain = mnt / "x" / "plain"
    os.makedirs(plain)
    run("cp", str(model), str(plain) + "/")
    (plain / "bogus.gguf").write_bytes(b"not a model\n")
    tag = mnt / "x" / "model"
    os.makedirs(tag)
    run("setfattr", "-n", "user.oci.artifacttype", "-v", DOCKER_MODEL_CONFIG, str(tag))
    (tmp_path / "LICENSE").write_bytes(LICENSE_TEXT)
    run("cp", str(tmp_path / "LICENSE"), str(tag) + "/")
    run("mv", str(plain / "model.gguf"), str(tag / "model.gguf"))
    manifest = manifest_of(client, f"{repo}/x", "model")
    assert [(layer.title, layer.media_type) for layer in manifest.layers] == [
        ("LICENSE", DOCKER_AI_LICENSE), ("model.gguf", DOCKER_AI_GGUF)]
    moved = manifest.layers[1]
    assert moved.annotations[ANNOTATION_MODEL_FILEPATH] == "model.gguf"
    assert json.loads(moved.annotations[ANNOTATION_FILE_METADATA])["name"] == "model.gguf"
    assert config_of(client, f"{repo}/x", manifest)["config"] == expected_fields(model)
    assert errno_of(lambda: os.rename(plain / "bogus.gguf", tag / "bogus.gguf")) == errno.EINVAL
    assert manifest_of(client, f"{repo}/x", "model").digest == manifest.digest
    assert [layer.title for layer in manifest_of(client, f"{repo}/x", "plain").layers] == ["bogus.gguf"]


def test_writes_through_a_digest_alias_are_refused(client: RegistryClient, registry: RunningRegistry, repo: str,
                                                   tmp_path: Path, mounter: Mounter) -> None:
    """A Docker-pushed model's files are named by media type; their digest names stay
    reachable for reading, but writing, removing or renaming through them is refused
    (EPERM): it would publish the file under its digest name and the name would vanish."""
    model = tmp_path / "model.gguf"
    write_gguf(model)
    before = push_layers(client, repo, "w", [(None, model.read_bytes(), DOCKER_AI_GGUF),
                                             (None, b"MIT\n", DOCKER_AI_LICENSE)],
                         config=(DOCKER_MODEL_CONFIG, b"{}"), artifact_type=None)
    mnt = mounter(f"{registry.host}/{repo}")
    tag = mnt / "w"
    alias = tag / Digest.of(b"MIT\n").filename
    assert alias.read_bytes() == b"MIT\n" and sorted(os.listdir(tag)) == ["LICENSE", "model.gguf"]
    assert errno_of(lambda: alias.write_bytes(b"Apache-2.0\n")) == errno.EPERM
    assert errno_of(lambda: os.truncate(alias, 0)) == errno.EPERM
    assert errno_of(lambda: os.unlink(alias)) == errno.EPERM
    assert errno_of(lambda: os.rename(alias, tag / "LICENSE.txt")) == errno.EPERM
    assert errno_of(lambda: os.rename(tag / "LICENSE", alias)) == errno.EPERM
    assert client.resolve(repo, "w").digest == before
    assert sorted(os.listdir(tag)) == ["LICENSE", "model.gguf"]


def test_a_model_docker_pushed_keeps_its_config_when_a_file_is_added(
        client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path, mounter: Mounter) -> None:
    """A model shaped as `docker model package --push` makes it (untitled layers, their file
    path annotated; a context size Docker's user set): copying a LICENSE in adds the layer;
    the config keeps every field and lists the new layer. mv retitles the path annotation."""
    model = tmp_path / "model.gguf"
    write_gguf(model)
    data = model.read_bytes()
    push_blob(client, repo, data)
    gguf_layer = Descriptor(DOCKER_AI_GGUF, Digest.of(data), len(data), {ANNOTATION_MODEL_FILEPATH: "model.gguf"})
    docker_config = {"config": {"format": "gguf", "quantization": "MOSTLY_F16", "parameters": "4.10K",
                                "architecture": "llama", "size": "8KiB", "context_size": 1024},
                     "descriptor": {"created": "2025-05-13T10:00:00.123456789+02:00"},
                     "rootfs": {"type": "rootfs", "diff_ids": [str(gguf_layer.digest)]}}
    raw_config = encode_json(docker_config)
    push_blob(client, repo, raw_config)
    client.put_manifest(repo, "docker", encode_json({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": Descriptor.for_bytes(DOCKER_MODEL_CONFIG, raw_config).to_dict(),
        "layers": [gguf_layer.to_dict()]}), OCI_MANIFEST)
    (tmp_path / "LICENSE").write_bytes(LICENSE_TEXT)
    mnt = mounter(f"{registry.host}/{repo}")
    run("cp", str(tmp_path / "LICENSE"), str(mnt / "docker") + "/")
    manifest = manifest_of(client, repo, "docker")
    assert [layer.media_type for layer in manifest.layers] == [DOCKER_AI_GGUF, DOCKER_AI_LICENSE]
    assert manifest.layers[0].annotations == {ANNOTATION_MODEL_FILEPATH: "model.gguf"}  # untouched
    config = config_of(client, repo, manifest)
    assert config["config"] == docker_config["config"] and config["descriptor"] == docker_config["descriptor"]
    assert config["rootfs"]["diff_ids"] == [str(layer.digest) for layer in manifest.layers]
    # A rename in a model: the file path annotation follows the title.
    os.rename(mnt / "docker" / "LICENSE", mnt / "docker" / "LICENSE.txt")
    renamed = manifest_of(client, repo, "docker").layers[1]
    assert (renamed.title, renamed.annotations[ANNOTATION_MODEL_FILEPATH]) == ("LICENSE.txt", "LICENSE.txt")
    assert json.loads(renamed.annotations[ANNOTATION_FILE_METADATA])["name"] == "LICENSE.txt"
    assert ANNOTATION_TITLE in renamed.annotations


def test_a_safetensors_file_that_is_none_is_refused(client: RegistryClient, registry: RunningRegistry, repo: str,
                                                    tmp_path: Path, mounter: Mounter) -> None:
    name = "weights.safetensors"
    good = tmp_path / "good.safetensors"
    write_safetensors(good)
    (tmp_path / name).write_bytes(b"\x00" * 64)
    mnt = mounter(f"{registry.host}/{repo}", "--artifact-type", DOCKER_MODEL_CONFIG)
    tag = mnt / "st" / "1"
    os.makedirs(tag)
    result = run("cp", str(tmp_path / name), str(tag) + "/", check=False)
    assert result.returncode != 0 and "Invalid argument" in result.stderr
    os.unlink(tag / name)
    run("cp", str(good), str(tag / "model.safetensors"))
    manifest = manifest_of(client, f"{repo}/st", "1")
    assert [(layer.title, layer.media_type) for layer in manifest.layers] == [
        ("model.safetensors", DOCKER_AI_SAFETENSORS)]
    assert config_of(client, f"{repo}/st", manifest)["config"] == {
        "format": "safetensors", "size": docker_bytes(good.stat().st_size)}


# ---- the tag editor, without a mount: the write path's guarantees hold for models -------------


@pytest.fixture
def model_editor(registry: RunningRegistry, tmp_path: Path) -> Iterator[Callable[[], TagEditor]]:
    """`model_editor()`: an editor as one mount has it (own client, Metadata and cache) whose
    new tags are models (the mount's --artifact-type); caches closed at the end."""
    stores: list[BlobStore] = []

    def make() -> TagEditor:
        client = make_client(registry)
        stores.append(BlobStore(tmp_path / f"cache-{len(stores)}"))
        metadata = Metadata(Source.parse(registry.host), client, stores[-1])
        return TagEditor(client, metadata, artifact_type=DOCKER_MODEL_CONFIG,
                         pending_artifact_type=lambda repository, tag: None)

    yield make
    for store in stores:
        store.close()


def titled(media_type: str, title: str, data: bytes) -> Descriptor:
    return Descriptor.for_bytes(media_type, data, {ANNOTATION_TITLE: title, ANNOTATION_MODEL_FILEPATH: title})


def test_a_change_another_writer_undid_is_applied_again_with_its_config(
        client: RegistryClient, repo: str, tmp_path: Path, model_editor: Callable[[], TagEditor]) -> None:
    """Another writer's PUT lands just after ours and drops our LICENSE: the editor applies it
    again, and the config of the manifest it then PUTs lists it (the header is read from the
    registry: this editor never saw the GGUF file)."""
    model = tmp_path / "model.gguf"
    write_gguf(model, arch="granite")
    gguf_layer = titled(DOCKER_AI_GGUF, "model.gguf", model.read_bytes())
    push_blob(client, repo, model.read_bytes())
    model_editor().edit(repo, "t", put_change(gguf_layer, None))
    before = manifest_of(client, repo, "t")
    assert config_of(client, repo, before)["config"] == expected_fields(model)

    editor = model_editor()
    real_put = editor.client.put_manifest
    puts: list[bytes] = []

    def put_then_undo(repository: str, reference: str, raw: bytes, media_type: str) -> Digest:
        digest = real_put(repository, reference, raw, media_type)
        puts.append(raw)
        if len(puts) == 1:  # the other writer's PUT: the manifest as it was before ours
            client.put_manifest(repo, "t", before.raw, OCI_MANIFEST)
        return digest

    editor.client.put_manifest = put_then_undo  # type: ignore[method-assign]
    license_layer = titled(DOCKER_AI_LICENSE, "LICENSE", LICENSE_TEXT)
    push_blob(client, repo, LICENSE_TEXT)
    editor.edit(repo, "t", put_change(license_layer, None))
    assert len(puts) == 2
    manifest = manifest_of(client, repo, "t")
    assert [layer.title for layer in manifest.layers] == ["model.gguf", "LICENSE"]
    config = config_of(client, repo, manifest)
    assert config["rootfs"]["diff_ids"] == [str(gguf_layer.digest), str(license_layer.digest)]
    assert config["config"] == expected_fields(model)


def test_the_editor_types_what_goes_into_a_model(
        client: RegistryClient, repo: str, tmp_path: Path, model_editor: Callable[[], TagEditor]) -> None:
    """A layer put into a model tag with a plain media type (moved in, or pushed by a mount
    whose view of the tag was stale) is typed by its name in the editor's round, with the
    file annotations, after its content was checked: a `.gguf` that is none is refused."""
    model = tmp_path / "model.gguf"
    write_gguf(model, arch="granite")
    push_blob(client, repo, model.read_bytes())
    push_blob(client, repo, b"not a model")
    plain = Descriptor.for_bytes(OCI_LAYER_TAR, model.read_bytes(), {ANNOTATION_TITLE: "model.gguf"})
    model_editor().edit(repo, "t", put_change(plain, None))
    manifest = manifest_of(client, repo, "t")
    assert [(layer.title, layer.media_type) for layer in manifest.layers] == [("model.gguf", DOCKER_AI_GGUF)]
    assert ANNOTATION_FILE_METADATA in manifest.layers[0].annotations
    assert config_of(client, repo, manifest)["config"] == expected_fields(model)
    bogus = Descriptor.for_bytes(OCI_LAYER_TAR, b"not a model", {ANNOTATION_TITLE: "other.gguf"})
    with pytest.raises(Refused) as refused:
        model_editor().edit(repo, "t", put_change(bogus, None))
    assert refused.value.errno == errno.EINVAL
    assert manifest_of(client, repo, "t").digest == manifest.digest


def test_a_typed_layer_another_writer_kept_is_not_applied_again(
        client: RegistryClient, repo: str, tmp_path: Path, model_editor: Callable[[], TagEditor]) -> None:
    """The editor typed our plain `model.gguf` as weights; another writer's PUT that keeps it
    (and adds a file) holds our change: no second round."""
    model = tmp_path / "model.gguf"
    write_gguf(model)
    push_blob(client, repo, model.read_bytes())
    push_blob(client, repo, LICENSE_TEXT)
    model_editor().edit(repo, "t", put_change(titled(DOCKER_AI_LICENSE, "LICENSE", LICENSE_TEXT), None))
    editor = model_editor()
    real_put = editor.client.put_manifest
    puts: list[bytes] = []

    def put_then_add(repository: str, reference: str, raw: bytes, media_type: str) -> Digest:
        digest = real_put(repository, reference, raw, media_type)
        puts.append(raw)
        if len(puts) == 1:  # another writer adds a README to what we PUT
            data = json.loads(raw)
            readme = Descriptor.for_bytes(OCI_LAYER_TAR, b"# hi", {ANNOTATION_TITLE: "README.md"})
            push_blob(client, repo, b"# hi")
            data["layers"].append(readme.to_dict())
            client.put_manifest(repo, "t", encode_json(data), OCI_MANIFEST)
        return digest

    editor.client.put_manifest = put_then_add  # type: ignore[method-assign]
    plain = Descriptor.for_bytes(OCI_LAYER_TAR, model.read_bytes(), {ANNOTATION_TITLE: "model.gguf"})
    editor.edit(repo, "t", put_change(plain, None))
    assert len(puts) == 1
    assert [(layer.title, layer.media_type) for layer in manifest_of(client, repo, "t").layers] == [
        ("LICENSE", DOCKER_AI_LICENSE), ("model.gguf", DOCKER_AI_GGUF), ("README.md", OCI_LAYER_TAR)]


def test_two_mounts_writing_one_model_lose_nothing_and_its_config_lists_every_layer(
        client: RegistryClient, repo: str, tmp_path: Path, model_editor: Callable[[], TagEditor]) -> None:
    """Two editors, several threads each, adding files to one model tag at once: when every
    edit returned, every file is in the tag and the config's diff_ids are its layers."""
    model = tmp_path / "model.gguf"
    write_gguf(model)
    push_blob(client, repo, model.read_bytes())
    editors = [model_editor(), model_editor()]
    editors[0].edit(repo, "busy", put_change(titled(DOCKER_AI_GGUF, "model.gguf", model.read_bytes()), None))
    files = {f"m{m}/t{t}/LICENSE-{e}": f"license {m}.{t}.{e}".encode()
             for m in range(2) for t in range(3) for e in range(2)}
    for data in files.values():
        push_blob(client, repo, data)
    barrier = threading.Barrier(6)
    failures: list[BaseException] = []

    def work(mount: int, thread: int) -> None:
        try:
            barrier.wait(10)
            for e in range(2):
                title = f"m{mount}/t{thread}/LICENSE-{e}"
                editors[mount].edit(repo, "busy", put_change(titled(DOCKER_AI_LICENSE, title, files[title]), None))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(m, t)) for m in range(2) for t in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == [] and not any(thread.is_alive() for thread in threads)
    manifest = manifest_of(client, repo, "busy")
    assert {layer.title for layer in manifest.layers} == {"model.gguf", *files}
    config = config_of(client, repo, manifest)
    assert config["rootfs"]["diff_ids"] == [str(layer.digest) for layer in manifest.layers]
    assert config["config"] == expected_fields(model)
