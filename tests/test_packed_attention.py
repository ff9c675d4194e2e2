"""A packed step (decoding rows and prompt chunks of rows on different cartridges, in one sequence)
gives each row the logits transformers gives that row alone after its prefix."""

import pytest
import torch

from cartridges.kv_layout import kv_shape
from cartridges.runtime import prefix_cache
from cartridges.serving.batch_kv import BatchKV
from cartridges.serving.packed_attention import (
    NO_MASK,
    STEP_ARGUMENT,
    Chunk,
    PackedStep,
    SharedPrefix,
    use_packed_attention,
)


def alone(model, prefix, shape, tokens):
    """transformers' own forward over the row's tokens after its prefix (sdpa attention): logits per token."""
    start = 0 if prefix is None else prefix.shape[0]
    cache = None if prefix is None else prefix_cache(prefix, *shape)
    with torch.no_grad():
        return model(
            input_ids=torch.tensor([tokens]),
            position_ids=torch.arange(start, start + len(tokens))[None],
            past_key_values=cache,
            use_cache=cache is not None,
        ).logits[0]


def packed(model, kv, rows, work):
    """One packed forward pass: `work` maps slot -> new tokens (one new token of a row whose prompt is done
    decodes; more are a chunk). Returns each slot's logits for its new tokens."""
    decode = [slot for slot, tokens in work.items() if len(tokens) == 1 and rows[slot]["decoding"]]
    chunked = [slot for slot in work if slot not in decode]
    ids, positions, chunks = [], [], []
    for slot in decode:
        ids += work[slot]
        positions.append(rows[slot]["start"] + kv.lengths[slot])
    for slot in chunked:
        chunks.append(Chunk(slot, len(ids), len(work[slot]), kv.lengths[slot], rows[slot]["shared"]))
        ids += work[slot]
        first = rows[slot]["start"] + kv.lengths[slot]
        positions += range(first, first + len(work[slot]))
    after = list(kv.lengths)
    for slot, tokens in work.items():
        after[slot] += len(tokens)
    kv.make_room(max(after))
    step = PackedStep(kv, decode, chunks, [row["shared"] for row in rows], after)
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor([ids]),
            position_ids=torch.tensor([positions]),
            attention_mask=NO_MASK,
            use_cache=False,
            **{STEP_ARGUMENT: step},
        ).logits[0]
    kv.lengths = after
    out, at = {}, 0
    for slot in decode + chunked:
        out[slot] = logits[at : at + len(work[slot])]
        at += len(work[slot])
    return out


@pytest.mark.parametrize(
    "kinds",
    [
        ["first", "second", "none", "first", "second", "first"],  # rows 0, 3, 5 share one, 1 and 4 another
        ["first"] * 6,  # one cartridge for the whole batch: read without gathering rows
    ],
)
def test_decoding_rows_and_prompt_chunks_on_cartridges_get_their_logits_alone(lively, kinds):
    model = lively.model
    shape = kv_shape(model.config)
    layers, heads, dim = shape
    assert model.config.num_attention_heads > heads  # grouped-query attention, as SmolLM2
    torch.manual_seed(0)
    first, second = (torch.randn(tokens, layers * 2 * heads * dim) * 0.5 for tokens in (6, 9))
    shared = {id(first): SharedPrefix.of(first, shape), id(second): SharedPrefix.of(second, shape)}
    use_packed_attention(model)
    kv = BatchKV(shape, model.dtype, model.device)
    prefixes = [{"first": first, "second": second, "none": None}[kind] for kind in kinds]
    rows = []
    for prefix in prefixes:
        kv.add()
        rows.append(
            {
                "prefix": prefix,
                "shared": None if prefix is None else shared[id(prefix)],
                "start": 0 if prefix is None else prefix.shape[0],
                "tokens": [],
                "decoding": False,
            }
        )
    prompts = [[5, 9, 14, 3, 7], [21, 8, 2], [30, 31, 4, 4], [11, 12], [], [3, 3, 3]]
    got = packed(model, kv, rows, {slot: tokens for slot, tokens in enumerate(prompts) if tokens})
    for slot, tokens in enumerate(prompts):
        rows[slot]["tokens"] += tokens
        rows[slot]["decoding"] = slot in (0, 1, 2, 5)
    # rows 0-2 and 5 decode a token each; row 3 takes a chunk after its first two tokens, row 4 its first
    work = {0: [17], 1: [40], 2: [6], 3: [13, 19, 2, 8], 4: [50, 51, 52], 5: [9]}
    steps = [got, packed(model, kv, rows, work)]
    for slot, tokens in work.items():
        rows[slot]["tokens"] += tokens
        rows[slot]["decoding"] = True
    work = {slot: [60 + slot] for slot in range(len(rows))}  # every row decodes
    steps.append(packed(model, kv, rows, work))
    for slot, tokens in work.items():
        rows[slot]["tokens"] += tokens
    for slot, row in enumerate(rows):
        expected = alone(model, row["prefix"], shape, row["tokens"])
        computed = torch.cat([step[slot] for step in steps if slot in step])
        assert computed.shape[0] == len(row["tokens"])
        torch.testing.assert_close(computed, expected, rtol=1e-5, atol=1e-5)
    # the rows hold only their own tokens; each cartridge is held once
    assert kv.lengths == [len(row["tokens"]) for row in rows]
    assert kv.columns < max(kv.lengths) + 2 * 64


def test_a_forward_pass_without_a_packed_step_is_transformers_sdpa(lively):
    model = lively.model
    ids = torch.tensor([[5, 9, 14, 3, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        use_packed_attention(model)
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-6, atol=1e-6)
