"""AI models as files through a real mount on the real registry (issue 12, parts 1 and 2).

Models are pushed as their tools lay them out (docker/model-spec's example manifest and
docker/model-runner's config and annotations, modelpack/model-spec's media types and modctl's
`org.cncf.model.filepath`, a manifest shaped like registry.ollama.ai's), with small real GGUF
and safetensors files written by the formats' own libraries (tests/models.py). The mount must
show them under the names their loaders expect, with the bytes pushed, and `user.gguf.*`
attributes read from a GGUF file's first bytes only. The `gguf` and `safetensors` readers open
the mounted files (the gguf reader mmaps them)."""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import subprocess
import tarfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zstandard
from gguf import GGUFReader, GGUFWriter
from safetensors import safe_open

from ocifs.digest import Digest
from ocifs.model import (
    ANNOTATION_MODEL_FILEPATH,
    DOCKER_AI_CHAT_TEMPLATE,
    DOCKER_AI_DIR_TAR,
    DOCKER_AI_GGUF,
    DOCKER_AI_LICENSE,
    DOCKER_AI_MMPROJ,
    DOCKER_AI_SAFETENSORS,
    DOCKER_AI_VLLM_CONFIG_TAR,
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    DOCKER_MODEL_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    encode_json,
)
from ocifs.registry import RegistryClient

from .conftest import Mounter
from .content import push_blob
from .faultproxy import FaultProxy
from .helpers import errno_of
from .models import write_gguf, write_safetensors
from .mounts import ocifs
from .registry_server import RunningRegistry

MiB = 1024 * 1024
ENODATA = getattr(errno, "ENODATA", 61)
GGUF_NAMES = ["user.gguf.architecture", "user.gguf.context_length", "user.gguf.name", "user.gguf.parameters",
              "user.gguf.quantization", "user.gguf.tensors", "user.gguf.version"]
MODELPACK = "application/vnd.cncf.model."
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODELPACK_MANIFEST = "application/vnd.cncf.model.manifest.v1+json"
OLLAMA = "application/vnd.ollama.image."

Layer = tuple[str, bytes] | tuple[str, bytes, Mapping[str, str]]


def push_model(client: RegistryClient, repo: str, tag: str, layers: Sequence[Layer], config: bytes, *,
               config_type: str = DOCKER_MODEL_CONFIG, manifest_type: str = OCI_MANIFEST,
               artifact_type: str | None = None) -> list[Descriptor]:
    """A manifest as the model tools push it: the config, then one layer per (media type,
    bytes[, annotations]), nothing else (no titles)."""
    descriptors = []
    for layer in layers:
        media_type, data = layer[0], layer[1]
        annotations = layer[2] if len(layer) > 2 else None
        push_blob(client, repo, data)
        descriptors.append(Descriptor.for_bytes(media_type, data, annotations))
    push_blob(client, repo, config)
    body: dict[str, Any] = {"schemaVersion": 2, "mediaType": manifest_type}
    if artifact_type is not None:
        body["artifactType"] = artifact_type
    body["config"] = Descriptor.for_bytes(config_type, config).to_dict()
    body["layers"] = [descriptor.to_dict() for descriptor in descriptors]
    client.put_manifest(repo, tag, encode_json(body), manifest_type)
    return descriptors


def docker_config(layers: Sequence[Layer], **config: str) -> bytes:
    """A model config as docker model-runner writes it (types.ConfigFile)."""
    return json.dumps({
        "config": {"format": "gguf", **config},
        "descriptor": {"created": "2025-06-01T00:00:00Z"},
        "rootfs": {"type": "rootfs", "diff_ids": [str(Digest.of(layer[1])) for layer in layers]},
    }).encode()


def gguf_file(tmp_path: Path, file_name: str, **options: Any) -> tuple[bytes, dict[str, np.ndarray]]:
    path = tmp_path / file_name
    tensors = write_gguf(path, **options)
    return path.read_bytes(), tensors


def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors llama.cpp's own reader finds in a file (it mmaps it)."""
    reader = GGUFReader(str(path))
    return {tensor.name: np.array(tensor.data) for tensor in reader.tensors}


def safetensors_tensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors Hugging Face's own reader finds in a file."""
    with safe_open(str(path), framework="numpy") as opened:
        names = opened.keys()
        return {name: opened.get_tensor(name) for name in names}


