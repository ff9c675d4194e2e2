"""The `sampled` and `summary` inits: which tokens they choose (against the corpus tokens and a greedy
decode written out by hand), their length, and that the prefix reads like those tokens in context."""

import pyarrow.parquet as pq
import pytest
import torch

from cartridges.kv_layout import kv_shape
from cartridges.layout import chat_token_ids, context_token_ids
from cartridges.runtime import prefix_logits
from cartridges.stages.distillation.config import DistillConfig
from cartridges.stages.distillation.init import summary as summary_init
from cartridges.stages.distillation.init.prefix import initial_prefix
from cartridges.stages.distillation.init.sampled import sampled_token_ids
from cartridges.stages.distillation.init.summary import (
    REPEAT_NGRAM,
    SUMMARY_REQUEST,
    summarised_chunk_indices,
    summary_token_ids,
)
from cartridges.stages.ingest import DOCUMENT_SEPARATOR, ingest, read_chunks
from cartridges.stages.run_dir import RunDir

TEXT = " ".join(
    f"Section {i}. The deposit for unit {i} is {i * 7} dollars, due by day {i % 28 + 1}." for i in range(60)
)


def holds(tokens: list[int], span: list[int]) -> bool:
    """Whether `span` occurs contiguously in `tokens`."""
    return any(tokens[i : i + len(span)] == span for i in range(len(tokens) - len(span) + 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_spans_are_corpus_slices_one_per_stratum_in_corpus_order(tiny, seed):
    corpus = tiny.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    num_tokens, span = 40, 8
    ids = sampled_token_ids(tiny.tokenizer, TEXT, num_tokens, span, seed)
    assert len(ids) == num_tokens and len(corpus) > 10 * num_tokens  # tiny's tokenizer has no BOS
    stratum = len(corpus) / (num_tokens / span)
    for index in range(num_tokens // span):  # the repetitive corpus may hold a span elsewhere too: look inside
        low, high = int(index * stratum), int((index + 1) * stratum)
        assert holds(corpus[low:high], ids[index * span : (index + 1) * span]), index
    assert ids != corpus[:num_tokens]


def test_sampled_draws_other_spans_with_another_seed_and_the_same_with_the_same(tiny):
    draw = lambda seed: sampled_token_ids(tiny.tokenizer, TEXT, 40, 8, seed)  # noqa: E731
    assert draw(0) == draw(0) and draw(0) != draw(1)


def test_sampled_from_a_corpus_no_longer_than_the_prefix_is_the_whole_corpus(tiny):
    short = "Section 1. Rent is due on the first."
    assert sampled_token_ids(tiny.tokenizer, short, 400, 8, 0) == context_token_ids(tiny.tokenizer, short)


def hand_greedy(loaded, chunk: str, num_tokens: int, ngram: int = REPEAT_NGRAM) -> list[int]:
    """Greedy decoding written out: full forward each step, special tokens never chosen, and no n-gram
    of the generated tokens twice (n-grams of the prompt may repeat)."""
    prompt = chat_token_ids(loaded.tokenizer, [{"role": "user", "content": SUMMARY_REQUEST.format(chunk=chunk)}])
    generated, special = [], list(loaded.tokenizer.all_special_ids)
    with torch.no_grad():
        for _ in range(num_tokens):
            logits = loaded.model(input_ids=torch.tensor([prompt + generated])).logits[0, -1].clone()
            seen = {tuple(generated[i : i + ngram]) for i in range(len(generated) - ngram + 1)}
            for token in range(logits.shape[0]):
                if token in special or (
                    len(generated) >= ngram - 1 and (*generated[len(generated) - ngram + 1 :], token) in seen
                ):
                    logits[token] = float("-inf")
            generated.append(int(logits.argmax()))
    return generated


def test_summaries_are_the_greedy_decodes_of_evenly_spaced_chunks_and_fill_the_prefix(lively):
    chunks = [f"Section {i}. Rent for unit {i} is {i * 9} dollars." for i in range(7)]
    separator = lively.tokenizer(DOCUMENT_SEPARATOR, add_special_tokens=False)["input_ids"]
    num_tokens, summary_tokens = 23, 6
    count = (num_tokens + len(separator)) // (summary_tokens + len(separator))
    chosen = summarised_chunk_indices(len(chunks), count)
    assert count >= 2 and chosen == sorted(set(chosen))
    assert all(index * len(chunks) / count <= c < (index + 1) * len(chunks) / count for index, c in enumerate(chosen))
    ids = summary_token_ids(lively, chunks, num_tokens, summary_tokens)
    total = num_tokens - (count - 1) * len(separator)  # what the summaries share, one token at a time
    budgets = [0] * count
    for token in range(total):
        budgets[token % count] += 1
    expected = []
    for position, (index, budget) in enumerate(zip(chosen, budgets)):
        expected += (separator if position else []) + hand_greedy(lively, chunks[index], budget)
    assert ids == expected and len(ids) == num_tokens
    assert not set(ids) & set(lively.tokenizer.all_special_ids)


def test_a_prefix_shorter_than_one_summary_summarises_the_middle_chunk(lively):
    chunks = ["Section 1. Rent is due on the first.", "Section 2. Notice is three days.", "Section 3. Cure in ten."]
    assert summary_token_ids(lively, chunks, 5, 64) == hand_greedy(lively, chunks[1], 5)


@pytest.fixture
def ingested_run(lively, tmp_path) -> RunDir:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "s.txt").write_text(TEXT)
    run = RunDir(tmp_path / "run")
    ingest(corpus, run, lively.tokenizer, lively.tokenizer_fingerprint, 16, 64)
    return run


@pytest.mark.parametrize("init", ["sampled", "summary"])
def test_the_init_of_a_run_reads_like_its_tokens_in_context_at_the_runtime_positions(lively, ingested_run, init):
    """The prefix, read where the runtime reads a cartridge (positions 0..P-1, the chat after it), gives
    the logits of the model with those tokens written before the chat."""
    config = DistillConfig(num_tokens=24, init=init, summary_tokens=6)
    text = DOCUMENT_SEPARATOR.join(pq.read_table(ingested_run.documents).column("text").to_pylist())
    if init == "sampled":
        ids = sampled_token_ids(lively.tokenizer, text, 24, config.sample_span_tokens, config.seed)
    else:
        ids = summary_token_ids(lively, [c.text for c in read_chunks(ingested_run)], 24, 6)
    prefix, made_by = initial_prefix(lively, ingested_run, config)
    assert prefix.shape[0] == 24 and made_by == init
    chat = chat_token_ids(lively.tokenizer, [{"role": "user", "content": "When is the deposit due?"}])
    with torch.no_grad():
        expected = lively.model(input_ids=torch.tensor([ids + chat])).logits[:, len(ids) :]
    got = prefix_logits(lively.model, prefix, kv_shape(lively.model.config), torch.tensor([chat]))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_a_summary_never_repeats_its_own_ngrams_but_may_copy_the_chunks(tiny, monkeypatch):
    """`tiny` loops on its last tokens when forced on; with bigrams banned it may not, and the decode
    equals the hand-written one with the same ban."""
    chunk = "Section 1. Rent is due on the first day of each month."
    looping = summary_init.greedy_summary(tiny, chunk, 30)
    bigrams = lambda ids: [tuple(ids[i : i + 2]) for i in range(len(ids) - 1)]  # noqa: E731
    monkeypatch.setattr(summary_init, "REPEAT_NGRAM", 2)
    banned = summary_init.greedy_summary(tiny, chunk, 30)
    assert len(set(bigrams(looping))) < len(bigrams(looping))  # without the ban at this size it loops
    assert len(set(bigrams(banned))) == len(bigrams(banned)) and banned == hand_greedy(tiny, chunk, 30, ngram=2)
