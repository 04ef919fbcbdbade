"""A model directory in Hugging Face layout: what it must hold, and which model it is."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import ModelIncomplete, ModelNotFound

DEFAULT_MODEL_ID = "openai/clip-vit-base-patch32"
DEFAULT_MODEL_DIR = "models/clip-vit-base-patch32"
MODEL_META_FILE = ".similarity-model.json"  # written by `model fetch`: id and resolved revision


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ``{}`` when the file is missing; ``ModelIncomplete`` when it is
    not a JSON object (a corrupt config must not be a traceback)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelIncomplete(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelIncomplete(f"{path} does not hold a JSON object")
    return data


def weights_files(model_dir: Path) -> list[Path]:
    """The checkpoint's files: ``model.safetensors``, else the shards its index names (present
    or not); ``[]`` with neither. ``ModelIncomplete`` for an index that names none."""
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        return []
    weight_map = read_json(index).get("weight_map")
    shards = sorted({str(v) for v in weight_map.values()}) if isinstance(weight_map, dict) else []
    if not shards:
        raise ModelIncomplete(f"{index} names no weights files")
    return [model_dir / name for name in shards]


def missing_weights(model_dir: Path) -> list[str]:
    """The weights files the directory lacks: ``model.safetensors``, or the shards its index names
    (a sharded download cut short leaves the index and some of them)."""
    files = weights_files(model_dir)
    return [p.name for p in files if not p.is_file()] if files else ["model.safetensors"]


def has_weights(model_dir: Path) -> bool:
    try:
        return not missing_weights(model_dir)
    except ModelIncomplete:
        return False


def check_model_dir(model_dir: str | os.PathLike[str], need_weights: bool = True) -> Path:
    """Raise ``ModelNotFound`` / ``ModelIncomplete`` with the exact missing files."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelNotFound(f"model directory {str(path)!r} does not exist")
    missing = [f for f in ("config.json", "preprocessor_config.json") if not (path / f).is_file()]
    if not (path / "tokenizer.json").is_file() and not (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    ):
        missing.append("tokenizer.json")
    if need_weights:
        missing += missing_weights(path)
    if missing:
        raise ModelIncomplete(f"model directory {str(path)!r} lacks {', '.join(missing)}")
    for name in ("config.json", "preprocessor_config.json"):
        read_json(path / name)  # parses, or says which file is corrupt
    return path


def read_identity(model_dir: Path) -> tuple[str, str]:
    """(model id, revision) as recorded by ``model fetch``, else the best the config tells."""
    meta = read_json(model_dir / MODEL_META_FILE)
    if meta.get("model_id"):
        return str(meta["model_id"]), str(meta.get("revision") or "unknown")
    cfg = read_json(model_dir / "config.json")
    name = cfg.get("_name_or_path") or model_dir.name
    return str(name), "local"


def max_caption_tokens(model_dir: Path) -> int:
    """The text tower's context length, or the tokenizer's limit when that is shorter."""
    cfg = read_json(model_dir / "config.json")
    max_len = int(cfg.get("text_config", {}).get("max_position_embeddings", 77))
    tcfg_max = read_json(model_dir / "tokenizer_config.json").get("model_max_length")
    if isinstance(tcfg_max, int) and 0 < tcfg_max < max_len:
        max_len = tcfg_max
    return max_len