def same_tensors(found: Mapping[str, np.ndarray], written: Mapping[str, np.ndarray]) -> bool:
    return found.keys() == written.keys() and all(np.array_equal(found[k], written[k]) for k in written)


def gguf_xattrs(path: Path) -> dict[str, str]:
    return {name: os.getxattr(path, name).decode() for name in os.listxattr(path) if name.startswith("user.gguf.")}


def tar_of(members: Mapping[str, bytes | None]) -> bytes:
    """An uncompressed tar, as Go's archive/tar writes one (None: a directory)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


# ---- Docker Model Runner's layout ------------------------------------------------------------------


def test_a_docker_gguf_model_with_license_and_template(
        client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path, mounter: Mounter) -> None:
    """docker/model-spec's example manifest (a GGUF and a license) plus a chat template: named
    as `docker model` unpacks them, the bytes pushed, GGUF attributes from the header, the
    digest name still reachable, and llama.cpp's reader loads the tensors from the mount."""
    weights, tensors = gguf_file(tmp_path, "w.gguf", name="SmolLM2 test", context_length=8192)
    layers: list[Layer] = [(DOCKER_AI_GGUF, weights), (DOCKER_AI_LICENSE, b"Apache License 2.0\n"),
                           (DOCKER_AI_CHAT_TEMPLATE, b"{% for m in messages %}{{ m.content }}{% endfor %}")]
    push_model(client, repo, "latest", layers, docker_config(layers, quantization="F16", architecture="llama"))
    mnt = mounter(f"{registry.host}/{repo}", "--read-only")
    tag = mnt / "latest"
    assert sorted(os.listdir(tag)) == ["LICENSE", "model.gguf", "template.jinja"]
    for name, (media_type, data) in zip(["model.gguf", "LICENSE", "template.jinja"], layers, strict=True):
        assert (tag / name).read_bytes() == data
        assert os.getxattr(tag / name, "user.oci.digest").decode() == str(Digest.of(data))
        assert os.getxattr(tag / name, "user.oci.mediatype").decode() == media_type
    # The name the file had before it had a name: reachable, not listed, the same bytes.
    digest_name = Digest.of(weights).filename
    assert (tag / digest_name).read_bytes() == weights
    assert digest_name not in os.listdir(tag)
    # `sha256:` lookups of the manifest still work, with the same names.
    manifest_digest = os.getxattr(tag, "user.oci.digest").decode()
    assert sorted(os.listdir(mnt / manifest_digest)) == ["LICENSE", "model.gguf", "template.jinja"]
    # GGUF attributes: listed beside user.oci.*, values from the header.
    assert sorted(os.listxattr(tag / "model.gguf")) == sorted(
        ["user.oci.digest", "user.oci.mediatype", *GGUF_NAMES])
    assert gguf_xattrs(tag / "model.gguf") == {
        "user.gguf.architecture": "llama", "user.gguf.name": "SmolLM2 test",
        "user.gguf.parameters": str(sum(t.size for t in tensors.values())), "user.gguf.quantization": "F16",
        "user.gguf.context_length": "8192", "user.gguf.version": "3", "user.gguf.tensors": str(len(tensors))}
    assert sorted(os.listxattr(tag / "LICENSE")) == ["user.oci.digest", "user.oci.mediatype"]
    assert errno_of(lambda: os.getxattr(tag / "LICENSE", "user.gguf.architecture")) == ENODATA
    assert same_tensors(gguf_tensors(tag / "model.gguf"), tensors)


