"""transformers' ``CLIPModel``: the fp32 reference, mixed bf16 on CPUs with native bf16, fp16 on CUDA."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailable
from ..hardware import import_torch
from .base import BF16_FP32_IMAGE_LAYERS, BackendName, Device, Dtype


class TorchBackend:
    name: BackendName = "torch"

    def __init__(
        self, model_dir: Path, device: Device = "cpu", dtype: Dtype = "fp32", threads: int | None = None
    ) -> None:
        """``device`` is cpu or cuda: the selection policy has already decided what auto means."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            torch = import_torch()
            from transformers import CLIPModel
            from transformers.utils import logging as hf_logging
        except ImportError as exc:
            raise BackendUnavailable(
                f"torch backend needs torch and transformers ({exc}); install the extra: pip install '.[torch]'"
            ) from None
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        if threads:
            torch.set_num_threads(threads)
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("--device cuda asked for, but torch sees no CUDA device")
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        if dtype not in dtypes:
            raise BackendUnavailable(f"torch backend supports fp32, bf16 or fp16, not {dtype!r}")
        self._autocast = device == "cpu" and dtype == "bf16"
        # CPU bf16 loads fp32 and runs mixed (see _mixed_bf16); CUDA casts the whole model.
        torch_dtype = torch.float32 if self._autocast else dtypes[dtype]
        model = CLIPModel.from_pretrained(
            str(model_dir), local_files_only=True, use_safetensors=True, dtype=torch_dtype
        )
        if self._autocast:
            _mixed_bf16(torch, model)
        self.model = model.eval().to(device)
        self.torch = torch
        self.device: Device = device
        self.dtype: Dtype = dtype
        self._tdtype = torch_dtype

    def _context(self) -> Any:
        torch = self.torch
        if self._autocast:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @staticmethod
    def _pooled(out: Any) -> Any:
        return out if hasattr(out, "shape") else out.pooler_output  # transformers 4 vs 5

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode(), self._context():
            x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, self._tdtype)
            y = self._pooled(self.model.get_image_features(pixel_values=x))
            return np.asarray(y.float().cpu().numpy())

    def text_features(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode(), self._context():
            i = torch.from_numpy(ids).to(self.device)
            m = torch.from_numpy(mask).to(self.device)
            y = self._pooled(self.model.get_text_features(input_ids=i, attention_mask=m))
            return np.asarray(y.float().cpu().numpy())


def _mixed_bf16(torch: Any, model: Any, fp32_layers: int = BF16_FP32_IMAGE_LAYERS) -> None:
    """bf16 where it is cheap in accuracy, fp32 where it is not.

    Run under ``torch.autocast``: the encoder's matmuls take bf16 inputs with fp32 accumulation
    while layer norms, softmax statistics and the residual stream stay fp32. Its Linear weights are
    stored in bf16 (autocast would cast them on every call, and this halves their memory). The
    patch embedding (it sees raw pixels), the image tower's first ``fp32_layers`` encoder layers
    and the two output projections stay fp32 outside autocast. On the test model with large inputs,
    rounding the activations that enter the first layer is most of bf16's drift (docs/performance.md).
    """

    class KeepFp32(torch.nn.Module):  # type: ignore[misc]  # torch is typed Any here: imported lazily
        def __init__(self, layer: Any) -> None:
            super().__init__()
            self.layer = layer

        @property
        def weight(self) -> Any:  # CLIPVisionEmbeddings reads patch_embedding.weight.dtype
            return self.layer.weight

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            def up(v: Any) -> Any:
                return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

            with torch.autocast("cpu", enabled=False):
                return self.layer(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})

    layers = [f"vision_model.encoder.layers.{i}" for i in range(fp32_layers)]
    keep = {"vision_model.embeddings.patch_embedding", "visual_projection", "text_projection"}
    for name, module in model.named_modules():
        in_fp32_layer = any(name == p or name.startswith(p + ".") for p in layers)
        if isinstance(module, torch.nn.Linear) and name not in keep and not in_fp32_layer:
            module.to(torch.bfloat16)
    # The fp32 tensors left still point into the memory-mapped checkpoint, which keeps all 600 MB of
    # it resident; copies let it be unmapped.
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dtype != torch.bfloat16:
                tensor.data = tensor.data.clone()
    model.vision_model.embeddings.patch_embedding = KeepFp32(model.vision_model.embeddings.patch_embedding)
    model.visual_projection = KeepFp32(model.visual_projection)
    model.text_projection = KeepFp32(model.text_projection)
    encoder = model.vision_model.encoder.layers
    for i in range(min(fp32_layers, len(encoder))):
        encoder[i] = KeepFp32(encoder[i])
