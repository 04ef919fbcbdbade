"""The files of a model directory belong together: graphs exported from other weights than the
directory holds are refused (not scored with the old model), `model fetch` over an exported
directory drops the graphs it makes stale, and `model export` on damaged weights is exit 3."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from similarity.backends.files import EXPORTED_FROM_FILE, ONNX_SUBDIR
from similarity.cli import EXIT_MODEL, main
from similarity.errors import ModelIncomplete
from similarity.model import load_model

CAPTIONS = ["a red circle", "a blue square"]


def _other_weights(src: Path, dest: Path, seed: int = 0) -> None:
    """Write ``src``'s checkpoint into ``dest`` with every float nudged: another revision."""
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(seed)
    w = load_file(str(src / "model.safetensors"))
    nudged = {
        k: np.asarray(v + rng.normal(0, 0.05, v.shape), v.dtype) if v.dtype.kind == "f" else v for k, v in w.items()
    }
    save_file(nudged, str(dest / "model.safetensors"))


@pytest.fixture
def exported(tiny_clip_dir, tmp_path) -> Path:
    from similarity.tools.onnx_export import export_onnx

    d = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, d)
    export_onnx(d, int8=False, openvino=False)
    return d


def test_graphs_from_other_weights_are_refused_until_exported_again(exported, tmp_path) -> None:
    from similarity.tools.onnx_export import export_onnx

    assert (exported / ONNX_SUBDIR / EXPORTED_FROM_FILE).is_file()
    load_model(exported, backend="onnx", dtype="fp32")  # its own graphs: loads
    _other_weights(exported, exported)
    with pytest.raises(ModelIncomplete, match="exported from other weights.*similarity model export"):
        load_model(exported, backend="onnx", dtype="fp32")  # before: scored with the old weights
    export_onnx(exported, int8=False, openvino=False)
    onnx = load_model(exported, backend="onnx", dtype="fp32").embed_texts(CAPTIONS)[0]
    torch = load_model(exported, backend="torch", dtype="fp32").embed_texts(CAPTIONS)[0]
    assert np.abs(onnx - torch).max() < 1e-4


def test_model_info_names_graphs_from_other_weights(exported, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SIMILARITY_BACKEND", "onnx")
    assert main(["model", "info", str(exported)]) == 0
    _other_weights(exported, exported)
    capsys.readouterr()
    assert main(["model", "info", str(exported)]) == EXIT_MODEL
    assert "exported from other weights" in capsys.readouterr().err


def test_graphs_without_the_mark_load_as_before(exported) -> None:
    (exported / ONNX_SUBDIR / EXPORTED_FROM_FILE).unlink()  # exported before the mark was written
    _other_weights(exported, exported)
    assert load_model(exported, backend="onnx", dtype="fp32").info.backend == "onnx"


def test_fetch_over_an_exported_directory_drops_the_graphs_it_makes_stale(exported, tmp_path, monkeypatch) -> None:
    import huggingface_hub

    from similarity.tools.hub import fetch_model

    hub = tmp_path / "hub"
    shutil.copytree(exported, hub, ignore=shutil.ignore_patterns(ONNX_SUBDIR, ".similarity-model.json"))

    class Api:  # the hub cannot be reached here: its two calls answer from a local copy
        def model_info(self, model_id: str, revision: str | None = None) -> object:
            return type("Info", (), {"sha": "b" * 40})()

    def snapshot_download(model_id: str, revision: str, local_dir: str, allow_patterns: list[str]) -> str:
        for f in hub.iterdir():
            shutil.copy2(f, Path(local_dir) / f.name)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    fetch_model(exported, "org/clip")  # the same weights again: the graphs still fit
    assert (exported / ONNX_SUBDIR / "vision.onnx").is_file()
    _other_weights(hub, hub)  # a new revision on the hub
    fetch_model(exported, "org/clip")
    assert not (exported / ONNX_SUBDIR).exists()
    assert load_model(exported, backend="auto").info.backend == "torch"  # the new weights, not old graphs


def test_export_of_damaged_weights_is_exit_3_without_a_traceback(tiny_clip_dir, tmp_path, capsys) -> None:
    d = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, d)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    assert main(["model", "export", str(d), "--no-int8"]) == EXIT_MODEL
    err = capsys.readouterr().err
    assert f"cannot export {d}" in err and "Traceback" not in err


def test_an_interrupted_model_command_does_not_speak_of_resume(tiny_clip_dir, tmp_path, monkeypatch, capsys) -> None:
    import similarity.tools.onnx_export as onnx_export

    def interrupted(*_a: object, **_k: object) -> list[Path]:
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "export_onnx", interrupted)
    assert main(["model", "export", str(tiny_clip_dir)]) == 130
    err = capsys.readouterr().err
    assert "may hold partial files" in err and "--resume" not in err