def test_a_sharded_docker_gguf_model_with_projector_and_licenses(
        client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path, mounter: Mounter) -> None:
    """Three GGUF shards named `model-0000i-of-00003.gguf` in manifest order, the projector as
    `mmproj.gguf`, two licenses as `LICENSE` and `LICENSE-2`; each shard loads its own tensors."""
    shards = [gguf_file(tmp_path, f"s{i}.gguf", seed=i, tensors={f"blk.{i}.weight": (16 + i, 8)}) for i in range(3)]
    projector, projector_tensors = gguf_file(tmp_path, "p.gguf", arch="clip", name="projector",
                                             tensors={"v.patch_embd.weight": (8, 8)}, seed=9)
    layers: list[Layer] = [(DOCKER_AI_GGUF, shards[0][0]), (DOCKER_AI_GGUF, shards[1][0]),
                           (DOCKER_AI_LICENSE, b"license one\n"), (DOCKER_AI_GGUF, shards[2][0]),
                           (DOCKER_AI_MMPROJ, projector), (DOCKER_AI_LICENSE, b"license two\n"),
                           (DOCKER_AI_CHAT_TEMPLATE, b"{{ prompt }}")]
    push_model(client, repo, "q", layers, docker_config(layers))
    tag = mounter(f"{registry.host}/{repo}", "--read-only") / "q"
    assert sorted(os.listdir(tag)) == ["LICENSE", "LICENSE-2", "mmproj.gguf", "model-00001-of-00003.gguf",
                                       "model-00002-of-00003.gguf", "model-00003-of-00003.gguf", "template.jinja"]
    for i, (data, tensors) in enumerate(shards, 1):
        path = tag / f"model-{i:05d}-of-00003.gguf"
        assert path.read_bytes() == data
        assert same_tensors(gguf_tensors(path), tensors)
        assert os.getxattr(path, "user.gguf.tensors") == b"1"
    assert (tag / "LICENSE").read_bytes() == b"license one\n"
    assert (tag / "LICENSE-2").read_bytes() == b"license two\n"
    assert same_tensors(gguf_tensors(tag / "mmproj.gguf"), projector_tensors)
    assert os.getxattr(tag / "mmproj.gguf", "user.gguf.architecture") == b"clip"


def test_docker_safetensors_models_by_filepath_and_by_type(
        client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path, mounter: Mounter) -> None:
    """Docker's newer packaging annotates each file with its path (nested ones make directories),
    older models have no annotation: shards then get `docker model`'s names. safetensors'
    own reader loads the tensors from the mount."""
    written = {}
    data = {}
    for i in (1, 2, 3):
        path = tmp_path / f"{i}.safetensors"
        written[i] = write_safetensors(path, seed=i, tensors={f"layers.{i}.weight": (8, 4 * i)})
        data[i] = path.read_bytes()
    annotated: list[Layer] = [
        (DOCKER_AI_SAFETENSORS, data[1], {ANNOTATION_MODEL_FILEPATH: "model-00001-of-00002.safetensors"}),
        (DOCKER_AI_SAFETENSORS, data[2], {ANNOTATION_MODEL_FILEPATH: "model-00002-of-00002.safetensors"}),
        (DOCKER_AI_SAFETENSORS, data[3], {ANNOTATION_MODEL_FILEPATH: "text_encoder/model.safetensors"}),
        ("application/vnd.docker.ai.model.file", b'{"architectures": ["LlamaForCausalLM"]}',
         {ANNOTATION_MODEL_FILEPATH: "config.json"}),
    ]
    push_model(client, repo, "annotated", annotated, docker_config(annotated, format="safetensors"),
               config_type="application/vnd.docker.ai.model.config.v0.2+json")
    bare: list[Layer] = [(DOCKER_AI_SAFETENSORS, data[1]), (DOCKER_AI_SAFETENSORS, data[2])]
    push_model(client, repo, "bare", bare, docker_config(bare, format="safetensors"))
    mnt = mounter(f"{registry.host}/{repo}", "--read-only")
    assert sorted(os.listdir(mnt / "annotated")) == ["config.json", "model-00001-of-00002.safetensors",
                                                     "model-00002-of-00002.safetensors", "text_encoder"]
    assert os.listdir(mnt / "annotated" / "text_encoder") == ["model.safetensors"]
    assert (mnt / "annotated" / "config.json").read_bytes() == b'{"architectures": ["LlamaForCausalLM"]}'
    assert sorted(os.listdir(mnt / "bare")) == ["model-00001-of-00002.safetensors",
                                                "model-00002-of-00002.safetensors"]
    for path, i in [(mnt / "annotated" / "model-00001-of-00002.safetensors", 1),
                    (mnt / "annotated" / "text_encoder" / "model.safetensors", 3),
                    (mnt / "bare" / "model-00002-of-00002.safetensors", 2)]:
        assert path.read_bytes() == data[i]
        assert same_tensors(safetensors_tensors(path), written[i])
        assert not any(name.startswith("user.gguf.") for name in os.listxattr(path))


