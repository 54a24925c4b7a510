"""Publishing a model by copying (issue 12): the files of a tag whose artifact type is Docker's
model config type (`application/vnd.docker.ai.model.config.v0.1+json`, or a newer version)
are pushed as `docker model package --push` pushes them (docker/model-runner,
pkg/distribution): one uncompressed layer per file, its media type from the file's name, and
a config of that type that describes the weights, rebuilt by every round of the tag editor
from the layers the manifest is about to hold.

Pure rules first (names -> media types, annotations, the config document and its formatting
as Go writes it), then `ModelConfigs`, which finds the GGUF headers the config needs: noted
when a staged file is pushed (read from its first bytes), else read from the registry's first
bytes of the blob, never the whole blob.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import re
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from ..digest import Digest
from ..errors import Refused
from ..gguf import GGUFError, GGUFHeader, read_header
from ..layout import GGUF_MEDIA_TYPES, model_filepath
from ..model import (
    ANNOTATION_MODEL_FILEPATH,
    ANNOTATION_TITLE,
    DOCKER_AI_CHAT_TEMPLATE,
    DOCKER_AI_DDUF,
    DOCKER_AI_GGUF,
    DOCKER_AI_LICENSE,
    DOCKER_AI_MMPROJ,
    DOCKER_AI_SAFETENSORS,
    DOCKER_MODEL_CONFIG_PREFIX,
    OCI_LAYER_TAR,
    Descriptor,
    Manifest,
    is_placeholder_layer,
)
from ..registry.client import RegistryClient

log = logging.getLogger(__name__)

DOCKER_AI_PREFIX = "application/vnd.docker.ai."
# What docker/model-runner's partial.NewLayer puts on every layer beside the file path.
ANNOTATION_FILE_METADATA = "org.cncf.model.file.metadata+json"
ANNOTATION_MEDIATYPE_UNTESTED = "org.cncf.model.file.mediatype.untested"
# The model's weights, by format (Docker's detectModelFormat: GGUF, then safetensors, then DDUF).
WEIGHT_FORMATS = ((DOCKER_AI_GGUF, "gguf"), (DOCKER_AI_SAFETENSORS, "safetensors"), (DOCKER_AI_DDUF, "diffusers"))
# Docker's ExtractConfig leaves GGUF arrays longer than this out of the config.
MAX_CONFIG_ARRAY = 50
# An existing config above this is not read back (it is rebuilt instead); real ones are KiBs.
MAX_OLD_CONFIG = 4 * 1024 * 1024
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # Docker's maxFormatJSONSize
HEADER_CACHE = 64  # GGUF headers kept by digest
FILE_MODE = 0o644  # the mode the mount shows files with (Docker records the source file's)

# License families an id after `LICENSE.` may start with (SPDX ids, and the model licenses of
# Hugging Face): `LICENSE.apache`, `LICENSE.Apache-2.0`, `COPYING.LESSER`. Not file extensions.
_LICENSE_FAMILIES = ("0bsd", "afl", "agpl", "apache", "apsl", "artistic", "bigscience", "boost", "bsd", "bsl",
                     "cc", "cc0", "cddl", "cecill", "creativeml", "ecl", "epl", "eupl", "gemma", "gfdl", "gpl",
                     "isc", "lesser", "lgpl", "library", "llama", "lppl", "mit", "mpl", "ncsa", "ofl", "openrail",
                     "osl", "postgresql", "psf", "unlicense", "upl", "wtfpl", "x11", "zlib", "zpl")
_DOC_SUFFIX = r"(?:\.(?:txt|md|rst))?"
# LICENSE, LICENCE, COPYING, NOTICE: bare, `.txt`/`.md`/`.rst`, or a license id after `-`
# (LICENSE-MIT, LICENSE-Apache-2.0) or `.` (LICENSE.apache), itself maybe `.txt`; and
# `*.license` (REUSE). Never a source file that only starts so (license.py, notice_utils.py).
_LICENSE = re.compile(
    r"^(?:licen[cs]e|copying|notice)"
    r"(?:" + _DOC_SUFFIX
    + r"|-[a-z0-9][a-z0-9+-]*(?:\.[0-9]+)*" + _DOC_SUFFIX
    + r"|\.(?:" + "|".join(_LICENSE_FAMILIES) + r")(?:[-+][a-z0-9+-]*(?:\.[0-9]+)*)?" + _DOC_SUFFIX
    + r")$|\.licen[cs]e$", re.IGNORECASE)


def is_model_type(artifact_type: str | None) -> bool:
    """Docker's model config type, any version (v0.1 flat, v0.2 nested paths...)."""
    return bool(artifact_type) and str(artifact_type).startswith(DOCKER_MODEL_CONFIG_PREFIX)


