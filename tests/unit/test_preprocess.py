"""Decoding untrusted bytes and CLIP preprocessing parity with transformers' processor."""

from __future__ import annotations

import importlib.util
import io
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageOps

from similarity.errors import DecodeError, ModelIncomplete, NotAnImage, RowError, TooManyPixels
from similarity.model.preprocess import (
    CROP_ONLY_FACTOR,
    PreprocessConfig,
    crop_uint8,
    decode,
    load_pixels,
    normalise,
    preprocess,
)
from support.imageserver import huge_png_header, png_bytes
from support.shapes import draw

CFG = PreprocessConfig()


def test_png_declaring_huge_image_is_too_many_pixels() -> None:
    with pytest.raises(TooManyPixels):
        decode(huge_png_header(100_000, 100_000), CFG)
    with pytest.raises(TooManyPixels, match="exceeds the limit"):
        decode(huge_png_header(5000, 5000), PreprocessConfig(max_pixels=1_000_000))


def test_truncated_jpeg_is_decode_error() -> None:
    data = png_bytes(Image.new("RGB", (300, 200), (1, 2, 3)), "JPEG", quality=90)
    with pytest.raises(DecodeError):
        decode(data[: len(data) // 2], CFG)


@pytest.mark.parametrize("data", [b"<html>hello</html>", b"", b"%PDF-1.4 ...", b"\x00" * 100])
def test_non_images(data: bytes) -> None:
    with pytest.raises(NotAnImage):
        decode(data, CFG)


def test_format_sniffed_not_trusted() -> None:
    # An EPS/PSD-like format outside the accepted list is refused even if Pillow could read it.
    buf = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buf, "PPM")
    with pytest.raises(NotAnImage):
        decode(buf.getvalue(), CFG)


def test_exif_orientation_applied() -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = png_bytes(img, "JPEG", exif=exif.tobytes())
    assert decode(data, CFG).size == (20, 40)


def test_alpha_composited_on_white() -> None:
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red
    out = decode(png_bytes(img), CFG)
    assert out.mode == "RGB" and out.getpixel((5, 5)) == (255, 255, 255)
    p = Image.new("P", (10, 10), 0)
    p.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    p.info["transparency"] = 0
    assert decode(png_bytes(p, transparency=0), CFG).getpixel((1, 1)) == (255, 255, 255)


def test_sixteen_bit_scaled_not_clamped() -> None:
    arr = np.full((8, 8), 32768, dtype=np.uint16)  # mid grey in 16 bits
    img = Image.fromarray(arr)
    assert img.mode.startswith("I")
    out = decode(png_bytes(img), CFG)
    r, g, b = out.getpixel((0, 0))
    assert r == g == b and 126 <= r <= 129  # convert() would clamp this to 255


def test_cmyk_converted() -> None:
    img = Image.new("CMYK", (10, 10), (0, 255, 255, 0))  # pure red in CMYK
    out = decode(png_bytes(img, "JPEG", quality=95), CFG)
    r, g, b = out.getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    r, g, b = decode(buf.getvalue(), CFG).getpixel((8, 8))
    assert r > 200 and b < 50


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_only_raise_row_errors(data: bytes) -> None:
    try:
        load_pixels(data, CFG)
    except RowError:
        pass


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=400), st.integers(min_value=0, max_value=2000))
def test_corrupted_png_only_raises_row_errors(noise: bytes, pos: int) -> None:
    good = bytearray(png_bytes(Image.new("RGB", (30, 30), (9, 99, 199))))
    pos = pos % len(good)
    good[pos : pos + len(noise)] = noise
    try:
        load_pixels(bytes(good), CFG)
    except RowError:
        pass


# ------------------------------------------------------------------ parity with the reference
@pytest.fixture(scope="module")
def reference_processor():
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil()


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (224, 224), (225, 1000), (97, 61), (1203, 301)])
def test_preprocess_equals_reference(reference_processor, size) -> None:
    rng = random.Random(hash(size) & 0xFFFF)
    img = draw("red", "circle", rng, min_side=10, max_side=20).resize(size)
    noise = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.blend(img, Image.fromarray(noise), 0.3)
    ours = preprocess(img, CFG)
    ref = reference_processor(images=img, return_tensors="np")["pixel_values"][0]
    assert ours.shape == ref.shape == (3, 224, 224)
    assert np.abs(ours - ref).max() < 1e-5


def test_preprocess_reads_model_config(tiny_clip_dir) -> None:
    cfg = PreprocessConfig.from_model_dir(tiny_clip_dir)
    assert (cfg.shortest_edge, cfg.crop_height, cfg.crop_width) == (64, 64, 64)
    assert preprocess(Image.new("RGB", (100, 80)), cfg).shape == (3, 64, 64)