def test_docker_directory_archives_are_directories(
        client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path, mounter: Mounter) -> None:
    """A `dir.tar` layer (an uncompressed tar of `text_encoder/`, as model-runner's
    CreateDirectoryTarArchive makes it, annotated with the tar's file name) shows as a packed
    directory named by its filepath without `.tar`; the vLLM config archive as `config/`. Their
    raw tars stay reachable; a GGUF inside has its attributes too."""
    weights, _ = gguf_file(tmp_path, "inner.gguf", name="inside")
    dir_tar = tar_of({"text_encoder": None, "text_encoder/config.json": b'{"a": 1}',
                      "text_encoder/model.gguf": weights})
    vllm = tar_of({"config.json": b'{"model_type": "llama"}', "tokenizer.json": b'{"version": "1.0"}'})
    layers: list[Layer] = [(DOCKER_AI_SAFETENSORS, b"not really safetensors"),
                           (DOCKER_AI_DIR_TAR, dir_tar, {ANNOTATION_MODEL_FILEPATH: "dir-tar-3518.tar"}),
                           (DOCKER_AI_VLLM_CONFIG_TAR, vllm)]
    push_model(client, repo, "d", layers, docker_config(layers, format="safetensors"))
    tag = mounter(f"{registry.host}/{repo}", "--read-only") / "d"
    assert sorted(os.listdir(tag)) == ["config", "dir-tar-3518", "model.safetensors"]
    assert sorted(os.listdir(tag / "dir-tar-3518")) == ["text_encoder"]
    assert sorted(os.listdir(tag / "dir-tar-3518" / "text_encoder")) == ["config.json", "model.gguf"]
    assert (tag / "dir-tar-3518" / "text_encoder" / "model.gguf").read_bytes() == weights
    assert os.getxattr(tag / "dir-tar-3518" / "text_encoder" / "model.gguf", "user.gguf.name") == b"inside"
    assert sorted(os.listdir(tag / "config")) == ["config.json", "tokenizer.json"]
    assert (tag / "config" / "config.json").read_bytes() == b'{"model_type": "llama"}'
    assert (tag / "dir-tar-3518.tar").read_bytes() == dir_tar
    assert (tag / "config.tar").read_bytes() == vllm
    assert os.getxattr(tag / "config", "user.oci.digest").decode() == str(Digest.of(vllm))
    assert errno_of(lambda: (tag / "config" / "new").write_bytes(b"x")) == errno.EROFS


# ---- ModelPack ---------------------------------------------------------------------------------


