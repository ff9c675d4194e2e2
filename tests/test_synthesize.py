"""Synthesis mechanics on the tiny model: teacher scores, schema, determinism, resume, Ray."""

import io
import json
import random
import subprocess
import sys
import time

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sample_helpers import assert_same_samples

from cartridges.errors import CartridgeError
from cartridges.stages.distillation.training_data import data_fingerprint
from cartridges.stages.ingest import ingest, read_chunks
from cartridges.stages.run_dir import RunDir
from cartridges.stages.synthesis.config import SynthesisConfig, SynthesisRunSettings
from cartridges.stages.synthesis.engine_choice import resolved_engine
from cartridges.stages.synthesis.engines import HFEngine, SamplingConfig, _sharing_batches
from cartridges.stages.synthesis.quality import is_repetitive, message_problem
from cartridges.stages.synthesis.sample_plan import chunk_keys, plan_samples, rendezvous_chunks
from cartridges.stages.synthesis.seed_prompts import corpus_answer, sentences
from cartridges.stages.synthesis.shards import SAMPLE_SCHEMA, num_shards
from cartridges.stages.synthesis.synthesize import ShardInputs, SynthesisWorker, synthesize

CORPUS_KINDS = {"continuation": 1.0, "fill_span": 1.0, "quote": 0.0}
SMALL = {"chunk_min_tokens": 16, "chunk_max_tokens": 64, "max_message_tokens": 12, "max_answer_tokens": 16}


def ingested_run(tiny, corpus, folder) -> tuple[RunDir, object]:
    run = RunDir(folder)
    record = ingest(
        corpus, run, tiny.tokenizer, tiny.tokenizer_fingerprint, SMALL["chunk_min_tokens"], SMALL["chunk_max_tokens"]
    )
    return run, record


def run_synthesis(tiny, corpus, folder, executor="local", reuse_from=None, engine="hf", **config):
    run, ingested = ingested_run(tiny, corpus, folder)
    settings = SynthesisRunSettings(engine=engine, executor=executor, batch_size=4)
    previous = RunDir(reuse_from) if reuse_from else None
    return synthesize(run, ingested, tiny.ref, SynthesisConfig(**(SMALL | config)), settings, previous)


def test_hf_scores_equal_an_unpadded_forward_pass(tiny):
    """Batches of 2 in sorted order: a shared 5-token beginning, none, and a lone prompt's first 3 tokens run as a KV prefix."""
    engine = HFEngine(str(tiny.path), batch_size=2, pad_token_id=tiny.tokenizer.pad_token_id)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [5, 6, 7, 8, 30], [13, 14, 15, 16], [5, 6, 7, 8, 9, 40, 41]]
    answers = [[20, 21, 22], [23], [24, 25, 26, 27, 28], [29, 30], [31, 32, 33, 34]]
    scores = engine.score(prompts, answers, top_k=5)
    for prompt, answer, got in zip(prompts, answers, scores):
        with torch.no_grad():
            logits = tiny.model(torch.tensor([prompt + answer])).logits[0]
        expected = torch.log_softmax(logits, -1)[len(prompt) - 1 : len(prompt) + len(answer) - 1]
        top = expected.topk(5, dim=-1)
        assert got.topk_ids == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(got.topk_logprobs), top.values, atol=1e-4, rtol=0)
        torch.testing.assert_close(
            torch.tensor(got.token_logprobs), expected[range(len(answer)), answer], atol=1e-4, rtol=0
        )


def test_scoring_batches_keep_samples_of_one_chunk_together():
    chunk_a, chunk_b = list(range(100, 140)), list(range(200, 240))
    prompts = [chunk_b + [1], chunk_a + [2], [7, 8], chunk_a + [3, 4], chunk_b + [5], [9], chunk_a + [6]]
    batches = _sharing_batches(prompts, size=2)
    assert sorted(i for batch in batches for i in batch) == list(range(len(prompts)))
    assert [sorted(b) for b in batches] == [[1, 3], [6], [0, 4], [2, 5]]


def test_hf_batched_greedy_generation_equals_one_by_one(tiny):
    engine = HFEngine(str(tiny.path), batch_size=4, pad_token_id=tiny.tokenizer.pad_token_id)
    sampling = SamplingConfig(max_tokens=6, temperature=0.0, top_p=1.0, stop_token_ids=(tiny.tokenizer.eos_token_id,))
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14]]
    together = engine.generate(prompts, sampling, seeds=[0, 1])
    alone = [engine.generate([p], sampling, seeds=[0])[0] for p in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]


