"""Unit tests for ocifs.digest: parsing digests and refusing bytes that do not match them."""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Iterator
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ocifs.digest import ALGORITHMS, Digest, DigestVerifier, verified_chunks
from ocifs.errors import IntegrityError, InvalidReference, OcifsError

HELLO = b"hello world"
HELLO_SHA256 = "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


# --------------------------------------------------------------------------- parse


def test_parse_sha256() -> None:
    digest = Digest.parse(f"sha256:{HELLO_SHA256}")
    assert digest.algorithm == "sha256"
    assert digest.hex == HELLO_SHA256
    assert str(digest) == f"sha256:{HELLO_SHA256}"
    assert digest.filename == f"sha256-{HELLO_SHA256}"
    assert digest == Digest("sha256", HELLO_SHA256)
    assert Digest.is_valid(f"sha256:{HELLO_SHA256}") is True


def test_parse_sha512() -> None:
    hex512 = hashlib.sha512(HELLO).hexdigest()
    digest = Digest.parse(f"sha512:{hex512}")
    assert digest.algorithm == "sha512"
    assert digest.hex == hex512
    assert len(digest.hex) == ALGORITHMS["sha512"] == 128


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256",
        "sha256:",
        HELLO_SHA256,  # missing algorithm and colon
        f"sha256{HELLO_SHA256}",  # missing colon
        f"sha256:{HELLO_SHA256[:-1]}",  # too short
        f"sha256:{HELLO_SHA256}0",  # too long
        f"sha256:{HELLO_SHA256.upper()}",  # upper-case hex
        f"sha256:{HELLO_SHA256[:-1]}A",
        f"sha256:{HELLO_SHA256[:-1]}g",  # not hex
        f"sha512:{HELLO_SHA256}",  # sha512 needs 128
        f"md5:{hashlib.md5(HELLO).hexdigest()}",  # unknown algorithm
        f"sha384:{hashlib.sha384(HELLO).hexdigest()}",
        f"SHA256:{HELLO_SHA256}",  # upper-case algorithm
        f"sha256+b64u:{HELLO_SHA256}",
        f" sha256:{HELLO_SHA256}",
        f"sha256:{HELLO_SHA256} ",
        f"sha256::{HELLO_SHA256}",
        f":{HELLO_SHA256}",
    ],
)
def test_parse_invalid(text: str) -> None:
    with pytest.raises(InvalidReference) as info:
        Digest.parse(text)
    assert info.value.errno == errno.EINVAL
    assert Digest.is_valid(text) is False


@pytest.mark.parametrize("value", [None, 123, b"sha256:" + HELLO_SHA256.encode(), ["sha256"]])
def test_parse_non_string(value: object) -> None:
    with pytest.raises(InvalidReference):
        Digest.parse(value)  # type: ignore[arg-type]


def test_parse_refuses_trailing_newline() -> None:
    with pytest.raises(InvalidReference):
        Digest.parse(f"sha256:{HELLO_SHA256}\n")


def test_unknown_algorithm_message() -> None:
    with pytest.raises(InvalidReference, match="unsupported digest algorithm"):
        Digest.parse(f"md5:{hashlib.md5(HELLO).hexdigest()}")


def test_digests_order_and_hash() -> None:
    a = Digest("sha256", "0" * 64)
    b = Digest("sha256", "f" * 64)
    assert a < b
    assert len({a, Digest.parse("sha256:" + "0" * 64)}) == 1


# --------------------------------------------------------------------------- of / verify


def test_of() -> None:
    assert Digest.of(HELLO) == Digest("sha256", HELLO_SHA256)
    assert Digest.of(b"") == Digest("sha256", EMPTY_SHA256)
    assert Digest.of(HELLO, "sha512") == Digest("sha512", hashlib.sha512(HELLO).hexdigest())


def test_verify_ok() -> None:
    assert Digest.of(HELLO).verify(HELLO) is None
    Digest.parse(f"sha256:{EMPTY_SHA256}").verify(b"")