def test_a_modelpack_model(
        client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path, mounter: Mounter) -> None:
    """modctl's layout: raw weights, weight config and docs by their filepath, code packed as a
    tar of its directory (under its path from the model's root, as modctl's archiver does), docs
    as a gzip tar; a GGUF in a `.raw` layer is GGUF by its name."""
    written = write_safetensors(tmp_path / "m.safetensors", seed=4)
    weights = (tmp_path / "m.safetensors").read_bytes()
    quantized, quantized_tensors = gguf_file(tmp_path, "q.gguf", name="quantized")
    code = tar_of({"src": None, "src/main.py": b"print('hi')\n", "src/util": None, "src/util/io.py": b"pass\n"})
    raw_docs = io.BytesIO()
    with tarfile.open(fileobj=raw_docs, mode="w") as tar:
        info = tarfile.TarInfo("docs/extra/guide.md")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"guide\n"))
    docs = gzip.compress(raw_docs.getvalue())
    zdata = zstandard.ZstdCompressor().compress(tar_of({"data": None, "data/train.jsonl": b"{}\n"}))
    layers: list[Layer] = [
        (MODELPACK + "weight.v1.raw", weights, {ANNOTATION_MODEL_FILEPATH: "model.safetensors"}),
        (MODELPACK + "weight.v1.raw", quantized, {ANNOTATION_MODEL_FILEPATH: "gguf/model-Q8_0.gguf"}),
        (MODELPACK + "weight.config.v1.raw", b'{"hidden_size": 32}', {ANNOTATION_MODEL_FILEPATH: "config.json"}),
        (MODELPACK + "doc.v1.raw", b"# A model\n", {ANNOTATION_MODEL_FILEPATH: "README.md"}),
        (MODELPACK + "doc.v1.tar+gzip", docs, {ANNOTATION_MODEL_FILEPATH: "docs/extra"}),
        (MODELPACK + "code.v1.tar", code, {ANNOTATION_MODEL_FILEPATH: "src"}),
        (MODELPACK + "dataset.v1.tar+zstd", zdata, {ANNOTATION_MODEL_FILEPATH: "data"}),
        # modctl's weight layer before `--raw` was its default: a tar holding the one file
        (MODELPACK + "weight.v1.tar", tar_of({"old.safetensors": weights}),
         {ANNOTATION_MODEL_FILEPATH: "old.safetensors"}),
    ]
    config = json.dumps({"descriptor": {"name": "tiny", "createdAt": "2025-06-01T00:00:00Z"},
                         "config": {"format": "safetensors", "paramSize": "4k"},
                         "modelfs": {"type": "layers", "diffIds": [str(Digest.of(layer[1])) for layer in layers]}})
    push_model(client, repo, "v1", layers, config.encode(), config_type=MODELPACK_CONFIG,
               artifact_type=MODELPACK_MANIFEST)
    tag = mounter(f"{registry.host}/{repo}", "--read-only") / "v1"
    assert sorted(os.listdir(tag)) == ["README.md", "config.json", "data", "docs", "gguf", "model.safetensors",
                                       "old.safetensors", "src"]
    # a directory holding that file, which the reader loads from inside the archive
    assert os.listdir(tag / "old.safetensors") == ["old.safetensors"]
    assert same_tensors(safetensors_tensors(tag / "old.safetensors" / "old.safetensors"), written)
    assert (tag / "model.safetensors").read_bytes() == weights
    assert same_tensors(safetensors_tensors(tag / "model.safetensors"), written)
    assert (tag / "config.json").read_bytes() == b'{"hidden_size": 32}'
    assert (tag / "README.md").read_bytes() == b"# A model\n"
    assert same_tensors(gguf_tensors(tag / "gguf" / "model-Q8_0.gguf"), quantized_tensors)
    assert os.getxattr(tag / "gguf" / "model-Q8_0.gguf", "user.gguf.name") == b"quantized"
    assert sorted(os.listdir(tag / "src")) == ["main.py", "util"]
    assert (tag / "src" / "util" / "io.py").read_bytes() == b"pass\n"
    assert (tag / "src.tar").read_bytes() == code
    assert os.listdir(tag / "docs") == ["extra"]
    assert os.listdir(tag / "docs" / "extra") == ["guide.md"]  # the archive's docs/extra/, not all of it
    assert (tag / "docs" / "extra.tar.gz").read_bytes() == docs
    assert os.getxattr(tag, "user.oci.artifacttype").decode() == MODELPACK_MANIFEST
    # zstd: its raw blob reads, and its files inside
    assert (tag / "data.tar.zst").read_bytes() == zdata
    assert os.listdir(tag / "data") == ["train.jsonl"]
    assert (tag / "data" / "train.jsonl").read_bytes() == b"{}\n"


def test_clashing_and_unsafe_filepaths_fall_back_to_digest_names(
        client: RegistryClient, registry: RunningRegistry, repo: str, mounter: Mounter) -> None:
    """Two layers that would take one name: the first keeps it, the other is named by its
    digest. Filepaths that would escape or that no file system takes are not used."""
    def raw(data: bytes, filepath: str) -> Layer:
        return (MODELPACK + "doc.v1.raw", data, {ANNOTATION_MODEL_FILEPATH: filepath})

    layers = [raw(b"first", "LICENSE"), raw(b"second", "LICENSE"), raw(b"up", "../x"),
              raw(b"absolute", "/etc/passwd"), raw(b"control", "bad\x01name"), raw(b"newline", "a\nb"),
              (DOCKER_AI_LICENSE, b"typed license")]  # the table's LICENSE is taken too
    push_model(client, repo, "c", layers, b"{}", config_type=MODELPACK_CONFIG, artifact_type=MODELPACK_MANIFEST)
    tag = mounter(f"{registry.host}/{repo}", "--read-only") / "c"
    expected = {"LICENSE": b"first"}
    for data in (b"second", b"up", b"absolute", b"control", b"newline", b"typed license"):
        expected[Digest.of(data).filename] = data  # these media types add no extension
    assert sorted(os.listdir(tag)) == sorted(expected)
    for name, data in expected.items():
        assert (tag / name).read_bytes() == data
    assert not (tag.parent / "x").exists() and not (tag / "etc").exists()