def test_jpeg_draft_off_by_default_and_only_for_large_images() -> None:
    small = png_bytes(Image.new("RGB", (640, 480), (10, 200, 30)), "JPEG")
    big = png_bytes(Image.new("RGB", (3000, 2000), (10, 200, 30)), "JPEG")
    assert decode(big, CFG).size == (3000, 2000)  # off by default: it moves scores past the bound
    draft = PreprocessConfig(draft_factor=2)
    assert decode(small, draft).size == (640, 480)
    w, h = decode(big, draft).size
    assert min(w, h) >= 2 * 224 and w < 3000  # reduced by DCT scaling, still twice the target


def _centre(px: np.ndarray) -> np.ndarray:
    """Centre of mass of a red shape's mask (red minus green) in a normalised crop."""
    w = np.clip(px[0] - px[1], 0, None)
    ys, xs = np.indices(w.shape)
    return np.array([(w * ys).sum(), (w * xs).sum()]) / w.sum()


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("size", [(897, 906), (906, 897), (1817, 1001)])  # odd sides: the reduced grid rounds up
def test_jpeg_draft_keeps_the_full_decode_geometry(orientation: int, size: tuple[int, int]) -> None:
    """An opted-in draft must not shift the crop. The reduced grid's last row and column are only
    partly picture; resizing the grid as it stands moved the crop by 0.4-0.5 px here (up to a pixel:
    0.15 in similarity on the test model); resizing the exact picture box keeps the full geometry,
    whatever the EXIF orientation."""
    rng = random.Random(7)
    img = draw("red", "square", rng, min(size), max(size)).resize(size)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = png_bytes(img, "JPEG", quality=95, exif=exif.tobytes())
    full = load_pixels(data, PreprocessConfig(draft_factor=0))
    drafted = load_pixels(data, PreprocessConfig(draft_factor=2))
    assert decode(data, PreprocessConfig(draft_factor=2)).size != decode(data, CFG).size  # it did draft
    assert np.abs(_centre(full) - _centre(drafted)).max() < 0.1
    assert np.abs(full - drafted).mean() < 0.02


def test_uint8_crop_is_the_same_input_before_normalising() -> None:
    """The uint8 path (for backends that normalise in their graph) is the float path's crop: one
    crop or a batch, normalised, gives the float path's values to the bit."""
    rng = random.Random(3)
    images = [draw("blue", "circle", rng, 100, 900) for _ in range(6)] + [Image.new("RGB", (50, 30), (1, 2, 3))]
    crops = [crop_uint8(img, CFG) for img in images]
    assert all(c.dtype == np.uint8 and c.shape == (224, 224, 3) for c in crops)
    floats = np.stack([preprocess(img, CFG) for img in images])
    assert np.array_equal(normalise(np.stack(crops), CFG), floats)
    data = png_bytes(images[0], "JPEG")
    assert np.array_equal(normalise(load_pixels(data, CFG, uint8=True), CFG), load_pixels(data, CFG))


def test_large_files_equal_reference_on_every_path(tiny_clip_dir) -> None:
    """Large JPEGs (some EXIF-rotated) and odd-sized PNGs through the whole loading path, float and
    uint8, and the device pixel path, against transformers' processor on Pillow's own full decode."""
    from transformers import CLIPImageProcessorPil

    from support.parity import large_images

    cfg = PreprocessConfig.from_model_dir(tiny_clip_dir)
    reference = CLIPImageProcessorPil.from_pretrained(str(tiny_clip_dir))
    device = None
    if importlib.util.find_spec("torch") is not None:
        from similarity.model.device_pixels import DevicePixels

        device = DevicePixels(cfg, "cpu")
    for data in large_images(64, n=4):
        upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        ref = reference(images=upright, return_tensors="np")["pixel_values"][0]
        assert np.abs(load_pixels(data, cfg) - ref).max() < 1e-5
        assert np.abs(normalise(load_pixels(data, cfg, uint8=True), cfg) - ref).max() < 1e-5
        if device is not None:  # SIMILARITY_PIXELS=torch, here on the CPU
            assert np.abs(device(data) - ref).max() < 1e-5


# ------------------------------------------------------------------ extreme aspect ratios
def _natural(size: tuple[int, int], seed: int) -> Image.Image:
    """A shape picture stretched to ``size`` with noise, as the parity test above uses."""
    img = draw("red", "circle", random.Random(seed), min_side=10, max_side=20).resize(size)
    noise = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.blend(img, Image.fromarray(noise), 0.3)


# Shapes whose full resize stays under CROP_ONLY_FACTOR x the crop: the reference's full resize.
@pytest.mark.parametrize("size", [(3583, 224), (224, 3583), (1000, 63), (63, 1000), (4000, 251)])
def test_preprocess_equals_reference_up_to_the_crop_only_threshold(reference_processor, size) -> None:
    img = _natural(size, sum(size))
    ref = reference_processor(images=img, return_tensors="np")["pixel_values"][0]
    assert np.abs(preprocess(img, CFG) - ref).max() < 1e-5


