"""GGUF headers: what a model file says about itself, read from its first bytes (issue 12).

No FUSE, no HTTP: `read_header(read, size)` takes a `read(offset, size) -> bytes` callable
(a blob handle's, a staged file's) and parses the header of GGUF version 2 or 3
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): the metadata key-value pairs,
then the tensor infos, whose shapes give the parameter count. The tensors' data, which is
all the rest of the file, is never read.

Cheaper than the `gguf` package for this: its reader maps the whole file and builds numpy
views of every tensor; this reads only the header, in pieces, and keeps only what a glance
needs (scalars, strings up to MAX_KEPT_STRING, arrays up to MAX_KEPT_ARRAY items). Long
arrays (a tokenizer's vocabulary) are skipped over without being kept.

A hostile header cannot make it allocate or read without bound: at most MAX_HEADER bytes are
parsed; lengths and counts beyond what the file or the bound could hold are errors; at most
MAX_KEPT_KEYS pairs are kept; long arrays are skipped without building them. Its CPU time is
bounded by the caller's `tick`, called every TICK_ITEMS items (a filesystem operation passes
its deadline check: millions of one-byte strings take seconds of Python).
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import OcifsError

MAGIC = b"GGUF"
MAX_HEADER = 32 << 20  # bytes of header parsed at most (a 256k vocabulary and its merges take ~8 MiB)
MAX_KEPT_STRING = 64 << 10
MAX_KEPT_ARRAY = 50  # as Docker's model config keeps (longer arrays are left out)
MAX_KEPT_KEYS = 1024  # real models have 20-60
MAX_XATTR_VALUE = 4096  # bytes of one `user.gguf.*` value (a name that long is no name)
TICK_ITEMS = 1 << 16
# Counts no model comes near (tens of keys; hundreds to a few thousand tensors, experts merged):
# a header claiming more is refused rather than parsed for seconds.
MAX_KEYS = 1 << 16
MAX_TENSORS = 1 << 16
MAX_NESTED_ITEMS = 1 << 16
MAX_DIMS = 8
MAX_NESTING = 4  # arrays of arrays
FIRST_PIECE = 256 << 10

# Value types of metadata (the spec's gguf_metadata_value_type).
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALARS = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i", FLOAT32: "f",
            BOOL: "?", UINT64: "Q", INT64: "q", FLOAT64: "d"}

# `general.file_type` (llama.cpp's llama_ftype): what a model's weights are quantized as.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE",
}
# Tensor types (ggml_type), for a file without `general.file_type`.
TENSOR_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}


class GGUFError(OcifsError):
    """Not a GGUF file, or a header this parser refuses (unknown version, over the bounds)."""


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    tensor_count: int
    metadata: dict[str, Any]  # what was kept: scalars, strings, short arrays (as lists)
    parameters: int  # elements of all tensors
    tensor_types: dict[str, int] = field(default_factory=dict)  # type name -> elements
    header_size: int = 0  # bytes up to the end of the tensor infos

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    @property
    def name(self) -> str | None:
        value = self.metadata.get("general.name")
        return value if isinstance(value, str) else None

    @property
    def quantization(self) -> str | None:
        """`general.file_type` by llama.cpp's name (Q4_K_M...), else the tensor type that
        holds most of the weights."""
        file_type = self.metadata.get("general.file_type")
        if isinstance(file_type, int) and not isinstance(file_type, bool):
            return FILE_TYPES.get(file_type, f"type {file_type}")
        if not self.tensor_types:
            return None
        return max(self.tensor_types.items(), key=lambda item: item[1])[0]

    @property
    def context_length(self) -> int | None:
        if self.architecture is None:
            return None
        value = self.metadata.get(f"{self.architecture}.context_length")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def xattrs(self) -> dict[str, bytes]:
        """The `user.gguf.*` extended attributes: what is worth a glance."""
        values: dict[str, str | int | None] = {
            "architecture": self.architecture,
            "name": self.name,
            "parameters": self.parameters,
            "quantization": self.quantization,
            "context_length": self.context_length,
            "version": self.version,
            "tensors": self.tensor_count,
        }
        return {f"{XATTR_PREFIX}{key}": str(value).encode()[:MAX_XATTR_VALUE]
                for key, value in values.items() if value is not None}


XATTR_PREFIX = "user.gguf."
XATTR_NAMES = tuple(f"{XATTR_PREFIX}{key}" for key in
                    ("architecture", "name", "parameters", "quantization", "context_length", "version", "tensors"))


class _Cursor:
    """Sequential reads over `read(offset, size)`, fetched in growing pieces, bounded."""

    def __init__(self, read: Callable[[int, int], bytes], size: int, limit: int,
                 tick: Callable[[], None] | None = None) -> None:
        self._read = read
        self._end = min(size, limit)
        self._size = size
        self._buffer = b""
        self._start = 0  # file offset of _buffer[0]
        self._position = 0  # offset in _buffer
        self._piece = FIRST_PIECE
        self.order = "<"
        self._tick = tick
        self._items = 0

    def item(self) -> None:
        """Count one parsed item; every TICK_ITEMS, the caller's tick (its deadline)."""
        self._items += 1
        if self._tick is not None and self._items % TICK_ITEMS == 0:
            self._tick()

    def skip_strings(self, count: int) -> None:
        """Skip `count` GGUF strings, reading their lengths straight from the buffer."""
        fmt = self.order + "Q"
        unpack_from = struct.unpack_from
        for done in range(count):
            if len(self._buffer) - self._position < 8:
                length = self.unpack("Q")
            else:
                length = unpack_from(fmt, self._buffer, self._position)[0]
                self._position += 8
            self.skip(length)
            if self._tick is not None and done % TICK_ITEMS == TICK_ITEMS - 1:
                self._tick()

    @property
    def offset(self) -> int:
        return self._start + self._position

    def _within(self, count: int) -> None:
        if count < 0 or self.offset + count > self._end:
            where = "the file's end" if self._end == self._size else f"the first {self._end} bytes"
            raise GGUFError(f"GGUF header runs past {where}")

    def take(self, count: int) -> bytes:
        self._within(count)
        while len(self._buffer) - self._position < count:
            self._fill(count)
        data = self._buffer[self._position:self._position + count]
        self._position += count
        return data

    def skip(self, count: int) -> None:
        self._within(count)
        held = len(self._buffer) - self._position
        if count <= held:
            self._position += count
            return
        self._start = self.offset + count
        self._buffer, self._position = b"", 0

    def _fill(self, need: int) -> None:
        kept = self._buffer[self._position:]
        self._start += self._position
        offset = self._start + len(kept)
        want = min(max(self._piece, need - len(kept)), self._end - offset)
        data = self._read(offset, want)
        if not data:
            raise GGUFError(f"the file ended at {offset} bytes")
        self._buffer, self._position = kept + data, 0
        self._piece = min(self._piece * 2, 8 << 20)

    def unpack(self, code: str) -> Any:
        fmt = self.order + code
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self, keep: int = MAX_KEPT_STRING) -> str | None:
        """A GGUF string: its text, or None (skipped) when longer than `keep` bytes."""
        length = self.unpack("Q")
        if length > keep:
            self.skip(length)
            return None
        return self.take(length).decode("utf-8", errors="replace")


