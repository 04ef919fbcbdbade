"""OpenVINO mixed bf16 and int8: the graph cut at the fp32 boundaries, the uint8 input, the pieces
`model export` writes, and the caches of cut pieces and compiled blobs."""

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
    """ONNX files only: loads cut the graphs themselves and keep the pieces in the cache."""
    from similarity.tools.onnx_export import export_onnx

    d = tmp_path / "tiny-clip"
    shutil.copytree(tiny_clip_dir, d)
    export_onnx(d, int8=False, openvino=False)
    return d


def _pieces(cache, dtype="bf16"):
    return sorted(p for p in cache.glob(f"mixed-{dtype}-*") if ".tmp" not in p.name)


def _weights(matmul):
    """The matmul's weight constant: bf16 directly, int8 behind convert -> multiply by scale."""
    node = matmul.input_value(1).get_node()
    if node.get_type_name() == "Multiply":
        node = node.input_value(0).get_node()
        assert node.get_type_name() == "Convert"
        node = node.input_value(0).get_node()
    return node


def _weight_types(graph):
    """Element type of every constant weight of the graph's matmuls."""
    weights = [_weights(op) for op in graph.get_ordered_ops() if op.get_type_name() == "MatMul"]
    return [w.get_element_type() for w in weights if w.get_type_name() == "Constant"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_cut_pieces_are_saved_once_and_reused(exported, tiny_model, dtype) -> None:
    import openvino as ov

    cache = exported / "onnx" / "openvino-cache"
    px, caps = parity_inputs(tiny_model.preprocess)
    first = similarities(load_model(exported, backend="openvino", dtype=dtype), px, caps)
    [pieces] = _pieces(cache, dtype)
    names = ["embed", "embed_u8", "text", "vision"]
    assert sorted(p.name for p in pieces.iterdir()) == sorted(
        ["projections.npz", *(f"{n}.{ext}" for n in names for ext in ("bin", "xml"))]
    )
    reduced = {"bf16": ov.Type.bf16, "int8": ov.Type.i8}[dtype]
    core = ov.Core()
    # The tiny model has 2 layers of 6 weight matmuls per tower. bf16 keeps the image tower's first
    # layer fp32, in the embedding piece; every other weight matmul holds reduced weights (fp32
    # copies would cost RSS).
    fp32_image_layers = {"bf16": 1, "int8": 0}[dtype]
    vision, text = (_weight_types(core.read_model(str(pieces / f"{n}.xml"))) for n in ("vision", "text"))
    assert vision == [reduced] * 6 * (2 - fp32_image_layers) and text == [reduced] * 12
    for embed in ("embed", "embed_u8"):
        assert _weight_types(core.read_model(str(pieces / f"{embed}.xml"))) == [ov.Type.f32] * 6 * fp32_image_layers
    stamp = {p.name: p.stat().st_mtime_ns for p in pieces.iterdir()}
    again = similarities(load_model(exported, backend="openvino", dtype=dtype), px, caps)
    assert {p.name: p.stat().st_mtime_ns for p in pieces.iterdir()} == stamp  # read, not rewritten
    np.testing.assert_allclose(again, first, atol=1e-6)


@pytest.mark.parametrize("fp32_layers", [0, 1])
def test_the_cut_is_exact(exported, fp32_layers) -> None:
    """The cut pieces chained (fp32 graph, rest of the tower, numpy projection), compiled in fp32,
    give the uncut graph's embeddings: the cut moves no value, wherever it is made."""
    import openvino as ov

    from similarity.backends.openvino import _split_vision

    core = ov.Core()
    path = str(exported / "onnx" / "vision.onnx")
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    px = np.random.default_rng(0).normal(size=(5, 3, 64, 64)).astype(np.float32)
    whole = core.compile_model(core.read_model(path), "CPU", f32)([px])[0]
    embed, rest, proj = _split_vision(ov, core.read_model(path), fp32_layers)
    out = core.compile_model(rest, "CPU", f32)([core.compile_model(embed, "CPU", f32)([px])[0]])[0] @ proj
    np.testing.assert_allclose(out, whole, rtol=1e-5, atol=1e-5)


@needs_bf16
def test_uint8_crops_are_normalised_in_the_graph(exported, tiny_model) -> None:
    """The mixed path takes the uint8 crops ``ClipModel.pixels`` hands it and normalises them in its
    graph: the same values numpy's normalisation gives, to float rounding; float input still works."""
    from similarity.backends.openvino import _run_parts
    from similarity.model.preprocess import normalise
    from support.parity import large_images

    model = load_model(exported, backend="openvino", dtype="bf16")
    assert model.uint8_pixels
    images = large_images(64, n=2)
    crops = np.stack([model.pixels(data) for data in images])
    assert crops.dtype == np.uint8 and crops.shape == (6, 64, 64, 3)
    floats = normalise(crops, model.preprocess)
    backend = model.backend
    in_graph = _run_parts(backend._embed_u8, [crops])[0]
    from_numpy = _run_parts(backend._float_embed(), [floats])[0]
    assert np.abs(in_graph - from_numpy).max() <= 1e-5 * max(1.0, np.abs(from_numpy).max())
    assert model.embed_images(floats).shape == model.embed_images(crops).shape == (6, 32)
    # The torch reference takes uint8 crops too, normalising them itself: the same input.
    assert not tiny_model.uint8_pixels
    np.testing.assert_array_equal(tiny_model.embed_images(crops), tiny_model.embed_images(floats))


@needs_bf16
def test_pieces_written_by_export_are_read_not_cut(tiny_clip_dir, tmp_path) -> None:
    """`model export` writes the CPU-independent pieces beside the ONNX files; a load with its own
    cache directory (Lambda: /tmp) reads them and only puts compiled blobs there, one directory per
    OpenVINO version and CPU type."""
    import openvino as ov

    from similarity.hardware import cpu_feature_key
    from similarity.tools.onnx_export import export_onnx

    d = tmp_path / "tiny-clip"
    shutil.copytree(tiny_clip_dir, d)
    written = export_onnx(d, int8=False)
    [pieces] = (d / "onnx" / "openvino").iterdir()
    assert pieces.name.startswith("mixed-bf16-") and set(written) >= set(pieces.iterdir())
    stamp = {p.name: p.stat().st_mtime_ns for p in pieces.iterdir()}
    cache = tmp_path / "tmp-cache"
    model = load_model(d, backend="openvino", dtype="bf16", cache_dir=str(cache))
    assert model.embed_images(model.pixels(_jpeg())[None]).shape == (1, 32)
    version = ov.get_version().split("-")[0]
    assert [p.name for p in cache.iterdir()] == [f"ov{version}-cpu{cpu_feature_key()}"]  # no pieces cut here
    assert len(list((cache / f"ov{version}-cpu{cpu_feature_key()}").glob("*.blob"))) == 3  # embed_u8, vision, text
    assert {p.name: p.stat().st_mtime_ns for p in pieces.iterdir()} == stamp
    assert not (d / "onnx" / "openvino-cache").exists()  # nothing written beside the model


@needs_bf16
def test_compiled_blobs_are_kept_per_cpu_type(exported, tmp_path, monkeypatch, tiny_model) -> None:
    """Hosts of different CPU types sharing one cache (EFS) never read each other's blobs."""
    from similarity.backends import openvino as ov_backend

    cache = tmp_path / "shared"
    px, caps = parity_inputs(tiny_model.preprocess)
    first = similarities(load_model(exported, backend="openvino", dtype="bf16", cache_dir=str(cache)), px, caps)
    [mine] = cache.glob("ov*-cpu*")
    blobs = {p.name: p.stat().st_mtime_ns for p in mine.glob("*.blob")}
    monkeypatch.setattr(ov_backend, "cpu_feature_key", lambda: "othercpu0000")
    other = similarities(load_model(exported, backend="openvino", dtype="bf16", cache_dir=str(cache)), px, caps)
    assert sorted(p.name for p in cache.glob("ov*-cpu*")) == sorted(
        [mine.name, mine.name.split("-cpu")[0] + "-cpuothercpu0000"]
    )
    assert {p.name: p.stat().st_mtime_ns for p in mine.glob("*.blob")} == blobs  # untouched
    np.testing.assert_allclose(other, first, atol=1e-6)


def _jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (90, 70), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


@needs_bf16
def test_a_new_export_replaces_the_old_pieces(exported) -> None:
    cache = exported / "onnx" / "openvino-cache"
    load_model(exported, backend="openvino", dtype="bf16")
    [old] = _pieces(cache)
    vision = exported / "onnx" / "vision.onnx"
    st = vision.stat()
    os.utime(vision, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # what a re-export looks like
    load_model(exported, backend="openvino", dtype="bf16")
    [new] = _pieces(cache)
    assert new.name != old.name and not old.exists()


@needs_bf16
def test_unwritable_cache_still_loads(exported, tiny_model, tmp_path) -> None:
    """Without a writable cache the graphs are cut in memory on every load; scores are the same."""
    px, caps = parity_inputs(tiny_model.preprocess)
    cached = similarities(load_model(exported, backend="openvino", dtype="bf16"), px, caps)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    unwritable = str(blocker / "cache")  # cannot be created, even by root
    model = load_model(exported, backend="openvino", dtype="bf16", cache_dir=unwritable)
    np.testing.assert_allclose(similarities(model, px, caps), cached, atol=1e-6)
    assert model.uint8_pixels  # the in-memory pieces take uint8 crops too


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_off_writes_nothing(exported, tiny_model, tmp_path, monkeypatch, dtype) -> None:
    """``off`` (the Lambda image's setting): no compiled blobs and no cut pieces anywhere, not even
    in a directory named "off" or the temporary directory, and the same scores."""
    import tempfile

    px, caps = parity_inputs(tiny_model.preprocess)
    cached = similarities(load_model(exported, backend="openvino", dtype=dtype), px, caps)
    shutil.rmtree(exported / "onnx" / "openvino-cache")
    work, tmp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    model = load_model(exported, backend="openvino", dtype=dtype, cache_dir="off")
    np.testing.assert_allclose(similarities(model, px, caps), cached, atol=1e-6)
    assert not (exported / "onnx" / "openvino-cache").exists()
    assert list(work.iterdir()) == [] and list(tmp.iterdir()) == []


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
def test_models_sharing_one_cache_keep_their_own_pieces(exported, tmp_path) -> None:
    other = tmp_path / "other-model"
    shutil.copytree(exported, other)
    st = (other / "onnx" / "vision.onnx").stat()  # a different export, as another model's would be
    os.utime(other / "onnx" / "vision.onnx", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    shared = tmp_path / "shared-cache"
    load_model(exported, backend="openvino", dtype="bf16", cache_dir=str(shared))
    load_model(other, backend="openvino", dtype="bf16", cache_dir=str(shared))
    load_model(exported, backend="openvino", dtype="int8", cache_dir=str(shared))  # another precision, same model
    assert len(_pieces(shared, "bf16")) == 2 and len(_pieces(shared, "int8")) == 1


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


def test_loads_sharing_a_blob_cache_compile_in_turn(exported, tmp_path) -> None:
    """OpenVINO writes its blobs in place, and a process mapping one another is still writing died
    of SIGBUS (2 of 60 loads, 4 processes at once on an empty cache). With the cache's lock held
    here, a load in another process waits for it, then loads."""
    import fcntl
    import subprocess
    import sys
    import time

    import openvino as ov

    from similarity.backends.openvino import compiled_cache_dir

    cache = tmp_path / "shared"
    blobs = compiled_cache_dir(ov, cache)
    blobs.mkdir(parents=True)
    code = (
        "from similarity.model import load_model\n"
        f"load_model({str(exported)!r}, backend='openvino', dtype='fp32', cache_dir={str(cache)!r})\n"
        "print('loaded')\n"
    )
    with open(blobs / ".compile.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        time.sleep(8)  # far longer than the load takes on its own (about 1 s)
        assert proc.poll() is None, "the load did not wait for the cache's lock"
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.strip() == "loaded"
    assert list(blobs.glob("*.blob"))


def test_pieces_that_cannot_be_written_are_used_from_memory(exported, tiny_model, monkeypatch) -> None:
    """OpenVINO reports a failed write (a full disk) as RuntimeError: the load goes on with the
    pieces in memory, leaving no half-written directory (before: the load failed)."""
    import openvino as ov

    px, caps = parity_inputs(tiny_model.preprocess)
    want = similarities(load_model(exported, backend="openvino", dtype="int8", cache_dir="off"), px, caps)

    def full(*_a, **_k):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(ov, "save_model", full)  # a full disk cannot be made here without mounting one
    got = similarities(load_model(exported, backend="openvino", dtype="int8"), px, caps)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not list((exported / "onnx").rglob("*.tmp*"))


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_a_damaged_graph_is_model_incomplete_naming_the_export(exported, backend) -> None:
    from similarity.errors import ModelIncomplete

    vision = exported / "onnx" / "vision.onnx"
    vision.write_bytes(vision.read_bytes()[: vision.stat().st_size // 3])  # an interrupted copy
    with pytest.raises(ModelIncomplete, match=f"{backend} cannot load the model.*similarity model export"):
        load_model(exported, backend=backend, dtype="fp32", cache_dir="off")
