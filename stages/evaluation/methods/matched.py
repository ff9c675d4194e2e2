"""`matched`: `select`'s keys with values fitted in closed form so that the compact block's attention
output matches the whole corpus's (Attention Matching, Zweiger et al., arXiv 2602.16284, step 3).

For each layer and KV head: the reference queries `Q` are the queries of the `select` pass (the model
repeating the corpus after its KV; the query heads of the group pooled), the target is the whole
corpus's attention output `O = softmax(Q K^T / sqrt(d)) V` over the corpus positions, and with the P
kept keys `C_k` fixed where the block is read (moved to positions 0..P-1, each query r tokens after the
block as it was r tokens after the corpus: `Q'`, rotated back by T - P) the values solve the ridge least
squares

    min_{C_v} ||softmax(Q' C_k^T / sqrt(d)) C_v - O||^2 + ridge * ||C_v - V_kept||^2,

whose normal equations are P x P (float64). The ridge pulls towards the kept tokens' own values, so
a block that already reproduces the output keeps them, and P = the corpus length reproduces it
exactly. What this does not fit is the block's attention *mass* (the paper's per-key biases, which a
PEFT prefix cannot carry): a compact block is still under-attended beside the chat.

The queries are those of the whole-corpus pass for every layer (not recomputed layer by layer with
the compacted earlier layers), and the corpus must fit one segment of the model's window.
"""

import torch

from cartridges.errors import CartridgeError
from cartridges.kv_layout import kv_shape
from cartridges.kv_prefix import kv_prefix_of_tokens, prefix_cache
from cartridges.layout import chat_token_ids, context_token_ids
from cartridges.models import LoadedModel
from cartridges.stages.evaluation.methods.select import (
    CHUNK_TOKENS,
    REPEAT_REQUEST,
    move_keys,
    moved_by,
    rotary_embedding,
    select_tokens,
)

RIDGE = 1e-2  # relative to the mean diagonal of the normal matrix: enough to keep rarely attended keys' values
MAX_QUERIES = 2048  # reference queries per layer and query head (evenly spaced over the corpus)


def reference_queries(loaded: LoadedModel, kv: torch.Tensor, body: list[int]) -> torch.Tensor:
    """[layers, query_heads, queries, head_dim]: the rotated queries of the model repeating `body` (the
    text of `kv`) right after it, at the positions they are read at."""
    model = loaded.model
    layers, kv_heads, head_dim = kv_shape(model.config)
    heads = model.config.num_attention_heads
    request = chat_token_ids(loaded.tokenizer, [{"role": "user", "content": REPEAT_REQUEST}])
    captured: list[list[torch.Tensor]] = [[] for _ in range(layers)]
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, out, i=i: captured[i].append(out[0].detach()))
        for i, layer in enumerate(model.model.layers)
    ]
    positions = []
    try:
        for start in range(0, len(body), CHUNK_TOKENS):
            window = request + body[start : start + CHUNK_TOKENS]
            first = kv.shape[0]
            ids = torch.tensor([window], device=model.device)
            position = torch.arange(first, first + len(window), device=model.device)
            cache = prefix_cache(kv.to(model.device), layers, kv_heads, head_dim)
            with torch.no_grad():
                model(input_ids=ids, position_ids=position[None], past_key_values=cache, use_cache=True)
            positions.append(position[len(request) :])
            for per_layer in captured:  # the request's queries are not reconstruction queries
                per_layer[-1] = per_layer[-1][len(request) :]
    finally:
        for hook in hooks:
            hook.remove()
    position = torch.cat(positions)
    keep = torch.linspace(0, len(position) - 1, min(MAX_QUERIES, len(position))).round().long().unique()
    rotary, apply = rotary_embedding(model)
    queries = torch.stack([torch.cat(per_layer)[keep] for per_layer in captured])  # [layers, m, heads*D]
    queries = queries.view(layers, len(keep), heads, head_dim).transpose(1, 2)  # [layers, heads, m, D]
    cos, sin = rotary(queries, position[keep][None])
    rotated, _ = apply(queries, queries, cos, sin)
    return rotated


def attention_weights(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[m, n] in float64: softmax(Q K^T / sqrt(d)), attention over these keys alone."""
    return torch.softmax(queries.double() @ keys.double().T * keys.shape[-1] ** -0.5, dim=-1)


def attention_output(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """[m, D] in float64: the output of attention over these keys alone."""
    return attention_weights(queries, keys) @ values.double()


def fitted_values(
    queries: torch.Tensor, keys: torch.Tensor, start_values: torch.Tensor, target: torch.Tensor, ridge: float = RIDGE
) -> torch.Tensor:
    """[P, D]: the values for the block's `keys` [P, D] whose attention output for `queries` [m, D] best
    matches `target` [m, D], pulled towards `start_values` (the kept tokens' own values)."""
    weights = attention_weights(queries, keys)  # [m, P]
    normal = weights.T @ weights
    strength = ridge * normal.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(keys.shape[0], dtype=torch.float64, device=normal.device)
    solved = torch.linalg.solve(normal + strength * eye, weights.T @ target.double() + strength * start_values.double())
    return solved.to(start_values.dtype)


def moved_queries(model, queries: torch.Tensor, by: int) -> torch.Tensor:
    """Rotated queries [..., m, D] read `by` positions later."""
    return moved_by(model, queries, torch.full((1, queries.shape[-2]), by, device=queries.device))


def matched_prefix(loaded: LoadedModel, text: str, num_tokens: int) -> torch.Tensor:
    """The `matched` prefix of `num_tokens` tokens, read at positions 0..P-1 (the whole corpus if shorter)."""
    model = loaded.model
    ids = context_token_ids(loaded.tokenizer, text)
    if len(ids) <= num_tokens:
        return kv_prefix_of_tokens(model, ids)
    head = context_token_ids(loaded.tokenizer, "")
    request = chat_token_ids(loaded.tokenizer, [{"role": "user", "content": REPEAT_REQUEST}])
    if len(ids) + len(request) + CHUNK_TOKENS > model.config.max_position_embeddings:
        raise CartridgeError(
            f"'matched' fits a corpus within one window of the model for now ({len(ids)} tokens is more): "
            "use 'select' for a longer corpus"
        )
    selection = select_tokens(loaded, text, num_tokens)
    kv = kv_prefix_of_tokens(model, ids)
    queries = reference_queries(loaded, kv, ids[len(head) :])
    block_queries = moved_queries(model, queries, num_tokens - len(ids))  # as far after the block as after the corpus
    target_positions = torch.arange(num_tokens, device=selection.positions.device)[:, None, None]
    block = move_keys(model, selection.prefix, selection.positions, target_positions.expand_as(selection.positions))
    layers, kv_heads, head_dim = kv_shape(model.config)
    group = model.config.num_attention_heads // kv_heads
    full = kv.view(len(ids), layers, 2, kv_heads, head_dim)
    block = block.view(num_tokens, layers, 2, kv_heads, head_dim).clone()
    for layer in range(layers):
        for h in range(kv_heads):
            heads = slice(h * group, (h + 1) * group)
            target = attention_output(
                queries[layer, heads].reshape(-1, head_dim), full[:, layer, 0, h], full[:, layer, 1, h]
            )
            q = block_queries[layer, heads].reshape(-1, head_dim)
            block[:, layer, 1, h] = fitted_values(q, block[:, layer, 0, h], block[:, layer, 1, h], target)
    return block.reshape(num_tokens, -1)
