"""ocifs.gguf: GGUF headers read from a file's first bytes, checked against files written by
llama.cpp's own `gguf` package and against its reader; hostile headers are refused."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from gguf import GGUFReader, LlamaFileType

from ocifs.gguf import FIRST_PIECE, GGUFError, read_header
from tests.models import write_gguf


def reader_of(path: Path, seen: list[tuple[int, int]] | None = None) -> Callable[[int, int], bytes]:
    data = path.read_bytes()

    def read(offset: int, size: int) -> bytes:
        if seen is not None:
            seen.append((offset, size))
        return data[offset:offset + size]
    return read


@pytest.mark.parametrize("big_endian", [False, True], ids=["little-endian", "big-endian"])
def test_header_matches_llama_cpps_reader(tmp_path: Path, big_endian: bool) -> None:
    path = tmp_path / "model.gguf"
    shapes = {"token_embd.weight": (100, 48), "blk.0.attn_q.weight": (48, 48), "output_norm.weight": (48,)}
    write_gguf(path, arch="qwen2", name="Tiny Qwen", tensors=shapes, file_type=LlamaFileType.MOSTLY_Q4_K_M,
               context_length=32768, big_endian=big_endian)
    header = read_header(reader_of(path), path.stat().st_size)
    reference = GGUFReader(path)
    assert header.tensor_count == len(reference.tensors) == 3
    assert header.parameters == sum(int(t.n_elements) for t in reference.tensors) == 100 * 48 + 48 * 48 + 48
    assert header.architecture == "qwen2"
    assert header.name == "Tiny Qwen"
    assert header.quantization == "Q4_K_M"
    assert header.context_length == 32768
    assert header.version == 3
    assert header.header_size <= min(t.data_offset for t in reference.tensors)
    assert "tokenizer.ggml.tokens" not in header.metadata  # 1000 items: skipped, not kept
    assert header.xattrs() == {
        "user.gguf.architecture": b"qwen2", "user.gguf.name": b"Tiny Qwen",
        "user.gguf.parameters": str(100 * 48 + 48 * 48 + 48).encode(), "user.gguf.quantization": b"Q4_K_M",
        "user.gguf.context_length": b"32768", "user.gguf.version": b"3", "user.gguf.tensors": b"3"}


def test_reads_only_the_first_bytes(tmp_path: Path) -> None:
    path = tmp_path / "big.gguf"
    write_gguf(path, tensors={"a": (1024, 1024), "b": (1024, 1024)})  # 4 MiB of tensor data
    seen: list[tuple[int, int]] = []
    header = read_header(reader_of(path, seen), path.stat().st_size)
    assert header.parameters == 2 * 1024 * 1024
    assert seen[0] == (0, FIRST_PIECE)
    assert max(offset + size for offset, size in seen) <= FIRST_PIECE  # the header fits the first piece
    assert path.stat().st_size > 16 * FIRST_PIECE


def test_quantization_without_file_type_is_the_main_tensor_type(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_gguf(path, file_type=None)
    assert read_header(reader_of(path), path.stat().st_size).quantization == "F16"


def test_a_long_vocabulary_is_walked_in_pieces(tmp_path: Path) -> None:
    path = tmp_path / "vocab.gguf"
    write_gguf(path, vocabulary=200_000)  # ~2.8 MiB of strings before the tensor infos
    seen: list[tuple[int, int]] = []
    header = read_header(reader_of(path, seen), path.stat().st_size)
    assert header.parameters == 64 * 32 * 2
    assert len(seen) > 1 and all(size <= 8 << 20 for _, size in seen)


def _header(*parts: bytes) -> bytes:
    return b"".join(parts)


def _string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


HOSTILE = {
    "no-magic": b"GGML" + bytes(60),
    "version-1": _header(b"GGUF", struct.pack("<IQQ", 1, 0, 0)),
    "version-99": _header(b"GGUF", struct.pack("<IQQ", 99, 0, 0)),
    "claims-2^60-keys": _header(b"GGUF", struct.pack("<IQQ", 3, 0, 1 << 60)),
    "claims-2^60-tensors": _header(b"GGUF", struct.pack("<IQQ", 3, 1 << 60, 0)),
    "string-longer-than-file": _header(b"GGUF", struct.pack("<IQQ", 3, 0, 1), struct.pack("<Q", 1 << 40)),
    "truncated": _header(b"GGUF", struct.pack("<IQQ", 3, 0, 1), _string(b"general.name"), struct.pack("<I", 8)),
    "unknown-value-type": _header(b"GGUF", struct.pack("<IQQ", 3, 0, 1), _string(b"k"), struct.pack("<I", 77),
                                  bytes(16)),
    "array-of-2^50-strings": _header(b"GGUF", struct.pack("<IQQ", 3, 0, 1), _string(b"k"),
                                     struct.pack("<IIQ", 9, 8, 1 << 50), bytes(16)),
    "nested-arrays": _header(b"GGUF", struct.pack("<IQQ", 3, 0, 1), _string(b"k"),
                             struct.pack("<I", 9), struct.pack("<IQ", 9, 1) * 200, bytes(16)),
    "tensor-with-1000-dims": _header(b"GGUF", struct.pack("<IQQ", 3, 1, 0), _string(b"t"),
                                     struct.pack("<I", 1000), bytes(8000)),
}


@pytest.mark.parametrize("data", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_headers_are_refused(data: bytes) -> None:
    with pytest.raises(GGUFError):
        read_header(lambda offset, size: data[offset:offset + size], len(data))


def test_a_header_past_the_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vocab.gguf"
    write_gguf(path, vocabulary=50_000)
    with pytest.raises(GGUFError, match="first 65536 bytes"):
        read_header(reader_of(path), path.stat().st_size, limit=65536)


def test_a_real_file_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_gguf(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        header = read_header(lambda offset, size: os.pread(fd, size, offset), path.stat().st_size)
    finally:
        os.close(fd)
    assert header.quantization == "F16" and header.parameters == 64 * 32 * 2


def test_hostile_headers_cost_bounded_time_and_respect_the_callers_tick() -> None:
    """Millions of items a header may claim: refused outright where no model comes near
    (keys, tensors, nested arrays), else walked without being kept, and the caller's tick (a
    filesystem operation's deadline) is called as it goes and may stop it."""
    import time

    from ocifs.gguf import MAX_HEADER, TICK_ITEMS

    count = (MAX_HEADER - 100) // 9
    strings = _header(b"GGUF", struct.pack("<IQQ", 3, 0, 1), _string(b"k"), struct.pack("<IIQ", 9, 8, count),
                      _string(b"a") * count)
    ticks: list[float] = []
    started = time.process_time()
    header = read_header(lambda offset, size: strings[offset:offset + size], len(strings),
                         tick=lambda: ticks.append(time.process_time()))
    assert header.metadata == {}
    assert len(ticks) >= count // TICK_ITEMS - 1
    assert time.process_time() - started < 5  # ~1 s here; was 5 s and 420 MiB kept in a list

    class Late(Exception):
        pass

    def late() -> None:
        raise Late
    with pytest.raises(Late):
        read_header(lambda offset, size: strings[offset:offset + size], len(strings), tick=late)

    many_keys = _header(b"GGUF", struct.pack("<IQQ", 3, 0, 100_000), (_string(b"k") + struct.pack("<IB", 0, 1))
                        * 100_000)
    with pytest.raises(GGUFError, match="not a model's"):
        read_header(lambda offset, size: many_keys[offset:offset + size], len(many_keys))


def test_xattr_values_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_gguf(path, name="\N{REPLACEMENT CHARACTER}" * 20_000)  # 60000 bytes: kept, too long for an xattr
    values = read_header(reader_of(path), path.stat().st_size).xattrs()
    assert len(values["user.gguf.name"]) <= 4096
