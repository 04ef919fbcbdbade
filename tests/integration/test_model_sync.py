"""Model sync: S3 prefix (moto server) -> staging -> ONNX export -> atomic swap into the mount."""

from __future__ import annotations

from pathlib import Path

import pytest

from handler.model_sync import sync
from similarity.errors import ModelIncomplete, ModelNotFound
from similarity.model import check_model_dir, load_model


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


def test_an_empty_prefix_says_so(s3, bucket, tmp_path) -> None:
    with pytest.raises(
        ModelNotFound, match=rf"no model files under s3://{bucket}/models/typo/ \(MODEL_SOURCE_S3_URI\)"
    ):
        sync(tmp_path / "clip", "x", None, f"s3://{bucket}/models/typo", s3, export=False)
    assert list(tmp_path.iterdir()) == []  # no staging directory left


def test_a_key_naming_an_absolute_path_is_not_copied_outside(s3, bucket, tiny_clip_dir, tmp_path) -> None:
    _upload(s3, bucket, tiny_clip_dir, "models/odd")
    outside = tmp_path / "outside.txt"
    s3.put_object(Bucket=bucket, Key=f"models/odd/{outside}", Body=b"escaped")  # models/odd//tmp/...
    sync(tmp_path / "mnt" / "clip", "x", None, f"s3://{bucket}/models/odd", s3, export=False)
    assert not outside.exists()
    check_model_dir(tmp_path / "mnt" / "clip")


def test_a_failed_swap_puts_the_old_model_back(s3, bucket, tiny_clip_dir, tmp_path, monkeypatch) -> None:
    _upload(s3, bucket, tiny_clip_dir, "models/swap")
    dest = tmp_path / "clip"
    dest.mkdir()
    (dest / "keep.txt").write_text("current model")
    real = Path.rename

    def rename(self: Path, target):
        if self.name.startswith(".clip.staging-"):
            raise OSError("EFS throttled the rename")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)  # the one step no real file system here fails on cue
    with pytest.raises(OSError, match="throttled"):
        sync(dest, "x", None, f"s3://{bucket}/models/swap", s3, export=False)
    assert (dest / "keep.txt").read_text() == "current model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]


def test_leftovers_of_a_killed_sync_are_swept(s3, bucket, tiny_clip_dir, tmp_path) -> None:
    import os
    import time

    _upload(s3, bucket, tiny_clip_dir, "models/sweep")
    stale, fresh = tmp_path / ".clip.staging-1", tmp_path / ".clip.staging-2"
    for d in (stale, fresh):
        (d / "onnx").mkdir(parents=True)
    hour_ago = time.time() - 2 * 3600
    os.utime(stale, (hour_ago, hour_ago))
    sync(tmp_path / "clip", "x", None, f"s3://{bucket}/models/sweep", s3, export=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".clip.staging-2", "clip"]  # a running sync's is kept
