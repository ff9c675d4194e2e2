"""Continuous batching over mixed cartridges gives each request the tokens it gets alone."""

import pytest
import torch

from cartridges.artifact.folder import load_artifact
from cartridges.kv_layout import kv_shape
from cartridges.layout import chat_token_ids
from cartridges.runtime import CartridgeRuntime
from cartridges.serving.batch_decoder import BatchDecoder
from cartridges.serving.generation import Generation, Sampling
from cartridges.stages.distillation.init.first_tokens import init_cartridge
from cartridges.stages.ingest import read_corpus

QUESTIONS = [
    "How many days notice must a landlord give?",
    "What is the deposit?",
    "Who repairs the heating?",
    "Can the tenant sublet the flat to a friend for the summer?",
]


def cartridges_of(lively, corpus_dir, tmp_path):
    corpus = read_corpus(corpus_dir)
    folders = {}
    for name, tokens in (("short", 12), ("long", 40)):
        init_cartridge(lively, corpus, tokens, name, tmp_path / name)
        folders[name] = load_artifact(tmp_path / name)
    return folders


def requests(lively, cartridges, max_tokens=12):
    """Every question with no cartridge, the short one, the long one, and both composed."""
    prefixes = {
        "none": None,
        "short": cartridges["short"].prompt_embeddings,
        "long": cartridges["long"].prompt_embeddings,
        "both": torch.cat([cartridges["long"].prompt_embeddings, cartridges["short"].prompt_embeddings]),
    }
    stops = frozenset({lively.tokenizer.eos_token_id})
    return [
        (kind, question, prefix, chat_token_ids(lively.tokenizer, [{"role": "user", "content": question}]), stops)
        for kind, prefix in prefixes.items()
        for question in QUESTIONS
    ], max_tokens


def run(decoder, prefix, prompt, stops, sampling):
    generation = decoder.submit(Generation(prefix, prompt, sampling, stops))
    return generation, generation.tokens(timeout=60)


def test_sixteen_concurrent_requests_over_mixed_cartridges_equal_each_alone_and_hf_generate(
    lively, corpus_dir, tmp_path
):
    cartridges = cartridges_of(lively, corpus_dir, tmp_path)
    cases, max_tokens = requests(lively, cartridges)
    decoder = BatchDecoder(lively.model, kv_shape(lively.model.config), max_batch=16)
    try:
        alone = []
        for _, _, prefix, prompt, stops in cases:
            generation = decoder.submit(Generation(prefix, prompt, Sampling(max_tokens), stops))
            alone.append(list(generation.tokens(timeout=60)))
            assert decoder.running == 0
        together = [decoder.submit(Generation(p, q, Sampling(max_tokens), s)) for _, _, p, q, s in cases]
        assert [list(g.tokens(timeout=120)) for g in together] == alone
        assert {g.finish_reason for g in together} <= {"stop", "length"}
        assert decoder.prompt_tokens_reused > 0  # the chat template's head was prefilled once per cartridge
    finally:
        decoder.close()
    uncached = BatchDecoder(lively.model, kv_shape(lively.model.config), max_batch=16, prompt_cache_entries=0)
    try:
        for (_, _, prefix, prompt, stops), expected in zip(cases, alone, strict=True):
            generation = uncached.submit(Generation(prefix, prompt, Sampling(max_tokens), stops))
            assert list(generation.tokens(timeout=60)) == expected
        assert uncached.prompt_tokens_reused == 0
    finally:
        uncached.close()
    # Independently: HF generate through the runtime `cartridges ask` uses gives the same text.
    for (kind, question, _, _, _), tokens in zip(cases, alone, strict=True):
        chosen = {"none": [], "short": ["short"], "long": ["long"], "both": ["long", "short"]}[kind]
        if not chosen:
            continue
        runtime = CartridgeRuntime(lively, [cartridges[name] for name in chosen])
        expected = runtime.generate([{"role": "user", "content": question}], max_new_tokens=max_tokens)
        assert lively.tokenizer.decode(tokens, skip_special_tokens=True).strip() == expected


def test_a_request_joins_a_running_batch_and_a_cancelled_one_leaves_it(lively, corpus_dir, tmp_path):
    cartridges = cartridges_of(lively, corpus_dir, tmp_path)
    cases, _ = requests(lively, cartridges)
    _, _, prefix, prompt, _ = cases[5]
    decoder = BatchDecoder(lively.model, kv_shape(lively.model.config), max_batch=4)
    try:
        alone = list(decoder.submit(Generation(prefix, prompt, Sampling(24), frozenset())).tokens(timeout=60))
        long_runner = decoder.submit(Generation(None, cases[0][3], Sampling(200), frozenset()))
        stream = long_runner.tokens(timeout=60)
        next(stream), next(stream)  # it is decoding now
        late = decoder.submit(Generation(prefix, prompt, Sampling(24), frozenset()))
        assert list(late.tokens(timeout=60)) == alone and late.finish_reason == "length"
        long_runner.cancel()
        list(stream)
        assert long_runner.finish_reason == "cancelled" and decoder.running == 0
    finally:
        decoder.close()


def test_sampling_with_a_seed_repeats_and_temperature_changes_the_answer(lively, corpus_dir, tmp_path):
    cartridges = cartridges_of(lively, corpus_dir, tmp_path)
    cases, _ = requests(lively, cartridges)
    _, _, prefix, prompt, _ = cases[6]
    decoder = BatchDecoder(lively.model, kv_shape(lively.model.config))
    try:

        def sample(seed):
            generation = Generation(prefix, prompt, Sampling(16, temperature=1.0, top_p=0.9, seed=seed), frozenset())
            return list(decoder.submit(generation).tokens(timeout=60))

        first, again, other = sample(1), sample(1), sample(2)
        greedy = list(decoder.submit(Generation(prefix, prompt, Sampling(16), frozenset())).tokens(timeout=60))
    finally:
        decoder.close()
    assert first == again and len(first) == 16
    assert other != first or greedy != first


