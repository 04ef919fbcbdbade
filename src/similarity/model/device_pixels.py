"""Image bytes to model input with the resize, crop and normalisation on a torch device.

On a GPU host the CPU side of the pipeline, not the model, limits end to end: decoding and
resizing every pixel as ``CLIPImageProcessor`` does costs ~9 ms of CPU per image, and the
bicubic resize is most of it. ``DevicePixels`` keeps Pillow's header checks and decoding and
moves the rest onto the model's device, bit for bit what ``load_pixels`` gives
(``similarity.model.resize``). With ``decoder="nvjpeg"`` it also decodes JPEGs there, with nvJPEG
through NVIDIA's nvImageCodec. nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's, so
those pixels differ and the embedding cache keys them apart; and nvJPEG decodes some damaged JPEGs
that Pillow refuses (a broken entropy-coded stream), so a few rows that are errors on the other
paths get a score on this one. Anything the device path does not take (other formats and modes, a
JPEG nvImageCodec refuses, opt-in draft decoding, extreme aspect ratios, crops that pad) and a
device out of memory go through ``load_pixels``'s steps unchanged, so every row gets the CPU
path's result or its error; any other device failure turns the device path off for the rest of
the run, with one logged error.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import math
import os
import queue
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image

from ..errors import BackendUnavailable
from ..hardware import import_torch
from .preprocess import (
    BYTES_PER_PIXEL,
    DRAFT_GEOMETRY,
    DecodeBudget,
    PreprocessConfig,
    ResizePlan,
    decode_budget,
    decode_cost,
    load_rgb,
    model_input,
    open_image,
    resize_plan,
)
from .resize import Coefficients, check_device, pillow_pass_order, resize

log = logging.getLogger(__name__)

#: Where image bytes become model input (``SIMILARITY_PIXELS``): ``pillow`` on the CPU; ``torch``:
#: Pillow decodes, the model's device resizes, crops and normalises (the same values to the bit);
#: ``nvjpeg``: JPEGs are decoded on the GPU too (other pixels: opt-in, drift in docs/performance.md).
PixelPath = Literal["pillow", "torch", "nvjpeg"]
PIXEL_PATHS: tuple[PixelPath, ...] = get_args(PixelPath)
#: The modes nvJPEG decodes as Pillow does (CMYK and YCCK JPEGs stay with Pillow).
NVJPEG_MODES = ("RGB", "L")
#: Extra host bytes per pixel a Pillow-decoded image costs on its way to the device (one packed
#: RGB copy), on top of what the decode budget counts for it (``BYTES_PER_PIXEL``).
UPLOAD_BYTES_PER_PIXEL = 3


class _Pool:
    """Objects that are costly to make (CUDA streams, nvImageCodec decoders), lent to one thread
    at a time and kept for the next, whichever thread or run that is."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()

    @contextlib.contextmanager
    def lend(self) -> Iterator[Any]:
        try:
            item = self._idle.get_nowait()
        except queue.Empty:
            item = self._make()
        try:
            yield item
        finally:
            self._idle.put(item)


#: Pillow's EXIF orientations as operations on an ``(H, W, 3)`` tensor (ImageOps.exif_transpose's
#: transposes: 6 is ROTATE_270, 8 ROTATE_90, 5 TRANSPOSE, 7 TRANSVERSE).
def _orient(x: Any, orientation: int, torch: Any) -> Any:
    if orientation == 2:
        return x.flip(1)
    if orientation == 3:
        return x.flip((0, 1))
    if orientation == 4:
        return x.flip(0)
    if orientation == 5:
        return x.transpose(0, 1)
    if orientation == 6:
        return torch.rot90(x, -1, (0, 1))
    if orientation == 7:
        return x.transpose(0, 1).flip((0, 1))
    if orientation == 8:
        return torch.rot90(x, 1, (0, 1))
    return x


