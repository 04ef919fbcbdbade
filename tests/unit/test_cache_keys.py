"""Cache keys and model fingerprints: anything that changes an embedding changes its key, and
preprocessing cannot change without ``PREPROCESS_VERSION`` changing with it."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import similarity.cache.keys as keys
from similarity.cache.keys import caption_key, content_hash, fingerprint, image_key, url_key
from similarity.model import ClipModel, PreprocessConfig, load_model
from similarity.model.preprocess import PREPROCESS_VERSION, load_pixels

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
IMAGES = FIXTURES / "preprocess"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "images"

#: sha256 of the preprocessed pixels of the fixed images below, per PREPROCESS_VERSION. When this
#: test fails, preprocessing (or the decoder under it) now gives other pixels: cached image
#: embeddings made before would be stale. Bump PREPROCESS_VERSION in similarity/model/preprocess.py
#: and add the new version's hash here; never edit an existing line.
GOLDEN = {
    1: "bd369124e9f865fe45933aca803cac31356a835569235f1501dd1980538bd096",
    # 2: JPEG draft decoding became opt-in (PreprocessConfig() no longer drafts), and an opted-in
    # draft now resizes the exact picture box Pillow reports to the full decode's size: for sides
    # not divisible by the DCT scale (photo_odd_exif8.jpg, added with this version) the same
    # config gives other pixels than version 1 did. Undrafted pixels are unchanged.
    2: "77c8e9015b293aae3c626fc40b958a5ff8b4ddb4307de60813a41d7156faea04",
    # 3: crop-only resizes take the full resize's pass order (tall_banner.png), 16-bit grey with a
    # tRNS level composites on white (gray16_trns.png), and an EXIF orientation is applied without
    # writing the EXIF back (photo_bad_exif_tag.jpg, a decode_error before); the three files were
    # added with this version. The first six files' pixels are unchanged.
    3: "544437ac90c90187007d4b75c0e433ad6857c4e6fcb4a716af44498d7bbc2aff",
}


def _configs(tiny_clip_dir: Path) -> list[PreprocessConfig]:
    return [
        PreprocessConfig(),  # ViT-B/32: 224 px, JPEG draft decoding off (the default)
        PreprocessConfig(draft_factor=2),  # the opt-in JPEG draft
        PreprocessConfig.from_model_dir(tiny_clip_dir),  # 64 px
        PreprocessConfig.from_model_dir(tiny_clip_dir, draft_factor=2),
        PreprocessConfig(shortest_edge=96, crop_height=128, crop_width=112, draft_factor=0),  # crop > image: padding
    ]


def _golden_digest(tiny_clip_dir: Path) -> str:
    files = [
        IMAGES / "photo_exif6.jpg",  # large JPEG: draft decode, EXIF rotation, resize, crop
        IMAGES / "photo_odd_exif8.jpg",  # 1003x917: the draft's reduced grid is rounded up
        IMAGES / "rgba.png",  # transparency composited on white, upscaled
        IMAGES / "gray16.png",  # 16-bit grey scaled, not clamped
        IMAGES / "palette.gif",  # palette image, wide aspect
        EXAMPLES / "red_circle.png",
        IMAGES / "tall_banner.png",  # 40x1100: crop-only resize in the full resize's pass order
        IMAGES / "gray16_trns.png",  # 16-bit grey with a tRNS level: composited on white
        IMAGES / "photo_bad_exif_tag.jpg",  # EXIF orientation 6 beside a tag Pillow cannot write back
    ]
    h = hashlib.sha256()
    for cfg in _configs(tiny_clip_dir):
        for f in files:
            px = load_pixels(f.read_bytes(), cfg)
            assert px.dtype == np.float32
            h.update(np.ascontiguousarray(px).tobytes())
    return h.hexdigest()


def test_preprocessing_output_is_pinned_to_its_version(tiny_clip_dir) -> None:
    assert max(GOLDEN) == PREPROCESS_VERSION, "record the golden hash of the new PREPROCESS_VERSION"
    assert len(set(GOLDEN.values())) == len(GOLDEN), "a version bump must come with a new hash"
    assert _golden_digest(tiny_clip_dir) == GOLDEN[PREPROCESS_VERSION], (
        "preprocessing gives other pixels than PREPROCESS_VERSION "
        f"{PREPROCESS_VERSION} did: bump it in similarity/model/preprocess.py (cached image embeddings "
        "would otherwise be reused for different inputs) and record the new hash in GOLDEN"
    )


@pytest.fixture(scope="module")
def model(tiny_clip_dir) -> ClipModel:
    return load_model(tiny_clip_dir, backend="torch", device="cpu", dtype="fp32")


def _with(model: ClipModel, **info: object) -> ClipModel:
    return ClipModel(model.backend, model.tokenizer, model.preprocess, dataclasses.replace(model.info, **info))


def test_fingerprint_is_stable_for_the_same_model(model, tiny_clip_dir) -> None:
    again = load_model(tiny_clip_dir, backend="torch", device="cpu", dtype="fp32")
    assert fingerprint(model) == fingerprint(again)


@pytest.mark.parametrize(
    "change",
    [{"backend": "onnx"}, {"dtype": "bf16"}, {"device": "cuda"}, {"revision": "other"}, {"model_id": "x/y"}],
    ids=lambda c: next(iter(c)),
)
def test_every_part_of_the_model_identity_changes_both_fingerprints(model, change) -> None:
    a, b = fingerprint(model), fingerprint(_with(model, **change))
    assert a.image != b.image and a.text != b.text


def test_preprocessing_config_and_version_change_only_the_image_fingerprint(model, monkeypatch) -> None:
    base = fingerprint(model)
    other = ClipModel(model.backend, model.tokenizer, dataclasses.replace(model.preprocess, draft_factor=2), model.info)
    assert fingerprint(other).image != base.image and fingerprint(other).text == base.text
    monkeypatch.setattr(keys, "PREPROCESS_VERSION", PREPROCESS_VERSION + 1)
    bumped = fingerprint(model)
    assert bumped.image != base.image and bumped.text == base.text


def test_weights_rewritten_in_place_change_the_fingerprint(tiny_clip_dir, tmp_path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_clip_dir, d)
    m = load_model(d, backend="torch", device="cpu")
    before = fingerprint(m)
    st = (d / "model.safetensors").stat()
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    after = fingerprint(m)
    assert after.image != before.image and after.text != before.text


def test_tokenizer_files_change_only_the_text_fingerprint(tiny_clip_dir, tmp_path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_clip_dir, d)
    m = load_model(d, backend="torch", device="cpu")
    before = fingerprint(m)
    with (d / "tokenizer_config.json").open("a") as fh:
        fh.write("\n")
    after = fingerprint(m)
    assert after.text != before.text and after.image == before.image


def test_keys_separate_kinds_inputs_and_models(model) -> None:
    fp, other = fingerprint(model), fingerprint(_with(model, dtype="bf16"))
    sha = content_hash(b"image bytes")
    assert image_key(fp, sha) != image_key(other, sha) != image_key(fp, content_hash(b"other bytes"))
    assert caption_key(fp, "a cat") != caption_key(fp, "a cat ") != caption_key(other, "a cat")
    assert url_key("https://x/a.png") != url_key("https://x/b.png")
    assert {k[:2] for k in (image_key(fp, sha), caption_key(fp, "a"), url_key("u"))} == {"i:", "c:", "u:"}
    # a caption that looks like a key of another kind still cannot collide with it
    assert caption_key(fp, sha) != image_key(fp, sha)