def test_hf_generation_scores_equal_the_scoring_pass(tiny):
    """Top-k recorded while sampling (raw logits) must equal scoring the finished answer afterwards."""
    engine = HFEngine(str(tiny.path), batch_size=2, pad_token_id=tiny.tokenizer.pad_token_id)
    sampling = SamplingConfig(max_tokens=8, temperature=1.0, top_p=0.9, stop_token_ids=(tiny.tokenizer.eos_token_id,))
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    completions = engine.generate(prompts, sampling, seeds=[3, 4], top_k=5)
    rescored = engine.score(prompts, [c.token_ids for c in completions], top_k=5)
    for completion, again in zip(completions, rescored):
        assert completion.scores.topk_ids == again.topk_ids
        torch.testing.assert_close(
            torch.tensor(completion.scores.token_logprobs), torch.tensor(again.token_logprobs), atol=1e-4, rtol=0
        )


def test_corpus_answers_are_real_text():
    text = "Rule one applies. Rule two is strict. Rule three ends it. Rule four follows."
    rng = __import__("random").Random(0)
    for kind in ("quote", "continuation", "fill_span"):
        found = corpus_answer(kind, text, rng, max_answer_words=50)
        assert found.answer and found.answer in " ".join(sentences(text))
    assert corpus_answer("quote", "Too short.", rng, 50) is None


def test_quality_filters():
    assert is_repetitive([1, 2, 3, 4] * 5) and not is_repetitive(list(range(40)))
    assert message_problem("question", "What is the notice period?", [1, 2, 3], True) is None
    assert message_problem("question", "Tell me the notice period.", [1, 2, 3], True) == "no_question"
    assert message_problem("summarization", "Summarize part two.", [1, 2, 3], False) == "message_truncated"
    assert message_problem("generic", "Hi", [1], True) == "empty_message"


def test_output_schema_round_trips_through_datasets(tiny, long_corpus, tmp_path):
    run = tmp_path / "run"
    summary = run_synthesis(tiny, long_corpus, run, samples=10, shard_size=4, kinds=CORPUS_KINDS)
    assert summary.samples == 10 and summary.unfilled == 0
    assert sum(summary.kinds.values()) == 10 and set(summary.kinds) <= {"continuation", "fill_span"}
    table = pq.read_table(RunDir(run).shards)
    assert table.schema.remove_metadata() == SAMPLE_SCHEMA
    loaded = datasets.load_dataset("parquet", data_dir=str(RunDir(run).shards), split="train")
    assert sorted(loaded["sample_id"]) == list(range(10))
    for row in loaded:
        assert len(row["topk_ids"]) == len(row["answer_ids"]) == len(row["token_logprobs"])
        assert all(len(ids) == 20 for ids in row["topk_ids"])
        assert all(a >= b for lps in row["topk_logprobs"] for a, b in zip(lps, lps[1:]))
        assert row["messages"][0]["role"] == "user" and row["answer_source"] == "corpus"
        assert row["engine"] == "hf" and row["model_fingerprint"] == tiny.fingerprint


def test_same_seed_gives_identical_samples_with_hf(tiny, long_corpus, tmp_path):
    kinds = {"question": 1.0, "continuation": 1.0, "fill_span": 1.0}
    first = run_synthesis(tiny, long_corpus, tmp_path / "a", samples=8, shard_size=4, kinds=kinds, seed=7)
    second = run_synthesis(tiny, long_corpus, tmp_path / "b", samples=8, shard_size=4, kinds=kinds, seed=7)
    a = pq.read_table(RunDir(tmp_path / "a").shards).to_pylist()
    b = pq.read_table(RunDir(tmp_path / "b").shards).to_pylist()
    assert a == b and first.rejected == second.rejected
    # The same samples have one fingerprint in a manifest, although their shards' timings differ.
    assert data_fingerprint(RunDir(tmp_path / "a").shards) == data_fingerprint(RunDir(tmp_path / "b").shards)
    run_synthesis(tiny, long_corpus, tmp_path / "c", samples=8, shard_size=4, kinds=kinds, seed=8)
    assert pq.read_table(RunDir(tmp_path / "c").shards).to_pylist() != a


def test_changed_settings_are_refused_on_resume(tiny, long_corpus, tmp_path):
    run_synthesis(tiny, long_corpus, tmp_path / "run", samples=4, shard_size=4, kinds=CORPUS_KINDS)
    with pytest.raises(CartridgeError, match="other settings.*config"):
        run_synthesis(tiny, long_corpus, tmp_path / "run", samples=4, shard_size=4, kinds=CORPUS_KINDS, seed=3)


