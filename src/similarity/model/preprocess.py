"""Decoding untrusted image bytes with Pillow, and CLIP preprocessing in Pillow + numpy.

``preprocess`` reproduces transformers' ``CLIPImageProcessor`` (PIL backend): bicubic resize of
the shortest edge (long edge truncated to int), centre crop, rescale by 1/255, normalise with the
model's mean and std. The parity tests hold it to the reference within 1e-5. Only for extreme
aspect ratios (a 20000x3 banner would be resized to 1,493,333x224, 1.3 GB, to keep 224x224 of it)
is just the part the crop keeps resized; that moves pixels by a level or two (measured in
docs/security.md).

Decoded pixels are the memory that untrusted input controls: ``DecodeBudget`` bounds what all
decode threads of the process hold at once, and ``DecodeLimits.for_memory`` sizes it and the pixel
limit from the memory the process has.
"""

from __future__ import annotations

import importlib
import io
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DecodeError, ModelIncomplete, NotAnImage, TooManyPixels
from .directory import read_json
from .resize import FILTERS, pillow_order, vertical_first

#: The formats we decode, each with the Pillow plugin that opens it. Content is sniffed by Pillow;
#: the server's Content-Type is never trusted. Only these plugins are imported: ``Image.init()``
#: imports all of Pillow's (~45, ~30 ms of every cold start), and ``Image.open`` calls it when
#: one of the formats asked for is not registered yet. (MPO files open through the JPEG plugin.)
_PLUGINS = {
    "JPEG": "JpegImagePlugin",
    "MPO": "MpoImagePlugin",
    "PNG": "PngImagePlugin",
    "GIF": "GifImagePlugin",
    "WEBP": "WebPImagePlugin",
    "BMP": "BmpImagePlugin",
    "TIFF": "TiffImagePlugin",
}


def _register(plugins: dict[str, str]) -> tuple[str, ...]:
    for module in plugins.values():
        try:
            importlib.import_module(f"PIL.{module}")
        except ImportError:  # a Pillow built without that codec
            continue
    return tuple(f for f in plugins if f in Image.OPEN)


ACCEPTED_FORMATS = _register(_PLUGINS)

# Pillow allocates image memory in 16 MiB blocks, under glibc's mmap threshold (32 MiB in the
# container, at most 32 MiB by default), so a decoded image lives in the malloc arena of the thread
# that decoded it and, freed, stays there: with 16 decode threads RSS grew to 16 decoded 9000x9000
# images (5.1 GB) although the budget let two decode at once. 64 MiB blocks are mapped and unmapped,
# so a decode's memory goes back when it ends (bench/hostile.py). PILLOW_BLOCK_SIZE still wins.
PILLOW_BLOCK_BYTES = 64 * 1024 * 1024
_pillow_core: Any = getattr(Image, "core")  # noqa: B009 - not in Pillow's typed exports
if "PILLOW_BLOCK_SIZE" not in os.environ and _pillow_core.get_block_size() < PILLOW_BLOCK_BYTES:
    _pillow_core.set_block_size(PILLOW_BLOCK_BYTES)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow's default decompression-bomb threshold; our own check turns it into a row error.
DEFAULT_MAX_PIXELS = 89_478_485