def read_header(read: Callable[[int, int], bytes], size: int, *, limit: int = MAX_HEADER,
                tick: Callable[[], None] | None = None) -> GGUFHeader:
    """Parse the GGUF header of a file of `size` bytes. GGUFError when it is none. `tick` is
    called every TICK_ITEMS items parsed and may raise (a deadline)."""
    cursor = _Cursor(read, size, limit, tick)
    if cursor.take(4) != MAGIC:
        raise GGUFError("not a GGUF file (no GGUF magic)")
    raw_version = cursor.take(4)
    version = struct.unpack("<I", raw_version)[0]
    if version not in (2, 3):
        swapped = struct.unpack(">I", raw_version)[0]
        if swapped not in (2, 3):
            raise GGUFError(f"GGUF version {version} is not read (2 and 3 are)")
        cursor.order, version = ">", swapped  # a big-endian file
    tensor_count = cursor.unpack("Q")
    kv_count = cursor.unpack("Q")
    # Each pair takes at least 12 bytes, each tensor info at least 24: counts the bound
    # cannot hold are lies (and would make the loops below long).
    if kv_count * 12 + tensor_count * 24 > min(size, limit):
        raise GGUFError(f"GGUF header claims {kv_count} keys and {tensor_count} tensors: more than the file holds")
    if kv_count > MAX_KEYS or tensor_count > MAX_TENSORS:
        raise GGUFError(f"GGUF header claims {kv_count} keys and {tensor_count} tensors: not a model's")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        cursor.item()
        key = cursor.string(keep=65535)
        value_type = cursor.unpack("I")
        value = _value(cursor, value_type, 0)
        if key is not None and value is not _SKIPPED and len(metadata) < MAX_KEPT_KEYS:
            metadata[key] = value
    parameters = 0
    tensor_types: Counter[str] = Counter()
    for _ in range(tensor_count):
        cursor.item()
        cursor.string(keep=0)  # the tensor's name: not kept
        dims = cursor.unpack("I")
        if dims > MAX_DIMS:
            raise GGUFError(f"a tensor with {dims} dimensions")
        elements = 1
        for _ in range(dims):
            elements *= cursor.unpack("Q")
        type_code = cursor.unpack("I")
        cursor.skip(8)  # the data's offset
        parameters += elements
        tensor_types[TENSOR_TYPES.get(type_code, f"type {type_code}")] += elements
    return GGUFHeader(version, tensor_count, metadata, parameters, dict(tensor_types), cursor.offset)


_SKIPPED = object()


def _value(cursor: _Cursor, value_type: int, depth: int) -> Any:
    code = _SCALARS.get(value_type)
    if code is not None:
        return cursor.unpack(code)
    if value_type == STRING:
        value = cursor.string()
        return _SKIPPED if value is None else value
    if value_type != ARRAY:
        raise GGUFError(f"unknown GGUF value type {value_type}")
    item_type = cursor.unpack("I")
    count = cursor.unpack("Q")
    item_code = _SCALARS.get(item_type)
    if item_code is not None:
        item_size = struct.calcsize(item_code)
        if count > MAX_KEPT_ARRAY:
            cursor.skip(count * item_size)
            return _SKIPPED
        return [cursor.unpack(item_code) for _ in range(count)]
    if item_type == STRING:
        if count * 8 > MAX_HEADER:
            raise GGUFError(f"an array of {count} strings")
        if count > MAX_KEPT_ARRAY:
            cursor.skip_strings(count)
            return _SKIPPED
        strings = [cursor.string() for _ in range(count)]
        return _SKIPPED if None in strings else strings
    if item_type == ARRAY:  # nested arrays: walked, never kept
        if count > MAX_NESTED_ITEMS or depth >= MAX_NESTING:
            raise GGUFError(f"an array of {count} arrays, {depth + 1} deep")
        for _ in range(count):
            cursor.item()
            _value(cursor, ARRAY, depth + 1)
        return _SKIPPED
    raise GGUFError(f"unknown GGUF array item type {item_type}")
