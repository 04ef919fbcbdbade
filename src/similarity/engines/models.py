"""Where a worker finds the model: a local directory, an ``s3://`` prefix copied to local disk once
per node, or a file or folder in Snowflake's import directory (a zip is unpacked once per node).

"Once per node": the first process to need a copy fills a staging directory under an exclusive
file lock and renames it into place; processes that wait on the lock find it complete and reuse
it. A copy is named by a digest of what it came from (S3 keys, ETags and sizes; the zip's size and
time), so a changed model is a new directory, never a half-updated one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import ModelFetchFailed, ModelNotFound
from ..io.streams import split_s3
from ..model import check_model_dir

#: A model source naming a file or folder in Snowflake's import directory: ``import:tiny-clip.zip``.
IMPORT_PREFIX = "import:"
#: Written last into a finished copy.
COMPLETE = ".similarity-complete"


@dataclass(frozen=True)
class LocalModel:
    path: Path
    #: Whether this process made the local copy (False: a local path, or another process's copy).
    copied: bool = False


def default_cache_root() -> Path:
    return Path(tempfile.gettempdir()) / "similarity-models"


def resolve_model(source: str, cache_root: Path | None = None, s3: Any = None) -> LocalModel:
    """A local directory holding the model named by ``source``."""
    root = cache_root or default_cache_root()
    if source.startswith("s3://"):
        return sync_s3_model(source, root, s3)
    if source.startswith(IMPORT_PREFIX):
        return from_import_directory(source[len(IMPORT_PREFIX) :], root)
    return LocalModel(Path(source))


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes on this node (released when the holder exits, even by a crash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def install_once(target: Path, fill: Callable[[Path], None]) -> bool:
    """Make ``target`` a complete model directory unless it already is; True when this call made it."""
    if (target / COMPLETE).is_file():
        return False
    with file_lock(target.parent / f".{target.name}.lock"):
        if (target / COMPLETE).is_file():
            return False
        staging = target.parent / f".{target.name}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)  # a copy left by a process that died mid-way
        staging.mkdir(parents=True)
        try:
            fill(staging)
            check_model_dir(staging)
            (staging / COMPLETE).write_text(json.dumps({"pid": os.getpid()}) + "\n")
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return True


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[-60:] or "model"


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _safe_relative(rel: str) -> bool:
    parts = PurePosixPath(rel).parts
    return bool(rel) and not rel.endswith("/") and not rel.startswith("/") and ".." not in parts


def sync_s3_model(uri: str, cache_root: Path, s3: Any = None) -> LocalModel:
    """Copy the objects under ``s3://bucket/prefix/`` into a local directory, once per node."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    if s3 is None:
        from ..aws import make_client

        s3 = make_client("s3")
    try:
        objects = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :]
                if _safe_relative(rel):
                    objects.append((rel, str(obj.get("ETag", "")), int(obj.get("Size", 0))))
    except (ClientError, BotoCoreError) as exc:
        raise ModelFetchFailed(f"cannot list the model at {uri}: {exc}") from None
    if not objects:
        raise ModelNotFound(f"no model files under {uri}")
    target = cache_root / f"{_slug(bucket + '-' + prefix)}-{_digest(sorted(objects))}"

    def fill(staging: Path) -> None:
        for rel, _, _ in objects:
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                s3.download_file(bucket, prefix + rel, str(dest))
            except (ClientError, BotoCoreError) as exc:
                raise ModelFetchFailed(f"cannot copy s3://{bucket}/{prefix}{rel}: {exc}") from None

    return LocalModel(target, install_once(target, fill))


def import_directory() -> Path | None:
    """Snowflake's import directory inside a UDF or stored procedure; None elsewhere."""
    value = getattr(sys, "_xoptions", {}).get("snowflake_import_directory")
    return Path(value) if value else None


def from_import_directory(name: str, cache_root: Path, directory: Path | None = None) -> LocalModel:
    """``name`` in Snowflake's import directory: a folder of model files, a zip of one (unpacked
    once per node), or ``""`` when the model's files were imported one by one."""
    base = directory or import_directory()
    if base is None:
        raise ModelNotFound(
            f"{IMPORT_PREFIX}{name} names Snowflake's import directory, which this process does not have"
        )
    path = base / name if name else base
    if path.is_dir():
        return LocalModel(path)
    if path.is_file() and zipfile.is_zipfile(path):
        st = path.stat()
        target = cache_root / f"{_slug(path.name)}-{_digest([path.name, st.st_size, st.st_mtime_ns])}"
        return LocalModel(target, install_once(target, lambda staging: extract_model_zip(path, staging)))
    raise ModelNotFound(f"{name!r} is not a folder or zip file in Snowflake's import directory {base}")


def extract_model_zip(archive: Path, dest: Path) -> None:
    """Unpack ``archive`` into ``dest``: entries with absolute paths or ``..`` are refused, and a zip
    holding one folder (``zip -r m.zip tiny-clip/``) gives that folder's contents."""
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        bad = [n for n in names if not _safe_relative(n)]
        if bad:
            raise ModelNotFound(f"{archive.name} holds unsafe paths, e.g. {bad[0]!r}")
        tops = {PurePosixPath(n).parts[0] for n in names}
        strip = len(tops) == 1 and all(len(PurePosixPath(n).parts) > 1 for n in names)
        for n in names:
            parts = PurePosixPath(n).parts[1:] if strip else PurePosixPath(n).parts
            out = dest.joinpath(*parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(n) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
