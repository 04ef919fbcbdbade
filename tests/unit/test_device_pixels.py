"""The device pixel paths (SIMILARITY_PIXELS=torch / nvjpeg) against the CPU path they replace.

Run here on the CPU: the torch path's arithmetic is exact in float64, so the CPU and a GPU give the
same bytes (bench/gpu.py checks that on a GPU); the nvjpeg path runs its code on nvImageCodec's CPU
backend (libjpeg-turbo), which decodes as Pillow does, so everything but nvJPEG's own decoding is
held to the bit here.
"""

from __future__ import annotations

import io
import logging
import random

import numpy as np
import pytest
from PIL import Image

from similarity.errors import BackendUnavailable, ConfigError, DecodeError, NotAnImage, TooManyPixels
from similarity.model import ClipModel, load_model
from similarity.model.device_pixels import DevicePixels
from similarity.model.preprocess import DecodeBudget, PreprocessConfig, decode_cost, load_pixels, open_image
from similarity.model.resize import Coefficients, coefficients, pillow_pass_order, resize
from support.parity import large_images
from support.shapes import COLOURS, SHAPES, draw

torch = pytest.importorskip("torch")


def _nvimgcodec_present() -> bool:
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return False
    return True


nvjpeg_cpu = pytest.mark.skipif(not _nvimgcodec_present(), reason="nvImageCodec not installed")


@pytest.fixture(scope="module")
def cfg(tiny_clip_dir) -> PreprocessConfig:
    return PreprocessConfig.from_model_dir(tiny_clip_dir)


def _pillow_resize(arr: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).resize(size, resample=resample))


