"""`matched`: select's keys with values fitted by ridge least squares to the whole corpus's attention output,
checked against numpy's least squares, the model's own attention by hand, and select's values."""

import numpy as np
import torch
from attention_helpers import layer_zero_attention

from cartridges.kv_layout import kv_shape
from cartridges.layout import chat_token_ids, context_token_ids
from cartridges.stages.evaluation.contexts import corpus_kv
from cartridges.stages.evaluation.methods.matched import (
    fitted_values,
    matched_prefix,
    moved_queries,
    reference_queries,
)
from cartridges.stages.evaluation.methods.select import REPEAT_REQUEST, selected_prefix

TEXT = (
    "Section 1. A landlord shall give written notice to vacate three days before filing suit. "
    "Section 2. Rent is due on the first day of each month. "
    "Section 3. A tenant may cure a default in rent within ten days. "
) * 3


def attention_output(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.softmax(queries.double() @ keys.double().T / keys.shape[-1] ** 0.5, dim=-1) @ values.double()


def test_with_every_key_kept_the_fitted_values_are_the_values():
    generator = torch.Generator().manual_seed(0)
    queries, keys, values = (torch.randn(n, 16, generator=generator) for n in (40, 12, 12))
    fitted = fitted_values(queries, keys, values, attention_output(queries, keys, values))
    torch.testing.assert_close(fitted, values, atol=1e-6, rtol=0)


def test_the_fit_is_numpys_ridge_least_squares_and_beats_the_kept_values_on_held_out_queries():
    generator = torch.Generator().manual_seed(1)
    keys, values = torch.randn(64, 16, generator=generator), torch.randn(64, 16, generator=generator)
    queries = torch.randn(400, 16, generator=generator) * 2
    kept, fit, held_out = torch.arange(0, 64, 4), queries[:300], queries[300:]
    fitted = fitted_values(fit, keys[kept], values[kept], attention_output(fit, keys, values), ridge=1e-2)

    # independent: numpy's lstsq on the stacked system [A; sqrt(s) I] C = [O; sqrt(s) V_kept]
    q, k, v = fit.double().numpy(), keys.double().numpy(), values.double().numpy()
    logits = q @ k.T / 4.0
    target = np.exp(logits - logits.max(1, keepdims=True))
    target = (target / target.sum(1, keepdims=True)) @ v
    weights = np.exp(logits[:, kept] - logits[:, kept].max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)
    strength = 1e-2 * np.diag(weights.T @ weights).mean()
    system = np.vstack([weights, np.sqrt(strength) * np.eye(len(kept))])
    wanted = np.vstack([target, np.sqrt(strength) * v[kept]])
    expected = np.linalg.lstsq(system, wanted, rcond=None)[0]
    np.testing.assert_allclose(fitted.double().numpy(), expected, atol=1e-5)

    whole = attention_output(held_out, keys, values)
    error = lambda block_values: float((attention_output(held_out, keys[kept], block_values) - whole).norm())  # noqa: E731
    assert error(fitted) < 0.8 * error(values[kept])


def test_reference_queries_attend_to_the_corpus_as_the_models_own_attention_does(lively):
    ids = context_token_ids(lively.tokenizer, TEXT)
    head = context_token_ids(lively.tokenizer, "")
    body = ids[len(head) :]
    kv = corpus_kv(lively, TEXT)
    layers, kv_heads, head_dim = kv_shape(lively.model.config)
    queries = reference_queries(lively, kv, body)[0]  # layer 0: [query_heads, m, D]
    request = chat_token_ids(lively.tokenizer, [{"role": "user", "content": REPEAT_REQUEST}])
    by_hand = layer_zero_attention(lively, kv, request + body)[:, len(request) :]  # [query_heads, m, T]
    by_hand = by_hand / by_hand.sum(-1, keepdim=True)  # the share of the corpus part
    keys = kv.view(len(ids), layers, 2, kv_heads, head_dim)[:, 0, 0]  # [T, kv_heads, D]
    group = queries.shape[0] // kv_heads
    ours = torch.stack(
        [torch.softmax(queries[h] @ keys[:, h // group].T / head_dim**0.5, dim=-1) for h in range(queries.shape[0])]
    )
    torch.testing.assert_close(ours, by_hand, atol=1e-5, rtol=1e-4)


def test_the_matched_block_reproduces_the_corpus_attention_closer_than_select(lively):
    budget = 24
    matched, selected = matched_prefix(lively, TEXT, budget), selected_prefix(lively, TEXT, budget)
    assert matched.shape == selected.shape == (budget, corpus_kv(lively, TEXT).shape[1])
    layers, kv_heads, head_dim = kv_shape(lively.model.config)
    as_blocks = lambda prefix: prefix.view(budget, layers, 2, kv_heads, head_dim)  # noqa: E731
    assert torch.equal(as_blocks(matched)[:, :, 0], as_blocks(selected)[:, :, 0])  # select's keys
    assert not torch.equal(as_blocks(matched)[:, :, 1], as_blocks(selected)[:, :, 1])  # fitted values
    ids = context_token_ids(lively.tokenizer, TEXT)
    full = corpus_kv(lively, TEXT)
    queries = reference_queries(lively, full, ids[len(context_token_ids(lively.tokenizer, "")) :])
    where_read = moved_queries(lively.model, queries, budget - len(ids))  # as far after the block as after the corpus
    group = queries.shape[1] // kv_heads
    errors = {"matched": 0.0, "select": 0.0}
    whole_kv = full.view(len(ids), layers, 2, kv_heads, head_dim)
    for layer in range(layers):
        for h in range(kv_heads):
            heads = slice(h * group, (h + 1) * group)
            q = queries[layer, heads].reshape(-1, head_dim)
            whole = attention_output(q, whole_kv[:, layer, 0, h], whole_kv[:, layer, 1, h])
            for name, prefix in (("matched", matched), ("select", selected)):
                block = as_blocks(prefix)
                out = attention_output(
                    where_read[layer, heads].reshape(-1, head_dim), block[:, layer, 0, h], block[:, layer, 1, h]
                )
                errors[name] += float((out - whole).norm())
    assert errors["matched"] < errors["select"]


def test_a_corpus_within_the_budget_is_its_own_kv(lively):
    torch.testing.assert_close(matched_prefix(lively, "Rent is due.", 64), corpus_kv(lively, "Rent is due."))