def media_type_for(name: str) -> str | None:
    """The media type `docker model package` gives a file of this name (its last component),
    None for a file it has no type for. A GGUF file named for a multimodal projector gets
    the type Docker Model Runner reads projectors from (`vnd.docker.ai.mmproj`, what
    `--mmproj` writes; the spec's `gguf.v3.mmproj` is not read by the runner)."""
    base = name.rsplit("/", 1)[-1].lower()
    if base.endswith(".gguf"):
        return DOCKER_AI_MMPROJ if "mmproj" in base else DOCKER_AI_GGUF
    if base.endswith(".safetensors"):
        return DOCKER_AI_SAFETENSORS
    if base.endswith(".dduf"):
        return DOCKER_AI_DDUF
    if base.endswith(".jinja"):
        return DOCKER_AI_CHAT_TEMPLATE
    if _LICENSE.search(base):
        return DOCKER_AI_LICENSE
    return None


def layer_media_type(name: str, current: str | None) -> str:
    """The media type of a file in a model tag: a Docker AI type it already has (set with
    `setfattr -n user.oci.mediatype`, e.g. `gguf.v3.lora`, or kept from the layer it
    replaces) stays; otherwise its name decides; a file Docker has no type for is a plain
    layer (what `oras push` gives it; Docker Model Runner ignores layers it does not know)."""
    if current and current.startswith(DOCKER_AI_PREFIX):
        return current
    return media_type_for(name) or current or OCI_LAYER_TAR


def layer_annotations(base: Mapping[str, str], title: str, size: int, mtime: float) -> dict[str, str]:
    """`base` with the annotations Docker's partial.NewLayer writes (the file's path, its
    metadata as JSON, media type tested) and the OCI title (so `oras pull` names it too)."""
    annotations = dict(base)
    annotations[ANNOTATION_TITLE] = title
    annotations[ANNOTATION_MODEL_FILEPATH] = title
    annotations[ANNOTATION_FILE_METADATA] = encode_go_json({
        "name": title.rsplit("/", 1)[-1], "mode": FILE_MODE, "uid": 0, "gid": 0, "size": size,
        "mtime": rfc3339_nano(mtime), "typeflag": 0}).decode()
    annotations[ANNOTATION_MEDIATYPE_UNTESTED] = "false"
    return annotations


def retitled(annotations: Mapping[str, str], title: str) -> dict[str, str]:
    """The annotations of a layer renamed to `title`: the model file path and the name in
    the file metadata follow the title (when the layer has them)."""
    out = dict(annotations)
    out[ANNOTATION_TITLE] = title
    if ANNOTATION_MODEL_FILEPATH in out:
        out[ANNOTATION_MODEL_FILEPATH] = title
    metadata = out.get(ANNOTATION_FILE_METADATA)
    if metadata is not None:
        try:
            data = json.loads(metadata)
        except ValueError:
            data = None
        if isinstance(data, dict):
            data["name"] = title.rsplit("/", 1)[-1]
            out[ANNOTATION_FILE_METADATA] = encode_go_json(data).decode()
    return out


def model_layer(layer: Descriptor, mtime: float) -> Descriptor:
    """A layer in a model tag, typed as `docker model package` types it: a titled file gets
    the media type of its name (`layer_media_type`) and, when it lacks them, the annotations
    Docker writes (its file metadata with `mtime`). Untitled layers (a model Docker pushed)
    and layers that have a Docker AI type already are kept as they are. Pure: whether the
    content is what the new type says is checked by the caller (`ModelConfigs.typed`)."""
    title = layer.title
    if title is None or layer.media_type.startswith(DOCKER_AI_PREFIX):
        return layer
    annotations = dict(layer.annotations)
    if ANNOTATION_FILE_METADATA not in annotations:
        annotations = layer_annotations(annotations, title, layer.size, mtime)
    else:
        annotations.setdefault(ANNOTATION_MODEL_FILEPATH, title)
    return replace(layer, media_type=layer_media_type(title, layer.media_type), annotations=annotations)


# What a media type says of a file's content, checked before a layer is typed so.
CHECKED_MEDIA_TYPES = GGUF_MEDIA_TYPES | {DOCKER_AI_SAFETENSORS}
# llama.cpp's shard names: `<name>-00001-of-00003.gguf` (numbered from 1).
_SHARD_NAME = re.compile(r"-(\d+)-of-(\d+)\.gguf$", re.IGNORECASE)


