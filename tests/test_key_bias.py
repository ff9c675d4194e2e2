"""Per-key attention biases (`matched-bias`, the attention-mass fit): a key with bias log(n) is attended
as n copies of it. Checked against the model's own attention over a prefix holding the copies, in both
runtime paths that read a block (packed scoring, the batch decoder); the NNLS mass fit, against the
exact mass of every key and against no bias on held-out queries."""

import math

import torch

from cartridges.kv_layout import kv_shape
from cartridges.layout import chat_token_ids
from cartridges.runtime import prefix_logits
from cartridges.serving.batch_decoder import BatchDecoder
from cartridges.serving.generation import Generation, Sampling
from cartridges.serving.packed_attention import packed_logits, use_packed_attention
from cartridges.stages.evaluation.contexts import corpus_kv
from cartridges.stages.evaluation.methods.matched import fitted_biases

MULTIPLICITIES = [1, 2, 3, 4]  # per layer and KV head in its own order


def block_and_copies(lively, seed: int = 0):
    """A 4-token block with biases log(multiplicity), and the block of the copies (each layer and KV head
    repeats its keys and values by its own permutation of the multiplicities, so rows differ by head)."""
    layers, heads, dim = kv_shape(lively.model.config)
    prefix = corpus_kv(lively, "Rent is due on the first day of each month.")[:4]
    rows = prefix.view(4, layers, 2, heads, dim)
    generator = torch.Generator().manual_seed(seed)
    copied = torch.empty(sum(MULTIPLICITIES), layers, 2, heads, dim)
    bias = torch.empty(layers, heads, 4)
    for layer in range(layers):
        for head in range(heads):
            counts = torch.tensor(MULTIPLICITIES)[torch.randperm(4, generator=generator)]
            copied[:, layer, :, head] = rows[torch.repeat_interleave(torch.arange(4), counts), layer, :, head]
            bias[layer, head] = counts.log()
    return prefix, bias, copied.reshape(sum(MULTIPLICITIES), -1)


def prompt(lively, question="When is rent due?"):
    return chat_token_ids(lively.tokenizer, [{"role": "user", "content": question}])


