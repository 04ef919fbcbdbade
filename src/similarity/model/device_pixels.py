"""Image bytes to model input with the resize, crop and normalisation on a torch device.

On a GPU host the CPU side of the pipeline, not the model, limits end to end: decoding and
resizing every pixel as ``CLIPImageProcessor`` does costs ~9 ms of CPU per image, and the
bicubic resize is most of it. ``DevicePixels`` keeps Pillow's header checks and decoding and
moves the rest onto the model's device, bit for bit what ``load_pixels`` gives
(``similarity.model.resize``). With ``decoder="nvjpeg"`` it also decodes JPEGs there, with nvJPEG
through NVIDIA's nvImageCodec; nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's, so
those pixels differ and the embedding cache keys them apart. Anything the device path does not
take (other formats and modes, a JPEG nvImageCodec refuses, opt-in draft decoding, extreme aspect
ratios, crops that pad) and any device failure (out of memory) go through ``load_pixels``
unchanged, so every row gets the CPU path's result or its error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image

from ..errors import BackendUnavailable
from ..hardware import import_torch
from .preprocess import (
    DRAFT_GEOMETRY,
    DecodeBudget,
    PreprocessConfig,
    crop_uint8,
    decode_budget,
    decode_cost,
    load_rgb,
    normalise,
    open_image,
    resize_plan,
)
from .resize import Coefficients, pillow_pass_order, resize

log = logging.getLogger(__name__)

#: Where image bytes become model input (``SIMILARITY_PIXELS``): ``pillow`` on the CPU; ``torch``:
#: Pillow decodes, the model's device resizes, crops and normalises (the same values to the bit);
#: ``nvjpeg``: JPEGs are decoded on the GPU too (other pixels: opt-in, drift in docs/performance.md).
PixelPath = Literal["pillow", "torch", "nvjpeg"]
PIXEL_PATHS: tuple[PixelPath, ...] = get_args(PixelPath)
#: The modes nvJPEG decodes as Pillow does (CMYK and YCCK JPEGs stay with Pillow).
NVJPEG_MODES = ("RGB", "L")


class NvJpegDecoder:
    """nvImageCodec's JPEG decoder, one per thread (a decoder is not shared between threads).
    ``on_gpu=False`` runs its CPU backend (libjpeg-turbo): the same code path without a GPU, for
    the tests."""

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
        self._params = nvimgcodec.DecodeParams(apply_exif_orientation=True, color_spec=nvimgcodec.ColorSpec.SRGB)
        self._local = threading.local()

    def _decoder(self) -> Any:
        decoder = getattr(self._local, "decoder", None)
        if decoder is None:
            nv = self._nv
            if self.on_gpu:
                decoder = nv.Decoder(device_id=self.torch.device(self.device).index or 0)
            else:
                decoder = nv.Decoder(
                    device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, backends=[nv.Backend(nv.BackendKind.CPU_ONLY)]
                )
            self._local.decoder = decoder
        return decoder

    def __call__(self, data: bytes) -> Any:
        """The oriented RGB image as a uint8 ``(H, W, 3)`` tensor on the device, or None where
        nvImageCodec cannot decode it."""
        torch = self.torch
        if self.on_gpu:  # decoded on the stream torch uses next, and handed over without a copy (DLPack)
            stream = torch.cuda.current_stream(self.device).cuda_stream
            image = self._decoder().decode(data, params=self._params, cuda_stream=stream)
            return None if image is None else torch.from_dlpack(image)
        image = self._decoder().decode(data, params=self._params)
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
        self._local = threading.local()
        if self.device.type == "cuda":  # the constants above are used from every loader thread's stream
            torch.cuda.synchronize(self.device)
        self.decoded_on_device = 0  # counts, for the tests and the bench
        self.fallbacks = 0
        self._warned = False

    def __call__(self, data: bytes, budget: DecodeBudget | None = None) -> np.ndarray:
        cfg = self.cfg
        im = open_image(data, cfg)  # the header checks, limits and their row errors: Pillow's
        with (budget or decode_budget()).hold(decode_cost(im)):
            try:
                if DRAFT_GEOMETRY not in im.info:  # a draft resizes a box: the CPU path
                    out = self._on_device(im, data)
                    if out is not None:
                        return out
            except RuntimeError as exc:  # out of device memory, or a device failure: the CPU gives the same
                if not self._warned:
                    log.warning("device pixel path failed (%s: %s); images it fails on go through Pillow on the CPU",
                                type(exc).__name__, str(exc)[:200])  # fmt: skip
                    self._warned = True
                im.close()
                im = open_image(data, cfg)  # the failed attempt may have decoded the first one
            try:
                return self._on_cpu(load_rgb(im))
            finally:
                im.close()

    def _on_cpu(self, rgb: Image.Image) -> np.ndarray:
        self.fallbacks += 1
        crop = crop_uint8(rgb, self.cfg)
        return crop if self.uint8 else normalise(crop, self.cfg)

    def _stream(self) -> Any:
        """A CUDA stream per loader thread: on the shared default stream each thread's copy back
        would wait for every other thread's work. A null context elsewhere."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = self.torch.cuda.Stream(self.device)
        return self.torch.cuda.stream(stream)

    def _on_device(self, im: Image.Image, data: bytes) -> np.ndarray | None:
        with self._stream():
            return self._on_stream(im, data)

    def _on_stream(self, im: Image.Image, data: bytes) -> np.ndarray | None:
        """The model input, or None to take the CPU path from the undecoded ``im``."""
        cfg, torch = self.cfg, self.torch
        pixels = None
        if self.nvjpeg is not None and im.format == "JPEG" and im.mode in NVJPEG_MODES:
            pixels = self.nvjpeg(data)
        if pixels is None:
            rgb = load_rgb(im)  # raises the row's DecodeError as the CPU path does
            width, height = rgb.size
            plan = resize_plan(width, height, cfg)
            if plan.crop_only or plan.pads:
                return self._on_cpu(rgb)
            with warnings.catch_warnings():  # read-only bytes: torch warns, but nothing writes to them
                warnings.simplefilter("ignore", UserWarning)
                host = torch.frombuffer(rgb.tobytes(), dtype=torch.uint8)
            pixels = host.reshape(height, width, 3).to(self.device)
        else:
            height, width = int(pixels.shape[0]), int(pixels.shape[1])
            plan = resize_plan(width, height, cfg)
            if plan.crop_only or plan.pads:
                return None
            self.decoded_on_device += 1
        with torch.inference_mode():
            resized = resize(pixels.permute(2, 0, 1), (plan.new_w, plan.new_h), self.coeffs, self.order)
            crop = resized[:, plan.top : plan.top + cfg.crop_height, plan.left : plan.left + cfg.crop_width]
            if self.uint8:
                return np.ascontiguousarray(crop.permute(1, 2, 0).to(torch.uint8).cpu().numpy())
            x = crop.to(torch.float32)
            x.mul_(self._rescale).sub_(self._mean).div_(self._std)
            return np.ascontiguousarray(x.cpu().numpy())
