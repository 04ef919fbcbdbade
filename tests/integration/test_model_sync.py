"""Model sync: S3 prefix (moto server) -> staging -> ONNX export -> atomic swap into the mount."""

from __future__ import annotations

from pathlib import Path

import pytest

from handler.model_sync import sync
from similarity.errors import ModelIncomplete
from similarity.model import load_model


def _upload(s3, bucket: str, src: Path, prefix: str, skip: str = "") -> None:
    for f in src.iterdir():
        if f.is_file() and f.name != skip:
            s3.upload_file(str(f), bucket, f"{prefix}/{f.name}")


def test_sync_from_s3_exports_onnx_and_swaps(s3, bucket, tiny_clip_dir, tmp_path) -> None:
    _upload(s3, bucket, tiny_clip_dir, "models/tiny")
    dest = tmp_path / "mnt" / "clip"
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_text("old model")
    out = sync(dest, "tiny-clip-shapes", None, f"s3://{bucket}/models/tiny", s3)
    assert out["model_id"] == "tiny-clip-shapes" and out["onnx"]
    assert not (dest / "stale.txt").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["clip"]  # no staging/old dirs left
    model = load_model(dest, backend="onnx")
    assert model.info.backend == "onnx"


def test_incomplete_source_leaves_existing_model_alone(s3, bucket, tiny_clip_dir, tmp_path) -> None:
    _upload(s3, bucket, tiny_clip_dir, "models/broken", skip="model.safetensors")
    dest = tmp_path / "clip"
    dest.mkdir()
    (dest / "keep.txt").write_text("current model")
    with pytest.raises(ModelIncomplete):
        sync(dest, "x", None, f"s3://{bucket}/models/broken", s3, export=False)
    assert (dest / "keep.txt").read_text() == "current model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]


def test_sync_records_identity_when_source_has_none(s3, bucket, tiny_clip_dir, tmp_path) -> None:
    _upload(s3, bucket, tiny_clip_dir, "models/plain", skip=".similarity-model.json")
    out = sync(tmp_path / "clip", 'org/"quoted"-model', None, f"s3://{bucket}/models/plain", s3, export=False)
    assert out["model_id"] == 'org/"quoted"-model'
    assert out["revision"] == f"s3://{bucket}/models/plain"
