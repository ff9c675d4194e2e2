"""`matched`: select's keys with values fitted by ridge least squares to the whole corpus's attention output,
checked against numpy's least squares, the model's own attention by hand, and select's values."""

import numpy as np
import torch
from attention_helpers import assert_layer_zero_probes, layer_zero_attention

from cartridges.kv_layout import kv_shape
from cartridges.layout import chat_token_ids, context_token_ids
from cartridges.rotary import moved_by
from cartridges.stages.evaluation.contexts import corpus_kv
from cartridges.stages.evaluation.methods import repeat_pass as repeat_pass_module
from cartridges.stages.evaluation.methods.matched import fitted_values, matched_prefix
from cartridges.stages.evaluation.methods.repeat_pass import REPEAT_REQUEST, repeat_pass
from cartridges.stages.evaluation.methods.select import selected_prefix

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


def probes_of_every_query(loaded):
    ids = context_token_ids(loaded.tokenizer, TEXT)
    body = ids[len(context_token_ids(loaded.tokenizer, "")) :]
    return repeat_pass(loaded, corpus_kv(loaded, TEXT), body, probes=len(body)).probes


def read_after(loaded, queries: torch.Tensor, tokens: int) -> torch.Tensor:
    return moved_by(loaded.model, queries, torch.full((1, queries.shape[-2]), tokens))


def test_the_repeat_pass_probes_are_the_models_own_attention_to_the_corpus(lively, monkeypatch):
    """Every reconstruction query of a pass in chunks of 16, against layer 0's attention computed by hand:
    where each is read, its share of attention over the corpus, its output and its log mass there."""
    monkeypatch.setattr(repeat_pass_module, "CHUNK_TOKENS", 16)
    ids = context_token_ids(lively.tokenizer, TEXT)
    body = ids[len(context_token_ids(lively.tokenizer, "")) :]
    kv = corpus_kv(lively, TEXT)
    request = chat_token_ids(lively.tokenizer, [{"role": "user", "content": REPEAT_REQUEST}])
    probes = probes_of_every_query(lively)
    assert probes.after.tolist() == [len(request) + i % 16 for i in range(len(body))]
    by_hand = torch.cat(
        [
            layer_zero_attention(lively, kv, request + body[start : start + 16])[:, len(request) :]
            for start in range(0, len(body), 16)
        ],
        dim=1,
    )  # [query_heads, m, T]
    assert_layer_zero_probes(lively, kv, probes, by_hand)


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
    queries = probes_of_every_query(lively).queries
    at_corpus, at_block = read_after(lively, queries, len(ids)), read_after(lively, queries, budget)
    group = queries.shape[1] // kv_heads
    errors = {"matched": 0.0, "select": 0.0}
    whole_kv = full.view(len(ids), layers, 2, kv_heads, head_dim)
    for layer in range(layers):
        for h in range(kv_heads):
            heads = slice(h * group, (h + 1) * group)
            q = at_corpus[layer, heads].reshape(-1, head_dim)
            whole = attention_output(q, whole_kv[:, layer, 0, h], whole_kv[:, layer, 1, h])
            for name, prefix in (("matched", matched), ("select", selected)):
                block = as_blocks(prefix)
                out = attention_output(
                    at_block[layer, heads].reshape(-1, head_dim), block[:, layer, 0, h], block[:, layer, 1, h]
                )
                errors[name] += float((out - whole).norm())
    assert errors["matched"] < errors["select"]


def test_a_corpus_within_the_budget_is_its_own_kv(lively):
    torch.testing.assert_close(matched_prefix(lively, "Rent is due.", 64), corpus_kv(lively, "Rent is due."))


def test_init_publishes_the_matched_block_of_the_corpus(cli, lively_model_dir, corpus_dir, cartridges_home):
    from cartridges.artifact.folder import load_artifact
    from cartridges.models import load_model
    from cartridges.stages.ingest import read_corpus

    model = ("--model", str(lively_model_dir))
    code, out, err = cli(
        "init", "--corpus", str(corpus_dir), "--tokens", "16", "--method", "matched", "--name", "fit", *model
    )
    assert code == 0, err
    assert "published fit@1 (16 tokens" in out
    artifact = load_artifact(cartridges_home / "registry" / "fit" / "1")
    expected = matched_prefix(load_model(str(lively_model_dir)), read_corpus(corpus_dir).text, 16)
    torch.testing.assert_close(artifact.prompt_embeddings, expected, atol=1e-6, rtol=0)
    assert artifact.manifest.method == "init" and artifact.manifest.method_config["init"] == "matched"
    code, _, err = cli("init", "--corpus", str(corpus_dir), "--method", "fitted", "--name", "bad", *model)
    assert code == 2 and "fitted" in err and not (cartridges_home / "registry" / "bad").exists()


