"""The fixed images and captions every backend is compared on (tests/integration/test_backends.py and bench/).

``parity_inputs`` are small pictures preprocessed straight from Pillow; ``large_images`` are encoded
files far larger than the model's input, which go through the library's whole loading path (decode,
EXIF orientation, resize, crop), so any shortcut for large images (JPEG draft decoding, reduced
precision on sharper inputs) triggers on them.
"""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image

from similarity.model.preprocess import PreprocessConfig, load_pixels, preprocess

from .shapes import COLOURS, SHAPES, all_captions, draw


def parity_inputs(cfg: PreprocessConfig) -> tuple[np.ndarray, list[str]]:
    """24 fresh shape pictures, every true caption, and two edge cases (a long caption truncated)."""
    rng = random.Random(99)
    px = np.stack([preprocess(draw(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng), cfg) for _ in range(24)])
    return px, all_captions() + ["a photo of a red circle", "a " * 30 + "blue square"]


def large_images(side: int, n: int = 24) -> list[bytes]:
    """``3 * n`` shape pictures for a model of ``side`` pixels: JPEG q92 with a short side of
    4.7-6.6x and 8-17x the input (eligible for draft decoding at factors 2 and 4), a third of them
    with an EXIF orientation that transposes, and PNGs at odd sizes of 2-6x. Sizes are random, so
    about half the sides are odd."""
    rng = random.Random(1234)
    sets = (
        (int(4.7 * side), int(6.6 * side), "JPEG"),
        (8 * side, 17 * side, "JPEG"),
        (2 * side + 1, 6 * side + 1, "PNG"),
    )
    out = []
    for lo, hi, fmt in sets:
        for i in range(n):
            img = draw(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng, lo, hi)
            buf = io.BytesIO()
            if fmt == "JPEG":
                exif = Image.Exif()
                if i % 3 == 0:
                    exif[0x0112] = (6, 8, 5)[(i // 3) % 3]
                    img = img.transpose(Image.Transpose.ROTATE_90)  # stored sideways, shown upright
                img.save(buf, fmt, quality=92, exif=exif.tobytes())
            else:
                img.save(buf, fmt)
            out.append(buf.getvalue())
    return out


def large_inputs(cfg: PreprocessConfig, n: int = 24) -> np.ndarray:
    """``large_images`` through ``load_pixels`` with ``cfg`` (float32 model input)."""
    side = max(cfg.shortest_edge, cfg.crop_height, cfg.crop_width)
    return np.stack([load_pixels(data, cfg) for data in large_images(side, n)])


def model_pixels(model, images: list[bytes]) -> np.ndarray:
    """``images`` as ``model`` loads them in the pipeline (``ClipModel.pixels``: uint8 crops where
    its backend normalises in its graph, float32 otherwise)."""
    return np.stack([model.pixels(data) for data in images])


def similarities(model, px: np.ndarray, captions: list[str]) -> np.ndarray:
    """Every image against every caption, on the 0..1 similarity scale."""
    return (model.embed_images(px) @ model.embed_texts(captions)[0].T + 1) / 2
