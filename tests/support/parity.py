"""The fixed images and captions every backend is compared on (tests/integration/test_backends.py and bench/)."""

from __future__ import annotations

import random

import numpy as np

from similarity.model.preprocess import PreprocessConfig, preprocess

from .shapes import COLOURS, SHAPES, all_captions, draw


def parity_inputs(cfg: PreprocessConfig) -> tuple[np.ndarray, list[str]]:
    """24 fresh shape pictures, every true caption, and two edge cases (a long caption truncated)."""
    rng = random.Random(99)
    px = np.stack([preprocess(draw(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng), cfg) for _ in range(24)])
    return px, all_captions() + ["a photo of a red circle", "a " * 30 + "blue square"]


def similarities(model, px: np.ndarray, captions: list[str]) -> np.ndarray:
    """Every image against every caption, on the 0..1 similarity scale."""
    return (model.embed_images(px) @ model.embed_texts(captions)[0].T + 1) / 2
