"""CLIP's byte-level BPE tables: the tiny model's toy vocabulary, and the real one rebuilt from the
``bpe_simple_vocab_16e6.txt.gz`` file that ships inside the ``open_clip_torch`` wheel."""

from __future__ import annotations

import gzip
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-character table: the base alphabet of CLIP's byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def toy_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP layout: 256 byte characters, the same with ``</w>``, merges, then the two specials.
    Each word gets a left-to-right merge chain so it becomes one token; anything else falls back
    to byte characters, as in the real tokenizer."""
    base = list(bytes_to_unicode().values())
    vocab_list = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    for word in words:
        chars = list(word)
        chars[-1] += "</w>"
        cur = chars[0]
        for ch in chars[1:]:
            pair = (cur, ch)
            if pair not in merges:
                merges.append(pair)
                vocab_list.append(cur + ch)
            cur = cur + ch
    vocab_list = list(dict.fromkeys(vocab_list))
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab_list)}, merges


def real_clip_vocab(bpe_gz: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The real 49408-token CLIP vocabulary, as open_clip's SimpleTokenizer builds it."""
    with gzip.open(bpe_gz) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges  # type: ignore[return-value]
