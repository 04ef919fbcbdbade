"""Put the model on EFS: invoke once after deploy (and again to change model or revision).

    aws lambda invoke --function-name <ModelSyncFunctionName> --cli-read-timeout 900 out.json

(the read timeout: the CLI's default 60 s would give up on a sync of minutes and retry it).

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
from similarity.errors import ModelNotFound
from similarity.io.streams import split_s3
from similarity.model import MODEL_META_FILE, check_model_dir, read_identity

from . import runtime
from .observability import logger

#: A staging or old directory this much older than now belongs to no sync still running (the
#: function's timeout is 900 s): one killed at its timeout left it behind.
STALE_SECONDS = 3600


def copy_from_s3(s3: Any, uri: str, dest: Path) -> list[str]:
    bucket, key = split_s3(uri)  # an S3 "folder": s3://bucket/prefix
    prefix = key.rstrip("/") + "/"
    copied = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) :]
            # "prefix//etc/x" names an absolute path: only keys that stay inside dest are copied.
            if not rel or rel.endswith("/") or rel.startswith("/") or ".." in Path(rel).parts:
                logger.warning("key skipped: not a file inside the model directory", extra={"key": obj["Key"]})
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(target))
            copied.append(rel)
    if not copied:
        raise ModelNotFound(f"no model files under s3://{bucket}/{prefix} (MODEL_SOURCE_S3_URI)")
    return copied


def _sweep(dest: Path) -> None:
    """Remove the staging and old directories of syncs killed before they cleaned up."""
    now = time.time()
    for leftover in dest.parent.glob(f".{dest.name}.*-*"):
        kind = leftover.name[len(dest.name) + 2 :].split("-", 1)[0]
        if kind in ("staging", "old") and leftover.is_dir() and now - leftover.stat().st_mtime > STALE_SECONDS:
            shutil.rmtree(leftover, ignore_errors=True)


def sync(
    dest: Path, model_id: str, revision: str | None, source_s3_uri: str, s3: Any, export: bool = True
) -> dict[str, Any]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep(dest)
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
        moved = dest.exists()
        if moved:
            dest.rename(old)
        try:
            staging.rename(dest)  # readers see the old model or the new one, never a mix
        except BaseException:
            if moved:
                old.rename(dest)  # the old model back where readers look for it
            raise
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
