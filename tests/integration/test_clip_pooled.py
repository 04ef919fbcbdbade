"""The export's towers (last layer computed for the pooled token only) against transformers' own."""

from __future__ import annotations

import numpy as np
import pytest

from support.parity import parity_inputs

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(tiny_clip_dir), attn_implementation="eager").eval()


def _pooled(out):
    return out if hasattr(out, "shape") else out.pooler_output  # transformers 4 vs 5


def test_image_embeds_match_transformers(clip, tiny_model) -> None:
    from similarity.tools.clip_pooled import image_embeds

    px = torch.from_numpy(parity_inputs(tiny_model.preprocess)[0])
    with torch.inference_mode():
        ours, ref = image_embeds(clip, px), _pooled(clip.get_image_features(pixel_values=px))
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("legacy_eos", [False, True], ids=["eos-id", "legacy-eos-2-argmax"])
def test_text_embeds_match_transformers_on_padded_batches(clip, tiny_model, monkeypatch, legacy_eos) -> None:
    """Captions of different lengths (so most rows are padded), with the end-of-text token found by
    its id, or by the highest id as configs with the legacy eos_token_id 2 (openai's) do."""
    from similarity.tools.clip_pooled import text_embeds

    captions = parity_inputs(tiny_model.preprocess)[1]
    ids, mask, _ = tiny_model.tokenizer(captions)
    assert len({int(m.sum()) for m in mask}) >= 3  # really padded to different lengths
    if legacy_eos:
        assert int(ids.max()) == clip.text_model.eos_token_id  # the end-of-text id is the highest
        monkeypatch.setattr(clip.text_model, "eos_token_id", 2)
    ids_t, mask_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
    with torch.inference_mode():
        ours = text_embeds(clip, ids_t, mask_t)
        ref = _pooled(clip.get_text_features(input_ids=ids_t, attention_mask=mask_t))
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-5)