def test_verify_mismatch() -> None:
    with pytest.raises(IntegrityError) as info:
        Digest.of(HELLO).verify(b"hello World")
    assert info.value.errno == errno.EIO
    assert HELLO_SHA256 in str(info.value)
    assert hashlib.sha256(b"hello World").hexdigest() in str(info.value)


@given(st.binary(max_size=512))
def test_of_parse_round_trip(data: bytes) -> None:
    digest = Digest.of(data)
    assert digest.hex == hashlib.sha256(data).hexdigest()
    assert Digest.parse(str(digest)) == digest
    digest.verify(data)


@given(st.binary(max_size=256), st.binary(max_size=256))
def test_verify_different_data(a: bytes, b: bytes) -> None:
    if a == b:
        Digest.of(a).verify(b)
    else:
        with pytest.raises(IntegrityError):
            Digest.of(a).verify(b)


# --------------------------------------------------------------------------- DigestVerifier


def test_verifier_ok() -> None:
    verifier = DigestVerifier(Digest.of(HELLO), len(HELLO))
    verifier.update(b"hello ")
    verifier.update(memoryview(b"world"))
    assert verifier.size == 11
    verifier.check()


def test_verifier_without_size() -> None:
    verifier = DigestVerifier(Digest.of(HELLO))
    verifier.update(HELLO)
    assert verifier.expected_size is None
    verifier.check()


def test_verifier_too_few_bytes() -> None:
    verifier = DigestVerifier(Digest.of(HELLO), len(HELLO))
    verifier.update(b"hello")
    with pytest.raises(IntegrityError, match="got 5 bytes, expected 11"):
        verifier.check()


def test_verifier_too_many_bytes_raises_on_update() -> None:
    verifier = DigestVerifier(Digest.of(HELLO), len(HELLO))
    verifier.update(HELLO)
    with pytest.raises(IntegrityError, match="more bytes than the expected 11"):
        verifier.update(b"!")


def test_verifier_right_size_wrong_digest() -> None:
    verifier = DigestVerifier(Digest.of(HELLO), len(HELLO))
    verifier.update(b"hello World")
    with pytest.raises(IntegrityError, match="digest mismatch"):
        verifier.check()


def test_verifier_wrong_digest_without_size() -> None:
    verifier = DigestVerifier(Digest.of(HELLO))
    verifier.update(b"other")
    with pytest.raises(IntegrityError, match="digest mismatch"):
        verifier.check()


# --------------------------------------------------------------------------- verified_chunks


