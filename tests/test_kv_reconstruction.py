"""The `select` init: reconstruction scores against attention by hand, key positions moved exactly,
segments for corpora longer than the window, and the distillation init that uses it."""

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from attention_helpers import layer_zero_attention

from cartridges.kv_layout import kv_shape
from cartridges.kv_prefix import kv_prefix_of_tokens
from cartridges.layout import chat_token_ids, context_token_ids
from cartridges.rotary import move_keys
from cartridges.runtime import prefix_logits
from cartridges.stages.distillation.config import DistillConfig
from cartridges.stages.distillation.init.prefix import initial_prefix
from cartridges.stages.evaluation.contexts import corpus_kv
from cartridges.stages.evaluation.methods import repeat_pass
from cartridges.stages.evaluation.methods import select as kv_reconstruction
from cartridges.stages.evaluation.methods.repeat_pass import REPEAT_REQUEST
from cartridges.stages.evaluation.methods.select import select_tokens, selected_prefix
from cartridges.stages.run_dir import RunDir

TEXT = (
    "Section 1. A landlord shall give written notice to vacate three days before filing suit. "
    "Section 2. Rent is due on the first day of each month. "
    "Section 3. A tenant may cure a default in rent within ten days. "
) * 3


def chat(loaded) -> torch.Tensor:
    return torch.tensor([chat_token_ids(loaded.tokenizer, [{"role": "user", "content": "When is rent due?"}])])


def test_moved_keys_give_the_logits_of_the_same_tokens_at_their_old_positions(lively):
    """A contiguous run of cached tokens moved to 0..n-1, with the chat right after it, keeps every
    query-key distance of the run at its corpus positions with the chat right after *it*."""
    shape = kv_shape(lively.model.config)
    full = corpus_kv(lively, TEXT)
    first, end = 10, 40
    run = full[first:end]
    layers, heads, _ = shape
    old = torch.arange(first, end)[:, None, None].expand(-1, layers, heads)
    new = torch.arange(end - first)[:, None, None].expand(-1, layers, heads)
    moved = move_keys(lively.model, run, old, new)
    ids = chat(lively)
    expected = prefix_logits(lively.model, run, shape, ids, start_position=end)
    torch.testing.assert_close(prefix_logits(lively.model, moved, shape, ids), expected, atol=1e-4, rtol=0)
    unmoved = prefix_logits(lively.model, run, shape, ids)  # the run read at 0..n-1 without moving its keys
    assert (unmoved - expected).abs().max() > 1e-2
    values = lambda prefix: prefix.view(end - first, layers, 2, heads, -1)[:, :, 1]  # noqa: E731
    assert torch.equal(values(moved), values(run))


def test_selection_keeps_the_positions_reconstruction_attends_to_most(lively, monkeypatch):
    """Layer 0 against attention computed from the weights by hand, over reconstruction chunks of 16 tokens."""
    monkeypatch.setattr(repeat_pass, "CHUNK_TOKENS", 16)
    budget = 12
    layers, kv_heads, head_dim = kv_shape(lively.model.config)
    ids = context_token_ids(lively.tokenizer, TEXT)  # the tiny tokenizer has no BOS: ids are the body
    full = kv_prefix_of_tokens(lively.model, ids)
    request = chat_token_ids(lively.tokenizer, [{"role": "user", "content": REPEAT_REQUEST}])
    scores = torch.full((len(ids), kv_heads), float("-inf"))
    for start in range(0, len(ids), 16):
        paid = layer_zero_attention(lively, full, request + ids[start : start + 16])[:, len(request) :]
        per_head = paid.reshape(kv_heads, -1, len(ids)).amax(dim=1).T  # max over the group's heads and queries
        scores = torch.maximum(scores, per_head)
    scores[0] = float("inf")  # the sink
    selection = select_tokens(lively, TEXT, budget)
    kept = selection.prefix.view(budget, layers, 2, kv_heads, head_dim)
    whole = full.view(len(ids), layers, 2, kv_heads, head_dim)
    for head in range(kv_heads):
        expected = scores[:, head].topk(budget).indices.sort().values
        assert torch.equal(selection.positions[:, 0, head], expected), head
        assert torch.equal(kept[:, 0, :, head], whole[expected, 0, :, head]), head
    assert not torch.equal(selection.positions[:, 0, 0], torch.arange(budget))  # not simply the first tokens


