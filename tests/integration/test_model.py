"""The test bed: the library's scores equal the reference, and mean something."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from similarity import Record, score_pairs
from similarity.errors import ModelIncomplete, ModelNotFound
from similarity.model import check_model_dir, load_model
from support.imageserver import png_bytes
from support.shapes import COLOURS, SHAPES, all_captions, draw


@pytest.fixture(scope="module")
def reference(tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(str(tiny_clip_dir)).eval(), CLIPProcessor.from_pretrained(str(tiny_clip_dir))


def _ref_cosines(reference, images, captions) -> np.ndarray:
    model, proc = reference
    with torch.inference_mode():
        px = proc(images=images, return_tensors="pt")["pixel_values"]
        tx = proc(text=captions, return_tensors="pt", padding=True, truncation=True)
        img = model.get_image_features(pixel_values=px)
        txt = model.get_text_features(input_ids=tx["input_ids"], attention_mask=tx["attention_mask"])
        img = torch.nn.functional.normalize(getattr(img, "pooler_output", img), dim=-1)
        txt = torch.nn.functional.normalize(getattr(txt, "pooler_output", txt), dim=-1)
    return (img * txt).sum(-1).numpy()


def test_scores_match_reference_end_to_end(tiny_model, reference, server, fetcher) -> None:
    rng = random.Random(7)
    images, captions, records = [], [], []
    for i in range(40):
        c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        img = draw(c, s, rng)
        caption = rng.choice([f"a {c} {s}", f"a photo of a {rng.choice(list(COLOURS))} {rng.choice(SHAPES)}"])
        images.append(img)
        captions.append(caption)
        records.append(Record(server.image(f"/parity/{i}.png", png_bytes(img)), caption))
    results = list(score_pairs(records, tiny_model, fetcher, batch_size=8))
    assert all(r.error is None for r in results), [r.error_text for r in results if r.error]
    ours = np.array([r.cosine for r in results])
    ref = _ref_cosines(reference, images, captions)
    assert np.abs(ours - ref).max() < 1e-3
    # the 0..1 score is (cos + 1) / 2, rounded to 4 decimals
    for r in results:
        assert r.similarity == round((r.cosine + 1) / 2, 4)


def test_reference_logits_agree(tiny_model, reference) -> None:
    """Cross-check the reference helper against CLIP's own forward pass (logit_scale * cos)."""
    model, proc = reference
    rng = random.Random(3)
    img = draw("blue", "square", rng)
    with torch.inference_mode():
        out = model(**proc(text=["a blue square"], images=[img], return_tensors="pt", padding=True))
        cos_from_logits = (out.logits_per_image / model.logit_scale.exp()).item()
    assert abs(cos_from_logits - _ref_cosines(reference, [img], ["a blue square"])[0]) < 1e-5


def test_true_caption_wins(tiny_model) -> None:
    """Fresh images the model never saw: the true caption beats every caption that differs in
    colour or shape in at least 95% of comparisons. A broken pipeline scores ~50%."""
    rng = random.Random(2024)
    captions = all_captions()
    text, _ = tiny_model.embed_texts(captions)
    from similarity.model.preprocess import preprocess

    wins = total = 0
    for _ in range(200):
        c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        emb = tiny_model.embed_images(preprocess(draw(c, s, rng), tiny_model.preprocess)[None])[0]
        scores = text @ emb
        true = captions.index(f"a {c} {s}")
        wrong = [j for j in range(len(captions)) if j != true]
        wins += sum(scores[true] > scores[j] for j in wrong)
        total += len(wrong)
    assert wins / total >= 0.95, f"true caption won only {wins / total:.1%}"


def test_tokenizer_matches_reference(tiny_model, reference) -> None:
    _, proc = reference
    captions = ["a red circle", "A  Photo of a YELLOW triangle!", "héllo ✓", "x" * 5, "a " * 40 + "blue"]
    ids, mask, truncated = tiny_model.tokenizer(captions)
    ref = proc.tokenizer(captions, padding=True, truncation=True, return_tensors="np")
    assert np.array_equal(ids, ref["input_ids"])
    assert np.array_equal(mask, ref["attention_mask"])
    assert ids.shape[1] == tiny_model.tokenizer.max_length  # the long one sets the batch length
    assert truncated == [False, False, False, False, True]
    eos = ids[0][mask[0].sum() - 1]
    assert ids[-1][-1] == eos  # truncation keeps the end-of-text token