# Beyond it only the cropped box is resized: pixels within a few levels of the reference's.
@pytest.mark.parametrize("size", [(3585, 224), (5000, 20), (20, 5000), (8000, 100), (100, 8000), (300, 5000)])
def test_crop_only_resize_stays_close_to_the_reference(reference_processor, size) -> None:
    img = _natural(size, sum(size))
    ref = reference_processor(images=img, return_tensors="np")["pixel_values"][0]
    ours = preprocess(img, CFG)
    levels = np.abs(ours - ref) * np.asarray(CFG.std, dtype=np.float32)[:, None, None] * 255
    assert levels.max() <= 3.01 and levels.mean() < 0.5, (levels.max(), levels.mean())


def _banner(size: tuple[int, int]) -> Image.Image:
    """Sharp-edged stripes and bars: where the two pass orders round differently."""
    from PIL import ImageDraw

    w, h = size
    img = Image.new("RGB", size, "white")
    pen = ImageDraw.Draw(img)
    for y in range(0, h, 97):
        pen.rectangle((0, y, w, y + 8), fill=(200, 0, 0))
    for y in range(3, h, 40):
        pen.rectangle((5, y, w - 5, y + 3), fill=(0, 0, 0))
    return img


@pytest.mark.parametrize("size", [(100, 2000), (120, 2400), (2000, 100), (30, 9000)])
def test_crop_only_resize_takes_the_full_resizes_pass_order(reference_processor, size) -> None:
    # Before: a tall image narrower than the edge was resized vertical pass first in its box (Pillow
    # chooses the order from the sizes it is given) and horizontal first by the reference: 16-19
    # levels apart on these edges.
    img = _banner(size)
    ref = reference_processor(images=img, return_tensors="np")["pixel_values"][0]
    levels = np.abs(preprocess(img, CFG) - ref) * np.asarray(CFG.std, dtype=np.float32)[:, None, None] * 255
    assert levels.max() <= 1.01, levels.max()


def test_crop_only_resize_pads_like_the_full_resize(monkeypatch) -> None:
    """A crop larger than the shortest edge is padded with zeros on both paths alike."""
    import similarity.model.preprocess as pre

    cfg = PreprocessConfig(shortest_edge=200, crop_height=224, crop_width=224)
    img = _natural((9000, 40), 5)
    crop_only = pre.preprocess(img, cfg)
    monkeypatch.setattr(pre, "CROP_ONLY_FACTOR", 10**9)
    full = pre.preprocess(img, cfg)
    assert crop_only.shape == full.shape == (3, 224, 224)
    pad = -np.asarray(cfg.mean, dtype=np.float32) / np.asarray(cfg.std, dtype=np.float32)  # zero pixels
    assert np.allclose(crop_only[:, :12, :], pad[:, None, None]) and np.allclose(full[:, :12, :], pad[:, None, None])
    levels = np.abs(crop_only - full) * np.asarray(cfg.std, dtype=np.float32)[:, None, None] * 255
    assert levels.max() <= 3.01


def test_extreme_aspect_ratios_need_no_full_resize() -> None:
    """20000x3 at 224 px was resized to 1,493,333x224 (1.3 GB, more in copies) to keep 224x224 of
    it; 60000x1 needed ~12 GB. Under a 1 GiB address-space limit every such image must preprocess,
    through decoding too, at the deployed 224 px and at the test model's 64 px."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import io, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
import numpy as np
from PIL import Image
from similarity.model.preprocess import PreprocessConfig, load_pixels, preprocess
for edge in (224, 64):
    cfg = PreprocessConfig(shortest_edge=edge, crop_height=edge, crop_width=edge)
    for size in [(20000, 3), (3, 20000), (60000, 1), (1, 60000), (1000000, 2), (2, 1000000)]:
        img = Image.new("RGB", size, (200, 30, 30))
        out = preprocess(img, cfg)
        buf = io.BytesIO(); img.save(buf, "PNG")
        again = load_pixels(buf.getvalue(), cfg)
        assert out.shape == again.shape == (3, edge, edge) and np.isfinite(out).all(), size
        assert np.allclose(out, again)
print("ok")
"""
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "OPENBLAS_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.parametrize("orientation", [1, 6])
def test_jpeg_draft_with_crop_only_resize_keeps_the_geometry(orientation: int) -> None:
    """An extreme aspect ratio resizes only the crop's source box; under a draft that box must be
    taken inside the picture's box of the reduced grid, not the grid itself."""
    cfg = PreprocessConfig(shortest_edge=32, crop_height=32, crop_width=32)
    img = Image.new("RGB", (2301, 129), (200, 200, 200))  # resized: 570x32, past CROP_ONLY_FACTOR
    ImageDraw.Draw(img).rectangle((1120, 30, 1180, 90), fill=(215, 35, 35))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = png_bytes(img, "JPEG", quality=95, exif=exif.tobytes())
    drafted_cfg = PreprocessConfig(**{**cfg.__dict__, "draft_factor": 1})
    assert decode(data, drafted_cfg).size != decode(data, cfg).size  # it did draft
    assert CROP_ONLY_FACTOR * 32 * 32 < 570 * 32
    full, drafted = load_pixels(data, cfg), load_pixels(data, drafted_cfg)
    assert np.abs(_centre(full) - _centre(drafted)).max() < 0.1


