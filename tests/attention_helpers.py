"""Attention computed from a tiny Llama's weights by hand: the independent side of selection tests."""

import torch

from cartridges.kv_layout import kv_shape


def layer_zero_attention(loaded, corpus: torch.Tensor, window: list[int]) -> torch.Tensor:
    """[query_heads, window, tokens]: the attention each `window` token, placed after the corpus KV, pays
    each corpus position in layer 0."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, (layers, kv_heads, head_dim) = loaded.model, kv_shape(loaded.model.config)
    tokens = corpus.shape[0]
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor([window])))
        positions = torch.arange(tokens, tokens + len(window))[None]
        cos, sin = model.model.rotary_emb(hidden, positions)
        queries = attention.q_proj(hidden).view(1, len(window), -1, head_dim).transpose(1, 2)
        own_keys = attention.k_proj(hidden).view(1, len(window), kv_heads, head_dim).transpose(1, 2)
        queries, own_keys = apply_rotary_pos_emb(queries, own_keys, cos, sin)
        cached = corpus.view(tokens, layers, 2, kv_heads, head_dim)[:, 0, 0].permute(1, 0, 2)[None]  # [1, kv, T, D]
        keys = torch.cat([cached, own_keys], dim=2)
        keys = keys.repeat_interleave(queries.shape[1] // kv_heads, dim=1)
        logits = queries @ keys.transpose(-1, -2) / head_dim**0.5  # [1, q_heads, W, T + W]
        causal = torch.ones(len(window), len(window), dtype=torch.bool).tril()
        logits[..., tokens:] = logits[..., tokens:].masked_fill(~causal, float("-inf"))
        return logits.softmax(dim=-1)[0, :, :, :tokens]


def assert_layer_zero_probes(loaded, corpus: torch.Tensor, probes, by_hand: torch.Tensor) -> None:
    """`probes` (queries read after the corpus KV `corpus`) against layer 0's attention `by_hand`
    [query_heads, m, tokens] of the same queries: each one's share of attention over the corpus, its output
    and its log mass there."""
    from cartridges.rotary import moved_by

    (layers, kv_heads, head_dim), tokens = kv_shape(loaded.model.config), corpus.shape[0]
    share = by_hand / by_hand.sum(-1, keepdim=True)  # of the corpus part
    whole = corpus.view(tokens, layers, 2, kv_heads, head_dim)[:, 0]  # [T, 2, kv_heads, D]
    group = probes.queries.shape[1] // kv_heads
    at_corpus = moved_by(loaded.model, probes.queries, torch.full((1, probes.queries.shape[2]), tokens))[0]
    for h in range(probes.queries.shape[1]):
        keys, values = whole[:, 0, h // group], whole[:, 1, h // group]
        logits = at_corpus[h].double() @ keys.double().T / head_dim**0.5
        torch.testing.assert_close(torch.softmax(logits, -1).float(), share[h], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(probes.outputs[0, h].float(), share[h] @ values, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(probes.log_mass[0, h], torch.logsumexp(logits, -1), atol=1e-4, rtol=0)