def _device_resize(arr: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    out = resize(x, size, Coefficients(torch, "cpu", resample), pillow_pass_order(resample))
    return out.permute(1, 2, 0).to(torch.uint8).numpy()


@pytest.mark.parametrize("resample", [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR])
def test_resize_is_pillows_to_the_bit(resample) -> None:
    """Random sizes both ways (shrinking and enlarging, 1-pixel sides, heights shrunk far more than
    widths so Pillow's pass order changes), on noise and on flat-edged pictures, where rounding
    between the passes and the filter's overshoot clamping show."""
    rng, nrng = random.Random(5), np.random.default_rng(5)
    cases = [((1, 1), (7, 3)), ((300, 1), (1, 40)), ((23, 97), (19, 11)), ((640, 480), (298, 224))]
    cases += [
        ((rng.randint(1, 700), rng.randint(1, 700)), (rng.randint(1, 300), rng.randint(1, 300))) for _ in range(80)
    ]
    for i, ((w, h), size) in enumerate(cases):
        arr = nrng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if i % 2:  # flat regions with hard edges
            arr = _pillow_resize(arr, (max(1, w // 9), max(1, h // 9)), Image.Resampling.NEAREST)
            arr = np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.NEAREST))
        want, got = _pillow_resize(arr, size, resample), _device_resize(arr, size, resample)
        assert np.array_equal(want, got), ((w, h), size)


def test_the_probe_tells_the_pass_orders_apart() -> None:
    """The probe that picks the installed Pillow's pass order gives different bytes for the two
    orders (else it could not tell them apart), and the order it picks is the one Pillow uses."""
    probe = np.random.default_rng(7).integers(0, 256, (97, 23, 3), dtype=np.uint8)
    x = torch.from_numpy(probe.copy()).permute(2, 0, 1)
    coeffs = Coefficients(torch, "cpu", int(Image.Resampling.BICUBIC))
    a, b = (resize(x, (19, 11), coeffs, order) for order in ("larger-reduction-first", "horizontal-first"))
    assert not torch.equal(a, b)
    picked = resize(x, (19, 11), coeffs, pillow_pass_order(int(Image.Resampling.BICUBIC)))
    assert np.array_equal(picked.permute(1, 2, 0).to(torch.uint8).numpy(), _pillow_resize(probe, (19, 11), 3))


def test_coefficients_are_pillows_integers() -> None:
    """Each output's taps sum to one in 22-bit fixed point, up to the rounding of each; the banded
    blocks hold exactly those taps, in their place; an unsupported filter is refused by name."""
    from similarity.model.resize import BLOCK, Banded, taps

    for in_size, out_size in ((3000, 224), (224, 224), (50, 301), (37, 1), (1, 5)):
        xmin, count, fixed = taps(in_size, out_size, int(Image.Resampling.BICUBIC))
        assert np.array_equal(fixed, np.round(fixed)) and not fixed.flags.writeable
        assert np.all(np.abs(fixed.sum(axis=1) - (1 << 22)) <= fixed.shape[1])
        dense = coefficients(in_size, out_size, int(Image.Resampling.BICUBIC))
        band = Banded(torch, "cpu", in_size, out_size, int(Image.Resampling.BICUBIC))
        rebuilt = np.zeros_like(dense)
        for b in range(band.nblocks):
            for i, col in enumerate(band.index[b].tolist()):
                for o in range(BLOCK):
                    if b * BLOCK + o < out_size and band.k[b, i, o] != 0:
                        rebuilt[b * BLOCK + o, col] = band.k[b, i, o]
        assert np.array_equal(rebuilt, dense), (in_size, out_size)
    with pytest.raises(BackendUnavailable, match="resample filter 1"):
        taps(10, 5, int(Image.Resampling.LANCZOS))


def test_the_device_check_catches_other_arithmetic(monkeypatch) -> None:
    """``check_device`` passes where the arithmetic is exact and refuses a device whose sums are off."""
    import similarity.model.resize as rz

    coeffs = Coefficients(torch, "cpu", int(Image.Resampling.BICUBIC))
    rz.check_device(coeffs, pillow_pass_order(int(Image.Resampling.BICUBIC)))
    monkeypatch.setattr(rz, "_HALF", rz._HALF - 2**20)  # as if the device rounded differently
    with pytest.raises(BackendUnavailable, match="other bytes than Pillow on cpu"):
        rz.check_device(Coefficients(torch, "cpu", int(Image.Resampling.BICUBIC)), "larger-reduction-first")


def _files() -> list[bytes]:
    """Large JPEGs (a third EXIF-rotated) and odd PNGs, every EXIF orientation, modes that need
    converting, pictures smaller than the crop, and an extreme aspect ratio (crop-only resize)."""
    out = large_images(64)
    rng = random.Random(3)
    for orientation in range(1, 9):
        img, buf = draw("red", "triangle", rng, 300, 500), io.BytesIO()
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(buf, "JPEG", quality=90, exif=exif.tobytes())
        out.append(buf.getvalue())
    xmp = (  # an orientation only XMP carries: Pillow reads it, and so must the device path
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    )
    buf = io.BytesIO()
    draw("yellow", "triangle", rng, 300, 500).save(buf, "JPEG", quality=90, xmp=xmp)
    out.append(buf.getvalue())
    base = draw("blue", "circle", rng, 200, 300)
    for mode, fmt in (("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("I;16", "PNG"), ("L", "PNG")):
        buf = io.BytesIO()
        base.convert(mode).save(buf, fmt)
        out.append(buf.getvalue())
    buf = io.BytesIO()
    base.save(buf, "JPEG", quality=85, progressive=True)
    out.append(buf.getvalue())
    for size in ((20, 30), (64, 64), (65, 64), (2000, 40)):  # upscaled, as is, odd, crop-only
        buf = io.BytesIO()
        draw("green", "square", rng, 8, 9).resize(size).save(buf, "PNG")
        out.append(buf.getvalue())
    for _ in range(6):  # small pictures, as the parity set has
        buf = io.BytesIO()
        draw(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"uint8": True},
        pytest.param({"decoder": "nvjpeg", "nvjpeg_on_gpu": False}, marks=nvjpeg_cpu),
        pytest.param({"decoder": "nvjpeg", "nvjpeg_on_gpu": False, "uint8": True}, marks=nvjpeg_cpu),
    ],
    ids=["float", "uint8", "nvjpeg-cpu", "nvjpeg-cpu-uint8"],
)
def test_device_pixels_are_load_pixels_to_the_bit(cfg, variant) -> None:
    dp = DevicePixels(cfg, "cpu", **variant)
    files = _files()
    for i, data in enumerate(files):
        want = load_pixels(data, cfg, uint8=variant.get("uint8", False))
        got = dp(data)
        assert got.dtype == want.dtype and np.array_equal(got, want), i
    jpegs = [f for f in files if f[:2] == b"\xff\xd8" and Image.open(io.BytesIO(f)).mode in ("RGB", "L")]
    if "decoder" in variant:  # the JPEGs went through nvImageCodec, the rest through Pillow
        assert dp.decoded_on_device == len(jpegs) > 30
    else:
        assert dp.decoded_on_device == 0
    assert dp.fallbacks == 1  # the crop-only image


@pytest.mark.parametrize("decoder", ["pillow", pytest.param("nvjpeg", marks=nvjpeg_cpu)])
def test_bad_images_give_the_cpu_paths_errors(cfg, decoder) -> None:
    small, large = io.BytesIO(), io.BytesIO()
    draw("red", "circle", random.Random(1), 90, 110).save(small, "JPEG")
    draw("red", "circle", random.Random(1), 300, 400).save(large, "JPEG")
    truncated = small.getvalue()[: len(small.getvalue()) // 2]
    dp = DevicePixels(cfg.__class__(**{**cfg.__dict__, "max_pixels": 20_000}), "cpu", decoder=decoder,
                      nvjpeg_on_gpu=False)  # fmt: skip
    for data, kind in ((truncated, DecodeError), (b"<html>nope</html>", NotAnImage), (large.getvalue(), TooManyPixels)):
        with pytest.raises(kind) as got:
            dp(data)
        with pytest.raises(kind) as want:
            load_pixels(data, dp.cfg)
        assert str(got.value) == str(want.value)


def _score_with_failing_resize(cfg, monkeypatch, caplog, message: str):
    """Three large images through a device path whose resize raises ``message``; each must still
    come out as the CPU path's pixels. Returns the resize calls made, the path and the files."""
    import similarity.model.device_pixels as dpm

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise RuntimeError(message)

    dp = DevicePixels(cfg, "cpu")
    monkeypatch.setattr(dpm, "resize", failing)
    files = large_images(64, n=3)
    with caplog.at_level(logging.WARNING, logger="similarity.model.device_pixels"):
        for data in files:
            assert np.array_equal(dp(data), load_pixels(data, cfg))
    return calls, dp, files


def test_running_out_of_device_memory_costs_speed_not_rows(cfg, monkeypatch, caplog) -> None:
    """An image the device has no memory for goes through Pillow (the decode it already did is
    reused): the CPU path's pixels, one warning, and the device path stays on for the next."""
    # torch.cuda.OutOfMemoryError's text
    calls, dp, files = _score_with_failing_resize(
        cfg, monkeypatch, caplog, "CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    assert len(calls) == len(files) and dp.enabled
    assert dp.counts["out_of_memory"] == dp.counts["cpu"] == len(files)
    assert len(caplog.records) == 1 and "out of memory" in caplog.records[0].getMessage()


def test_another_device_failure_turns_the_device_path_off(cfg, monkeypatch, caplog) -> None:
    """A device error that is not memory (a driver fault, a bug) would fail every image the same
    way: after the first, the run goes on in Pillow without trying the device again."""
    calls, dp, files = _score_with_failing_resize(
        cfg, monkeypatch, caplog, "CUDA error: an illegal memory access was encountered"
    )
    assert len(calls) == 1 and not dp.enabled and dp.counts["cpu"] == len(files)
    assert [r.levelname for r in caplog.records] == ["ERROR"] and "illegal memory access" in caplog.text


def test_a_decoder_that_disagrees_with_the_header_is_not_counted(cfg) -> None:
    """A device decode whose size is not the header's goes to Pillow and is counted there, not as
    decoded on the device (the figure bench/gpu.py reports)."""
    dp = DevicePixels(cfg, "cpu")
    dp.nvjpeg = lambda data: torch.zeros((5, 7, 3), dtype=torch.uint8)  # stands in for nvJPEG
    files = [f for f in large_images(64, n=6) if Image.open(io.BytesIO(f)).format == "JPEG"][:2]
    for data in files:
        assert np.array_equal(dp(data), load_pixels(data, cfg))
    assert dp.decoded_on_device == 0 and dp.fallbacks == len(files) == 2


def test_drafts_take_the_cpu_path(cfg) -> None:
    drafted = cfg.__class__(**{**cfg.__dict__, "draft_factor": 2})
    dp = DevicePixels(drafted, "cpu")
    for data in large_images(64, n=6):
        assert np.array_equal(dp(data), load_pixels(data, drafted))


def test_decoding_holds_the_decode_budget(cfg) -> None:
    """The decode budget counts the packed copy that goes to the device too (3 bytes a pixel on
    Pillow's 5), and is given back."""
    data = large_images(64, n=1)[0]
    budget = DecodeBudget(1000.0)
    DevicePixels(cfg, "cpu")(data, budget=budget)
    cost = decode_cost(open_image(data, cfg))
    assert budget.peak == cost + -(-cost * 3 // 5) and budget.in_use == 0


def test_load_model_pixel_paths(tiny_clip_dir) -> None:
    from similarity.cache.keys import fingerprint

    pillow = load_model(tiny_clip_dir, backend="torch", dtype="fp32")
    on_device = load_model(tiny_clip_dir, backend="torch", dtype="fp32", pixels="torch")
    assert pillow.pixel_path == "pillow" and on_device.pixel_path == "torch"
    for data in large_images(64, n=4):
        assert np.array_equal(on_device.pixels(data), pillow.pixels(data))
    # the same pixels, so the same cache keys; nvJPEG's pixels are keyed apart
    assert fingerprint(on_device) == fingerprint(pillow)
    if _nvimgcodec_present():
        nv = ClipModel(pillow.backend, pillow.tokenizer, pillow.preprocess, pillow.info, "nvjpeg",
                       DevicePixels(pillow.preprocess, "cpu", decoder="nvjpeg", nvjpeg_on_gpu=False))  # fmt: skip
        assert fingerprint(nv).image != fingerprint(pillow).image and fingerprint(nv).text == fingerprint(pillow).text
    with pytest.raises(BackendUnavailable, match="SIMILARITY_PIXELS=nvjpeg .* needs the model on CUDA, not cpu"):
        load_model(tiny_clip_dir, backend="torch", device="cpu", pixels="nvjpeg")


def test_worker_processes_and_device_pixels_are_refused_together(tiny_clip_dir) -> None:
    from similarity.fetch import Fetcher
    from similarity.pipeline.scorer import Scorer

    model = load_model(tiny_clip_dir, backend="torch", dtype="fp32", pixels="torch")
    with pytest.raises(ConfigError, match="SIMILARITY_PROCESSES=2 with SIMILARITY_PIXELS=torch"):
        Scorer(model, Fetcher(), processes=2)