def test_the_matched_omp_init_is_the_pursuit_block_without_biases(lively, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cartridges.stages.distillation.config import DistillConfig
    from cartridges.stages.distillation.init.prefix import initial_prefix
    from cartridges.stages.evaluation.methods.matched import matched_block
    from cartridges.stages.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    run.root.mkdir(parents=True)
    pq.write_table(pa.table({"text": [TEXT]}), run.documents)
    pursued = matched_block(lively, TEXT, 12, key_choice="omp")
    assert pursued.key_bias is None
    assert torch.equal(initial_prefix(lively, run, DistillConfig(num_tokens=12, init="matched_omp"))[0], pursued.prefix)
    assert not torch.equal(pursued.prefix, matched_prefix(lively, TEXT, 12))  # other keys than select's


def test_auto_starts_from_the_pursuit_block_within_one_window_matched_above_its_bound_and_first_tokens_beyond(
    lively, tmp_path, monkeypatch
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cartridges.kv_prefix import kv_prefix_of_tokens
    from cartridges.stages.distillation.config import DistillConfig
    from cartridges.stages.distillation.init.prefix import initial_prefix
    from cartridges.stages.evaluation.methods.matched import matched_block
    from cartridges.stages.evaluation.methods.repeat_pass import segment_capacity
    from cartridges.stages.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    run.root.mkdir(parents=True)
    pq.write_table(pa.table({"text": [TEXT]}), run.documents)
    config = DistillConfig(num_tokens=12, init="auto")
    ids = context_token_ids(lively.tokenizer, TEXT)
    # A block larger than the pursuit's bound: select's keys with fitted values (the pursuit grows too slow).
    monkeypatch.setattr("cartridges.stages.distillation.init.prefix.OMP_MAX_TOKENS", 11)
    prefix, made_by = initial_prefix(lively, run, config)
    assert made_by == "matched" and torch.equal(prefix, matched_prefix(lively, TEXT, 12))
    monkeypatch.undo()
    # The corpus exactly fills one window's segment: the pursuit block.
    monkeypatch.setattr(lively.model.config, "max_position_embeddings", lively.model.config.max_position_embeddings)
    lively.model.config.max_position_embeddings += len(ids) - segment_capacity(lively)
    prefix, made_by = initial_prefix(lively, run, config)
    assert made_by == "matched_omp" and torch.equal(prefix, matched_block(lively, TEXT, 12, key_choice="omp").prefix)
    # One token more than fits: the first tokens' KV, which any corpus length allows.
    lively.model.config.max_position_embeddings -= 1
    prefix, made_by = initial_prefix(lively, run, config)
    assert made_by == "first_tokens" and torch.equal(prefix, kv_prefix_of_tokens(lively.model, ids[:12]))


def test_a_corpus_beyond_one_window_is_one_line_for_the_one_window_methods(lively):
    import pytest

    from cartridges.errors import CartridgeError
    from cartridges.stages.evaluation.methods.kvzip import kvzip_context
    from cartridges.stages.evaluation.methods.matched import matched_block
    from cartridges.stages.evaluation.methods.repeat_pass import segment_capacity

    lively.model.config.max_position_embeddings = len(context_token_ids(lively.tokenizer, TEXT)) + 8
    assert len(context_token_ids(lively.tokenizer, TEXT)) > segment_capacity(lively)
    with pytest.raises(CartridgeError, match="'matched-omp' reads a corpus within one window.*use 'matched'"):
        matched_block(lively, TEXT, 12, key_choice="omp")
    with pytest.raises(CartridgeError, match="'kvzip' reads a corpus within one window"):
        kvzip_context(lively, TEXT, 12)