def test_only_the_accepted_formats_plugins_are_imported(tmp_path) -> None:
    """Importing the library and decoding one image of every accepted format imports Pillow's
    plugins for those formats only: ``Image.init()`` imported all of them (~45, ~30 ms of each
    cold start), and ``Image.open`` calls it for any format asked for that is not registered."""
    import subprocess
    import sys
    from pathlib import Path

    from similarity.model.preprocess import ACCEPTED_FORMATS

    assert set(ACCEPTED_FORMATS) >= {"JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"}
    files = []
    for fmt in ACCEPTED_FORMATS:
        path = tmp_path / f"image.{fmt.lower()}"
        path.write_bytes(png_bytes(draw("red", "circle", random.Random(fmt)), fmt))
        files.append(str(path))
    code = """
import sys
import similarity
from pathlib import Path
from similarity.model.preprocess import PreprocessConfig, load_pixels
for f in sys.argv[1:]:
    assert load_pixels(Path(f).read_bytes(), PreprocessConfig()).shape == (3, 224, 224), f
print(" ".join(sorted(m.split(".")[1] for m in sys.modules if m.startswith("PIL.") and m.endswith("ImagePlugin"))))
"""
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "OPENBLAS_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code, *files], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    # Pillow's preinit() registers PPM too; MPO files open through the JPEG plugin.
    expected = {f"{name}ImagePlugin" for name in ("Jpeg", "Mpo", "Png", "Gif", "WebP", "Bmp", "Tiff", "Ppm")}
    assert set(r.stdout.split()) <= expected, set(r.stdout.split()) - expected


# ------------------------------------------------------------------ EXIF, 16-bit transparency, configs
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "preprocess"


def test_a_rotated_jpeg_whose_exif_pillow_cannot_write_back_decodes(reference_processor) -> None:
    # Before: ImageOps.exif_transpose turned the picture, then wrote the EXIF back and raised on a
    # tag of an unexpected type (0x0107 as ASCII): a decode_error row for a picture that decodes.
    data = (FIXTURES / "photo_bad_exif_tag.jpg").read_bytes()
    upright = Image.open(io.BytesIO(data)).convert("RGB").transpose(Image.Transpose.ROTATE_270)  # orientation 6
    ref = reference_processor(images=upright, return_tensors="np")["pixel_values"][0]
    assert np.abs(load_pixels(data, CFG) - ref).max() < 1e-5
    if importlib.util.find_spec("torch") is not None:
        from similarity.model.device_pixels import DevicePixels

        assert np.abs(DevicePixels(CFG, "cpu")(data) - ref).max() < 1e-5


def test_sixteen_bit_grey_with_a_transparent_level_composites_on_white() -> None:
    # Before: the 16-bit branch scaled the levels and never looked at tRNS: the transparent
    # pixels came out black, where the 8-bit picture (and the reference) give white.
    data = (FIXTURES / "gray16_trns.png").read_bytes()
    wide = Image.open(io.BytesIO(data))
    assert wide.mode == "I;16" and wide.info["transparency"] == 0
    narrow = Image.fromarray(((np.asarray(wide).astype(np.uint32) + 128) // 257).astype(np.uint8))
    buf = io.BytesIO()
    narrow.save(buf, "PNG", transparency=0)
    ours = np.asarray(decode(data, CFG))
    assert (ours[:, :45] == 255).all() and np.array_equal(ours, np.asarray(decode(buf.getvalue(), CFG)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"size": {"height": 64, "width": 64}}, "only size.shortest_edge"),
        ({"do_normalize": False}, "do_normalize false is not supported"),
        ({"do_center_crop": False, "do_resize": False}, "do_resize, do_center_crop false"),
    ],
)
def test_a_preprocessor_config_this_recipe_cannot_follow_is_refused(tiny_clip_dir, tmp_path, change, message) -> None:
    # Before: {"height", "width"} was read as shortest_edge 224 and the do_* switches were ignored:
    # other pixels than CLIPImageProcessor's, silently (0.5 in cosine on the test model).
    import json

    cfg = json.loads((tiny_clip_dir / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ModelIncomplete, match=message):
        PreprocessConfig.from_model_dir(tmp_path)
