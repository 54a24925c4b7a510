"""Small real model files for the model tests (issue 12), written by the formats' own
libraries: llama.cpp's `gguf` package and Hugging Face's `safetensors`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFEndian, GGUFWriter, LlamaFileType
from safetensors.numpy import save_file


def write_gguf(path: Path, *, arch: str = "llama", name: str = "tiny test model",
               tensors: dict[str, tuple[int, ...]] | None = None, file_type: int | None = LlamaFileType.MOSTLY_F16,
               context_length: int = 2048, vocabulary: int = 1000, seed: int = 0,
               big_endian: bool = False) -> dict[str, np.ndarray]:
    """A GGUF file with a tokenizer vocabulary (a long string array, as real models have),
    float16 tensors of these shapes (random, reproducible from `seed`), and the usual
    general.* and <arch>.* keys. Returns the tensors written."""
    shapes = tensors if tensors is not None else {"token_embd.weight": (64, 32), "output.weight": (32, 64)}
    rng = np.random.default_rng(seed)
    endian = GGUFEndian.BIG if big_endian else GGUFEndian.LITTLE
    writer = GGUFWriter(path, arch, endianess=endian)
    writer.add_name(name)
    if file_type is not None:
        writer.add_file_type(int(file_type))
    writer.add_context_length(context_length)
    writer.add_block_count(2)
    writer.add_embedding_length(32)
    writer.add_token_list([f"token-{i}" for i in range(vocabulary)])
    written: dict[str, np.ndarray] = {}
    for tensor_name, shape in shapes.items():
        data = rng.standard_normal(shape).astype(np.float16)
        if big_endian:
            data = data.byteswap()
        writer.add_tensor(tensor_name, data)
        written[tensor_name] = data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def write_safetensors(path: Path, *, tensors: dict[str, tuple[int, ...]] | None = None, seed: int = 0,
                      metadata: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """A safetensors file of float32 tensors (random, reproducible). Returns them."""
    shapes = tensors if tensors is not None else {"model.embed.weight": (64, 32), "lm_head.weight": (32, 64)}
    rng = np.random.default_rng(seed)
    written = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    save_file(written, str(path), metadata=metadata)
    return written
