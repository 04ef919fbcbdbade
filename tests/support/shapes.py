"""Synthetic images of one coloured shape on a plain background, with their true captions.

Shared by the tiny-CLIP generator (training data) and the tests (fresh images the model never saw).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 70, 215),
    "yellow": (235, 215, 40),
}
SHAPES = ("circle", "square", "triangle")
# Neutral backgrounds, so the background never carries one of the named colours.
BACKGROUNDS = (
    (255, 255, 255),
    (235, 235, 235),
    (190, 190, 190),
    (120, 120, 120),
    (40, 40, 40),
    (0, 0, 0),
    (225, 215, 195),
)
TEMPLATES = ("a {c} {s}", "a photo of a {c} {s}", "a {c} {s} shape", "a picture of a {c} {s}", "{c} {s}")


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    colour: str
    shape: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape}"


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)  # type: ignore[return-value]


def draw(colour: str, shape: str, rng: random.Random, min_side: int = 48, max_side: int = 160) -> Image.Image:
    w, h = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
    img = Image.new("RGB", (w, h), _jitter(rng.choice(BACKGROUNDS), rng, 12))
    d = ImageDraw.Draw(img)
    side = int(min(w, h) * rng.uniform(0.4, 0.75))
    x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
    fill = _jitter(COLOURS[colour], rng, 20)
    if shape == "circle":
        d.ellipse((x0, y0, x0 + side, y0 + side), fill=fill)
    elif shape == "square":
        d.rectangle((x0, y0, x0 + side, y0 + side), fill=fill)
    else:
        d.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    return img


def sample(rng: random.Random) -> Sample:
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    return Sample(draw(colour, shape, rng), colour, shape)


def all_captions() -> list[str]:
    return [f"a {c} {s}" for c in COLOURS for s in SHAPES]
