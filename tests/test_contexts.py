"""Context blocks per method: budgets, presses against independent computations, retrieval, errors."""

import pytest
import torch

from cartridges.artifact import kv_shape
from cartridges.errors import CartridgeError
from cartridges.layout import chat_token_ids
from cartridges.qa import Question
from cartridges.runtime import prefix_cache, prefix_logits
from cartridges.stages.contexts import METHODS, RetrievedContext, compress, context_source, corpus_kv

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
        if method == "icl":
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
