"""Context blocks per method: budgets, presses against independent computations, retrieval, errors."""

import pytest
import torch
from attention_helpers import layer_zero_attention

from cartridges.errors import CartridgeError
from cartridges.kv_layout import kv_shape
from cartridges.layout import chat_token_ids, context_token_ids
from cartridges.qa import Question
from cartridges.runtime import prefix_cache, prefix_logits
from cartridges.stages.evaluation.contexts import corpus_kv
from cartridges.stages.evaluation.methods.presses import compress
from cartridges.stages.evaluation.methods.rag import RetrievedContext
from cartridges.stages.evaluation.methods.table import METHODS, WHOLE_CORPUS_METHODS, context_source

TEXT = (
    "Section 1. A landlord shall give written notice to vacate three days before filing suit. "
    "Section 2. Rent is due on the first day of each month. "
    "Section 3. A tenant may cure a default in rent within ten days. "
) * 3
QUESTION = Question(id="q1", question="How many days of notice to vacate?", answer="three days", answer_type="duration")


def chat(tiny) -> torch.Tensor:
    return torch.tensor([chat_token_ids(tiny.tokenizer, [{"role": "user", "content": QUESTION.question}])])


def test_every_method_stays_within_the_budget(tiny):
    budget = 16
    cartridge = corpus_kv(tiny, TEXT, budget)
    for method in METHODS:
        if method in WHOLE_CORPUS_METHODS:
            continue
        source = context_source(tiny, method, TEXT, budget, cartridge=cartridge)
        assert source.context(QUESTION).kv_tokens <= budget, method
    assert context_source(tiny, "icl", TEXT, None).context(QUESTION).kv_tokens == len(tiny.tokenizer(TEXT)["input_ids"])


def test_knorm_keeps_the_sink_and_the_lowest_key_norms_per_layer_and_head(tiny):
    shape = kv_shape(tiny.model.config)
    full = corpus_kv(tiny, TEXT)
    budget = 10
    kept = compress(full, shape, budget, "knorm")
    layers, heads, head_dim = shape
    tokens = full.shape[0]
    kv_full = full.view(tokens, layers, 2, heads, head_dim)
    kv_kept = kept.prefix.view(budget, layers, 2, heads, head_dim)
    for layer in range(layers):
        for head in range(heads):
            # equal norms (the same token at two positions) may be kept in either order: compare norms, not indices
            norms = sorted(kv_full[t, layer, 0, head].norm().item() for t in range(1, tokens))
            assert torch.equal(kv_kept[0, layer, :, head], kv_full[0, layer, :, head])
            kept_norms = sorted(kv_kept[t, layer, 0, head].norm().item() for t in range(1, budget))
            assert kept_norms == pytest.approx(norms[: budget - 1], abs=1e-6)
            for row in kv_kept[1:, layer, :, head]:
                assert any(torch.equal(row, kv_full[t, layer, :, head]) for t in range(1, tokens))
    assert kept.start_position == tokens


def test_streaming_press_equals_masking_the_dropped_tokens_of_the_full_cache(tiny):
    """Independent check of the compressed layout and positions: the full cache with the middle masked out."""
    shape = kv_shape(tiny.model.config)
    full = corpus_kv(tiny, TEXT)
    tokens, budget = full.shape[0], 12
    kept = compress(full, shape, budget, "streaming")
    assert torch.equal(kept.prefix, torch.cat([full[:1], full[tokens - budget + 1 :]]))
    ids = chat(tiny)
    got = prefix_logits(tiny.model, kept.prefix, shape, ids, start_position=kept.start_position)
    mask = torch.ones(1, tokens + ids.shape[1], dtype=torch.long)
    mask[0, 1 : tokens - budget + 1] = 0
    positions = torch.arange(tokens, tokens + ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        expected = tiny.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=prefix_cache(full, *shape),
            use_cache=True,
        ).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_a_press_with_room_for_everything_is_icl(tiny):
    full = corpus_kv(tiny, TEXT)
    kept = compress(full, kv_shape(tiny.model.config), full.shape[0] + 5, "knorm")
    assert torch.equal(kept.prefix, full) and kept.start_position is None


def test_rag_retrieves_the_passage_that_shares_the_question_words(tiny):
    source = RetrievedContext(
        tiny,
        "Rent is due monthly. " * 8 + "Written notice to vacate takes three days. " + "Pets are allowed. " * 8,
        budget=24,
        passage_tokens=8,
    )
    assert "vacate" in source.ranked_passages("notice to vacate")[0]
    context = source.context(QUESTION)
    assert context.kv_tokens <= 24 and source.context(QUESTION) is context  # cached per question


@pytest.mark.parametrize(
    ("method", "budget", "message"),
    [
        ("magic", 16, "unknown method 'magic'"),
        ("truncated", None, "needs a KV budget"),
        ("cartridge", 16, "needs a cartridge"),
    ],
)
def test_context_source_errors_name_the_fix(tiny, method, budget, message):
    with pytest.raises(CartridgeError, match=message):
        context_source(tiny, method, TEXT, budget)


def layer_zero_window_attention(loaded, corpus: torch.Tensor, window: list[int]) -> torch.Tensor:
    """[tokens, kv_heads] attention the window pays the corpus in layer 0, summed over queries and group."""
    paid = layer_zero_attention(loaded, corpus, window)  # [q_heads, W, T]
    kv_heads = kv_shape(loaded.model.config)[1]
    return paid.sum(dim=1).view(kv_heads, -1, corpus.shape[0]).sum(dim=1).T


