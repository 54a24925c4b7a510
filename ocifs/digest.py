"""Content digests (`sha256:<hex>`) and readers that refuse bytes that do not match them."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .errors import IntegrityError, InvalidReference

# Registered algorithms and the length of their hex encoding (OCI image-spec, descriptor.md).
ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}

_DIGEST_RE = re.compile(r"^([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")


@dataclass(frozen=True, order=True)
class Digest:
    """A validated digest of a registered algorithm: `Digest.parse("sha256:...")`."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        if not isinstance(text, str):
            raise InvalidReference(f"invalid digest: {text!r}")
        match = _DIGEST_RE.fullmatch(text)
        if match is None:
            raise InvalidReference(f"invalid digest: {text!r}")
        algorithm, encoded = match.groups()
        length = ALGORITHMS.get(algorithm)
        if length is None:
            raise InvalidReference(f"unsupported digest algorithm: {algorithm!r}")
        if len(encoded) != length or not re.fullmatch(r"[a-f0-9]+", encoded):
            raise InvalidReference(f"invalid {algorithm} digest: {text!r}")
        return cls(algorithm, encoded)

    @classmethod
    def is_valid(cls, text: str) -> bool:
        try:
            cls.parse(text)
        except InvalidReference:
            return False
        return True

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> Any:
        return hashlib.new(self.algorithm)

    @property
    def filename(self) -> str:
        """`sha256-<hex>`: usable as a file name, unlike the `:` form."""
        return f"{self.algorithm}-{self.hex}"

    def verify(self, data: bytes) -> None:
        actual = hashlib.new(self.algorithm, data).hexdigest()
        if actual != self.hex:
            raise IntegrityError(f"digest mismatch: expected {self}, got {self.algorithm}:{actual}")

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


class DigestVerifier:
    """Hashes bytes as they pass; `check()` raises IntegrityError unless size and digest match."""

    def __init__(self, digest: Digest, size: int | None = None) -> None:
        self.digest = digest
        self.expected_size = size
        self.size = 0
        self._hasher = digest.hasher()

    def update(self, chunk: bytes | memoryview) -> None:
        self.size += len(chunk)
        if self.expected_size is not None and self.size > self.expected_size:
            raise IntegrityError(
                f"{self.digest}: more bytes than the expected {self.expected_size}"
            )
        self._hasher.update(chunk)

    def check(self) -> None:
        if self.expected_size is not None and self.size != self.expected_size:
            raise IntegrityError(
                f"{self.digest}: got {self.size} bytes, expected {self.expected_size}"
            )
        actual = self._hasher.hexdigest()
        if actual != self.digest.hex:
            raise IntegrityError(
                f"digest mismatch: expected {self.digest}, got {self.digest.algorithm}:{actual}"
            )


HASH_BLOCK = 4 * 1024 * 1024  # big enough that hashlib releases the GIL and syscalls are few


def update_from_fd(hasher: Any, fd: int, size: int | None = None) -> int:
    """Feed a file's bytes (from offset 0, up to `size` or its end) to `hasher` in big
    blocks; returns how many bytes were hashed."""
    buffer = memoryview(bytearray(HASH_BLOCK))
    offset = 0
    while size is None or offset < size:
        want = HASH_BLOCK if size is None else min(HASH_BLOCK, size - offset)
        n = os.preadv(fd, [buffer[:want]], offset)
        if n == 0:
            break
        hasher.update(buffer[:n])
        offset += n
    return offset


def verified_chunks(
    chunks: Iterable[bytes], digest: Digest, size: int | None = None
) -> Iterator[bytes]:
    """Yield `chunks`, holding the last one back until the whole digest has been checked.

    A consumer therefore never sees the end of a stream whose bytes do not match: the
    mismatch is raised where the final chunk would have been.
    """
    verifier = DigestVerifier(digest, size)
    pending: bytes | None = None
    for chunk in chunks:
        if not chunk:
            continue
        verifier.update(chunk)
        if pending is not None:
            yield pending
        pending = chunk
    verifier.check()
    if pending is not None:
        yield pending
