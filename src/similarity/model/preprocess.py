"""Decoding untrusted image bytes with Pillow, and CLIP preprocessing in Pillow + numpy.

``preprocess`` reproduces transformers' ``CLIPImageProcessor`` (PIL backend): bicubic resize of
the shortest edge (long edge truncated to int), centre crop, rescale by 1/255, normalise with the
model's mean and std. The parity tests hold it to the reference within 1e-5.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DecodeError, ModelIncomplete, NotAnImage, TooManyPixels
from .directory import read_json

#: Formats we decode. Content is sniffed by Pillow; the server's Content-Type is never trusted.
Image.init()  # register every plugin now, so the format list below can be checked against them
ACCEPTED_FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF") if f in Image.OPEN)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow's default decompression-bomb threshold; our own check turns it into a row error.
DEFAULT_MAX_PIXELS = 89_478_485


@dataclass(frozen=True)
class PreprocessConfig:
    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = int(Image.Resampling.BICUBIC)
    rescale_factor: float = 1 / 255
    max_pixels: int = DEFAULT_MAX_PIXELS
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
        shortest = size.get("shortest_edge", 224) if isinstance(size, dict) else int(size)
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


def decode(data: bytes, cfg: PreprocessConfig) -> Image.Image:
    """Bytes to an RGB ``Image``; every failure is a ``RowError``."""
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
        if width * height > cfg.max_pixels:
            raise TooManyPixels(f"{width}x{height} pixels exceeds the limit of {cfg.max_pixels}")
        geometry = _draft(im, cfg) if cfg.draft_factor and im.format in ("JPEG", "MPO") else None
        im.load()  # first frame of animations; truncated data raises here
        ImageOps.exif_transpose(im, in_place=True)  # without in_place it copies every upright image
        out = to_rgb(im)
        if geometry:
            out.info[DRAFT_GEOMETRY] = geometry
        return out
    except (DecodeError, TooManyPixels):
        raise
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - OSError, SyntaxError, ValueError, struct.error, ...
        raise DecodeError(f"{type(exc).__name__}: {exc}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: transparency composited on white, 16-bit scaled, CMYK converted."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # convert() would clamp 16-bit values to 0..255; scale them instead.
        arr = np.asarray(im, dtype=np.float64)
        arr = np.clip(arr / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.nan_to_num(np.clip(arr, 0, 255)).round().astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK (Pillow undoes Adobe inversion), YCbCr, LAB, HSV


def preprocess(im: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """RGB image to a float32 ``(3, crop_h, crop_w)`` array, as CLIPImageProcessor makes it."""
    return normalise(crop_uint8(im, cfg), cfg)


def crop_uint8(im: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """The resized centre crop as uint8 ``(crop_h, crop_w, 3)``: what ``normalise`` (or a backend
    that normalises inside its graph) turns into model input."""
    width, height, box = source_geometry(im)
    size = cfg.shortest_edge
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if box is not None:  # a draft: resize the picture's exact box to the full decode's size
        im = im.resize((new_w, new_h), resample=cfg.resample, box=box)
    elif (new_w, new_h) != (width, height):
        im = im.resize((new_w, new_h), resample=cfg.resample)
    top = (new_h - cfg.crop_height) // 2
    left = (new_w - cfg.crop_width) // 2
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
    orientation = im.getexif().get(0x0112, 1)  # what exif_transpose will apply after load
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


def load_pixels(data: bytes, cfg: PreprocessConfig, uint8: bool = False) -> np.ndarray:
    """Bytes straight to model input: decode, convert, preprocess. ``uint8``: the crop as uint8
    ``(H, W, 3)`` instead, for a backend that normalises inside its graph."""
    im = decode(data, cfg)
    return crop_uint8(im, cfg) if uint8 else preprocess(im, cfg)


def _sniff(data: bytes) -> str:
    head = data[:16]
    if not head:
        return "empty body"
    if head.lstrip().startswith((b"<", b"{", b"[")):
        return "looks like text/markup"
    return f"starts with {head[:8].hex()}"
