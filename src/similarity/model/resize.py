"""Pillow's convolution resize, bit for bit, as batched matrix products on a torch device.

``CLIPImageProcessor`` resizes with Pillow, whose 8-bit resample is a separable convolution in
fixed point: each pass sums ``pixel * coefficient`` with the coefficients scaled to 22-bit integers,
adds half a unit and keeps the clamped top bits. ``resize`` reproduces that arithmetic exactly:
Pillow's coefficients (the same double-precision steps as its ``precompute_coeffs``) are grouped
into blocks of ``BLOCK`` outputs, each block a small dense matrix over the run of inputs it reads,
and each pass is one batched float64 matrix product over those blocks. Every product and partial
sum is an integer below 2**53, so float64 holds them exactly and the result does not depend on the
summation order: the same bytes on the CPU and on a GPU. Pillow rounds to 8 bits between the passes
and (in recent releases) runs the vertical pass first when the height shrinks by more than twice
the width's reduction; ``pillow_pass_order`` finds out which rule the installed Pillow follows, and
``check_device`` compares a set of resizes with Pillow's on the device itself before it is used
(float64 arithmetic that is not IEEE, emulated or fused differently, would show there).

This is for moving the resize off the CPU (``DevicePixels``); on the CPU itself Pillow's C loop is
faster.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from typing import Any, Literal

import numpy as np
import PIL
from PIL import Image

from ..errors import BackendUnavailable

#: Pillow's ``PRECISION_BITS`` for 8-bit images (Resample.c: 32 - 8 - 2).
PRECISION_BITS = 22
_HALF = float(1 << (PRECISION_BITS - 1))
_UNIT = float(1 << PRECISION_BITS)
#: Outputs per block. Each block's matrix spans the inputs its outputs read, about BLOCK x the
#: scale plus the filter's support: a few times Pillow's own multiply-adds, against the hundreds a
#: single dense matrix per axis costs on a large image.
BLOCK = 16
#: float64 elements one pass gathers at a time (32 MB): large images run in slices, so each thread
#: holds little beyond the uint8 image and the (small) results on the device.
CHUNK_ELEMENTS = 1 << 22

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
FILTERS = {
    int(Image.Resampling.BICUBIC): (_bicubic, 2.0),
    int(Image.Resampling.BILINEAR): (_bilinear, 1.0),
}


@functools.lru_cache(maxsize=64)
def taps(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's fixed-point coefficients for resizing ``in_size`` pixels to ``out_size`` (the whole
    axis, no box): for each output the first input it reads, how many it reads, and the integer
    coefficients (``(out_size, ksize)`` float64, zero past the count). Read-only arrays."""
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
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    j = np.arange(ksize, dtype=np.int64)
    valid = j[None, :] < count[:, None]
    w = np.where(valid, filt((((j[None, :] + xmin[:, None]).astype(np.float64) - center[:, None]) + 0.5) * inv), 0.0)
    total = np.zeros(out_size, dtype=np.float64)
    for k in range(ksize):  # in order, as the C loop adds them (numpy's sum is pairwise)
        total += w[:, k]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * _UNIT), np.trunc(0.5 + w * _UNIT))
    for a in (xmin, count, fixed):
        a.flags.writeable = False
    return xmin, count, fixed


def coefficients(in_size: int, out_size: int, resample: int) -> np.ndarray:
    """``taps`` as one dense ``(out_size, in_size)`` matrix (for checking; ``Banded`` is what runs)."""
    xmin, count, fixed = taps(in_size, out_size, resample)
    out = np.zeros((out_size, in_size), dtype=np.float64)
    for o in range(out_size):
        out[o, xmin[o] : xmin[o] + count[o]] = fixed[o, : count[o]]
    return out