def test_select_with_room_for_the_whole_corpus_is_the_corpus_kv(lively):
    whole = corpus_kv(lively, TEXT)
    assert torch.equal(selected_prefix(lively, TEXT, whole.shape[0]), whole)


def test_select_reads_its_tokens_at_positions_0_to_p(lively):
    """The prefix is the selection with each key moved from its corpus position to its rank."""
    budget = 10
    selection = select_tokens(lively, TEXT, budget)
    rank = torch.arange(budget)[:, None, None].expand_as(selection.positions)
    expected = move_keys(lively.model, selection.prefix, selection.positions, rank)
    assert torch.equal(selected_prefix(lively, TEXT, budget), expected)
    assert not torch.equal(expected, selection.prefix)


def test_a_corpus_longer_than_the_window_is_selected_in_segments(lively, monkeypatch):
    """Each segment is prefilled from position 0; only the first segment's first token is kept as a sink."""
    monkeypatch.setattr(repeat_pass, "CHUNK_TOKENS", 16)
    request = chat_token_ids(lively.tokenizer, [{"role": "user", "content": REPEAT_REQUEST}])
    segment = 40
    lively.model.config.max_position_embeddings = segment + len(request) + 16
    ids = context_token_ids(lively.tokenizer, TEXT)
    segments = [ids[i : i + segment] for i in range(0, len(ids), segment)]
    assert len(segments) >= 3
    rows = torch.cat([kv_prefix_of_tokens(lively.model, part) for part in segments])
    starts = torch.tensor([i * segment for i in range(len(segments))])
    budget = 20
    selection = select_tokens(lively, TEXT, budget)
    layers, heads, head_dim = kv_shape(lively.model.config)
    kept = selection.prefix.view(budget, layers, 2, heads, head_dim)
    every = rows.view(-1, layers, 2, heads, head_dim)
    assert selection.positions.max() < segment
    assert (selection.positions[0] == 0).all() and (selection.positions[1:] == 0).sum() == 0
    for layer in range(layers):
        for head in range(heads):
            # every kept row is a row of one segment's own prefill, none of them a later segment's first token
            for row in kept[:, layer, :, head]:
                matches = [i for i in range(every.shape[0]) if torch.equal(row, every[i, layer, :, head])]
                assert matches and not set(matches) & set(starts[1:].tolist())


def test_the_select_init_of_a_run_is_the_selection_of_its_documents(lively, tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir(parents=True)
    pq.write_table(pa.table({"text": [TEXT]}), run.documents)
    config = DistillConfig(num_tokens=12, init="select")
    assert torch.equal(initial_prefix(lively, run, config)[0], selected_prefix(lively, TEXT, 12))


def test_a_cap_on_the_tokens_read_keeps_evenly_spaced_segments(lively, monkeypatch):
    """With room for two of four segments, the first and the last are read; nothing of the others is kept."""
    assert kv_reconstruction.evenly_spaced(4, 2) == [0, 3] and kv_reconstruction.evenly_spaced(5, 3) == [0, 2, 4]
    assert kv_reconstruction.evenly_spaced(3, 9) == [0, 1, 2] and kv_reconstruction.evenly_spaced(3, 0) == [0]
    monkeypatch.setattr(repeat_pass, "CHUNK_TOKENS", 16)
    request = chat_token_ids(lively.tokenizer, [{"role": "user", "content": REPEAT_REQUEST}])
    segment = 30
    lively.model.config.max_position_embeddings = segment + len(request) + 16
    ids = context_token_ids(lively.tokenizer, TEXT)
    count = -(-len(ids) // segment)
    assert count >= 4
    read = [ids[i * segment : (i + 1) * segment] for i in kv_reconstruction.evenly_spaced(count, 2)]
    rows = torch.cat([kv_prefix_of_tokens(lively.model, part) for part in read])
    selection = select_tokens(lively, TEXT, 12, max_tokens=2 * segment)
    layers, heads, head_dim = kv_shape(lively.model.config)
    kept = selection.prefix.view(12, layers, 2, heads, head_dim)
    every = rows.view(-1, layers, 2, heads, head_dim)
    for layer in range(layers):
        for head in range(heads):
            for row in kept[:, layer, :, head]:
                assert any(torch.equal(row, every[i, layer, :, head]) for i in range(every.shape[0]))
