"""On-policy probes: the queries of a build's self-study conversations read after the whole corpus, checked
against layer 0's attention by hand; a block fitted to them matches their attention better than one fitted
to the repeat pass; a build's fitted start reads its training samples, never the held-out ones."""

import pytest
import torch
from attention_helpers import assert_layer_zero_probes, layer_zero_attention
from run_helpers import synthesized_run_of

from cartridges.errors import CartridgeError
from cartridges.kv_layout import kv_shape
from cartridges.layout import chat_token_ids
from cartridges.rotary import moved_by
from cartridges.stages.evaluation.contexts import corpus_kv
from cartridges.stages.evaluation.methods.matched import attention_output, matched_block
from cartridges.stages.evaluation.methods.sample_probes import PROBE_SOURCES, conversation_probes

TEXT = (
    "Section 1. A landlord shall give written notice to vacate three days before filing suit. "
    "Section 2. Rent is due on the first day of each month. "
    "Section 3. A tenant may cure a default in rent within ten days. "
) * 3
EXCHANGES = [("When is rent due?", "On the first day of each month."), ("How long to cure?", "Ten days.")]


def conversations(loaded) -> list[list[int]]:
    """Chat then answer tokens, as the student reads a self-study sample."""
    return [
        chat_token_ids(loaded.tokenizer, [{"role": "user", "content": question}])
        + loaded.tokenizer.encode(answer, add_special_tokens=False)
        for question, answer in EXCHANGES
    ]


def test_conversation_probes_are_the_models_own_attention_to_the_corpus(lively):
    kv, talks = corpus_kv(lively, TEXT), conversations(lively)
    probes = conversation_probes(lively, kv, talks, probes=10_000)
    assert probes.after.tolist() == [i for talk in talks for i in range(len(talk))]  # each read alone after the corpus
    by_hand = torch.cat([layer_zero_attention(lively, kv, talk) for talk in talks], dim=1)
    assert_layer_zero_probes(lively, kv, probes, by_hand)


def test_a_conversation_is_cut_where_the_window_ends_and_none_fitting_is_one_line(lively, monkeypatch):
    kv, talks = corpus_kv(lively, TEXT), conversations(lively)
    monkeypatch.setattr(lively.model.config, "max_position_embeddings", kv.shape[0] + 5)
    assert conversation_probes(lively, kv, talks, probes=10_000).after.tolist() == [0, 1, 2, 3, 4] * 2
    assert conversation_probes(lively, kv, talks, probes=4).after.tolist() == [0, 3, 1, 4]  # evenly over all ten
    lively.model.config.max_position_embeddings = kv.shape[0]
    with pytest.raises(CartridgeError, match=r"^no self-study conversation fits .*set distill.init_probes=repeat$"):
        conversation_probes(lively, kv, talks, probes=10)


def test_a_block_fitted_to_the_samples_matches_their_attention_better_than_one_fitted_to_the_repeat_pass(lively):
    budget, talks = 24, conversations(lively)
    layers, kv_heads, head_dim = kv_shape(lively.model.config)
    blocks = {
        source: matched_block(lively, TEXT, budget, conversations=talks, probe_source=source).prefix.view(
            budget, layers, 2, kv_heads, head_dim
        )
        for source in PROBE_SOURCES
    }
    assert torch.equal(blocks["samples"][:, :, 0], blocks["repeat"][:, :, 0])  # the same keys (select's)
    probes = conversation_probes(lively, corpus_kv(lively, TEXT), talks, probes=10_000)
    at_block = moved_by(lively.model, probes.queries, torch.full((1, probes.queries.shape[2]), budget))
    group = probes.queries.shape[1] // kv_heads

    def error(block: torch.Tensor) -> float:
        total = 0.0
        for layer in range(layers):
            for h in range(probes.queries.shape[1]):
                keys, values = block[:, layer, 0, h // group], block[:, layer, 1, h // group]
                total += float((attention_output(at_block[layer, h], keys, values) - probes.outputs[layer, h]).norm())
        return total

    errors = {source: error(block) for source, block in blocks.items()}
    assert errors["samples"] < errors["both"] < errors["repeat"]


def test_the_fitted_start_reads_the_training_samples_and_never_the_held_out_ones(lively, tmp_path):
    import pyarrow.parquet as pq

    from cartridges.stages.distillation.config import DistillConfig
    from cartridges.stages.distillation.init.prefix import initial_prefix, sample_conversations
    from cartridges.stages.distillation.train import split_examples
    from cartridges.stages.distillation.training_data import load_examples
    from cartridges.stages.ingest import DOCUMENT_SEPARATOR

    run = synthesized_run_of(lively, TEXT, tmp_path, samples=10, shard_size=5, kinds={"continuation": 1.0})
    config = DistillConfig(num_tokens=12, init="matched", init_probes="samples", init_probe_samples=100, eval_samples=2)
    examples = load_examples(run.shards, lively.tokenizer, config.max_length)
    train, held_out = split_examples(examples, config.eval_samples, config.seed)
    read = sample_conversations(lively, run, config)
    tokens = lambda group: sorted(e.prompt_ids + e.answer_ids for e in group)  # noqa: E731
    assert len(held_out) == 2 and sorted(read) == tokens(train)
    prefix, made_by = initial_prefix(lively, run, config)
    assert made_by == "matched"
    text = DOCUMENT_SEPARATOR.join(pq.read_table(run.documents, columns=["text"]).column("text").to_pylist())
    assert torch.equal(prefix, matched_block(lively, text, 12, conversations=read, probe_source="samples").prefix)
    assert not torch.equal(prefix, initial_prefix(lively, run, config.model_copy(update={"init_probes": "repeat"}))[0])