def test_a_biased_block_scores_as_the_model_attending_to_the_copies(lively):
    shape = kv_shape(lively.model.config)
    prefix, bias, copied = block_and_copies(lively)
    rows = [prompt(lively), prompt(lively, "Who repairs the heating in winter?")]
    expected = [
        prefix_logits(lively.model, copied, shape, torch.tensor([row]), start_position=4)[0] for row in rows
    ]  # the model's own attention (sdpa), the chat read right after the 4-token block
    use_packed_attention(lively.model)
    biased = packed_logits(lively.model, shape, prefix, rows, [len(r) for r in rows], key_bias=bias)
    plain = packed_logits(lively.model, shape, prefix, rows, [len(r) for r in rows])
    for ours, theirs, unbiased in zip(biased, expected, plain, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        assert (unbiased - theirs).abs().max() > 1e-2


def test_the_batch_decoder_reads_a_biased_block_as_its_copies_beside_other_rows(lively):
    prefix, bias, copied = block_and_copies(lively, seed=1)
    stops = frozenset({lively.tokenizer.eos_token_id})
    decoder = BatchDecoder(lively.model, kv_shape(lively.model.config), max_batch=4)
    try:
        submitted = [
            decoder.submit(Generation(prefix, prompt(lively), Sampling(10), stops, key_bias=bias)),
            decoder.submit(Generation(copied, prompt(lively), Sampling(10), stops, first_position=4)),
            decoder.submit(Generation(prefix, prompt(lively), Sampling(10), stops)),
        ]
        biased, copies, plain = (list(g.tokens(timeout=60)) for g in submitted)
    finally:
        decoder.close()
    assert biased == copies and biased != plain


def test_the_mass_fit_with_every_key_kept_gives_no_bias_and_keeps_the_mass_of_a_subset():
    generator = torch.Generator().manual_seed(2)
    keys = torch.randn(48, 16, generator=generator)
    queries = torch.randn(300, 16, generator=generator) * 1.5
    mass = lambda q, k, b=0.0: torch.logsumexp(q.double() @ k.double().T / 4.0 + b, dim=-1)  # noqa: E731
    every = fitted_biases(queries, keys, mass(queries, keys))
    torch.testing.assert_close(every, torch.zeros(48), atol=1e-5, rtol=0)
    kept, fit, held_out = torch.arange(0, 48, 4), queries[:200], queries[200:]
    bias = fitted_biases(fit, keys[kept], mass(fit, keys))
    assert bias.min() > -20 and bias.max() > math.log(2)  # 12 keys stand for 48: most weigh more than one
    error = lambda b: float((mass(held_out, keys[kept], b.double()) - mass(held_out, keys)).abs().mean())  # noqa: E731
    assert error(bias) < 0.5 * error(torch.zeros(12))


def test_matching_pursuit_keeps_the_mass_closer_than_the_most_attended_keys():
    from scipy.optimize import nnls

    from cartridges.stages.evaluation.methods.matched import omp_keys

    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(64, 16, generator=generator)
    queries = torch.randn(300, 16, generator=generator) * 1.5
    logits = queries.double() @ keys.double().T / 4.0
    relative = torch.exp(logits - torch.logsumexp(logits, dim=-1, keepdim=True))  # [m, T], rows sum to 1
    chosen = omp_keys(relative, 12, step=4)
    assert chosen[0] == 0 and len(set(chosen.tolist())) == 12 and torch.equal(chosen, chosen.sort().values)
    most_attended = torch.cat([torch.tensor([0]), relative[:, 1:].amax(dim=0).topk(11).indices + 1]).sort().values

    def mass_error(kept):  # an independent NNLS fit of the kept columns to every query's whole mass
        system = relative[:, kept].numpy()
        weights, _ = nnls(system, torch.ones(300, dtype=torch.float64).numpy())
        return float(((system @ weights) - 1.0).__abs__().mean())

    assert mass_error(chosen) < mass_error(most_attended)


def test_kvzip_keeps_the_top_entries_of_every_head_together_and_never_reads_its_padding(lively):
    from cartridges.stages.evaluation.methods.kvzip import kept_entries, kvzip_context

    scores = torch.tensor([[[0.0, 0.0]], [[0.9, 0.1]], [[0.8, 0.2]], [[0.7, 0.3]]])  # [T=4, layers=1, heads=2]
    keep = kept_entries(scores, 2)  # 4 entries: both sinks, then 0.9 and 0.8, both of head 0
    assert keep[:, 0, 0].tolist() == [True, True, True, False] and keep[:, 0, 1].tolist() == [True, False, False, False]

    text = "Section 1. A landlord shall give written notice to vacate three days before filing suit. " * 3
    context = kvzip_context(lively, text, 6)
    layers, kv_heads, head_dim = kv_shape(lively.model.config)
    real = context.key_bias == 0  # [layers, kv_heads, width]
    assert real.sum() == 6 * layers * kv_heads and real.sum(dim=-1).unique().numel() > 1  # unequal heads
    assert context.kv_tokens == 6 < context.prefix.shape[0]  # its KV is the attended entries, not the padded width
    junk = context.prefix.view(-1, layers, 2, kv_heads, head_dim).clone()
    junk.permute(0, 1, 3, 2, 4)[~real.permute(2, 0, 1)] = 7.0  # [width, layers, kv_heads, K/V, D]: padding changed
    rows = [prompt(lively)]
    use_packed_attention(lively.model)
    shape = kv_shape(lively.model.config)
    read = lambda prefix: packed_logits(  # noqa: E731
        lively.model, shape, prefix, rows, [len(rows[0])], context.start_position, context.key_bias
    )[0]
    assert not torch.equal(junk.reshape(context.prefix.shape), context.prefix)
    torch.testing.assert_close(read(junk.reshape(context.prefix.shape)), read(context.prefix), atol=1e-5, rtol=0)
