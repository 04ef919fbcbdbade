"""Cache entries: compact, checksummed, and anything damaged reads as a miss, never as an embedding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from similarity.cache.codec import (
    FLAG_TRUNCATED,
    UrlRecord,
    decode_embedding,
    decode_url,
    encode_embedding,
    encode_url,
    quantise,
)


def _unit(n: int = 512, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=n).astype(np.float32)
    return v / np.linalg.norm(v)


def test_float32_round_trip_is_exact_and_compact() -> None:
    v = _unit()
    data = encode_embedding(v, "float32", FLAG_TRUNCATED)
    assert len(data) == 512 * 4 + 15  # 11-byte header, 4-byte checksum
    out, flags = decode_embedding(data, 512)
    assert out.dtype == np.float32 and np.array_equal(out, v) and flags == FLAG_TRUNCATED


def test_float16_halves_the_size_and_matches_quantise() -> None:
    v = _unit()
    data = encode_embedding(v, "float16")
    assert len(data) == 512 * 2 + 15
    out, flags = decode_embedding(data)
    assert flags == 0 and np.array_equal(out, quantise(v, "float16"))
    assert float(np.abs(out - v).max()) < 1e-3
    assert abs(float(out @ _unit(seed=1)) - float(v @ _unit(seed=1))) < 1e-3  # a cosine moves < 0.001


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_every_single_bit_flip_and_every_truncation_is_rejected(dtype) -> None:
    data = encode_embedding(_unit(16), dtype)
    for i in range(len(data)):
        for bit in (0, 3, 7):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            assert decode_embedding(bytes(bad)) is None, (i, bit)
    for n in range(len(data)):
        assert decode_embedding(data[:n]) is None, n
    assert decode_embedding(data + b"\0") is None


def test_wrong_dimension_kind_or_values_are_rejected() -> None:
    assert decode_embedding(encode_embedding(_unit(16)), dim=512) is None
    assert decode_embedding(encode_url(UrlRecord("a" * 64, 1.0))) is None  # a URL record is no embedding
    nan = _unit(16)
    nan[3] = np.nan
    assert decode_embedding(encode_embedding(nan)) is None
    assert decode_embedding(encode_embedding(np.zeros(0, np.float32))) is None
    assert decode_embedding(None) is None and decode_embedding(b"") is None


def test_url_record_round_trip_and_damage() -> None:
    rec = UrlRecord(sha256="ab" * 32, checked_at=1234.5, etag='W/"x1"', last_modified="Tue, 01 Dec 2026 10:00:00 GMT")
    data = encode_url(rec)
    assert decode_url(data) == rec
    assert decode_url(encode_url(UrlRecord("cd" * 32, 1.0))) == UrlRecord("cd" * 32, 1.0)
    hops = UrlRecord("cd" * 32, 1.0, via=("https://cdn.example/a.png", "https://cdn2.example/b"))
    assert decode_url(encode_url(hops)) == hops
    assert decode_url(encode_url(UrlRecord("cd" * 32, 1.0, via=None))).via is None  # not known: never trusted
    for n in range(len(data)):
        assert decode_url(data[:n]) is None
    bad = bytearray(data)
    bad[10] ^= 1
    assert decode_url(bytes(bad)) is None
    assert decode_url(encode_embedding(_unit(16))) is None
    assert decode_url(encode_url(UrlRecord("not a hash", 1.0))) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    emb, url = decode_embedding(data), decode_url(data)  # raising fails the test
    if not data.startswith(b"TIS"):
        assert emb is None and url is None


def test_image_entries_keep_the_size_and_dimensions_and_read_only_as_images() -> None:
    from similarity.cache.codec import ImageInfo, decode_image, encode_image, is_embedding

    v = _unit()
    info = ImageInfo(nbytes=123_456, width=640, height=480)
    data = encode_image(v, info)
    assert len(data) == 512 * 4 + 15 + 16  # byte size (8), width and height (4 each)
    out, got = decode_image(data, 512)
    assert np.array_equal(out, v) and got == info and got.pixels == 640 * 480
    f16, _ = decode_image(encode_image(v, info, "float16"))
    assert np.array_equal(f16, quantise(v, "float16"))
    assert decode_embedding(data) is None  # never read as a caption's
    assert decode_image(data, 256) is None
    old = encode_embedding(v)  # an image entry as stored before: a miss, but not a damaged entry
    assert decode_image(old) is None and is_embedding(old)
    assert decode_image(data[:-1]) is None and not is_embedding(data)
    flipped = data[:20] + bytes([data[20] ^ 1]) + data[21:]
    assert decode_image(flipped) is None
    assert decode_image(encode_image(v, ImageInfo(10, 0, 5))) is None