#: Peak bytes per pixel of decoding and converting an RGB image to model input, as measured
#: (decode 4 bytes per pixel, Pillow keeps RGB in 32 bits; bench/hostile.py). Other modes count
#: as multiples of it (``MODE_WEIGHT``).
BYTES_PER_PIXEL = 5
#: Peak memory of each source mode relative to RGB: conversions hold the decoded image and its
#: converted copies at once (alpha: RGBA, white, composite, RGB; 16-bit: integer arrays).
MODE_WEIGHT = {"RGB": 1, "L": 1, "P": 1, "1": 1, "YCbCr": 1, "CMYK": 2, "LAB": 2, "HSV": 2}
MODE_WEIGHT.update(dict.fromkeys(("I;16", "I;16L", "I;16B", "I;16N"), 2))
ALPHA_WEIGHT = 4
WIDE_WEIGHT = 4  # I, F and anything not listed
#: Two copies of the decoded image (an EXIF transpose), in weights: Pillow stores 4 bytes a pixel
#: (8 for both, two weights) except for these modes (1 byte; 2 for 16-bit), whose pair fits in one.
TRANSPOSE_WEIGHT = dict.fromkeys(("1", "L", "P", "I;16", "I;16L", "I;16B", "I;16N"), 1)
#: Of the memory the process has: what all decodes in flight may hold, and what one image at the
#: pixel limit may hold in its costliest mode.
BUDGET_SHARE = 0.25
SINGLE_IMAGE_SHARE = 0.5
#: Decoding is CPU-bound (Pillow lets go of the GIL): beyond two large images per core in flight,
#: more only hold memory.
DECODES_PER_CORE = 2
#: Images whose full shortest-edge resize would exceed this many times the crop's pixels have
#: only the cropped part resized (a 16:1 aspect ratio at the usual square crop).
CROP_ONLY_FACTOR = 16

#: Bump whenever decoding or preprocessing can give other pixels for the same bytes and config: the
#: embedding cache keys image embeddings by it (similarity.cache.keys), and
#: tests/unit/test_cache_keys.py holds the golden hash of each version's output on fixed images.
#: 2: an opted-in JPEG draft resizes the exact picture box (other pixels for sides not divisible by
#: the DCT scale); draft decoding off by default.
#: 3: crop-only resizes take the full resize's pass order (tall images narrower than the edge);
#: 16-bit grey with a tRNS level composites those pixels on white; an EXIF orientation is applied
#: without rewriting the EXIF (pictures whose tags Pillow cannot write decode instead of failing).
PREPROCESS_VERSION = 3


#: CLIPImageProcessor's switches for the steps this preprocessing always takes.
_STEPS = ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb")


