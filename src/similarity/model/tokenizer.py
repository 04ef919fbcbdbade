"""CLIP's BPE on the Rust ``tokenizers`` library, straight from ``tokenizer.json``: the same ids as
transformers without importing it (cold start)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelIncomplete
from .directory import read_json

#: Captions longer than this many characters are tokenized from a prefix first (see ``_prefix``).
PREFIX_CHARS = 4096


def _prefix(caption: str) -> str | None:
    """The caption up to its last ASCII space within ``PREFIX_CHARS``, or None when it is short or
    has no such space. A space ends a word for CLIP's normalizer and pre-tokenizer alike, so the
    prefix's tokens are the caption's first tokens: when the prefix alone overflows the model's
    limit, its truncated ids are the whole caption's. Without this, a 1 MB caption costs over a
    second of tokenizing (all of it thrown away), holding up every batch it shares."""
    if len(caption) <= PREFIX_CHARS:
        return None
    cut = caption.rfind(" ", 0, PREFIX_CHARS)
    return caption[:cut] if cut > 0 else None


class CaptionTokenizer:
    """Pads to the longest caption in the batch (never to the model maximum) and truncates to the
    model's limit, keeping the end-of-text token."""

    def __init__(self, model_dir: Path, max_length: int) -> None:
        from tokenizers import Tokenizer

        tok_file = model_dir / "tokenizer.json"
        if tok_file.is_file():
            try:
                tok = Tokenizer.from_file(str(tok_file))
            except Exception as exc:  # noqa: BLE001 - the Rust side raises a bare Exception for bad files
                raise ModelIncomplete(f"{tok_file} cannot be read: {exc}") from None
        else:  # vocab.json + merges.txt only: let transformers assemble the same pipeline
            from transformers import CLIPTokenizer

            tok = CLIPTokenizer.from_pretrained(str(model_dir), local_files_only=True).backend_tokenizer
        tcfg = read_json(model_dir / "tokenizer_config.json")
        pad = tcfg.get("pad_token") or "<|endoftext|>"
        pad = pad.get("content", "<|endoftext|>") if isinstance(pad, dict) else str(pad)
        pad_id = tok.token_to_id(pad)
        if pad_id is None:
            raise ModelIncomplete(f"tokenizer has no pad token {pad!r}")
        self.max_length = max_length
        tok.no_padding()
        tok.no_truncation()
        tok.enable_truncation(max_length=max_length)
        tok.enable_padding(pad_id=pad_id, pad_token=pad)
        self._tok = tok

    def __call__(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        prefixes = [_prefix(c) for c in captions]
        if any(p is not None for p in prefixes):
            encs = self._tok.encode_batch([c if p is None else p for c, p in zip(captions, prefixes, strict=True)])
            if any(p is not None and not e.overflowing for p, e in zip(prefixes, encs, strict=True)):
                encs = self._tok.encode_batch(captions)  # a prefix that fits says nothing: the whole batch
        else:
            encs = self._tok.encode_batch(captions)
        ids = np.asarray([e.ids for e in encs], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encs], dtype=np.int64)
        return ids, mask, [bool(e.overflowing) for e in encs]
