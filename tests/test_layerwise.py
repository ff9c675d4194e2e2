"""`matched` fitted layer by layer: layer 0 is the plain `matched` block's (its queries read nothing
before it), and the last layer's values are numpy's ridge fit to the queries the model makes when it reads
the finished block as a plain prefix, window by window (an independent forward pass, hooked)."""

import numpy as np
import pytest
import torch

from cartridges.kv_layout import kv_shape
from cartridges.kv_prefix import prefix_cache
from cartridges.layout import chat_token_ids, context_token_ids
from cartridges.rotary import moved_by
from cartridges.stages.evaluation.contexts import corpus_kv
from cartridges.stages.evaluation.methods import repeat_pass as repeat_pass_module
from cartridges.stages.evaluation.methods.layerwise import layerwise_prefix
from cartridges.stages.evaluation.methods.matched import RIDGE, matched_block
from cartridges.stages.evaluation.methods.repeat_pass import REPEAT_REQUEST

TEXT = (
    "Section 1. A landlord shall give written notice to vacate three days before filing suit. "
    "Section 2. Rent is due on the first day of each month. "
    "Section 3. A tenant may cure a default in rent within ten days. "
) * 3
BUDGET = 12


def blocks(loaded, prefix: torch.Tensor) -> torch.Tensor:
    layers, kv_heads, head_dim = kv_shape(loaded.model.config)
    return prefix.view(prefix.shape[0], layers, 2, kv_heads, head_dim)


@pytest.mark.parametrize("key_choice", ["attention", "omp"])
def test_layer_zero_is_the_plain_matched_block_and_later_layers_are_fitted_to_other_queries(lively, key_choice):
    layered = blocks(lively, layerwise_prefix(lively, TEXT, BUDGET, key_choice))
    plain = blocks(lively, matched_block(lively, TEXT, BUDGET, key_choice=key_choice).prefix)
    torch.testing.assert_close(layered[:, 0], plain[:, 0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(layered[:, -1], plain[:, -1], atol=1e-3)


def test_a_corpus_within_the_budget_is_its_own_kv(lively):
    torch.testing.assert_close(layerwise_prefix(lively, "Rent is due.", 64), corpus_kv(lively, "Rent is due."))


def last_layer_queries(loaded, prefix: torch.Tensor, window: list[int]) -> torch.Tensor:
    """[query_heads, W, D]: the last layer's rotated queries of `window` read after `prefix` as a plain cache
    (transformers' own attention), from a hook on its q_proj."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, (layers, kv_heads, head_dim) = loaded.model, kv_shape(loaded.model.config)
    seen = []
    hook = model.model.layers[-1].self_attn.q_proj.register_forward_hook(lambda m, i, out: seen.append(out))
    positions = torch.arange(prefix.shape[0], prefix.shape[0] + len(window))[None]
    try:
        with torch.no_grad():
            model(
                input_ids=torch.tensor([window]),
                position_ids=positions,
                past_key_values=prefix_cache(prefix, layers, kv_heads, head_dim),
                use_cache=True,
            )
    finally:
        hook.remove()
    queries = seen[0].view(1, len(window), -1, head_dim).transpose(1, 2)
    cos, sin = model.model.rotary_emb(queries, positions)
    return apply_rotary_pos_emb(queries, queries, cos, sin)[0][0]


def test_the_last_layer_is_numpys_ridge_fit_to_the_queries_of_the_model_reading_the_block(lively, monkeypatch):
    monkeypatch.setattr(repeat_pass_module, "CHUNK_TOKENS", 16)
    monkeypatch.setattr("cartridges.stages.evaluation.methods.layerwise.CHUNK_TOKENS", 16)
    model, (layers, kv_heads, head_dim) = lively.model, kv_shape(lively.model.config)
    prefix = layerwise_prefix(lively, TEXT, BUDGET)
    ids = context_token_ids(lively.tokenizer, TEXT)
    body = ids[len(context_token_ids(lively.tokenizer, "")) :]
    request = chat_token_ids(lively.tokenizer, [{"role": "user", "content": REPEAT_REQUEST}])
    # Every reconstruction query of the windows (fewer than the probes asked for), read after the block.
    queries = torch.cat(
        [
            last_layer_queries(lively, prefix, request + body[s : s + 16])[:, len(request) :]
            for s in range(0, len(body), 16)
        ],
        dim=1,
    )  # [query_heads, m, D] read at P + r
    at_corpus = moved_by(model, queries[None], torch.full((1, queries.shape[1]), len(ids) - BUDGET))[0]
    whole = corpus_kv(lively, TEXT).view(len(ids), layers, 2, kv_heads, head_dim)[:, -1]  # [T, 2, kv_heads, D]
    block = blocks(lively, prefix)[:, -1]
    group = queries.shape[0] // kv_heads
    for h in range(kv_heads):
        corpus_keys = whole[:, 0, h]
        # which corpus token each block key is: the corpus key that, moved to the block position, is it
        kept = []
        for j in range(BUDGET):
            moved = moved_by(model, corpus_keys[None, None], (j - torch.arange(len(ids)))[None])[0, 0]
            distance = (moved - block[j, 0, h]).norm(dim=-1)
            kept.append(int(distance.argmin()))
            assert float(distance.min()) < 1e-4
        q_block = queries[h * group : (h + 1) * group].reshape(-1, head_dim).double().numpy()
        q_corpus = at_corpus[h * group : (h + 1) * group].reshape(-1, head_dim).double().numpy()
        logits = q_corpus @ corpus_keys.double().numpy().T / head_dim**0.5
        target = np.exp(logits - logits.max(1, keepdims=True))
        target = (target / target.sum(1, keepdims=True)) @ whole[:, 1, h].double().numpy()
        weights = q_block @ block[:, 0, h].double().numpy().T / head_dim**0.5
        weights = np.exp(weights - weights.max(1, keepdims=True))
        weights /= weights.sum(1, keepdims=True)
        strength = RIDGE * np.diag(weights.T @ weights).mean()
        start = whole[kept, 1, h].double().numpy()
        system = np.vstack([weights, np.sqrt(strength) * np.eye(BUDGET)])
        wanted = np.vstack([target, np.sqrt(strength) * start])
        expected = np.linalg.lstsq(system, wanted, rcond=None)[0]
        np.testing.assert_allclose(block[:, 1, h].double().numpy(), expected, atol=2e-4, rtol=1e-3)