def test_long_captions_tokenize_from_a_prefix_with_the_reference_ids(tiny_model, reference, monkeypatch) -> None:
    # Before: a 1 MB caption was tokenized whole (over a second) to keep its first 77 tokens.
    from similarity.model.tokenizer import PREFIX_CHARS

    _, proc = reference
    words = ["red", "circle", "Héllo", "✓✓", "日本語", "l'eau", "<|endoftext|>", "x1y2", "!?!", "ﬁne", "e\u0301"]
    rnd = random.Random(3)
    long = [" ".join(rnd.choice(words) for _ in range(20_000)) for _ in range(3)]
    spaces = "   " * PREFIX_CHARS + "a blue square"  # long, few tokens: its prefix fits
    one_word = "ab" * PREFIX_CHARS  # no space to cut at
    captions = [*long, spaces, one_word, "a red circle"]
    tok = tiny_model.tokenizer._tok
    seen: list[int] = []
    real = tok.encode_batch

    class Spy:
        def __getattr__(self, name):
            return getattr(tok, name)

        def encode_batch(self, texts):
            seen.append(max(len(t) for t in texts))
            return real(texts)

    longest = []
    for batch in (long, captions):
        seen.clear()
        monkeypatch.setattr(tiny_model.tokenizer, "_tok", Spy())
        ids, mask, truncated = tiny_model.tokenizer(batch)
        monkeypatch.undo()
        ref = proc.tokenizer(batch, padding=True, truncation=True, return_tensors="np")
        assert np.array_equal(ids, ref["input_ids"]) and np.array_equal(mask, ref["attention_mask"])
        assert truncated == [len(proc.tokenizer(c)["input_ids"]) > 77 for c in batch]
        longest.append(max(seen))
    assert truncated == [True, True, True, False, True, False]
    assert min(len(c) for c in long) > 20 * PREFIX_CHARS
    assert longest[0] <= PREFIX_CHARS  # the long batch never reached the tokenizer whole
    assert longest[1] == max(len(c) for c in captions)  # a prefix that fits: the batch again, whole


def test_pads_to_longest_not_maximum(tiny_model) -> None:
    ids, _, _ = tiny_model.tokenizer(["a red circle", "a blue square"])
    assert ids.shape[1] < tiny_model.tokenizer.max_length


def test_truncation_reported_per_row(tiny_model, server, fetcher) -> None:
    url = server.image("/trunc.png", png_bytes(draw("red", "circle", random.Random(1))))
    long = "a red circle " * 20
    res = list(score_pairs([Record(url, "a red circle"), Record(url, long)], tiny_model, fetcher))
    assert [r.truncated for r in res] == [False, True]
    assert all(r.error is None for r in res)


def test_load_is_offline(tiny_clip_dir, monkeypatch) -> None:
    """Loading must not open a single network connection (no hub calls)."""

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access during model load: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    model = load_model(tiny_clip_dir, backend="torch", device="cpu")
    assert model.info.model_id == "tiny-clip-shapes"
    assert model.info.revision == "generated"


def test_missing_and_incomplete_model_dir(tmp_path, tiny_clip_dir) -> None:
    with pytest.raises(ModelNotFound, match="does not exist"):
        check_model_dir(tmp_path / "nope")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_clip_dir, partial)
    (partial / "model.safetensors").unlink()
    (partial / "tokenizer.json").unlink()
    with pytest.raises(ModelIncomplete, match="tokenizer.json, model.safetensors"):
        load_model(partial, backend="torch")


def test_a_sharded_checkpoint_missing_a_shard_is_incomplete(tmp_path, tiny_clip_dir) -> None:
    # Before: the index alone passed the check, and `model info` said the weights were there.
    import json

    d = tmp_path / "sharded"
    shutil.copytree(tiny_clip_dir, d)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    names = {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}))
    with pytest.raises(ModelIncomplete, match="lacks model-00002-of-00002.safetensors"):
        check_model_dir(d)
    from similarity.model.directory import has_weights

    assert not has_weights(d)
    (d / "model-00002-of-00002.safetensors").write_bytes(b"")
    assert check_model_dir(d) == d and has_weights(d)


@pytest.mark.parametrize(("preset", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_torch_path_sets_openmp_wait_policy_and_threads(tiny_clip_dir, preset, expected) -> None:
    """OpenMP reads its wait policy once, when torch loads it: the first import must come from us,
    with PASSIVE unless the user chose otherwise; --threads reaches torch too."""
    code = (
        "import os;from similarity.model import load_model;"
        f"m=load_model({str(tiny_clip_dir)!r}, backend='torch', threads=1);"
        "import torch;print(os.environ.get('OMP_WAIT_POLICY'), torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [expected, "1"]