class Banded:
    """One axis's coefficients on a device, in blocks of ``BLOCK`` outputs: block ``b`` reads the
    ``span`` inputs from ``starts[b]`` on, through its ``(span, BLOCK)`` matrix."""

    def __init__(self, torch: Any, device: Any, in_size: int, out_size: int, resample: int) -> None:
        xmin, count, fixed = taps(in_size, out_size, resample)
        nblocks = -(-out_size // BLOCK)
        pad = nblocks * BLOCK - out_size  # the last block's spare outputs read nothing
        first = np.concatenate([xmin, np.full(pad, xmin[-1])]).reshape(nblocks, BLOCK)
        last = np.concatenate([xmin + count, np.full(pad, xmin[-1])]).reshape(nblocks, BLOCK)
        starts = first.min(axis=1)
        span = int(min(in_size, max(1, int((last.max(axis=1) - starts).max()))))
        starts = np.minimum(starts, in_size - span)  # keep every window inside the axis
        k = np.zeros((nblocks, span, BLOCK), dtype=np.float64)
        o = np.arange(out_size)
        for j in range(fixed.shape[1]):
            m = j < count
            k[o[m] // BLOCK, xmin[m] + j - starts[o[m] // BLOCK], o[m] % BLOCK] = fixed[m, j]
        self.out_size, self.nblocks, self.span = out_size, nblocks, span
        self.k = torch.from_numpy(k).to(device)
        self.index = torch.from_numpy(starts[:, None] + np.arange(span)).to(device)
        if self.k.device.type == "cuda":  # shared with every thread's stream: the copies must be done
            torch.cuda.current_stream(self.k.device).synchronize()

    def used_on_this_stream(self, torch: Any) -> None:
        """Evicted while this stream still reads it, its memory must wait for the stream."""
        if self.k.device.type == "cuda":
            stream = torch.cuda.current_stream(self.k.device)
            self.k.record_stream(stream)
            self.index.record_stream(stream)


class Coefficients:
    """``Banded`` coefficients on one device for the sizes seen recently (a few MB each)."""

    def __init__(self, torch: Any, device: Any, resample: int, maxsize: int = 128) -> None:
        self.torch, self.device, self.resample, self.maxsize = torch, device, resample, maxsize
        self._items: OrderedDict[tuple[int, int], Banded] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, in_size: int, out_size: int) -> Banded:
        key = (in_size, out_size)
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
        if found is None:  # built outside the lock: a slow build never stalls the other threads
            found = Banded(self.torch, self.device, in_size, out_size, self.resample)
            with self._lock:
                self._items[key] = found
                while len(self._items) > self.maxsize:
                    self._items.popitem(last=False)
        found.used_on_this_stream(self.torch)
        return found


def _along_last(x: Any, band: Banded, torch: Any) -> Any:
    """One pass along ``x``'s last axis: ``(..., L)`` of 0..255 integers (any dtype) to float64
    ``(..., out)``, Pillow's sum, half-unit rounding and clamp."""
    lead, length = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, length)
    n = rows.shape[0]
    out = torch.empty((n, band.out_size), dtype=torch.float64, device=x.device)
    step = max(1, CHUNK_ELEMENTS // (band.nblocks * band.span))
    for r in range(0, n, step):
        gathered = rows[r : r + step][:, band.index].to(torch.float64)  # (rows, blocks, span)
        y = torch.bmm(gathered.transpose(0, 1), band.k)  # (blocks, rows, BLOCK)
        y = y.transpose(0, 1).reshape(gathered.shape[0], band.nblocks * BLOCK)[:, : band.out_size]
        out[r : r + step] = y.add_(_HALF).div_(_UNIT).floor_().clamp_(0.0, 255.0)  # Pillow's clip8
    return out.reshape(*lead, band.out_size)


def resize(pixels: Any, size: tuple[int, int], coeffs: Coefficients, order: PassOrder) -> Any:
    """Resize a ``(3, H, W)`` tensor of 0..255 integers (uint8, or any dtype holding them) to
    ``size`` (width, height) as Pillow resizes the same RGB image: float64 ``(3, h, w)`` of integers."""
    torch = coeffs.torch
    _, height, width = pixels.shape
    new_w, new_h = size

    def horizontal(x: Any) -> Any:
        w = x.shape[2]
        return x.double() if new_w == w else _along_last(x, coeffs(w, new_w), torch)

    def vertical(x: Any) -> Any:
        h = x.shape[1]
        if new_h == h:
            return x.double()
        return _along_last(x.transpose(1, 2), coeffs(h, new_h), torch).transpose(1, 2)

    if vertical_first(width, height, new_w, new_h, order):
        return horizontal(vertical(pixels))
    return vertical(horizontal(pixels))


def vertical_first(width: int, height: int, new_w: int, new_h: int, order: PassOrder) -> bool:
    """Whether Pillow, following ``order``, resizes ``width x height`` to ``new_w x new_h``
    vertical pass first: under the larger-reduction rule, when the height shrinks by more than
    twice the width's reduction."""
    shrink_h, shrink_w = height - new_h, width - new_w
    return order == "larger-reduction-first" and shrink_h > 0 and shrink_h > shrink_w * 2


#: ``check_device``'s resizes: (source size, target size), both pass orders, shrinking and
#: enlarging, blocks partly filled, one axis unchanged.
CHECKS = (((97, 23), (19, 11)), ((23, 97), (11, 19)), ((301, 211), (64, 83)), ((40, 30), (91, 67)), ((50, 9), (50, 4)))


#: A tall image shrunk mostly in height, where the two pass orders round differently.
_PROBE = np.random.default_rng(7).integers(0, 256, (97, 23, 3), dtype=np.uint8)
_PROBE_SIZE = (19, 11)


@functools.lru_cache(maxsize=4)
def pillow_order(resample: int) -> PassOrder | None:
    """Which pass order the installed Pillow follows, from Pillow alone: its resize of the probe
    against its own two single-axis resizes taken each way; None when neither matches."""
    img = Image.fromarray(_PROBE)
    want = np.asarray(img.resize(_PROBE_SIZE, resample=resample))
    w, h = _PROBE_SIZE
    v_first = img.resize((img.width, h), resample=resample).resize(_PROBE_SIZE, resample=resample)
    h_first = img.resize((w, img.height), resample=resample).resize(_PROBE_SIZE, resample=resample)
    if np.array_equal(np.asarray(v_first), want):
        return "larger-reduction-first"
    return "horizontal-first" if np.array_equal(np.asarray(h_first), want) else None


@functools.lru_cache(maxsize=4)
def pillow_pass_order(resample: int) -> PassOrder:
    """Pillow's pass order (``pillow_order``), checked to be what the device resize reproduces."""
    import torch

    order = pillow_order(resample)
    if order is not None:
        want = np.asarray(Image.fromarray(_PROBE).resize(_PROBE_SIZE, resample=resample), dtype=np.uint8)
        x = torch.from_numpy(_PROBE.copy()).permute(2, 0, 1)
        got = resize(x, _PROBE_SIZE, Coefficients(torch, "cpu", resample), order)
        if np.array_equal(got.permute(1, 2, 0).to(torch.uint8).numpy(), want):
            return order
    raise BackendUnavailable(
        f"the installed Pillow ({PIL.__version__}) resizes in a way the device resize does not reproduce; "
        "use SIMILARITY_PIXELS=pillow"
    )


def check_device(coeffs: Coefficients, order: PassOrder) -> None:
    """``CHECKS`` on ``coeffs``' device against Pillow, on noise and on hard edges (0/255): any
    byte that differs means this device's arithmetic is not what the exactness rests on."""
    torch = coeffs.torch
    rng = np.random.default_rng(11)
    for (w, h), size in CHECKS:
        for image in (
            rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            rng.choice([0, 255], (h, w, 3)).astype(np.uint8),
        ):
            want = np.asarray(Image.fromarray(image).resize(size, resample=coeffs.resample), dtype=np.uint8)
            x = torch.from_numpy(image).permute(2, 0, 1).to(coeffs.device)
            got = resize(x, size, coeffs, order).permute(1, 2, 0).to(torch.uint8).cpu().numpy()
            if not np.array_equal(got, want):
                raise BackendUnavailable(
                    f"the exact resize gives other bytes than Pillow on {coeffs.device} ({(w, h)} -> {size}); "
                    "use SIMILARITY_PIXELS=pillow"
                )