def shard_number(layer: Descriptor, header: GGUFHeader | None) -> int | None:
    """Which shard of split GGUF weights a layer is (from 0): `split.no` of its header, else
    the number in its name (`-00002-of-00003.gguf` is 1); None when neither says."""
    if header is not None:
        value = header.metadata.get("split.no")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    name = layer.title or model_filepath(layer)
    found = _SHARD_NAME.search(name) if name else None
    return int(found.group(1)) - 1 if found else None


def ordered_weights(layers: Sequence[Descriptor], headers: Mapping[Digest, GGUFHeader | None]
                    ) -> list[Descriptor]:
    """GGUF weights in shard order (llama.cpp loads the shards so, Docker Model Runner names
    them by layer order); what says no shard number comes after, in the order it had."""
    def key(item: tuple[int, Descriptor]) -> tuple[bool, int, int]:
        number = shard_number(item[1], headers.get(item[1].digest))
        return (number is None, number or 0, item[0])

    return [layer for _, layer in sorted(enumerate(layers), key=key)]


# ---- checking a staged file -----------------------------------------------------------------


def check_model_file(media_type: str, read: Callable[[int, int], bytes], size: int, path: str
                     ) -> GGUFHeader | None:
    """A file about to be pushed into a model tag must be what its media type says: the GGUF
    header of a GGUF file (returned, read from its first bytes only), a safetensors header
    for safetensors. EINVAL otherwise, before anything is uploaded."""
    if media_type in GGUF_MEDIA_TYPES:
        try:
            return read_header(read, size)
        except GGUFError as exc:
            raise Refused(f"{path}: a .gguf file in a model tag must be a GGUF file: {exc}", errno.EINVAL) from None
    if media_type == DOCKER_AI_SAFETENSORS:
        head = read(0, 9) if size >= 9 else b""
        length = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else 0
        if len(head) < 9 or head[8:9] != b"{" or length < 2 or length > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise Refused(f"{path}: not a safetensors file (no JSON header); a .safetensors file in a "
                          "model tag must be one", errno.EINVAL)
    return None


# ---- the config -----------------------------------------------------------------------------


def weight_format(layers: Sequence[Descriptor]) -> tuple[str, str] | None:
    """(weights media type, config format) of the model these layers make, or None."""
    present = {layer.media_type for layer in layers}
    return next(((media_type, name) for media_type, name in WEIGHT_FORMATS if media_type in present), None)


def weight_digests(layers: Sequence[Descriptor]) -> list[tuple[str, Digest]]:
    weights = {media_type for media_type, _ in WEIGHT_FORMATS}
    return [(layer.media_type, layer.digest) for layer in layers if layer.media_type in weights]