def test_snapkv_keeps_the_positions_the_question_attends_to_most(lively):
    """Layer 0's selection against attention computed from the weights by hand (pooled the same way), and a
    different question selects differently."""
    from cartridges.stages.evaluation.methods.snapkv import QuestionSelectedContext, pooled

    budget = 12
    source = QuestionSelectedContext(lively, TEXT, budget)
    corpus, (layers, kv_heads, head_dim) = source.corpus, kv_shape(lively.model.config)
    tokens = corpus.shape[0]
    window = chat_token_ids(lively.tokenizer, [{"role": "user", "content": QUESTION.question}])
    scores = pooled(layer_zero_window_attention(lively, corpus, window)[:, None, :])[:, 0]  # [T, kv_heads]
    scores[0] = float("inf")  # the sink
    kept = source.context(QUESTION)
    assert kept.kv_tokens == budget and kept.start_position == tokens
    full = corpus.view(tokens, layers, 2, kv_heads, head_dim)
    got = kept.prefix.view(budget, layers, 2, kv_heads, head_dim)
    for head in range(kv_heads):
        expected = scores[:, head].topk(budget).indices.sort().values
        assert torch.equal(got[:, 0, :, head], full[expected, 0, :, head]), head
    other = Question(id="q2", question="When is rent due each month?", answer="first day", answer_type="date")
    assert not torch.equal(source.context(other).prefix, kept.prefix)


def test_snapkv_with_the_whole_corpus_in_budget_is_icl(lively):
    icl = context_source(lively, "icl", TEXT, None).context(QUESTION)
    whole = context_source(lively, "snapkv", TEXT, icl.kv_tokens).context(QUESTION)
    assert torch.equal(whole.prefix, icl.prefix) and whole.start_position is None


def test_lingua_keeps_the_most_surprising_tokens_given_what_it_kept_before(lively):
    """The token-level pass against the same rule computed with plain forward passes (no cache)."""
    import math

    from cartridges.stages.evaluation.methods.lingua import kept_token_ids

    ids = context_token_ids(lively.tokenizer, TEXT)
    budget, segment = 20, 16
    expected, ratio = ids[:1], (budget - 1) / (len(ids) - 1)
    with torch.no_grad():
        for start in range(1, len(ids), segment):
            piece = ids[start : start + segment]
            logits = lively.model(input_ids=torch.tensor([expected + piece])).logits[0]
            logprobs = logits[len(expected) - 1 : len(expected) - 1 + len(piece)].log_softmax(-1)
            info = -logprobs[torch.arange(len(piece)), torch.tensor(piece)]
            keep = min(len(piece), math.ceil(len(piece) * ratio), budget - len(expected))
            expected += [piece[i] for i in sorted(info.topk(keep).indices.tolist())] if keep > 0 else []
    assert kept_token_ids(lively, ids, budget, segment) == expected and len(expected) == budget


def test_lingua_with_the_whole_corpus_in_budget_keeps_the_text(lively):
    from cartridges.stages.evaluation.methods.lingua import compressed_text

    icl = context_source(lively, "icl", TEXT, None).context(QUESTION)
    assert compressed_text(lively, TEXT, icl.kv_tokens) == TEXT
    assert torch.equal(context_source(lively, "lingua", TEXT, icl.kv_tokens).context(QUESTION).prefix, icl.prefix)
    shorter = compressed_text(lively, TEXT, 24)
    assert len(context_token_ids(lively.tokenizer, shorter)) < icl.kv_tokens


def test_ape_with_one_text_at_temperature_one_is_icl(lively):
    from cartridges.stages.evaluation.methods.ape import parallel_context

    icl = context_source(lively, "icl", TEXT, None).context(QUESTION)
    one = parallel_context(lively, [TEXT], temperature=1.0)
    assert torch.equal(one.prefix, icl.prefix) and one.start_position == icl.kv_tokens


def test_ape_encodes_each_text_alone_from_the_same_position_with_sharper_keys(lively):
    """Each text's block is the KV of that text alone after the shared prefix, keys divided by T; the chat
    follows the longest text."""
    from cartridges.stages.evaluation.methods.ape import parallel_context

    first, second = (
        "Section 2. Rent is due on the first day.",
        "Section 3. A tenant may cure a default within ten days.",
    )
    shared = context_token_ids(lively.tokenizer, "")
    layers, heads, head_dim = kv_shape(lively.model.config)
    block = parallel_context(lively, [first, second], temperature=0.5)
    alone = [corpus_kv(lively, text)[len(shared) :] for text in (first, second)]
    lengths = [part.shape[0] for part in alone]
    assert block.kv_tokens == len(shared) + sum(lengths)
    assert block.start_position == len(shared) + max(lengths)
    got = block.prefix[len(shared) :].view(-1, layers, 2, heads, head_dim)
    want = torch.cat(alone).view(-1, layers, 2, heads, head_dim)
    assert torch.allclose(got[:, :, 0] * 0.5, want[:, :, 0], atol=1e-6) and torch.equal(got[:, :, 1], want[:, :, 1])


def test_the_eval_commands_help_names_every_method_of_the_table(cli):
    """The help is written out (the table imports torch, which the CLI's start does not): it must keep up."""
    code, out, _ = cli("eval", "--help")
    assert code == 0
    listed = {word.strip(",") for word in " ".join(out.split()).replace("│", " ").split()}
    assert set(METHODS) <= listed
