"""Backend parity on the test bed: every backend against the torch fp32 reference.

Bounds are on the 0..1 ``similarity``. fp32 backends must match to rounding; reduced-precision ones
are held to what was measured on this test bed (see README, Performance) with some headroom, so a
broken export or quantisation fails while normal rounding does not.
"""

from __future__ import annotations

import importlib.util
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
from support.shapes import COLOURS, SHAPES, all_captions, draw

from similarity.images import preprocess
from similarity.model import load_model, resolve_backend
from similarity.onnx_backend import onnx_files_present


@pytest.fixture(scope="module")
def exported(tiny_clip_dir, tmp_path_factory):
    from similarity.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("models") / "tiny-clip"
    shutil.copytree(tiny_clip_dir, d)
    export_onnx(d, int8=True)
    return d


@pytest.fixture(scope="module")
def inputs(tiny_model):
    rng = random.Random(99)
    px = np.stack([preprocess(draw(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng), tiny_model.preprocess) for _ in range(24)])
    caps = all_captions() + ["a photo of a red circle", "a " * 30 + "blue square"]
    return px, caps


def _sims(model, px, caps) -> np.ndarray:
    img = model.embed_images(px)
    txt, _ = model.embed_texts(caps)
    return (img @ txt.T + 1) / 2


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def _cpu_bf16() -> bool:
    try:
        return "avx512_bf16" in open("/proc/cpuinfo").read() or "amx_bf16" in open("/proc/cpuinfo").read()
    except OSError:
        return False


CASES = [
    ("onnx", "fp32", 1e-5, None),
    ("onnx", "int8", 0.03, None),
    ("torch", "bf16", 0.01, None),
    ("openvino", "fp32", 1e-5, "openvino"),
    ("openvino", "bf16", 0.01, "openvino"),
]


@pytest.mark.parametrize(("backend", "dtype", "bound", "needs"), CASES, ids=[f"{b}-{d}" for b, d, _, _ in CASES])
def test_backend_agrees_with_reference(exported, tiny_model, inputs, backend, dtype, bound, needs) -> None:
    if needs and not _has(needs):
        pytest.skip(f"{needs} not installed")
    if dtype == "bf16" and backend == "openvino" and not _cpu_bf16():
        pytest.skip("CPU without bf16")
    px, caps = inputs
    ref = _sims(tiny_model, px, caps)
    model = load_model(exported, backend=backend, dtype=dtype)
    assert model.info.backend == backend and model.info.dtype == dtype
    diff = np.abs(_sims(model, px, caps) - ref).max()
    assert diff < bound, f"{backend}/{dtype}: max |similarity difference| {diff:.5f}"


def test_default_backend_is_exact(exported, tiny_clip_dir, tiny_model, inputs) -> None:
    """auto picks ONNX Runtime fp32 when the exported files are there (within 0.002 of the
    reference, as the default must be) and torch fp32 when they are not."""
    assert onnx_files_present(exported) and not onnx_files_present(tiny_clip_dir)
    assert resolve_backend("auto", "cpu", exported) == ("onnx", "cpu")
    assert resolve_backend("auto", "cpu", tiny_clip_dir) == ("torch", "cpu")
    px, caps = inputs
    model = load_model(exported)
    assert (model.info.backend, model.info.dtype) == ("onnx", "fp32")
    assert np.abs(_sims(model, px, caps) - _sims(tiny_model, px, caps)).max() <= 0.002


def test_onnx_path_needs_no_torch(exported) -> None:
    """The Lambda's CPU path: loading and scoring must not import torch or transformers."""
    code = (
        "import sys, base64, io;from similarity import load_model, score_pairs, Record, Fetcher;"
        f"m = load_model({str(exported)!r});"
        "from PIL import Image;b=io.BytesIO();Image.new('RGB',(40,40),(200,0,0)).save(b,'PNG');"
        "u='data:image/png;base64,'+base64.b64encode(b.getvalue()).decode();"
        "r = next(score_pairs([Record(u, 'a red square')], m, Fetcher()));assert r.ok, r.error_text;"
        "print(m.info.backend, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["onnx", "False", "False"]


def test_unknown_backend_and_dtype_are_clear(exported) -> None:
    from similarity.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="unknown backend"):
        load_model(exported, backend="tpu")
    with pytest.raises(BackendUnavailable, match="fp32 or int8"):
        load_model(exported, backend="onnx", dtype="bf16")


def test_onnx_without_export_says_how_to_fix(tiny_clip_dir) -> None:
    from similarity.errors import ModelIncomplete

    with pytest.raises(ModelIncomplete, match="similarity model export"):
        load_model(tiny_clip_dir, backend="onnx")