class Source:
    """An iterable of chunks that records how many were taken from it."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.taken = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.taken += 1
            yield chunk


def _drain(iterator: Iterator[bytes], out: list[bytes]) -> None:
    for chunk in iterator:
        out.append(chunk)


def test_verified_chunks_yields_all() -> None:
    chunks = [b"he", b"llo", b" ", b"world"]
    assert list(verified_chunks(chunks, Digest.of(HELLO), len(HELLO))) == chunks
    assert list(verified_chunks(chunks, Digest.of(HELLO))) == chunks


def test_verified_chunks_skips_empty_chunks() -> None:
    chunks = [b"", b"hello", b"", b" world", b""]
    assert list(verified_chunks(chunks, Digest.of(HELLO), 11)) == [b"hello", b" world"]


def test_verified_chunks_empty_stream() -> None:
    assert list(verified_chunks([], Digest.of(b""), 0)) == []
    with pytest.raises(IntegrityError):
        list(verified_chunks([], Digest.of(HELLO)))


def test_verified_chunks_mismatch_withholds_last_chunk() -> None:
    chunks = [b"hello", b" ", b"World"]
    seen: list[bytes] = []
    with pytest.raises(IntegrityError, match="digest mismatch"):
        _drain(verified_chunks(chunks, Digest.of(HELLO), len(HELLO)), seen)
    assert seen == [b"hello", b" "]
    assert b"World" not in seen


def test_verified_chunks_single_chunk_mismatch_yields_nothing() -> None:
    seen: list[bytes] = []
    with pytest.raises(IntegrityError):
        _drain(verified_chunks([b"hello World"], Digest.of(HELLO)), seen)
    assert seen == []


def test_verified_chunks_short_stream_withholds_last_chunk() -> None:
    seen: list[bytes] = []
    with pytest.raises(IntegrityError, match="got 6 bytes, expected 11"):
        _drain(verified_chunks([b"hel", b"lo "], Digest.of(HELLO), len(HELLO)), seen)
    assert seen == [b"hel"]


def test_verified_chunks_too_many_bytes_raises_early() -> None:
    source = Source([b"hello", b" world", b"more", b"and more", b"and more"])
    seen: list[bytes] = []
    with pytest.raises(IntegrityError, match="more bytes than the expected 5"):
        _drain(verified_chunks(source, Digest.of(b"hello"), 5), seen)
    # The second chunk overflows: neither it nor the first is passed on, and the rest
    # of the stream is never read.
    assert seen == []
    assert source.taken == 2


def test_verified_chunks_overflow_late() -> None:
    source = Source([b"ab", b"cd", b"ef", b"gh", b"ij"])
    seen: list[bytes] = []
    with pytest.raises(IntegrityError):
        _drain(verified_chunks(source, Digest.of(b"abcdef"), 6), seen)
    assert seen == [b"ab", b"cd"]
    assert source.taken == 4


def test_verified_chunks_accepts_memoryviews() -> None:
    chunks = [memoryview(b"hello"), memoryview(b""), memoryview(b" world")]
    out = list(verified_chunks(chunks, Digest.of(HELLO), 11))  # type: ignore[arg-type]
    assert b"".join(out) == HELLO
    assert len(out) == 2


@st.composite
def chunked(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    data = draw(st.binary(min_size=0, max_size=2048))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return data, [data[a:b] for a, b in pairwise(bounds)]


@given(chunked(), st.booleans())
def test_verified_chunks_random_chunkings(case: tuple[bytes, list[bytes]], with_size: bool) -> None:
    data, chunks = case
    assert b"".join(chunks) == data
    out = list(verified_chunks(chunks, Digest.of(data), len(data) if with_size else None))
    assert out == [chunk for chunk in chunks if chunk]
    assert b"".join(out) == data


@given(chunked(), st.integers(0, 2047), st.integers(1, 255), st.booleans())
def test_verified_chunks_random_corruption(
    case: tuple[bytes, list[bytes]], position: int, flip: int, with_size: bool
) -> None:
    data, chunks = case
    if not data:
        return
    position %= len(data)
    corrupt = bytearray(data)
    corrupt[position] ^= flip
    # Chunk the corrupted bytes exactly as the good ones.
    bad_chunks: list[bytes] = []
    offset = 0
    for chunk in chunks:
        bad_chunks.append(bytes(corrupt[offset : offset + len(chunk)]))
        offset += len(chunk)
    non_empty = [chunk for chunk in bad_chunks if chunk]
    seen: list[bytes] = []
    with pytest.raises(IntegrityError):
        _drain(verified_chunks(bad_chunks, Digest.of(data), len(data) if with_size else None), seen)
    # Everything but the final chunk may pass; the final one never does.
    assert seen == non_empty[:-1]
    assert sum(map(len, seen)) < len(data)


@given(chunked(), st.binary(min_size=1, max_size=64))
def test_verified_chunks_random_extra_bytes(case: tuple[bytes, list[bytes]], extra: bytes) -> None:
    data, chunks = case
    seen: list[bytes] = []
    with pytest.raises(IntegrityError, match="more bytes"):
        _drain(verified_chunks([*chunks, extra], Digest.of(data), len(data)), seen)
    assert seen == [chunk for chunk in chunks if chunk][:-1]


def test_error_classes() -> None:
    assert issubclass(IntegrityError, OcifsError)
    assert IntegrityError("x").errno == errno.EIO
    assert InvalidReference("x").errno == errno.EINVAL
