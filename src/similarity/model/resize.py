"""Pillow's convolution resize, bit for bit, as two matrix products on a torch device.

``CLIPImageProcessor`` resizes with Pillow, whose 8-bit resample is a separable convolution in
fixed point: each pass sums ``pixel * coefficient`` with the coefficients scaled to 22-bit integers,
adds half a unit and keeps the clamped top bits. ``resize`` reproduces that arithmetic exactly:
Pillow's coefficients (the same double-precision steps as its ``precompute_coeffs``) become a dense
``(out, in)`` matrix of integers, and each pass is one float64 matrix product. Every product and
partial sum is an integer below 2**53, so float64 holds them exactly and the result does not depend
on the summation order: the same bytes on the CPU and on a GPU. Pillow rounds to 8 bits between the
passes and (in recent releases) runs the vertical pass first when the height shrinks by more than
twice the width's reduction; ``pillow_pass_order`` finds out which rule the installed Pillow follows
rather than trusting its version number.

This is for moving the resize off the CPU (``DevicePixels``); on the CPU itself Pillow's C loop is
faster.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import PIL
from PIL import Image

from ..errors import BackendUnavailable

#: Pillow's ``PRECISION_BITS`` for 8-bit images (Resample.c: 32 - 8 - 2).
PRECISION_BITS = 22
_HALF = float(1 << (PRECISION_BITS - 1))
_UNIT = float(1 << PRECISION_BITS)

PassOrder = Literal["horizontal-first", "larger-reduction-first"]


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


#: Pillow's filters this module reproduces: resample code -> (filter, support).
FILTERS: dict[int, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    int(Image.Resampling.BICUBIC): (_bicubic, 2.0),
    int(Image.Resampling.BILINEAR): (_bilinear, 1.0),
}


@functools.lru_cache(maxsize=256)
def coefficients(in_size: int, out_size: int, resample: int) -> np.ndarray:
    """Pillow's fixed-point coefficients for resizing ``in_size`` pixels to ``out_size`` (the whole
    axis, no box) as a dense float64 ``(out_size, in_size)`` matrix of integers. Read-only."""
    if resample not in FILTERS:
        raise BackendUnavailable(f"resample filter {resample} has no exact device resize (only bicubic, bilinear)")
    filt, base_support = FILTERS[resample]
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    inv = 1.0 / filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize, dtype=np.int64)
    valid = taps[None, :] < xmax[:, None]
    w = filt((((taps[None, :] + xmin[:, None]).astype(np.float64) - center[:, None]) + 0.5) * inv)
    w = np.where(valid, w, 0.0)
    total = np.zeros(out_size, dtype=np.float64)
    for j in range(ksize):  # in order, as the C loop adds them (numpy's sum is pairwise)
        total += w[:, j]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * _UNIT), np.trunc(0.5 + w * _UNIT))
    out = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.broadcast_to(np.arange(out_size)[:, None], fixed.shape)
    cols = np.minimum(taps[None, :] + xmin[:, None], in_size - 1)
    out[rows[valid], cols[valid]] = fixed[valid]
    out.flags.writeable = False
    return out


def _clip8(t: Any, torch: Any) -> Any:
    """Pillow's ``clip8``: the integer part above the fixed point, clamped to 0..255."""
    return torch.clamp(torch.floor(t / _UNIT), 0.0, 255.0)


class Coefficients:
    """``coefficients`` as float64 tensors on one device, kept for the sizes seen recently."""

    def __init__(self, torch: Any, device: Any, resample: int, maxsize: int = 128) -> None:
        self.torch, self.device, self.resample = torch, device, resample
        self._get = functools.lru_cache(maxsize=maxsize)(self._make)
        self._lock = threading.Lock()

    def _make(self, in_size: int, out_size: int) -> Any:
        k = self.torch.from_numpy(np.array(coefficients(in_size, out_size, self.resample))).to(self.device)
        if k.device.type == "cuda":  # cached for every thread's stream: the copy must be done first
            self.torch.cuda.current_stream(k.device).synchronize()
        return k

    def __call__(self, in_size: int, out_size: int) -> Any:
        with self._lock:
            k = self._get(in_size, out_size)
        if k.device.type == "cuda":  # evicted while this stream still reads it, its memory must wait
            k.record_stream(self.torch.cuda.current_stream(k.device))
        return k


#: Elements of float64 one pass converts at a time (128 MB): a large image's first pass runs in
#: slices, so the device never holds more than this beside the uint8 image and the result.
CHUNK_ELEMENTS = 1 << 24


def resize(pixels: Any, size: tuple[int, int], coeffs: Coefficients, order: PassOrder) -> Any:
    """Resize a ``(3, H, W)`` tensor of 0..255 integers (uint8, or any dtype holding them) to
    ``size`` (width, height) as Pillow resizes the same RGB image: float64 ``(3, h, w)`` of integers."""
    torch = coeffs.torch
    channels, height, width = pixels.shape
    new_w, new_h = size

    def horizontal(x: Any) -> Any:  # rows are independent: slice them
        h, w = x.shape[1], x.shape[2]
        if new_w == w:
            return x.double()
        k = coeffs(w, new_w).T
        out = torch.empty((channels, h, new_w), dtype=torch.float64, device=x.device)
        step = max(1, CHUNK_ELEMENTS // max(1, channels * w))
        for r in range(0, h, step):
            out[:, r : r + step] = _clip8(torch.matmul(x[:, r : r + step].double(), k) + _HALF, torch)
        return out

    def vertical(x: Any) -> Any:  # columns are independent: slice them
        h, w = x.shape[1], x.shape[2]
        if new_h == h:
            return x.double()
        k = coeffs(h, new_h)
        out = torch.empty((channels, new_h, w), dtype=torch.float64, device=x.device)
        step = max(1, CHUNK_ELEMENTS // max(1, channels * h))
        for c in range(0, w, step):
            out[:, :, c : c + step] = _clip8(torch.matmul(k, x[:, :, c : c + step].double()) + _HALF, torch)
        return out

    shrink_h, shrink_w = height - new_h, width - new_w
    vertical_first = order == "larger-reduction-first" and shrink_h > 0 and shrink_h > shrink_w * 2
    return horizontal(vertical(pixels)) if vertical_first else vertical(horizontal(pixels))


@functools.lru_cache(maxsize=4)
def pillow_pass_order(resample: int) -> PassOrder:
    """Which pass order the installed Pillow uses, found by resizing a probe both ways (a tall
    image shrunk mostly in height, where the two orders round differently)."""
    import torch

    rng = np.random.default_rng(7)
    probe = rng.integers(0, 256, (97, 23, 3), dtype=np.uint8)
    size = (19, 11)
    want = np.asarray(Image.fromarray(probe).resize(size, resample=resample), dtype=np.uint8)
    coeffs = Coefficients(torch, "cpu", resample)
    x = torch.from_numpy(probe.copy()).permute(2, 0, 1)
    orders: tuple[PassOrder, ...] = ("larger-reduction-first", "horizontal-first")
    for order in orders:
        got = resize(x, size, coeffs, order).permute(1, 2, 0).to(torch.uint8).numpy()
        if np.array_equal(got, want):
            return order
    raise BackendUnavailable(
        f"the installed Pillow ({PIL.__version__}) resizes in a way the device resize does not reproduce; "
        "use SIMILARITY_PIXELS=pillow"
    )
