"""Put the model on EFS: invoke once after deploy (and again to change model or revision).

    aws lambda invoke --function-name <ModelSyncFunctionName> --payload '{}' out.json

Copies the model from an S3 prefix (``MODEL_SOURCE_S3_URI``) or downloads it from the Hugging Face
hub (``MODEL_ID``/``MODEL_REVISION``), exports the ONNX files the Lambda backend runs, and swaps the
finished directory into ``CLIP_MODEL_DIR`` with a rename, so readers never see a half-copied model.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from similarity.config import ModelSyncSettings, validated
from similarity.io.streams import split_s3
from similarity.model import MODEL_META_FILE, check_model_dir, read_identity

from . import runtime
from .observability import logger


def copy_from_s3(s3: Any, uri: str, dest: Path) -> list[str]:
    bucket, key = split_s3(uri)  # an S3 "folder": s3://bucket/prefix
    prefix = key.rstrip("/") + "/"
    copied = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) :]
            if not rel or rel.endswith("/") or ".." in Path(rel).parts:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(target))
            copied.append(rel)
    return copied


def sync(
    dest: Path, model_id: str, revision: str | None, source_s3_uri: str, s3: Any, export: bool = True
) -> dict[str, Any]:
    staging = dest.parent / f".{dest.name}.staging-{int(time.time())}"
    staging.mkdir(parents=True)
    try:
        if source_s3_uri:
            files = copy_from_s3(s3, source_s3_uri, staging)
            if not (staging / MODEL_META_FILE).exists():
                (staging / MODEL_META_FILE).write_text(
                    json.dumps({"model_id": model_id, "revision": source_s3_uri}) + "\n"
                )
        else:
            from similarity.tools.hub import fetch_model

            fetch_model(staging, model_id=model_id, revision=revision)
            files = sorted(p.name for p in staging.iterdir())
        check_model_dir(staging)
        if export:
            from similarity.tools.onnx_export import export_onnx

            export_onnx(staging, int8=True)
        old = dest.parent / f".{dest.name}.old-{int(time.time())}"
        if dest.exists():
            dest.rename(old)
        staging.rename(dest)  # readers see the old model or the new one, never a mix
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    mid, rev = read_identity(dest)
    return {"model_dir": str(dest), "model_id": mid, "revision": rev, "files": len(files), "onnx": export}


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    event = event or {}
    s = runtime.services()
    wanted = validated(ModelSyncSettings)
    result = sync(
        Path(event.get("model_dir") or s.settings.model.dir),
        model_id=event.get("model_id") or wanted.model_id,
        revision=event.get("revision") or wanted.revision,
        source_s3_uri=event.get("source_s3_uri", wanted.source_s3_uri),
        s3=s.clients.get("s3"),
        export=bool(event.get("export", True)),
    )
    logger.info("model synced", extra=result)
    return result