def test_prompts_are_prefilled_in_chunks_within_the_token_budget_while_others_decode(lively, corpus_dir, tmp_path):
    """A budget of one prompt token a step prefills every prompt one token a step, beside the rows that
    decode; a large one prefills all the queued prompts in one step. The answers are the same tokens."""
    cartridges = cartridges_of(lively, corpus_dir, tmp_path)
    cases, max_tokens = requests(lively, cartridges)
    answers, decoders = {}, {}
    for budget in (1, 100_000):
        decoder = BatchDecoder(lively.model, kv_shape(lively.model.config), max_batch=16, prefill_tokens=budget)
        try:
            blocker = decoder.submit(Generation(None, cases[0][3], Sampling(400), frozenset()))
            stream = blocker.tokens(timeout=60)
            next(stream)  # the decoder is busy: the next ones queue up behind its current step
            together = [decoder.submit(Generation(p, q, Sampling(max_tokens), s)) for _, _, p, q, s in cases[1:]]
            answers[budget] = [list(g.tokens(timeout=120)) for g in together]
            decoded_meanwhile = blocker._queue.qsize()
            blocker.cancel()
            list(stream)
            decoders[budget] = decoder
        finally:
            decoder.close()
        assert decoded_meanwhile >= min(399, decoder.prefill_steps) - 1  # every step decoded the blocker too
    assert answers[1] == answers[100_000]
    one_a_step = decoders[1]
    assert one_a_step.prefill_steps == one_a_step.prompt_tokens_computed  # each carried exactly one prompt token
    all_at_once = decoders[100_000]
    assert all_at_once.prefill_steps <= 3  # the blocker's prompt, then the queued ones together (or in two)
    assert all_at_once.prompt_tokens_computed == one_a_step.prompt_tokens_computed


def test_run_in_the_callers_thread_gives_the_tokens_of_the_threaded_decoder(lively, corpus_dir, tmp_path):
    """Synthesis steps the decoder in its own thread (`thread=False`, `run`): the same tokens, sampled
    with per-row seeds too, and the stop token that ended a generation is kept."""
    cartridges = cartridges_of(lively, corpus_dir, tmp_path)
    cases, max_tokens = requests(lively, cartridges)
    samplings = [Sampling(max_tokens), Sampling(max_tokens, temperature=0.9, top_p=0.8, seed=7)]
    threaded = BatchDecoder(lively.model, kv_shape(lively.model.config), max_batch=4)
    try:
        _, _, prefix, prompt, stops = cases[0]
        stop = list(run(threaded, prefix, prompt, stops, samplings[0])[1])[3]  # a token greedy decoding makes
        cases = [(*case[:4], case[4] | {stop}) for case in cases]
        expected = [
            list(run(threaded, prefix, prompt, stops, sampling)[1])
            for _, _, prefix, prompt, stops in cases
            for sampling in samplings
        ]
        with pytest.raises(RuntimeError, match="thread=False"):
            threaded.run([])
    finally:
        threaded.close()
    inline = BatchDecoder(lively.model, kv_shape(lively.model.config), max_batch=4, thread=False)
    generations = [
        Generation(prefix, prompt, sampling, stops) for _, _, prefix, prompt, stops in cases for sampling in samplings
    ]
    inline.run(generations)
    assert [list(g.tokens(timeout=0)) for g in generations] == expected
    stopped = [g for g in generations if g.finish_reason == "stop"]
    assert stopped and all(g.stop_token == stop for g in stopped)
    assert all(g.stop_token is None for g in generations if g.finish_reason == "length")


def steps_at_first_token(decoder: BatchDecoder, generation: Generation) -> list[int]:
    """Record the decoder's step count each time `generation` gets a token (on the decoder's thread)."""
    seen: list[int] = []
    put = generation._put

    def recording(item) -> None:
        seen.append(decoder.steps)
        put(item)

    generation._put = recording
    return seen


@pytest.mark.parametrize("order", ["shortest", "arrival"])
def test_a_short_prompt_is_not_held_behind_a_long_ones_prefill(lively, order):
    """Issue 36: a 3-token request waited 34 s behind a 6k-token prompt, which took every step's prefill
    budget first. Shortest remaining prompt first: the short one's first token comes from the first step
    (the long one's chunk shares it); first come first served: after all of the long prompt's chunks."""
    tokenizer = lively.tokenizer
    long_prompt = tokenizer("The tenant shall pay the rent on the first day of each month. " * 40)["input_ids"][:320]
    short_prompt = tokenizer("Notice?")["input_ids"]
    decoder = BatchDecoder(
        lively.model, kv_shape(lively.model.config), max_batch=4, prefill_tokens=32, prefill_order=order, thread=False
    )
    long_run = Generation(None, long_prompt, Sampling(2), frozenset())
    short_run = Generation(None, short_prompt, Sampling(2), frozenset())
    long_steps, short_steps = steps_at_first_token(decoder, long_run), steps_at_first_token(decoder, short_run)
    decoder.run([long_run, short_run])
    chunks_of_long, chunks_of_short = -(-len(long_prompt) // 32), -(-len(short_prompt) // 32)
    assert len(short_prompt) < 32 and chunks_of_short == 1
    if order == "shortest":
        assert short_steps[0] == chunks_of_short  # its own chunks only, the long one's taking what is left
        assert long_steps[0] <= chunks_of_long + chunks_of_short  # and the long one still gets through
    else:
        assert long_steps[0] == chunks_of_long and short_steps[0] > chunks_of_long, (short_steps, long_steps)
