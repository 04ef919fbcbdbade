"""OpenVINO mixed bf16: the graph cut at the fp32 boundaries and the cache of the cut pieces."""

from __future__ import annotations

import importlib.util
import os
import shutil

import numpy as np
import pytest
from support.parity import parity_inputs, similarities

from similarity.model import cpu_has_native_bf16, load_model

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed"),
    pytest.mark.skipif(not cpu_has_native_bf16(), reason="CPU without bf16"),
]


@pytest.fixture
def exported(tiny_clip_dir, tmp_path):
    from similarity.onnx_export import export_onnx

    d = tmp_path / "tiny-clip"
    shutil.copytree(tiny_clip_dir, d)
    export_onnx(d, int8=False)
    return d


def _pieces(model_dir):
    return sorted((model_dir / "onnx" / "openvino-cache").glob("mixed-bf16-*"))


def test_cut_pieces_are_saved_once_and_reused(exported, tiny_model) -> None:
    px, caps = parity_inputs(tiny_model.preprocess)
    first = similarities(load_model(exported, backend="openvino", dtype="bf16"), px, caps)
    [pieces] = _pieces(exported)
    assert sorted(p.name for p in pieces.iterdir()) == [
        "embed.bin", "embed.xml", "projections.npz", "text.bin", "text.xml", "vision.bin", "vision.xml"]
    import openvino as ov

    for name in ("vision", "text"):  # every weight matmul holds bf16 weights; fp32 copies would cost RSS
        graph = ov.Core().read_model(str(pieces / f"{name}.xml"))
        weights = [op.input_value(1).get_node() for op in graph.get_ordered_ops() if op.get_type_name() == "MatMul"]
        consts = [w for w in weights if w.get_type_name() == "Constant"]
        assert consts and all(w.get_element_type() == ov.Type.bf16 for w in consts)
    stamp = {p.name: p.stat().st_mtime_ns for p in pieces.iterdir()}
    again = similarities(load_model(exported, backend="openvino", dtype="bf16"), px, caps)
    assert {p.name: p.stat().st_mtime_ns for p in pieces.iterdir()} == stamp  # read, not rewritten
    np.testing.assert_allclose(again, first, atol=1e-6)


def test_a_new_export_replaces_the_old_pieces(exported) -> None:
    load_model(exported, backend="openvino", dtype="bf16")
    [old] = _pieces(exported)
    vision = exported / "onnx" / "vision.onnx"
    st = vision.stat()
    os.utime(vision, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # what a re-export looks like
    load_model(exported, backend="openvino", dtype="bf16")
    [new] = _pieces(exported)
    assert new.name != old.name and not old.exists()


def test_unwritable_cache_still_loads(exported, tiny_model, tmp_path, monkeypatch) -> None:
    """Without a writable cache the graphs are cut in memory on every load; scores are the same."""
    px, caps = parity_inputs(tiny_model.preprocess)
    cached = similarities(load_model(exported, backend="openvino", dtype="bf16"), px, caps)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SIMILARITY_OV_CACHE_DIR", str(blocker / "cache"))  # cannot be created, even by root
    np.testing.assert_allclose(similarities(load_model(exported, backend="openvino", dtype="bf16"), px, caps),
                               cached, atol=1e-6)


def test_a_graph_without_projection_is_a_clear_error(exported) -> None:
    """ONNX files from another exporter: a named error that says how to fix it, not a wrong score."""
    import onnx
    from onnx import TensorProto, helper

    from similarity.errors import ModelIncomplete

    graph = helper.make_graph(
        [helper.make_node("Relu", ["pixel_values"], ["image_embeds"])], "g",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["b", 3, 224, 224])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["b", 3, 224, 224])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), exported / "onnx" / "vision.onnx")
    with pytest.raises(ModelIncomplete, match="similarity model export"):
        load_model(exported, backend="openvino", dtype="bf16")


def test_models_sharing_one_cache_keep_their_own_pieces(exported, tmp_path, monkeypatch) -> None:
    other = tmp_path / "other-model"
    shutil.copytree(exported, other)
    st = (other / "onnx" / "vision.onnx").stat()  # a different export, as another model's would be
    os.utime(other / "onnx" / "vision.onnx", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    shared = tmp_path / "shared-cache"
    monkeypatch.setenv("SIMILARITY_OV_CACHE_DIR", str(shared))
    load_model(exported, backend="openvino", dtype="bf16")
    load_model(other, backend="openvino", dtype="bf16")
    assert len(list(shared.glob("mixed-bf16-*"))) == 2
