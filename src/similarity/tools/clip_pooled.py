"""CLIP's two towers written out for export, computing only the pooled token in the last layer.

The embedding is read from one token of the last layer: the class token for images, the
end-of-text token for captions. That layer still needs keys and values of every token, but its
query, attention output, out-projection and MLP are needed for that one token only. Skipping them
for the other 49 image tokens saves ~7% of the image tower's FLOPs (10 of 12 weight matmuls of one
of 12 layers) with the same result: the parity tests hold the exported graphs to the transformers
model within 1e-5. Only the modules' weights and submodules are used, not the layers' own forward
methods, whose signatures change between transformers releases.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _attend(attn: Any, x_q: torch.Tensor, x_kv: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """CLIPAttention's eager math, with queries from ``x_q`` only."""
    b, tq, d = x_q.shape
    heads, hd = attn.num_heads, attn.head_dim
    q = attn.q_proj(x_q).view(b, tq, heads, hd).transpose(1, 2)
    k = attn.k_proj(x_kv).view(b, -1, heads, hd).transpose(1, 2)
    v = attn.v_proj(x_kv).view(b, -1, heads, hd).transpose(1, 2)
    w = torch.matmul(q, k.transpose(2, 3)) * attn.scale
    if bias is not None:
        w = w + bias
    out = torch.matmul(w.softmax(dim=-1), v).transpose(1, 2).reshape(b, tq, d)
    return attn.out_proj(out)


Pick = Callable[[torch.Tensor], torch.Tensor]


def _layer(layer: Any, h: torch.Tensor, bias: torch.Tensor | None, pick: Pick | None = None) -> torch.Tensor:
    """One pre-norm encoder layer; with ``pick`` ([batch, tokens, dim] -> [batch, 1, dim]) only
    that token comes out."""
    x = layer.layer_norm1(h)
    h_q, x_q = (pick(h), pick(x)) if pick else (h, x)
    h = h_q + _attend(layer.self_attn, x_q, x, bias)
    return h + layer.mlp(layer.layer_norm2(h))


def image_embeds(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """``model.get_image_features(pixel_values)``: the class token's projected embedding."""
    vm = model.vision_model
    h = vm.pre_layrnorm(vm.embeddings(pixel_values))
    layers = list(vm.encoder.layers)
    for layer in layers[:-1]:
        h = _layer(layer, h, None)
    h = _layer(layers[-1], h, None, pick=lambda t: t[:, :1])
    return model.visual_projection(vm.post_layernorm(h[:, 0]))


def text_embeds(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``model.get_text_features(input_ids, attention_mask)``: the end-of-text token's projected
    embedding, found the way transformers finds it (the highest id for configs with the legacy
    ``eos_token_id == 2``, else the first end-of-text id)."""
    tm = model.text_model
    h = tm.embeddings(input_ids=input_ids)
    ids = input_ids.to(torch.int)
    eos = ids.argmax(dim=-1) if tm.eos_token_id == 2 else (ids == tm.eos_token_id).int().argmax(dim=-1)
    positions = torch.arange(ids.shape[1])
    keep = attention_mask.bool()[:, None, None, :]  # padding keys are never attended to

    def bias(query_pos: torch.Tensor) -> torch.Tensor:
        """Additive mask [batch, 1, queries, keys]: causal and padding, as transformers builds it."""
        allowed = (positions[None, None, None, :] <= query_pos[:, None, :, None]) & keep
        return torch.zeros_like(allowed, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)

    layers = list(tm.encoder.layers)
    full = bias(positions[None, :].expand(ids.shape[0], -1))
    for layer in layers[:-1]:
        h = _layer(layer, h, full)
    batch = torch.arange(ids.shape[0])
    h = _layer(layers[-1], h, bias(eos[:, None]), pick=lambda t: t[batch, eos].unsqueeze(1))
    return model.text_projection(tm.final_layer_norm(h[:, 0]))