@dataclass(frozen=True)
class PreprocessConfig:
    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = int(Image.Resampling.BICUBIC)
    rescale_factor: float = 1 / 255
    #: None: the process's limit (``decode_limits()``: sized to its memory).
    max_pixels: int | None = None
    #: Opt-in JPEG draft decoding (``SIMILARITY_JPEG_DRAFT``): decode at a reduced DCT scale (1/2,
    #: 1/4 or 1/8) while the reduced short side stays >= this many times the target size; 0, the
    #: default, decodes every pixel. It is off because DCT scaling filters like a box, not like the
    #: bicubic antialias CLIPImageProcessor applies: on the trained test model, with the geometry
    #: kept exact, it moved similarities by up to 0.015-0.023 at 2, 0.004-0.007 at 3 and 0.004 at 4
    #: (torch fp32, JPEG q92 shapes of 300-1100 px at 64 px input; docs/performance.md).
    draft_factor: int = 0

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, **overrides: object) -> PreprocessConfig:
        path = Path(model_dir) / "preprocessor_config.json"
        raw = read_json(path)
        cfg: dict[str, Any] = raw.get("image_processor", raw)
        size = cfg.get("size", 224)
        if isinstance(size, dict) and "shortest_edge" not in size:
            # {"height", "width"} resizes to exactly that size: not CLIP's recipe, not this one.
            raise ModelIncomplete(f"{path}: size {size!r} is not supported: only size.shortest_edge (CLIP's resize)")
        off = [flag for flag in _STEPS if cfg.get(flag) is False]
        if off:
            raise ModelIncomplete(f"{path}: {', '.join(off)} false is not supported: every CLIP step is always applied")
        shortest = size["shortest_edge"] if isinstance(size, dict) else int(size)
        crop = cfg.get("crop_size", shortest)
        ch, cw = (crop.get("height", shortest), crop.get("width", shortest)) if isinstance(crop, dict) else (crop, crop)
        if ch is None or cw is None:
            raise ModelIncomplete(f"{path}: crop_size {crop!r} has no height or width")
        values: dict[str, Any] = {
            "shortest_edge": int(shortest),
            "crop_height": int(ch),
            "crop_width": int(cw),
            "mean": tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)),
            "std": tuple(cfg.get("image_std", OPENAI_CLIP_STD)),
            "resample": int(cfg.get("resample", int(Image.Resampling.BICUBIC))),
            "rescale_factor": float(cfg.get("rescale_factor", 1 / 255)),
        }
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class DecodeLimits:
    """How many pixels one image may declare, and how many (weighted by mode) all decode threads
    of the process may hold at once."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    budget_megapixels: float = 256.0

    @classmethod
    def for_memory(
        cls,
        memory_bytes: int,
        max_pixels: int | None = None,
        budget_megapixels: float | None = None,
        cores: int | None = None,
    ) -> DecodeLimits:
        """Limits that fit ``memory_bytes``: the decodes in flight hold at most a quarter of it,
        and one image at the pixel limit at most half of it even in its costliest mode (the
        budget lets such an image run alone). With ``cores``, the budget is also kept to what
        that many cores can decode at once (``DECODES_PER_CORE`` images at the default limit):
        more in flight would only hold memory. Given values win."""
        if max_pixels is None:
            fits = int(memory_bytes * SINGLE_IMAGE_SHARE / (BYTES_PER_PIXEL * max(ALPHA_WEIGHT, WIDE_WEIGHT)))
            max_pixels = max(1, min(DEFAULT_MAX_PIXELS, fits))
        if budget_megapixels is None:
            budget_megapixels = memory_bytes * BUDGET_SHARE / BYTES_PER_PIXEL / 1e6
            if cores is not None:
                budget_megapixels = min(budget_megapixels, DECODES_PER_CORE * max(cores, 1) * DEFAULT_MAX_PIXELS / 1e6)
        return cls(max_pixels=max_pixels, budget_megapixels=budget_megapixels)


class DecodeBudget:
    """Weighted pixels that may be decoded at once, shared by every thread that decodes.

    A decode waits until its share is free. One larger than the whole budget still runs, alone,
    so every image within the pixel limit is decoded eventually and waiting cannot deadlock.
    """

    def __init__(self, megapixels: float) -> None:
        self.capacity = max(1, int(megapixels * 1_000_000))
        self._used = 0
        self._cond = threading.Condition()
        self.peak = 0  # the most held at once: for tests and the bench

    @property
    def in_use(self) -> int:
        return self._used

    @contextmanager
    def hold(self, cost: int) -> Iterator[None]:
        need = min(max(cost, 0), self.capacity)
        with self._cond:
            while self._used and self._used + need > self.capacity:
                self._cond.wait()
            self._used += need
            self.peak = max(self.peak, self._used)
        try:
            yield
        finally:
            with self._cond:
                self._used -= need
                self._cond.notify_all()


_limits_lock = threading.Lock()
_limits: DecodeLimits | None = None
_budget: DecodeBudget | None = None


def set_decode_limits(limits: DecodeLimits) -> None:
    """Use ``limits`` for every later decode in this process (``bootstrap.build`` calls this with
    the settings'); decodes in flight finish under the old budget."""
    global _limits, _budget
    with _limits_lock:
        if limits != _limits or _budget is None:
            _limits, _budget = limits, DecodeBudget(limits.budget_megapixels)


def decode_limits() -> DecodeLimits:
    """The process's limits: as last set, else sized to the memory the process has."""
    if _limits is None:
        from ..hardware import cpu_count, memory_limit_bytes

        set_decode_limits(DecodeLimits.for_memory(memory_limit_bytes(), cores=cpu_count()))
    assert _limits is not None
    return _limits


def decode_budget() -> DecodeBudget:
    decode_limits()
    assert _budget is not None
    return _budget


def decode_cost(im: Image.Image) -> int:
    """Weighted pixels decoding and converting ``im`` (opened, not yet loaded) will hold."""
    width, height = im.size
    mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        weight = ALPHA_WEIGHT
    else:
        weight = MODE_WEIGHT.get(mode, WIDE_WEIGHT)
    if _transposes(im):
        # The EXIF turn holds the decoded image and its transposed copy at once, before any
        # conversion starts: the costlier of the two steps counts (a 48 MP RGB JPEG rotated by
        # its EXIF peaked at 385 MB, upright at 201 MB).
        weight = max(weight, TRANSPOSE_WEIGHT.get(mode, 2))
    return width * height * weight


def _transposes(im: Image.Image) -> bool:
    """Whether ``load_rgb`` will turn ``im`` by its EXIF orientation, from its header alone."""
    if im.format == "PNG" and "exif" not in im.info:
        # PngImageFile.getexif decodes the pixels to look for an eXIf chunk after them (and its
        # answer is cached): only an EXIF read with the header counts. Writers put eXIf first.
        return False
    try:
        return im.getexif().get(0x0112, 1) in range(2, 9)  # 1: upright; 2-8 flip or rotate
    except Exception:  # noqa: BLE001 - a broken EXIF: the decode reports it as the row's error
        return False


def open_image(data: bytes, cfg: PreprocessConfig) -> Image.Image:
    """The image's header read and checked (format, size, pixel limit), the JPEG draft scale set;
    nothing decoded yet. Every failure is a ``RowError``."""
    try:
        im = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise NotAnImage(f"not a JPEG/PNG/GIF/WebP/BMP/TIFF image ({_sniff(data)})") from None
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for malformed headers
        raise DecodeError(f"{type(exc).__name__}: {exc}") from None
    try:
        width, height = im.size
        if width <= 0 or height <= 0:
            raise DecodeError(f"image has no pixels ({width}x{height})")
        limit = cfg.max_pixels if cfg.max_pixels is not None else decode_limits().max_pixels
        if width * height > limit:
            raise TooManyPixels(f"{width}x{height} pixels exceeds the limit of {limit}")
        if cfg.draft_factor and im.format in ("JPEG", "MPO"):
            geometry = _draft(im, cfg)
            if geometry:
                im.info[DRAFT_GEOMETRY] = geometry
        return im
    except (DecodeError, TooManyPixels):
        raise
    except Exception as exc:  # noqa: BLE001
        raise DecodeError(f"{type(exc).__name__}: {exc}") from None


def load_rgb(im: Image.Image) -> Image.Image:
    """Decode an opened image (first frame of animations), apply EXIF orientation, convert to RGB."""
    try:
        geometry = im.info.get(DRAFT_GEOMETRY)  # set by open_image; conversions need not keep info
        im.load()  # truncated data raises here
        upright = _upright(im)
        if upright is not im:
            im.close()  # the turned copy replaces the decode: its pixels go now, as in place
        out = to_rgb(upright)
        if geometry:
            out.info[DRAFT_GEOMETRY] = geometry
        return out
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - OSError, SyntaxError, ValueError, struct.error, ...
        raise DecodeError(f"{type(exc).__name__}: {exc}") from None


#: EXIF orientation -> the transpose that stands the picture upright (ImageOps.exif_transpose's).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF (or XMP) orientation says. Not ``ImageOps.exif_transpose``: it
    writes the EXIF back afterwards, and a tag of an unexpected type (which Pillow reads but
    cannot write) fails a picture that decoded. An EXIF Pillow cannot read is taken as upright."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - broken EXIF, readable pixels
        return im
    method = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    return im.transpose(method) if method is not None else im


def decode(data: bytes, cfg: PreprocessConfig) -> Image.Image:
    """Bytes to an RGB ``Image``; every failure is a ``RowError``. Outside the decode budget:
    ``load_pixels`` is what the pipeline calls."""
    return load_rgb(open_image(data, cfg))


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: transparency composited on white, 16-bit scaled, CMYK converted."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # convert() would clamp 16-bit values to 0..255; scale them instead: round(x / 257) in
        # integers ((x + 128) // 257: no x / 257 lies halfway), a third of float64's memory.
        raw = np.asarray(im)
        wide = np.clip(raw, 0, 65535).astype(np.uint32)
        wide += 128
        wide //= 257
        narrow = wide.astype(np.uint8)
        del wide
        key = im.info.get("transparency")
        if isinstance(key, int):  # a tRNS grey level: those pixels are transparent, so white
            narrow[raw == key] = 255
        return Image.fromarray(narrow).convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)  # in place from here: one float64 copy at a time
        if arr.size and np.nanmax(arr) <= 1.0:
            arr *= 255.0
        np.clip(arr, 0, 255, out=arr)
        np.nan_to_num(arr, copy=False)
        np.round(arr, out=arr)
        grey = Image.fromarray(arr.astype(np.uint8))
        del arr
        return grey.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im if mode == "RGBA" else im.convert("RGBA")  # convert() to the same mode copies
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        composite = Image.alpha_composite(white, rgba)
        del white, rgba
        return composite.convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK (Pillow undoes Adobe inversion), YCbCr, LAB, HSV


