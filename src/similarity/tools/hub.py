"""``similarity model fetch``: put a CLIP checkpoint from the Hugging Face hub into a directory.

Only this command talks to the hub. It records the model id and the resolved commit in
``.similarity-model.json`` so every later run can report exactly which weights scored a file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..backends.files import ONNX_SUBDIR, weights_fingerprint
from ..errors import ModelFetchFailed
from ..model.directory import DEFAULT_MODEL_ID, MODEL_META_FILE, check_model_dir

#: What scoring needs; the hub repos also hold TF/Flax/pickle weights we never download.
FILES = [
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
]

PROVIDE_HINT = (
    "Provide the model by hand: on a machine with network run\n"
    "  similarity model fetch --model-id {model_id} --to DIR\n"
    "(or `hf download {model_id} --include '*.json' '*.txt' model.safetensors --local-dir DIR`),\n"
    "copy DIR here and set CLIP_MODEL_DIR=DIR. The directory must hold config.json, "
    "preprocessor_config.json, tokenizer.json and model.safetensors.\n"
    "To try the pipeline without it: CLIP_MODEL_DIR=tests/fixtures/tiny-clip make run"
)


def fetch_model(dest: str | Path, model_id: str = DEFAULT_MODEL_ID, revision: str | None = None) -> dict[str, str]:
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:
        raise ModelFetchFailed("huggingface_hub is not installed (pip install '.[hub]')") from None
    dest = Path(dest)
    before = weights_fingerprint(dest) if dest.is_dir() else None
    try:
        info = HfApi().model_info(model_id, revision=revision)
        sha = info.sha or revision or "main"
        snapshot_download(model_id, revision=sha, local_dir=str(dest), allow_patterns=FILES)
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: all the same to the user
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFetchFailed(
            f"could not download {model_id}: {msg[:300]}\n" + PROVIDE_HINT.format(model_id=model_id)
        ) from None
    if before is not None and weights_fingerprint(dest) != before:
        # Graphs exported from the weights just replaced would score with the old model.
        shutil.rmtree(dest / ONNX_SUBDIR, ignore_errors=True)
    meta = {"model_id": model_id, "revision": sha}
    (dest / MODEL_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    check_model_dir(dest)
    return meta
