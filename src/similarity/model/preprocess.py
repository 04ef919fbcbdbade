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

#: Bump whenever decoding or preprocessing can give other pixels for the same bytes and config: the
#: embedding cache keys image embeddings by it (similarity.cache.keys), and
#: tests/unit/test_cache_keys.py holds the golden hash of each version's output on fixed images.
PREPROCESS_VERSION = 1


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
    #: JPEGs are decoded at a reduced DCT scale while their short side stays >= this many times the
    #: target size; 0 turns draft decoding off. At 2x the bicubic resize still sees twice the
    #: pixels it keeps, so the result stays close to a full decode (bench measures the effect).
    draft_factor: int = 2

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
        if cfg.draft_factor and im.format in ("JPEG", "MPO"):
            target = cfg.draft_factor * max(cfg.shortest_edge, cfg.crop_height, cfg.crop_width)
            if min(width, height) >= 2 * target:
                im.draft(None, (target, target))
        im.load()  # first frame of animations; truncated data raises here
        ImageOps.exif_transpose(im, in_place=True)  # without in_place it copies every upright image
        return to_rgb(im)
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
    width, height = im.size
    size = cfg.shortest_edge
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
        im = im.resize((new_w, new_h), resample=cfg.resample)
    top = (new_h - cfg.crop_height) // 2
    left = (new_w - cfg.crop_width) // 2
    if top >= 0 and left >= 0:
        arr = np.asarray(im, dtype=np.uint8)[top : top + cfg.crop_height, left : left + cfg.crop_width]
    else:  # smaller than the crop: pad with zeros around the centre, as the reference does
        arr = np.zeros((cfg.crop_height, cfg.crop_width, 3), dtype=np.uint8)
        src = np.asarray(im, dtype=np.uint8)
        oy, ox = max(-top, 0), max(-left, 0)
        sy, sx = max(top, 0), max(left, 0)
        h = min(new_h - sy, cfg.crop_height - oy)
        w = min(new_w - sx, cfg.crop_width - ox)
        arr[oy : oy + h, ox : ox + w] = src[sy : sy + h, sx : sx + w]
    out = arr.astype(np.float32).transpose(2, 0, 1)
    out *= np.float32(cfg.rescale_factor)
    out -= np.asarray(cfg.mean, dtype=np.float32)[:, None, None]
    out /= np.asarray(cfg.std, dtype=np.float32)[:, None, None]
    return out


def load_pixels(data: bytes, cfg: PreprocessConfig) -> np.ndarray:
    """Bytes straight to model input: decode, convert, preprocess."""
    return preprocess(decode(data, cfg), cfg)


def _sniff(data: bytes) -> str:
    head = data[:16]
    if not head:
        return "empty body"
    if head.lstrip().startswith((b"<", b"{", b"[")):
        return "looks like text/markup"
    return f"starts with {head[:8].hex()}"
