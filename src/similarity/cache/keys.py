"""Cache keys: everything an entry depends on, hashed, so a changed input or model never finds an
old entry.

- image embedding: sha256 of the image bytes + the model's image fingerprint;
- caption embedding: the caption + the model's text fingerprint;
- URL record: the URL alone (its ETag, Last-Modified and content hash do not depend on the model).

Both fingerprints cover the model id and revision, the backend, device and dtype it runs as, and
the size and modification time of its weight and graph files (a re-export or retrained weights in
place change them). The image one adds ``PREPROCESS_VERSION`` and the preprocessing config; the
text one the tokenizer's files and token limit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..model.preprocess import PREPROCESS_VERSION

if TYPE_CHECKING:
    from ..model import ClipModel

#: Bump when what an entry means changes in a way the fingerprints do not see (e.g. embeddings
#: stored before or after some normalisation).
KEY_VERSION = 1

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "model-*.safetensors", "onnx/*.onnx")
_TOKENIZER = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class Fingerprint:
    image: str
    text: str
    parts: dict[str, Any]


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: no two part lists collide
        h.update(data)
    return h.hexdigest()


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _file_stats(root: Path, patterns: tuple[str, ...]) -> list[tuple[str, int, int]]:
    out = []
    for pattern in patterns:
        for p in sorted(root.glob(pattern)):
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    return out


def _file_hashes(root: Path, names: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = hashlib.sha256((root / name).read_bytes()).hexdigest()
        except OSError:
            continue
    return out


def fingerprint(model: ClipModel) -> Fingerprint:
    info = model.info
    root = Path(info.path)
    base = {
        "key_version": KEY_VERSION,
        "model_id": info.model_id,
        "revision": info.revision,
        "backend": info.backend,
        "device": info.device,
        "dtype": info.dtype,
        "config": _file_hashes(root, ("config.json",)),
        "weights": _file_stats(root, _WEIGHTS),
    }
    image = {
        **base,
        "preprocess_version": PREPROCESS_VERSION,
        "preprocess": dataclasses.asdict(model.preprocess),
    }
    if model.pixel_path == "nvjpeg":  # other pixels for the same bytes; torch's are Pillow's to the bit
        decoder = getattr(model.device_pixels, "nvjpeg", None)
        image["decoder"] = getattr(decoder, "identity", "nvjpeg")
    text = {**base, "tokenizer": _file_hashes(root, _TOKENIZER), "max_length": model.tokenizer.max_length}
    return Fingerprint(image=_digest("image", _json(image)), text=_digest("text", _json(text)), parts=base)


def image_key(fp: Fingerprint, content_sha256: str) -> str:
    return "i:" + _digest(fp.image, content_sha256)


def caption_key(fp: Fingerprint, caption: str) -> str:
    return "c:" + _digest(fp.text, caption)


def url_key(url: str) -> str:
    return "u:" + _digest("url", url)


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