def preprocess(im: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """RGB image to a float32 ``(3, crop_h, crop_w)`` array, as CLIPImageProcessor makes it."""
    return normalise(crop_uint8(im, cfg), cfg)


def model_input(rgb: Image.Image, cfg: PreprocessConfig, uint8: bool) -> np.ndarray:
    """A decoded RGB image as the model takes it: the uint8 crop, or ``preprocess``'s float32."""
    return crop_uint8(rgb, cfg) if uint8 else preprocess(rgb, cfg)


@dataclass(frozen=True)
class ResizePlan:
    """Where an image of a given size goes: the shortest-edge resize (long edge truncated to int,
    as the reference does) and the centre crop's corner in it (negative: the crop pads)."""

    new_w: int
    new_h: int
    top: int
    left: int
    #: Only the cropped part is resized (extreme aspect ratios: ``CROP_ONLY_FACTOR``).
    crop_only: bool

    @property
    def pads(self) -> bool:
        return self.top < 0 or self.left < 0


def resize_plan(width: int, height: int, cfg: PreprocessConfig) -> ResizePlan:
    size = cfg.shortest_edge
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    top = (new_h - cfg.crop_height) // 2
    left = (new_w - cfg.crop_width) // 2
    crop_only = new_w * new_h > CROP_ONLY_FACTOR * cfg.crop_height * cfg.crop_width
    return ResizePlan(new_w, new_h, top, left, crop_only)


def crop_uint8(im: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """The resized centre crop as uint8 ``(crop_h, crop_w, 3)``: what ``normalise`` (or a backend
    that normalises inside its graph) turns into model input."""
    width, height, box = source_geometry(im)
    plan = resize_plan(width, height, cfg)
    new_w, new_h, top, left = plan.new_w, plan.new_h, plan.top, plan.left
    if plan.crop_only:
        return _resize_crop_only(im, cfg, new_w, new_h, top, left)
    if box is not None:  # a draft: resize the picture's exact box to the full decode's size
        im = im.resize((new_w, new_h), resample=cfg.resample, box=box)
    elif (new_w, new_h) != (width, height):
        im = im.resize((new_w, new_h), resample=cfg.resample)
    if top >= 0 and left >= 0:
        return np.asarray(im, dtype=np.uint8)[top : top + cfg.crop_height, left : left + cfg.crop_width]
    # smaller than the crop: pad with zeros around the centre, as the reference does
    arr = np.zeros((cfg.crop_height, cfg.crop_width, 3), dtype=np.uint8)
    src = np.asarray(im, dtype=np.uint8)
    oy, ox = max(-top, 0), max(-left, 0)
    sy, sx = max(top, 0), max(left, 0)
    h = min(new_h - sy, cfg.crop_height - oy)
    w = min(new_w - sx, cfg.crop_width - ox)
    arr[oy : oy + h, ox : ox + w] = src[sy : sy + h, sx : sx + w]
    return arr


def _resize_crop_only(
    im: Image.Image, cfg: PreprocessConfig, new_w: int, new_h: int, top: int, left: int
) -> np.ndarray:
    """The crop of the full resize, computed by resizing only the source box it comes from.

    Pillow reads the filter's support around the box from the source, so the result matches the
    full resize up to its rounding (box corners are passed to its C code as 32-bit floats): pixels
    move by a level or two, which is why only extreme aspect ratios come here.
    """
    width, height, box = source_geometry(im)
    bx, by, bw, bh = (
        (0.0, 0.0, float(width), float(height)) if box is None else (box[0], box[1], box[2] - box[0], box[3] - box[1])
    )
    sx, sy = bw / new_w, bh / new_h
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + cfg.crop_width, new_w), min(top + cfg.crop_height, new_h)
    order = pillow_order(cfg.resample) if cfg.resample in FILTERS else None
    full_vertical_first = order is not None and vertical_first(width, height, new_w, new_h, order)
    box_vertical_first = order is not None and vertical_first(width, height, x1 - x0, y1 - y0, order)
    if box is None and full_vertical_first != box_vertical_first:
        # Pillow picks the pass order from the sizes it is given, and the box resize's sizes pick
        # the other order than the full resize's (a tall image narrower than the edge: the full
        # resize enlarges both axes, the box shrinks the height): up to 23 levels apart on sharp
        # edges. Two single-axis resizes in the full resize's order give its rounding.
        part = _two_passes(im, cfg.resample, (x0, y0, x1, y1), (sx, sy), full_vertical_first)
    else:
        part = im.resize(
            (x1 - x0, y1 - y0), resample=cfg.resample, box=(bx + x0 * sx, by + y0 * sy, bx + x1 * sx, by + y1 * sy)
        )
    arr = np.zeros((cfg.crop_height, cfg.crop_width, 3), dtype=np.uint8)
    oy, ox = y0 - top, x0 - left  # > 0 only where the crop is larger than the resized image
    arr[oy : oy + (y1 - y0), ox : ox + (x1 - x0)] = np.asarray(part, dtype=np.uint8)
    return arr


def _two_passes(
    im: Image.Image,
    resample: int,
    out: tuple[int, int, int, int],
    scale: tuple[float, float],
    vertical_first: bool,
) -> Image.Image:
    """The output box ``out`` (x0, y0, x1, y1) of the full resize at ``scale`` (source pixels per
    output pixel), as two single-axis resizes in the full resize's order. The first pass covers
    only the strip of rows (or columns) the second one's filter reads, with margin: away from the
    image's edges no tap is clipped, at them the same taps as the full resize's are."""
    x0, y0, x1, y1 = out
    sx, sy = scale
    width, height = im.size
    support = FILTERS[resample][1]
    if vertical_first:
        reach = support * max(sx, 1.0) + 2
        c0, c1 = max(0, math.floor(x0 * sx - reach)), min(width, math.ceil(x1 * sx + reach))
        strip = im.crop((c0, 0, c1, height)).resize(
            (c1 - c0, y1 - y0), resample=resample, box=(0, y0 * sy, c1 - c0, y1 * sy)
        )
        return strip.resize((x1 - x0, y1 - y0), resample=resample, box=(x0 * sx - c0, 0, x1 * sx - c0, y1 - y0))
    reach = support * max(sy, 1.0) + 2
    r0, r1 = max(0, math.floor(y0 * sy - reach)), min(height, math.ceil(y1 * sy + reach))
    strip = im.crop((0, r0, width, r1)).resize(
        (x1 - x0, r1 - r0), resample=resample, box=(x0 * sx, 0, x1 * sx, r1 - r0)
    )
    return strip.resize((x1 - x0, y1 - y0), resample=resample, box=(0, y0 * sy - r0, x1 - x0, y1 * sy - r0))


def normalise(arr: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """uint8 ``(..., H, W, 3)`` crops to float32 ``(..., 3, H, W)``: rescale, subtract the mean,
    divide by the std (one crop or a batch: the same values to the bit)."""
    out = np.moveaxis(arr.astype(np.float32), -1, -3)
    out *= np.float32(cfg.rescale_factor)
    out -= np.asarray(cfg.mean, dtype=np.float32)[:, None, None]
    out /= np.asarray(cfg.std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray(out)


#: ``Image.info`` key of a drafted JPEG: (full-decode size, the picture's box in the reduced image),
#: both after EXIF orientation.
DRAFT_GEOMETRY = "similarity.draft"


def source_geometry(im: Image.Image) -> tuple[int, int, tuple[float, float, float, float] | None]:
    """(width, height, box): the size a full decode has, and for a drafted JPEG the box of ``im``
    that holds the picture (None: all of ``im``). Resizing must start from these, not ``im.size``."""
    geometry = im.info.get(DRAFT_GEOMETRY)
    if geometry is None:
        return im.size[0], im.size[1], None
    (width, height), box = geometry
    return width, height, box


def _draft(im: Image.Image, cfg: PreprocessConfig) -> tuple[tuple[int, int], tuple[float, float, float, float]] | None:
    """Ask Pillow for a reduced DCT scale; (full size, picture box), oriented, when it took one.

    The reduced grid rounds each side up to whole pixels (318x337 at 1/2 gives 159x169), so its
    last row and column are partly outside the picture. Resizing that grid as it stands shifts the
    centre crop by up to a pixel (0.15 in similarity on the test model at 64 px); resizing the exact
    box ``draft`` reports, to the size a full decode would get, keeps the full decode's geometry.
    """
    width, height = im.size
    target = cfg.draft_factor * max(cfg.shortest_edge, cfg.crop_height, cfg.crop_width)
    if min(width, height) < 2 * target:
        return None
    drafted = im.draft(None, (target, target))
    if drafted is None or im.size == (width, height):
        return None
    box = drafted[1]
    try:
        orientation = im.getexif().get(0x0112, 1)  # what _upright will apply after load
    except Exception:  # noqa: BLE001 - a broken EXIF: _upright takes the picture as upright too
        orientation = 1
    if orientation in (5, 6, 7, 8):  # the transposing ones swap the sides
        return (height, width), _oriented_box(box, im.size, orientation)
    return (width, height), _oriented_box(box, im.size, orientation)


def _oriented_box(
    box: tuple[float, float, float, float], size: tuple[int, int], orientation: int
) -> tuple[float, float, float, float]:
    """``box`` of an image of ``size`` mapped through the EXIF orientation's transpose."""
    w, h = size
    maps = {
        2: lambda x, y: (w - x, y),  # mirror
        3: lambda x, y: (w - x, h - y),  # 180
        4: lambda x, y: (x, h - y),  # flip
        5: lambda x, y: (y, x),  # transpose
        6: lambda x, y: (h - y, x),  # 90 clockwise
        7: lambda x, y: (h - y, w - x),  # transverse
        8: lambda x, y: (y, w - x),  # 90 counter-clockwise
    }
    f = maps.get(orientation)
    if f is None:
        return box
    (x0, y0), (x1, y1) = f(box[0], box[1]), f(box[2], box[3])
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def load_pixels(
    data: bytes, cfg: PreprocessConfig, budget: DecodeBudget | None = None, uint8: bool = False
) -> np.ndarray:
    """Bytes straight to model input: decode, convert, preprocess. The decoded pixels are held
    under ``budget`` (default: the process's), so the threads that decode at once never hold
    more than it allows. ``uint8``: the crop as uint8 ``(H, W, 3)`` instead, for a backend that
    normalises inside its graph."""
    im = open_image(data, cfg)
    with (budget or decode_budget()).hold(decode_cost(im)):
        out = model_input(load_rgb(im), cfg, uint8)
        im.close()
        return out


def _sniff(data: bytes) -> str:
    head = data[:16]
    if not head:
        return "empty body"
    if head.lstrip().startswith((b"<", b"{", b"[")):
        return "looks like text/markup"
    return f"starts with {head[:8].hex()}"
