"""``similarity model export``: write ONNX files for both towers next to the weights.

The graphs end at the projection (unnormalised embeddings, like ``get_*_features``); text pooling
at the end-of-text token is inside the graph, and the last layer computes the pooled token only
(``clip_pooled``). Batch and sequence axes are dynamic, so captions keep being padded only to the
longest in each batch. int8 files use ONNX Runtime's dynamic quantisation (QInt8 weights with one
scale per tensor, activations quantised at run time).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..backends.files import (
    EXPORTED_FROM_FILE,
    INT8_WEIGHTS,
    INT8_WEIGHTS_KEY,
    ONNX_SUBDIR,
    mark_exported_from,
    onnx_paths,
)
from ..model.directory import check_model_dir

OPSET = 17


def export_onnx(model_dir: str | os.PathLike[str], int8: bool = True, openvino: bool = True) -> list[Path]:
    """Write the ONNX files; with ``openvino`` (and OpenVINO installed), also the cut graphs of
    OpenVINO's mixed bf16 path beside them, so loads read those instead of cutting the ONNX files
    (the pieces do not depend on the CPU; the compiled blobs, which do, are made where the model
    runs)."""
    import torch
    from transformers import CLIPModel

    from .clip_pooled import image_embeds, text_embeds

    path = check_model_dir(model_dir)
    out_dir = path / ONNX_SUBDIR
    out_dir.mkdir(exist_ok=True)
    (out_dir / EXPORTED_FROM_FILE).unlink(missing_ok=True)  # written again once every graph is
    # Plain attention math exports cleanly with the TorchScript exporter.
    model = CLIPModel.from_pretrained(
        str(path), local_files_only=True, use_safetensors=True, attn_implementation="eager"
    ).eval()

    class Vision(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return image_embeds(self.m, pixel_values)

    class Text(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return text_embeds(self.m, input_ids, attention_mask)

    vcfg, tcfg = model.config.vision_config, model.config.text_config
    px = torch.zeros(2, 3, vcfg.image_size, vcfg.image_size)
    ids = torch.full((2, 7), 1, dtype=torch.long)
    ids[:, 0] = getattr(tcfg, "bos_token_id", 0) or 0
    ids[:, -1] = tcfg.eos_token_id if tcfg.eos_token_id != 2 else tcfg.vocab_size - 1
    mask = torch.ones_like(ids)
    fp32 = onnx_paths(path, "fp32")
    written: list[Path] = []
    with torch.inference_mode():
        torch.onnx.export(
            Vision(),
            (px,),
            str(fp32["vision"]),
            input_names=["pixel_values"],
            output_names=["image_embeds"],
            dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
        torch.onnx.export(
            Text(),
            (ids, mask),
            str(fp32["text"]),
            input_names=["input_ids", "attention_mask"],
            output_names=["text_embeds"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "seq"},
                "attention_mask": {0: "batch", 1: "seq"},
                "text_embeds": {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    for tower in ("vision", "text"):
        written += _weights_beside(fp32[tower])
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        q = onnx_paths(path, "int8")
        for tower in ("vision", "text"):
            # One scale per weight tensor, not per channel: on CPUs without VNNI (AVX2, and AVX-512
            # without VNNI) ONNX Runtime's u8s8 kernel adds pairs of products in saturating 16-bit
            # lanes, and per-channel weights, each column scaled to the full int8 range, overflow
            # them: 0.046 in similarity on the test model on a Zen 3, against 0.011 per tensor at
            # the same speed (docs/performance.md).
            quantize_dynamic(str(fp32[tower]), str(q[tower]), weight_type=QuantType.QInt8, per_channel=False)
            _stamp(q[tower], {INT8_WEIGHTS_KEY: INT8_WEIGHTS})
            written.append(q[tower])
    if openvino:
        written += _openvino_pieces(path)
    mark_exported_from(path)
    written.append(out_dir / EXPORTED_FROM_FILE)
    return written


def _stamp(graph: Path, props: dict[str, str]) -> None:
    """Add metadata the loader reads (ONNX Runtime's ``custom_metadata_map``) to a graph file."""
    import onnx

    model = onnx.load(str(graph))
    keep = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(graph))


def _openvino_pieces(path: Path) -> list[Path]:
    from ..backends import PixelNorm
    from ..hardware import installed
    from ..model.preprocess import PreprocessConfig

    if not installed("openvino"):
        return []
    from ..backends.openvino import write_pieces

    cfg = PreprocessConfig.from_model_dir(path)
    d = write_pieces(path, "bf16", PixelNorm(cfg.mean, cfg.std, cfg.rescale_factor))
    return sorted(d.iterdir()) if d else []


def _weights_beside(path: Path) -> list[Path]:
    """Rewrite an ONNX file with its weights in ``<name>.data`` next to it. ONNX Runtime maps such
    external weights instead of parsing them out of the protobuf: session creation drops from 0.90
    to 0.53 s (vision) and 0.74 to 0.27 s (text), and RSS by ~140 MB, which is most of the Lambda's
    cold start."""
    import onnx

    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing file
    onnx.save_model(
        onnx.load(str(path)),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    shutil.copymode(path, data)  # onnx creates it owner-only; readers of the .onnx need it too
    return [path, data]