def test_a_run_recorded_before_a_setting_existed_resumes_as_made_with_its_value(tiny, long_corpus, tmp_path):
    run = RunDir(tmp_path / "run")
    run_synthesis(tiny, long_corpus, run.root, samples=8, shard_size=4, kinds=CORPUS_KINDS)
    columns = ["sample_id", "chunk_id", "messages", "answer_ids", "topk_ids"]
    first = pq.read_table(run.shard(1), columns=columns).to_pylist()
    record = json.loads(run.synthesis_config.read_text())
    for added in ("samples_per_chunk", "teacher_context"):  # what an older version wrote
        del record["config"][added]
    run.synthesis_config.write_text(json.dumps(record))
    run.shard(1).unlink()
    run_synthesis(tiny, long_corpus, run.root, samples=8, shard_size=4, kinds=CORPUS_KINDS)
    assert pq.read_table(run.shard(1), columns=columns).to_pylist() == first
    with pytest.raises(CartridgeError, match="other settings.*config"):  # another value is still another plan
        run_synthesis(tiny, long_corpus, run.root, samples=8, shard_size=4, kinds=CORPUS_KINDS, samples_per_chunk=2)


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown seed kind"):
        SynthesisConfig(kinds={"poetry": 1.0})


RESUME_SCRIPT = """
import sys
from pathlib import Path
from cartridges.models import load_model
from cartridges.stages.ingest import ingest
from cartridges.stages.run_dir import RunDir
from cartridges.stages.synthesis.synthesize import synthesize
from cartridges.stages.synthesis.config import SynthesisRunSettings, SynthesisConfig
tiny = load_model(sys.argv[1])
run = RunDir(Path(sys.argv[3]))
ingested = ingest(Path(sys.argv[2]), run, tiny.tokenizer, tiny.tokenizer_fingerprint, 16, 64)
config = SynthesisConfig(samples=64, shard_size=2, chunk_min_tokens=16, chunk_max_tokens=64, max_message_tokens=12,
                         max_answer_tokens=16, kinds={"continuation": 1.0, "fill_span": 1.0})
synthesize(run, ingested, tiny.ref, config, SynthesisRunSettings(engine="hf", executor="local", batch_size=1))
"""