# ---- Ollama ------------------------------------------------------------------------------------


def test_an_ollama_model(
        client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path, mounter: Mounter) -> None:
    """A manifest as registry.ollama.ai serves it: Docker v2, an image config, layers typed
    `application/vnd.ollama.image.*` without annotations. Not a container image: no rootfs/."""
    weights, tensors = gguf_file(tmp_path, "o.gguf", arch="qwen2", name="Qwen2.5 0.5B Instruct")
    layers: list[Layer] = [
        (OLLAMA + "model", weights),
        (OLLAMA + "system", b"You are a helpful assistant."),
        (OLLAMA + "template", b"{{ .System }}{{ .Prompt }}"),
        (OLLAMA + "license", b"Apache License\n"),
        (OLLAMA + "params", b'{"stop":["<|im_end|>"]}'),
    ]
    config = json.dumps({"model_format": "gguf", "model_family": "qwen2", "model_families": ["qwen2"],
                         "model_type": "494.03M", "file_type": "F16", "architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [str(Digest.of(layer[1])) for layer in layers]}})
    push_model(client, repo, "0.5b", layers, config.encode(), config_type=DOCKER_CONFIG,
               manifest_type=DOCKER_MANIFEST)
    tag = mounter(f"{registry.host}/{repo}") / "0.5b"  # writable: the tag still is not
    assert sorted(os.listdir(tag)) == ["LICENSE", "model.gguf", "params.json", "system", "template"]
    for name, layer in zip(["model.gguf", "system", "template", "LICENSE", "params.json"], layers, strict=True):
        assert (tag / name).read_bytes() == layer[1]
    assert os.getxattr(tag / "model.gguf", "user.gguf.architecture") == b"qwen2"
    assert same_tensors(gguf_tensors(tag / "model.gguf"), tensors)
    assert errno_of(lambda: os.listdir(tag / "rootfs")) == errno.ENOENT
    assert errno_of(lambda: (tag / "notes.txt").write_bytes(b"x")) == errno.EPERM  # as for images


# ---- GGUF attributes ----------------------------------------------------------------------------


def test_gguf_attributes_of_a_cold_big_file_download_only_its_first_bytes(
        client: RegistryClient, repo: str, tmp_path: Path, proxy: FaultProxy, mounter: Mounter) -> None:
    """Listing the attributes of a cold 64 MiB GGUF reads its header: at most 2 MiB leave the
    registry, counted at a proxy in front of it; `getfattr -d` and asking again download
    nothing more."""
    weights, _ = gguf_file(tmp_path, "big.gguf", tensors={"token_embd.weight": (4096, 8192)},
                                 name="big one")
    assert len(weights) > 64 * MiB
    layers: list[Layer] = [(DOCKER_AI_GGUF, weights)]
    push_model(client, repo, "big", layers, docker_config(layers))
    path = mounter(f"{proxy.host}/{repo}", "--read-only") / "big" / "model.gguf"
    blobs = r"/v2/.*/blobs/sha256:[0-9a-f]+"
    assert set(GGUF_NAMES) <= set(os.listxattr(path))  # listing reads the header: each name listed reads
    fetched = proxy.bytes_sent("GET", blobs)
    assert 0 < fetched <= 2 * MiB, fetched
    shown = subprocess.run(["getfattr", "-d", "-m", "user.gguf.", str(path)], capture_output=True, text=True,
                           timeout=60, check=True).stdout
    assert 'user.gguf.name="big one"' in shown
    assert f'user.gguf.parameters="{4096 * 8192}"' in shown
    assert 'user.gguf.architecture="llama"' in shown
    assert proxy.bytes_sent("GET", blobs) == fetched
    # The parsed header is kept in memory: asked again with the cache emptied, nothing is fetched.
    assert ocifs("cache", "clear", "--cache-dir", str(mounter.cache_dir)).returncode == 0
    assert gguf_xattrs(path)["user.gguf.tensors"] == "1"
    assert proxy.bytes_sent("GET", blobs) == fetched


def test_gguf_attributes_a_header_lacks_or_a_file_that_is_no_gguf(
        client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path, mounter: Mounter) -> None:
    """A `.gguf` file that is not GGUF lists no `user.gguf.*` names and answers ENODATA for
    each; a GGUF without `general.name` or a context length does not list those and answers
    ENODATA for them, so `cp --preserve=xattr` copies what is listed."""
    bare = tmp_path / "bare.gguf"
    writer = GGUFWriter(bare, "llama")  # only general.architecture among the keys
    writer.add_tensor("a", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    layers: list[Layer] = [
        (MODELPACK + "weight.v1.raw", b"GGUF? no: " + os.urandom(1000), {ANNOTATION_MODEL_FILEPATH: "fake.gguf"}),
        (MODELPACK + "weight.v1.raw", bare.read_bytes(), {ANNOTATION_MODEL_FILEPATH: "bare.gguf"}),
    ]
    push_model(client, repo, "g", layers, b"{}", config_type=MODELPACK_CONFIG, artifact_type=MODELPACK_MANIFEST)
    tag = mounter(f"{registry.host}/{repo}", "--read-only") / "g"
    assert not [name for name in os.listxattr(tag / "fake.gguf") if name.startswith("user.gguf.")]
    assert sorted(name for name in os.listxattr(tag / "bare.gguf") if name.startswith("user.gguf.")) == [
        "user.gguf.architecture", "user.gguf.parameters", "user.gguf.quantization", "user.gguf.tensors",
        "user.gguf.version"]
    for name in GGUF_NAMES:
        assert errno_of(lambda name=name: os.getxattr(tag / "fake.gguf", name)) == ENODATA
    assert os.getxattr(tag / "fake.gguf", "user.oci.digest").decode() == str(Digest.of(layers[0][1]))
    assert os.getxattr(tag / "bare.gguf", "user.gguf.architecture") == b"llama"
    assert os.getxattr(tag / "bare.gguf", "user.gguf.quantization") == b"F32"
    assert os.getxattr(tag / "bare.gguf", "user.gguf.parameters") == b"16"
    for missing in ("user.gguf.name", "user.gguf.context_length"):
        assert errno_of(lambda missing=missing: os.getxattr(tag / "bare.gguf", missing)) == ENODATA
    assert errno_of(lambda: os.getxattr(tag / "bare.gguf", "user.gguf.nonsense")) == ENODATA
    assert errno_of(lambda: os.getxattr(tag, "user.gguf.name")) == ENODATA  # directories have none
    copied = tmp_path / "copied.gguf"
    subprocess.run(["cp", "--preserve=xattr", str(tag / "bare.gguf"), str(copied)], check=True, timeout=60)
    assert os.getxattr(copied, "user.gguf.architecture") == b"llama"
    # The file that is not GGUF was read once and logged once, whatever was asked of it.
    log = (mounter.cache_dir / "ocifs.log").read_text()
    assert log.count("fake.gguf has no GGUF attributes") == 1, log


def test_gguf_attributes_of_a_hanging_blob_end_within_the_timeout(
        client: RegistryClient, repo: str, tmp_path: Path, proxy: FaultProxy, mounter: Mounter) -> None:
    """A getxattr that needs the header of a blob the registry never sends ends with ETIMEDOUT
    within --timeout (it is bounded like a read), and is not remembered as "not GGUF": once the
    registry answers, the attribute is there."""
    weights, _ = gguf_file(tmp_path, "h.gguf", name="hung")
    layers: list[Layer] = [(DOCKER_AI_GGUF, weights)]
    push_model(client, repo, "h", layers, docker_config(layers))
    proxy.stall("GET", rf"/v2/{repo}/blobs/{Digest.of(weights)}")
    path = mounter(f"{proxy.host}/{repo}", "--read-only", "--timeout", "3") / "h" / "model.gguf"
    started = time.monotonic()
    stuck = subprocess.run(["getfattr", "-n", "user.gguf.name", str(path)], capture_output=True, text=True,
                           timeout=30)
    elapsed = time.monotonic() - started
    assert stuck.returncode != 0 and "timed out" in stuck.stderr, stuck.stderr
    assert elapsed < 3 + 4, elapsed
    proxy.heal()
    assert os.getxattr(path, "user.gguf.name") == b"hung"
