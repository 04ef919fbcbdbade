"""OpenVINO mixed bf16 and int8: the graph cut at the fp32 boundaries and the cache of the cut pieces."""

from __future__ import annotations

import importlib.util
import os
import shutil

import numpy as np
import pytest

from similarity.hardware import has_native_bf16 as cpu_has_native_bf16
from similarity.model import load_model
from support.parity import parity_inputs, similarities

pytestmark = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")
needs_bf16 = pytest.mark.skipif(not cpu_has_native_bf16(), reason="CPU without bf16")
# int8 runs anywhere (OpenVINO falls back to fp32 kernels without VNNI); bf16 needs the CPU's support.
DTYPES = [pytest.param("bf16", marks=needs_bf16), "int8"]


@pytest.fixture
def exported(tiny_clip_dir, tmp_path):
    from similarity.tools.onnx_export import export_onnx

    d = tmp_path / "tiny-clip"
    shutil.copytree(tiny_clip_dir, d)
    export_onnx(d, int8=False)
    return d


def _pieces(model_dir, dtype="bf16"):
    return sorted((model_dir / "onnx" / "openvino-cache").glob(f"mixed-{dtype}-*"))


def _weights(matmul):
    """The matmul's weight constant: bf16 directly, int8 behind convert -> multiply by scale."""
    node = matmul.input_value(1).get_node()
    if node.get_type_name() == "Multiply":
        node = node.input_value(0).get_node()
        assert node.get_type_name() == "Convert"
        node = node.input_value(0).get_node()
    return node


@pytest.mark.parametrize("dtype", DTYPES)
def test_cut_pieces_are_saved_once_and_reused(exported, tiny_model, dtype) -> None:
    px, caps = parity_inputs(tiny_model.preprocess)
    first = similarities(load_model(exported, backend="openvino", dtype=dtype), px, caps)
    [pieces] = _pieces(exported, dtype)
    assert sorted(p.name for p in pieces.iterdir()) == [
        "embed.bin",
        "embed.xml",
        "projections.npz",
        "text.bin",
        "text.xml",
        "vision.bin",
        "vision.xml",
    ]
    import openvino as ov

    for name in ("vision", "text"):  # every weight matmul holds reduced weights; fp32 copies would cost RSS
        graph = ov.Core().read_model(str(pieces / f"{name}.xml"))
        weights = [_weights(op) for op in graph.get_ordered_ops() if op.get_type_name() == "MatMul"]
        consts = [w for w in weights if w.get_type_name() == "Constant"]
        # 2 layers x (q, k, v, out, fc1, fc2) per tower
        assert len(consts) == 12 and all(
            w.get_element_type() == {"bf16": ov.Type.bf16, "int8": ov.Type.i8}[dtype] for w in consts
        )
    stamp = {p.name: p.stat().st_mtime_ns for p in pieces.iterdir()}
    again = similarities(load_model(exported, backend="openvino", dtype=dtype), px, caps)
    assert {p.name: p.stat().st_mtime_ns for p in pieces.iterdir()} == stamp  # read, not rewritten
    np.testing.assert_allclose(again, first, atol=1e-6)


@needs_bf16
def test_a_new_export_replaces_the_old_pieces(exported) -> None:
    load_model(exported, backend="openvino", dtype="bf16")
    [old] = _pieces(exported)
    vision = exported / "onnx" / "vision.onnx"
    st = vision.stat()
    os.utime(vision, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # what a re-export looks like
    load_model(exported, backend="openvino", dtype="bf16")
    [new] = _pieces(exported)
    assert new.name != old.name and not old.exists()


@needs_bf16
def test_unwritable_cache_still_loads(exported, tiny_model, tmp_path, monkeypatch) -> None:
    """Without a writable cache the graphs are cut in memory on every load; scores are the same."""
    px, caps = parity_inputs(tiny_model.preprocess)
    cached = similarities(load_model(exported, backend="openvino", dtype="bf16"), px, caps)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    unwritable = str(blocker / "cache")  # cannot be created, even by root
    np.testing.assert_allclose(
        similarities(load_model(exported, backend="openvino", dtype="bf16", cache_dir=unwritable), px, caps),
        cached,
        atol=1e-6,
    )


@needs_bf16
def test_a_graph_without_projection_is_a_clear_error(exported) -> None:
    """ONNX files from another exporter: a named error that says how to fix it, not a wrong score."""
    import onnx
    from onnx import TensorProto, helper

    from similarity.errors import ModelIncomplete

    graph = helper.make_graph(
        [helper.make_node("Relu", ["pixel_values"], ["image_embeds"])],
        "g",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["b", 3, 224, 224])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["b", 3, 224, 224])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), exported / "onnx" / "vision.onnx")
    with pytest.raises(ModelIncomplete, match="similarity model export"):
        load_model(exported, backend="openvino", dtype="bf16")


@needs_bf16
def test_models_sharing_one_cache_keep_their_own_pieces(exported, tmp_path, monkeypatch) -> None:
    other = tmp_path / "other-model"
    shutil.copytree(exported, other)
    st = (other / "onnx" / "vision.onnx").stat()  # a different export, as another model's would be
    os.utime(other / "onnx" / "vision.onnx", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    shared = tmp_path / "shared-cache"
    load_model(exported, backend="openvino", dtype="bf16", cache_dir=str(shared))
    load_model(other, backend="openvino", dtype="bf16", cache_dir=str(shared))
    load_model(exported, backend="openvino", dtype="int8", cache_dir=str(shared))  # another precision, same model
    assert len(list(shared.glob("mixed-bf16-*"))) == 2 and len(list(shared.glob("mixed-int8-*"))) == 1


def test_int8_dequantises_to_the_weights(exported) -> None:
    """The int8 weights times their per-channel scale give back the fp32 weights within half a step."""
    import openvino as ov

    from similarity.backends.openvino import _int8_weights, _weight_matmuls

    core = ov.Core()
    graph = core.read_model(str(exported / "onnx" / "text.onnx"))
    before = [(np.asarray(w, np.float32), a) for _, w, a in _weight_matmuls(ov, graph)]
    _int8_weights(ov, graph)
    after = [
        op
        for op in graph.get_ordered_ops()
        if op.get_type_name() == "MatMul" and _weights(op).get_element_type() == ov.Type.i8
    ]
    assert len(after) == len(before) == 13  # 2 layers x 6, and the projection (this graph is not cut)
    for (w, attrs), op in zip(before, after):
        mul = op.input_value(1).get_node()
        q = np.asarray(_weights(op).get_data(), np.float32)
        scale = np.asarray(mul.input_value(1).get_node().get_data(), np.float32)
        ref = w if attrs["transpose_b"] else w.T
        assert (np.abs(q).max(axis=1) == 127).all()  # each output channel uses the whole range
        assert np.abs(q * scale - ref).max() <= scale.max() / 2 + 1e-7