class NvJpegDecoder:
    """nvImageCodec's JPEG decoder; decoders are pooled (one per thread at a time). ``on_gpu=False``
    runs its CPU backend (libjpeg-turbo): the same code path without a GPU, for the tests."""

    def __init__(self, torch: Any, device: Any, on_gpu: bool = True) -> None:
        os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")  # failures fall back to Pillow, which reports them
        try:
            from nvidia import nvimgcodec
        except ImportError as exc:
            raise BackendUnavailable(
                f"SIMILARITY_PIXELS=nvjpeg needs nvImageCodec ({exc}); install the extra: pip install '.[gpu]'"
            ) from None
        self._nv = nvimgcodec
        self.torch, self.device, self.on_gpu = torch, device, on_gpu
        # What decodes, for the embedding cache's keys: nvImageCodec picks the GPU's hardware JPEG
        # engine where it has one and CUDA kernels elsewhere, so the GPU's name is part of it.
        where = torch.cuda.get_device_name(device) if on_gpu else "its CPU backend"
        self.identity = f"nvImageCodec {importlib.metadata.version('nvidia-nvimgcodec-cu13')} on {where}"
        # Orientation is applied from Pillow's reading of the header (it also reads XMP's).
        self._params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB)
        self._decoders = _Pool(self._make)

    def _make(self) -> Any:
        nv = self._nv
        # One CPU thread each: the loader threads are the parallelism, and the default (a thread
        # per core in every decoder) would start hundreds. Fancy upsampling is libjpeg-turbo's.
        if self.on_gpu:
            return nv.Decoder(device_id=self.device.index or 0, max_num_cpu_threads=1, options=":fancy_upsampling=1")
        return nv.Decoder(
            device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY,
            max_num_cpu_threads=1,
            backends=[nv.Backend(nv.BackendKind.CPU_ONLY)],
        )

    def __call__(self, data: bytes) -> Any:
        """The stored (not yet oriented) RGB image as a uint8 ``(H, W, 3)`` tensor on the device,
        or None where nvImageCodec cannot decode it."""
        torch = self.torch
        with self._decoders.lend() as decoder:
            if self.on_gpu:  # decoded on the stream torch uses next, handed over without a copy (DLPack)
                stream = torch.cuda.current_stream(self.device).cuda_stream
                image = decoder.decode(data, params=self._params, cuda_stream=stream)
                return None if image is None else torch.from_dlpack(image).to(self.device)
            image = decoder.decode(data, params=self._params)
            return None if image is None else torch.from_numpy(np.asarray(image.cpu())).to(self.device)