def gguf_weight_bytes(layer: Descriptor, header: GGUFHeader) -> int:
    """The bytes of tensor data in a GGUF file: from the aligned end of its header to its
    end (gguf-parser-go's ModelSize, what Docker's config calls the model's size)."""
    alignment = header.metadata.get("general.alignment")
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0:
        alignment = 32
    start = -(-header.header_size // alignment) * alignment
    return max(0, layer.size - start)


def config_fields(layers: Sequence[Descriptor], headers: Mapping[Digest, GGUFHeader | None]) -> dict[str, Any]:
    """The `config` object of a model made of `layers`, in the order of Docker's
    types.Config: the format of its weights; for GGUF, what the header of the first weights
    file (split.no 0, whatever the layer order) says (quantization, architecture, its
    metadata as strings, context length), with parameters and size summed over every weights
    file (shards); a header that could not be read adds nothing (Docker: "continue without
    metadata")."""
    found = weight_format(layers)
    if found is None:
        return {}
    media_type, name = found
    weights = [layer for layer in layers if layer.media_type == media_type]
    fields: dict[str, Any] = {"format": name}
    if name != "gguf":
        fields["size"] = docker_bytes(sum(layer.size for layer in weights))
        return fields
    first = headers.get(ordered_weights(weights, headers)[0].digest)  # the shard with split.no 0
    if first is None:
        return fields
    parsed = [(layer, header) for layer in weights if (header := headers.get(layer.digest)) is not None]
    if first.quantization is not None:
        fields["quantization"] = first.quantization
    fields["parameters"] = docker_count(sum(header.parameters for _, header in parsed))
    if first.architecture:
        fields["architecture"] = first.architecture.strip()
    fields["size"] = docker_bytes(sum(gguf_weight_bytes(layer, header) for layer, header in parsed))
    metadata = gguf_strings(first.metadata)
    if metadata:
        fields["gguf"] = metadata
    context = first.context_length
    if context is not None and 0 < context <= 2**31 - 1:
        fields["context_size"] = context
    return fields


def config_document(fields: Mapping[str, Any], created: str, diff_ids: Sequence[Digest]) -> dict[str, Any]:
    """Docker's types.ConfigFile: config, descriptor (when it was made), rootfs (the digest
    of every layer, in manifest order: layers are uncompressed, so digest = diff ID)."""
    return {"config": dict(fields), "descriptor": {"created": created},
            "rootfs": {"type": "rootfs", "diff_ids": [str(digest) for digest in diff_ids]}}


def gguf_strings(metadata: Mapping[str, Any]) -> dict[str, str]:
    """GGUF metadata as Docker's config holds it: every value a string (Go's %d, %f, %t),
    arrays joined with ", ", arrays longer than 50 left out. What ocifs.gguf does not keep
    (strings above 64 KiB, nested arrays) is left out too."""
    out = {}
    for key, value in metadata.items():
        if isinstance(value, list):
            if len(value) > MAX_CONFIG_ARRAY:
                continue
            out[key] = ", ".join(_go_value(item) for item in value)
        else:
            out[key] = _go_value(value)
    return dict(sorted(out.items()))  # Go writes map keys sorted


def _go_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return f"{value:.6f}"
    return str(value)


def _go_scaled(value: int, units: Sequence[tuple[float, str]], suffix: str) -> str:
    """gguf-parser-go's scalar String() (two decimals, ".00" trimmed, then the unit) with
    Docker's normalizeUnitString (no space before the unit)."""
    base, unit = 1.0, ""
    for scale, name in units:
        if float(value) >= scale:
            base, unit = scale, name
            break
    text = f"{float(value) / base:.2f}"
    return text.removesuffix(".00") + unit + suffix


# GGUFBytesScalar: binary and decimal units interleaved, the first one the value reaches.
_BYTE_UNITS = ((2.0**50, "Pi"), (1e15, "P"), (2.0**40, "Ti"), (1e12, "T"), (2.0**30, "Gi"), (1e9, "G"),
               (2.0**20, "Mi"), (1e6, "M"), (2.0**10, "Ki"), (1e3, "K"))
_COUNT_UNITS = ((1e15, "Q"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))


def docker_bytes(size: int) -> str:
    """A size as Docker's config writes it: `256.35MiB`, `864B`, `8KiB`."""
    return "0B" if size == 0 else _go_scaled(size, _BYTE_UNITS, "B")


def docker_count(count: int) -> str:
    """A parameter count as Docker's config writes it: `361.82M`, `1B`, `183`."""
    return "0" if count == 0 else _go_scaled(count, _COUNT_UNITS, "")


def rfc3339_nano(timestamp: float) -> str:
    """Go's time.RFC3339Nano in UTC (trailing zeros of the fraction dropped)."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    fraction = f"{moment.microsecond:06d}".rstrip("0")
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"


_GO_ESCAPES = (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def encode_go_json(data: Mapping[str, Any]) -> bytes:
    """Compact JSON as Go's json.Marshal writes it: HTML characters and line separators
    escaped (they only ever occur inside strings, so replacing them is safe)."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    for raw, escaped in _GO_ESCAPES:
        text = text.replace(raw, escaped)
    return text.encode()


# ---- the config of a tag, with the headers it needs -------------------------------------------


class ModelConfigs:
    """Builds the config blob of a model tag from the layers it is about to hold."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self._mutex = threading.Lock()
        self._headers: OrderedDict[Digest, GGUFHeader] = OrderedDict()
        self._refused: OrderedDict[tuple[Digest, str], str] = OrderedDict()  # (digest, type) -> why

    def note(self, digest: Digest, header: GGUFHeader) -> None:
        """The header of a file just checked at push: the round that follows needs it."""
        with self._mutex:
            self._headers[digest] = header
            self._headers.move_to_end(digest)
            while len(self._headers) > HEADER_CACHE:
                self._headers.popitem(last=False)

    def header(self, repository: str, layer: Descriptor) -> GGUFHeader | None:
        """The GGUF header of a layer: noted at push, else read from the first bytes of the
        blob in the registry (None when it is no GGUF file). Registry errors propagate:
        the round fails and its files are pushed again later."""
        with self._mutex:
            known = self._headers.get(layer.digest)
        if known is not None:
            return known
        try:
            header = read_header(self._first_bytes(repository, layer.digest), layer.size)
        except GGUFError as exc:
            log.info("%s@%s: no GGUF header for the model config: %s", repository, layer.digest, exc)
            return None
        self.note(layer.digest, header)
        return header

    def _first_bytes(self, repository: str, digest: Digest) -> Callable[[int, int], bytes]:
        """Ranged reads of a blob in the registry (a header's first bytes, never the whole blob)."""
        def read(offset: int, size: int) -> bytes:
            return b"".join(self.client.fetch_blob_range(repository, digest, offset, size))
        return read

    def check(self, repository: str, layer: Descriptor) -> None:
        """A layer of the registry about to be typed `layer.media_type` in a model tag must be
        what that type says (`check_model_file`, on the first bytes of the blob): EINVAL
        otherwise. What was found is remembered by digest: a file kept as it was is not
        read again every round."""
        key = (layer.digest, layer.media_type)
        with self._mutex:
            known = self._refused.get(key)
            if known is None and layer.media_type in GGUF_MEDIA_TYPES and layer.digest in self._headers:
                return
        if known is not None:
            raise Refused(known, errno.EINVAL)
        try:
            header = check_model_file(layer.media_type, self._first_bytes(repository, layer.digest), layer.size,
                                      layer.title or str(layer.digest))
        except Refused as exc:
            with self._mutex:
                self._refused[key] = str(exc)
                while len(self._refused) > HEADER_CACHE:
                    self._refused.popitem(last=False)
            raise
        if header is not None:
            self.note(layer.digest, header)

    def typed(self, repository: str, layers: Sequence[Descriptor],
              strict: Callable[[Descriptor], bool]) -> list[Descriptor]:
        """`layers` typed as model files (`model_layer`), each file a new type says is GGUF
        or safetensors checked first (`check`). One that is not: EINVAL when `strict(layer)`
        (a file being put there now), else it keeps the type it had (a file the tag held)."""
        out = []
        now = time.time()
        for layer in layers:
            new = model_layer(layer, now)
            if new.media_type != layer.media_type and new.media_type in CHECKED_MEDIA_TYPES:
                try:
                    self.check(repository, new)
                except Refused:
                    if strict(layer):
                        raise
                    new = replace(new, media_type=layer.media_type)
            out.append(new)
        return out

    def ordered(self, repository: str, layers: Sequence[Descriptor]) -> list[Descriptor]:
        """`layers` with the GGUF weights in shard order, in the places weights held: by the
        headers known already, else by their names, else by the headers read from the
        registry (first bytes only). Nothing is read for a model of one weights file."""
        places = [i for i, layer in enumerate(layers) if layer.media_type == DOCKER_AI_GGUF]
        if len(places) < 2:
            return list(layers)
        weights = [layers[i] for i in places]
        headers: dict[Digest, GGUFHeader | None] = {}
        for layer in weights:
            with self._mutex:
                headers[layer.digest] = self._headers.get(layer.digest)
            if headers[layer.digest] is None and shard_number(layer, None) is None:
                headers[layer.digest] = self.header(repository, layer)
        out = list(layers)
        for place, layer in zip(places, ordered_weights(weights, headers), strict=True):
            out[place] = layer
        return out

    def build(self, repository: str, layers: Sequence[Descriptor], old: Manifest | None) -> bytes:
        """The config blob for a model tag holding `layers` (file layers, in order). When its
        weights are those the current config was made for (a license added, a template
        removed), that config is kept, fields Docker or a user set included, with the layer
        list updated; otherwise it is made again from the weights' headers."""
        diff_ids = [layer.digest for layer in layers]
        kept = self._reusable(repository, layers, old)
        if kept is not None:
            kept["rootfs"] = {"type": "rootfs", "diff_ids": [str(digest) for digest in diff_ids]}
            return encode_go_json(kept)
        headers: dict[Digest, GGUFHeader | None] = {}
        found = weight_format(layers)
        if found is not None and found[1] == "gguf":
            for layer in layers:
                if layer.media_type == found[0] and layer.digest not in headers:
                    headers[layer.digest] = self.header(repository, layer)
        fields = config_fields(layers, headers)
        return encode_go_json(config_document(fields, rfc3339_nano(time.time()), diff_ids))

    def _reusable(self, repository: str, layers: Sequence[Descriptor], old: Manifest | None
                  ) -> dict[str, Any] | None:
        if old is None or old.config is None or not is_model_type(old.config.media_type) \
                or old.config.size > MAX_OLD_CONFIG:
            return None
        before = [layer for layer in old.layers if not is_placeholder_layer(layer)]
        if weight_digests(before) != weight_digests(layers):
            return None
        raw = b"".join(self.client.fetch_blob(repository, old.config.digest, old.config.size))
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            return None
        return data