def test_resume_after_kill_keeps_finished_shards_and_completes(tiny, tiny_model_dir, long_corpus, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-c", RESUME_SCRIPT, str(tiny_model_dir), str(long_corpus), str(run)]
    proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not RunDir(run).shard(1).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    done = {p.name: p.read_bytes() for p in (RunDir(run).shards).glob("*.parquet")}
    total = num_shards(SynthesisConfig(samples=64, shard_size=2))
    assert 2 <= len(done) < total, "the kill should land mid-run"
    assert not list((RunDir(run).shards).glob(".*.tmp"))
    subprocess.run(args, check=True, stderr=subprocess.DEVNULL)
    for name, data in done.items():
        assert (RunDir(run).shards / name).read_bytes() == data
    table = pq.read_table(RunDir(run).shards)
    assert sorted(table.column("sample_id").to_pylist()) == list(range(64))


def test_ray_data_executor_writes_the_same_samples(tiny, long_corpus, tmp_path, capfd, recwarn):
    import ray
    from ray.util.debug import reset_log_once

    reset_log_once("ray_data_progress_manager_disabled")  # Ray warns once per process
    local = run_synthesis(tiny, long_corpus, tmp_path / "local", samples=6, shard_size=3, kinds=CORPUS_KINDS)
    try:
        on_ray = run_synthesis(
            tiny, long_corpus, tmp_path / "ray", executor="ray", samples=6, shard_size=3, kinds=CORPUS_KINDS
        )
    finally:
        ray.shutdown()
    noise = capfd.readouterr().err  # Ray's lines a newcomer reads as failures or that repeat our progress
    assert not [w for w in recwarn if "ray_remote_args" in str(w.message)]  # it would print in a build's log
    for line in ["Progress bars disabled", "constructor arguments in the object store", "execution finished"]:
        assert line not in noise
    assert on_ray.samples == local.samples == 6
    assert_same_samples(
        pq.read_table(RunDir(tmp_path / "ray").shards).sort_by("sample_id"),
        pq.read_table(RunDir(tmp_path / "local").shards).sort_by("sample_id"),
    )


def test_a_shard_holds_the_same_samples_whichever_shards_its_engine_made_before(tiny, long_corpus, tmp_path):
    """Engines on a cluster, and a resumed run, make shards in an order of their own, and an engine reuses
    the KV prefix it computed last: one making the shards shuffled makes the samples one making them in
    order does (the teacher's log-probs to float rounding, `sample_helpers`)."""
    run, _ = ingested_run(tiny, long_corpus, tmp_path / "run")
    config = SynthesisConfig(**SMALL, samples=48, shard_size=2, kinds=CORPUS_KINDS)
    settings = SynthesisRunSettings(engine="hf", executor="local", batch_size=2)
    worker_args = {
        "inputs": ShardInputs.of(run),
        "model": tiny.ref,
        "config_json": config.model_dump_json(),
        "settings_json": settings.model_dump_json(),
    }
    shards = list(range(num_shards(config)))
    in_order, shuffled = SynthesisWorker(**worker_args), SynthesisWorker(**worker_args)
    made = {shard: in_order.make_shard(shard)[1] for shard in shards}
    random.Random(0).shuffle(shards)
    for shard in shards:
        assert_same_samples(
            pq.read_table(io.BytesIO(shuffled.make_shard(shard)[1])), pq.read_table(io.BytesIO(made[shard]))
        )


def _rows_by_sample(run) -> dict[int, dict]:
    return {row["sample_id"]: row for row in pq.read_table(RunDir(run).shards).to_pylist()}


def test_rendezvous_plan_is_uniform_and_moves_only_samples_of_changed_chunks():
    keys = [f"{i:064x}" for i in range(1, 11)]
    counts = np.bincount(rendezvous_chunks(keys, seed=3, samples=20000), minlength=10)
    assert np.all(np.abs(counts - 2000) < 5 * np.sqrt(20000 * 0.1 * 0.9)), counts
    before = plan_samples(500, 3, {"quote": 1.0, "continuation": 2.0}, keys)
    added = plan_samples(500, 3, {"quote": 1.0, "continuation": 2.0}, keys + ["ff" * 32])
    moved = [b for a, b in zip(before, added) if a != b]
    assert moved and all(m.chunk_id == 10 for m in moved) and len(moved) < 100
    removed = plan_samples(500, 3, {"quote": 1.0, "continuation": 2.0}, keys[1:])
    assert all(b.chunk_id + 1 == a.chunk_id for a, b in zip(before, removed) if a.chunk_id != 0)
    assert (
        [(p.kind, p.seed) for p in before] == [(p.kind, p.seed) for p in added] == [(p.kind, p.seed) for p in removed]
    )


def test_samples_per_chunk_puts_consecutive_samples_on_the_chunk_of_their_group():
    keys = [f"{i:064x}" for i in range(1, 41)]
    kinds = {"quote": 1.0, "continuation": 2.0}
    single = plan_samples(102, 3, kinds, keys)
    grouped = plan_samples(102, 3, kinds, keys, per_chunk=4)
    # group g (samples 4g..4g+3; the last group holds 2) reads the chunk that the ungrouped plan gives sample g
    assert [p.chunk_id for p in grouped] == [single[i // 4].chunk_id for i in range(102)]
    assert [(p.sample_id, p.kind, p.seed) for p in grouped] == [(p.sample_id, p.kind, p.seed) for p in single]
    assert len({p.chunk_id for p in grouped}) <= 26 < len({p.chunk_id for p in single})


def test_rebuild_of_an_edited_corpus_reuses_unchanged_chunks_and_equals_a_fresh_run(tiny, long_corpus, tmp_path):
    (long_corpus / "rules.txt").write_text(
        " ".join(f"Rule {i}. Repairs in room {i} are due within {i + 2} days." for i in range(30))
    )
    config = {"samples": 24, "shard_size": 8, "kinds": CORPUS_KINDS}
    run_synthesis(tiny, long_corpus, tmp_path / "first", **config)
    (long_corpus / "rules.txt").write_text(
        " ".join(f"Rule {i}. Repairs in room {i} are due within {i + 3} days." for i in range(30))
    )
    fresh = run_synthesis(tiny, long_corpus, tmp_path / "fresh", **config)
    summary = run_synthesis(tiny, long_corpus, tmp_path / "second", reuse_from=tmp_path / "first", **config)

    first, second, expected = (_rows_by_sample(tmp_path / run) for run in ("first", "second", "fresh"))
    first_keys, fresh_keys = chunk_keys(RunDir(tmp_path / "first")), chunk_keys(RunDir(tmp_path / "fresh"))
    assert set(first_keys) & set(fresh_keys) and set(fresh_keys) - set(first_keys), "one document changed, one did not"
    # Reusable: the sample drew the same chunk content before and after the edit (read off the two runs' rows).
    same_chunk = [
        i for i in expected if i in first and first_keys[first[i]["chunk_id"]] == fresh_keys[expected[i]["chunk_id"]]
    ]
    assert summary.reused == len(same_chunk) > 0 and summary.reused_from == str(tmp_path / "first")
    assert summary.samples == fresh.samples == 24 and fresh.reused == 0
    assert second.keys() == expected.keys()
    for i, row in second.items():
        for column in ("chunk_id", "doc_id", "seed_kind", "seed", "messages", "answer_ids", "topk_ids"):
            assert row[column] == expected[i][column], (i, column)
        torch.testing.assert_close(
            torch.tensor(row["topk_logprobs"]), torch.tensor(expected[i]["topk_logprobs"]), atol=1e-4, rtol=0
        )


def test_samples_of_other_settings_are_not_reused(tiny, long_corpus, tmp_path):
    config = {"samples": 4, "shard_size": 4, "kinds": CORPUS_KINDS}
    run_synthesis(tiny, long_corpus, tmp_path / "first", **config)
    summary = run_synthesis(tiny, long_corpus, tmp_path / "second", reuse_from=tmp_path / "first", top_k=5, **config)
    assert summary.reused == 0 and summary.reuse_refused == "other settings (top_k)"
    with pytest.raises(CartridgeError, match="holds no synthesis.*--out folder"):
        run_synthesis(tiny, long_corpus, tmp_path / "third", reuse_from=tmp_path / "nowhere", **config)


def test_hf_generation_with_a_shared_beginning_equals_each_prompt_alone(lively):
    """Prompts of one chunk share their beginning as one KV prefix; greedy tokens equal `generate` on
    each whole prompt alone, for rows whose own tails differ in length (left padding after the prefix)."""
    engine = HFEngine(str(lively.path), batch_size=4, pad_token_id=lively.tokenizer.pad_token_id)
    sampling = SamplingConfig(max_tokens=8, temperature=0.0, top_p=1.0, stop_token_ids=(lively.tokenizer.eos_token_id,))
    chunk = list(range(40, 90))
    prompts = [chunk + [7, 8, 9], [13, 14, 15], chunk + [21], chunk + [5, 6, 30, 31, 32]]
    got = engine.generate(prompts, sampling, seeds=[0, 1, 2, 3])
    for prompt, completion in zip(prompts, got):
        with torch.no_grad():
            alone = lively.model.generate(
                torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=[lively.tokenizer.eos_token_id]
            )[0, len(prompt) :].tolist()
        assert completion.token_ids == alone
    assert len({tuple(c.token_ids) for c in got}) > 1  # the tails matter: equal answers would prove nothing


def test_auto_takes_the_hf_engine_on_cpu_for_corpus_answered_kinds_even_with_fewer_samples_than_chunks(
    tiny, corpus_dir, tmp_path
):
    summary = run_synthesis(tiny, corpus_dir, tmp_path / "run", engine="auto", samples=4, kinds={"continuation": 1})
    assert len(read_chunks(RunDir(tmp_path / "run"))) > 4 and summary.engines == ["hf"]
    assert resolved_engine("auto", {"quote": 1, "fill_span": 2, "question": 0}) == "hf"
    assert resolved_engine("auto", {"quote": 1, "question": 1}) == "auto"  # vLLM when it starts
    assert resolved_engine("vllm", {"quote": 1}) == "vllm"  # asked for by name


def test_a_prefix_extends_the_kv_of_its_beginning_and_the_engine_reuses_it(lively, monkeypatch):
    """The KV of a prompt's beginning is the first rows of the prompt's KV: the engine computes only
    the part a new shared beginning adds to the last one."""
    from cartridges import kv_prefix
    from cartridges.stages.synthesis import engines

    ids = list(range(40, 100))
    whole = kv_prefix.kv_prefix_of_tokens(lively.model, ids)
    extended = kv_prefix.kv_prefix_of_tokens(lively.model, ids, known=whole[:35])
    torch.testing.assert_close(extended, whole, atol=1e-5, rtol=0)
    engine = HFEngine(str(lively.path), batch_size=4, pad_token_id=lively.tokenizer.pad_token_id)
    computed = []
    real = engines.kv_prefix_of_tokens
    monkeypatch.setattr(
        engines,
        "kv_prefix_of_tokens",
        lambda model, token_ids, known=None: (
            computed.append(len(token_ids) - (0 if known is None else len(known))) or real(model, token_ids, known)
        ),
    )
    torch.testing.assert_close(engine._shared_prefix(ids[:50]), whole[:50], atol=1e-5, rtol=0)
    torch.testing.assert_close(engine._shared_prefix(ids[:30]), whole[:30], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        engine._shared_prefix(ids[:30] + [7, 8]), real(lively.model, ids[:30] + [7, 8]), atol=1e-5, rtol=0
    )
    assert computed == [50, 2]  # the first, nothing for a beginning it knows, two tokens past the common 30