class DevicePixels:
    """``load_pixels`` with the resize, crop and normalisation on ``device``: the same contract
    (float32 ``(3, H, W)``, or the uint8 ``(H, W, 3)`` crop with ``uint8``), the same errors, the
    same decode budget."""

    def __init__(
        self,
        cfg: PreprocessConfig,
        device: str = "cuda",
        uint8: bool = False,
        decoder: Literal["pillow", "nvjpeg"] = "pillow",
        nvjpeg_on_gpu: bool = True,
    ) -> None:
        torch = import_torch()
        self.torch, self.cfg, self.device, self.uint8 = torch, cfg, torch.device(device), uint8
        self.order = pillow_pass_order(cfg.resample)
        self.coeffs = Coefficients(torch, self.device, cfg.resample)
        shape = (3, 1, 1)
        self._rescale = torch.tensor(cfg.rescale_factor, dtype=torch.float32, device=self.device)
        self._mean = torch.tensor(cfg.mean, dtype=torch.float32, device=self.device).reshape(shape)
        self._std = torch.tensor(cfg.std, dtype=torch.float32, device=self.device).reshape(shape)
        self.nvjpeg = NvJpegDecoder(torch, self.device, nvjpeg_on_gpu) if decoder == "nvjpeg" else None
        self._streams = _Pool(lambda: torch.cuda.Stream(self.device)) if self.device.type == "cuda" else None
        if self.device.type == "cuda":  # the constants above are read from every loader thread's stream
            torch.cuda.synchronize(self.device)
        check_device(self.coeffs, self.order)  # this device's arithmetic gives Pillow's bytes
        self._lock = threading.Lock()
        self.counts = {"decoded_on_device": 0, "resized_on_device": 0, "cpu": 0, "out_of_memory": 0}
        self.enabled = True  # off after a device failure other than running out of memory
        self._warned = False

    @property
    def decoded_on_device(self) -> int:
        return self.counts["decoded_on_device"]

    @property
    def fallbacks(self) -> int:
        return self.counts["cpu"]

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def __call__(self, data: bytes, budget: DecodeBudget | None = None) -> np.ndarray:
        cfg = self.cfg
        im = open_image(data, cfg)  # the header checks, limits and their row errors: Pillow's
        # Held before it is known whether nvJPEG takes the image (then the host holds no pixels):
        # counted as a Pillow decode and its upload copy, the larger, so a refusal never overdraws.
        cost = decode_cost(im)
        cost += math.ceil(cost * UPLOAD_BYTES_PER_PIXEL / BYTES_PER_PIXEL)
        decoded: list[Image.Image] = []  # what Pillow decoded, for the CPU path if the device fails
        try:
            with (budget or decode_budget()).hold(cost):
                if self.enabled and DRAFT_GEOMETRY not in im.info:  # a draft resizes a box: the CPU path
                    try:
                        out = self._on_device(im, data, decoded)
                        if out is not None:
                            return out
                    except RuntimeError as exc:
                        self._failed(exc)
                self._count("cpu")
                return model_input(decoded[0] if decoded else load_rgb(im), cfg, self.uint8)
        finally:
            im.close()

    def _failed(self, exc: RuntimeError) -> None:
        if "out of memory" in str(exc).lower():  # torch.cuda.OutOfMemoryError: this image goes to the CPU
            self._count("out_of_memory")
            if not self._warned:
                self._warned = True
                log.warning("device out of memory in the pixel path; images it cannot take go through Pillow")
            return
        with self._lock:
            was, self.enabled = self.enabled, False
        if was:
            log.error("device pixel path failed (%s: %s); Pillow on the CPU does the rest of the run",
                      type(exc).__name__, str(exc)[:300])  # fmt: skip

    def _plan(self, im: Image.Image) -> tuple[ResizePlan, int, tuple[int, int]] | None:
        """The resize for the image as it will stand upright, its EXIF orientation (Pillow's
        reading, XMP included) and its upright size, from the header alone; None where the
        header's EXIF is broken."""
        try:
            orientation = int(im.getexif().get(0x0112, 1))
        except Exception:  # noqa: BLE001 - Pillow's decode reports it as the row's error
            return None
        width, height = im.size
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        return resize_plan(width, height, self.cfg), orientation, (width, height)

    def _on_device(self, im: Image.Image, data: bytes, decoded: list[Image.Image]) -> np.ndarray | None:
        """The model input, or None to take the CPU path (``decoded`` holds Pillow's decode if it ran)."""
        planned = self._plan(im)
        if planned is None or planned[0].crop_only or planned[0].pads:
            return None
        plan, orientation, (width, height) = planned
        with self._stream():
            pixels = None
            if self.nvjpeg is not None and im.format == "JPEG" and im.mode in NVJPEG_MODES:
                stored = self.nvjpeg(data)
                if stored is not None:
                    pixels = _orient(stored, orientation, self.torch)
            on_device = pixels is not None
            if pixels is None:
                rgb = load_rgb(im)  # raises the row's DecodeError as the CPU path does
                decoded.append(rgb)
                pixels = self._upload(rgb)
            if tuple(pixels.shape) != (height, width, 3):
                return None  # a decoder that disagrees with the header: let Pillow decide
            out = self._crop(pixels, plan)
            if on_device:
                self._count("decoded_on_device")
            self._count("resized_on_device")
            return out

    def _stream(self) -> Any:
        """A CUDA stream per call, from a pool: on the shared default stream each thread's copy back
        would wait for every other thread's work. A null context elsewhere."""
        if self._streams is None:
            return contextlib.nullcontext()
        return _on_stream(self.torch, self._streams)

    def _upload(self, rgb: Image.Image) -> Any:
        torch = self.torch
        width, height = rgb.size
        with warnings.catch_warnings():  # read-only bytes: torch warns, but nothing writes to them
            warnings.simplefilter("ignore", UserWarning)
            host = torch.frombuffer(rgb.tobytes(), dtype=torch.uint8)
        return host.reshape(height, width, 3).to(self.device)

    def _crop(self, pixels: Any, plan: ResizePlan) -> np.ndarray:
        cfg, torch = self.cfg, self.torch
        with torch.inference_mode():
            resized = resize(pixels.permute(2, 0, 1), (plan.new_w, plan.new_h), self.coeffs, self.order)
            crop = resized[:, plan.top : plan.top + cfg.crop_height, plan.left : plan.left + cfg.crop_width]
            if self.uint8:
                return np.ascontiguousarray(crop.permute(1, 2, 0).to(torch.uint8).cpu().numpy())
            x = crop.to(torch.float32)
            x.mul_(self._rescale).sub_(self._mean).div_(self._std)
            return np.ascontiguousarray(x.cpu().numpy())


@contextlib.contextmanager
def _on_stream(torch: Any, streams: _Pool) -> Iterator[None]:
    with streams.lend() as stream, torch.cuda.stream(stream):
        yield
