"""Distillation mechanics on the tiny model: gradients, overfitting, resume, PEFT equality, Ray Train."""

import json
import os

import pytest
import torch
from peft_check import ours_and_peft_logits
from run_helpers import synthesized_run_of
from safetensors.torch import load_file

from cartridges.artifact.folder import load_artifact
from cartridges.cluster import runs_on_ray
from cartridges.stages.distillation.artifact import TrainedRun, save_distilled
from cartridges.stages.distillation.config import DistillConfig, DistillRunSettings, for_start
from cartridges.stages.distillation.run import run_training
from cartridges.stages.distillation.training_data import collate, distillation_loss, load_examples
from cartridges.stages.distillation.worker import student as make_student
from cartridges.stages.records import IngestRecord, SynthesisSummary, read_record
from cartridges.stages.run_dir import RunDir

P = 12
LOCAL = DistillRunSettings(executor="local")


@pytest.fixture
def synthesized_run(tiny, tmp_path):
    text = " ".join(
        f"Section {i}. The deposit for unit {i} is {i * 7} dollars, due by day {i % 28 + 1}." for i in range(50)
    )
    return synthesized_run_of(tiny, text, tmp_path)


def config(**changes) -> DistillConfig:
    return DistillConfig(
        **(
            {
                "num_tokens": P,
                "init": "first_tokens",
                "steps": 4,
                "batch_size": 2,
                "eval_every": 2,
                "eval_samples": 2,
                "checkpoint_every": 2,
                "lr": 1e-2,
            }
            | changes
        )
    )


def test_loss_equals_an_independent_computation(tiny, synthesized_run):
    examples = load_examples(synthesized_run.shards, tiny.tokenizer, 512)[:2]
    batch = collate(examples, 0)
    logits = torch.randn(*batch.input_ids.shape, len(tiny.tokenizer), generator=torch.Generator().manual_seed(0))
    loss, stats = distillation_loss(logits, batch, ce_weight=0.5)
    per_sample_kd, per_sample_ce = [], []
    for row, example in enumerate(examples):
        start = len(example.prompt_ids) - 1
        kd = ce = 0.0
        for j, answer_token in enumerate(example.answer_ids):
            student = torch.log_softmax(logits[row, start + j], -1)
            teacher = torch.softmax(torch.tensor(example.topk_logprobs[j]), -1)
            kd += -(teacher * student[example.topk_ids[j]]).sum().item()
            ce += -student[answer_token].item()
        per_sample_kd.append(kd / len(example.answer_ids))
        per_sample_ce.append(ce / len(example.answer_ids))
    expected_kd = sum(per_sample_kd) / 2
    assert stats["kd"] == pytest.approx(expected_kd, rel=1e-5)
    assert loss.item() == pytest.approx(expected_kd + 0.5 * sum(per_sample_ce) / 2, rel=1e-5)


def test_gradient_reaches_only_the_trainable_prefix(tiny, synthesized_run):
    init = torch.randn(P, 2 * 2 * 2 * 16)
    model = make_student(str(tiny.path), P, init)
    batch = collate(load_examples(synthesized_run.shards, tiny.tokenizer, 512)[:2], 0)
    loss, _ = distillation_loss(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch)
    loss.backward()
    encoder = model.prompt_encoder["default"]
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_encoder.default.trainable_embedding"]
    assert encoder.trainable_embedding.grad.abs().sum() > 0
    assert encoder.frozen_embedding.grad is None
    assert all(p.grad is None for n, p in model.named_parameters() if "prompt_encoder" not in n)
    assert torch.equal(encoder.weight[:1], init[:1])


def test_overfits_a_fixed_batch_towards_a_reachable_teacher(tiny):
    """Teacher = the same model with a known prefix (full-vocabulary targets), so KL 0 is reachable:
    training from another prefix must close most of the gap on a fixed batch."""
    from cartridges.stages.distillation.training_data import Example

    generator = torch.Generator().manual_seed(0)
    teacher = make_student(str(tiny.path), P, torch.randn(P, 128, generator=generator))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15]]
    answers = [[20, 21, 22, 23, 24], [25, 26, 27]]
    vocab = len(tiny.tokenizer)
    examples = []
    with torch.no_grad():
        for prompt, answer in zip(prompts, answers):
            logprobs = torch.log_softmax(teacher(input_ids=torch.tensor([prompt + answer])).logits[0], -1)
            top = logprobs[len(prompt) - 1 : len(prompt) + len(answer) - 1].topk(vocab, dim=-1)
            examples.append(Example(0, prompt, answer, top.indices.tolist(), top.values.tolist()))
    batch = collate(examples, 0)
    student = make_student(str(tiny.path), P, torch.randn(P, 128, generator=generator))
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=5e-2)
    kls = []
    for _ in range(60):
        optimizer.zero_grad()
        loss, stats = distillation_loss(
            student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch
        )
        loss.backward()
        optimizer.step()
        kls.append(stats["topk_kl"])
    assert kls[0] > 1e-3
    assert kls[-1] < 0.3 * kls[0]


def test_resume_continues_with_identical_state(tiny, synthesized_run, tmp_path):
    import shutil

    straight = RunDir(shutil.copytree(synthesized_run.root, tmp_path / "straight"))
    run_training(straight, tiny, config(), LOCAL)
    resumed = RunDir(shutil.copytree(synthesized_run.root, tmp_path / "resumed"))
    run_training(resumed, tiny, config(steps=2), LOCAL)
    resumed.training_config.unlink()  # the same run, continued to 4 steps
    run_training(resumed, tiny, config(), LOCAL)
    a = load_file(str(straight.final_prefix))["prefix"]
    b = load_file(str(resumed.final_prefix))["prefix"]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.equal(a, load_file(str(straight.init_prefix))["prefix"])
    steps = sorted(p.name for p in resumed.checkpoints.iterdir())
    assert steps == ["step-000002", "step-000004"]
    records = [json.loads(line) for line in straight.metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and "eval_topk_kl" in records[1]


def test_changed_settings_are_refused(tiny, synthesized_run):
    from cartridges.errors import CartridgeError

    run_training(synthesized_run, tiny, config(steps=1), LOCAL)
    with pytest.raises(CartridgeError, match="other settings"):
        run_training(synthesized_run, tiny, config(steps=1, lr=0.5), LOCAL)


def test_published_artifact_loads_in_peft_like_in_our_runtime(tiny, synthesized_run, tmp_path):
    run_training(synthesized_run, tiny, config(steps=2), LOCAL)
    trained = TrainedRun(
        synthesized_run,
        read_record(synthesized_run.ingest_record, IngestRecord),
        read_record(synthesized_run.synthesis_summary, SynthesisSummary),
        config(steps=2),
    )
    manifest = save_distilled(tiny, trained, "legal", tmp_path / "artifact")
    assert manifest.method == "distilled" and "eval_topk_kl" in manifest.metrics
    assert manifest.method_config["data_fingerprint"] and manifest.method_config["init"] == "first_tokens"
    assert manifest.method_config["init_used"] == "first_tokens"
    cartridge = load_artifact(tmp_path / "artifact")
    ours, theirs = ours_and_peft_logits(tiny, cartridge)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_the_published_prefix_is_stored_at_the_configured_precision(tiny, synthesized_run, tmp_path):
    run_training(synthesized_run, tiny, config(steps=1, precision="int8"), LOCAL)
    trained = TrainedRun(
        synthesized_run,
        read_record(synthesized_run.ingest_record, IngestRecord),
        read_record(synthesized_run.synthesis_summary, SynthesisSummary),
        config(steps=1, precision="int8"),
    )
    manifest = save_distilled(tiny, trained, "legal", tmp_path / "artifact")
    prefix = load_file(str(synthesized_run.final_prefix))["prefix"]
    loaded = load_artifact(tmp_path / "artifact").prompt_embeddings
    assert manifest.dtype == "int8" and not torch.equal(loaded, prefix)
    assert ((loaded - prefix).abs() <= prefix.abs().amax(dim=0) / 254 + 1e-6).all()


def test_two_ray_workers_match_one_local_worker(tiny, synthesized_run, tmp_path):
    import shutil

    import ray

    single = RunDir(shutil.copytree(synthesized_run.root, tmp_path / "single"))
    run_training(single, tiny, config(steps=3, batch_size=4), LOCAL)
    double = RunDir(shutil.copytree(synthesized_run.root, tmp_path / "double"))
    try:
        run_training(
            double, tiny, config(steps=3, batch_size=4), DistillRunSettings(executor="ray", workers=2, threads=1)
        )
    finally:
        ray.shutdown()
    a = load_file(str(single.final_prefix))["prefix"]
    b = load_file(str(double.final_prefix))["prefix"]
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_a_ray_worker_trains_with_all_its_cpus(tiny, synthesized_run):
    """Ray starts workers with OMP_NUM_THREADS = their CPUs, one by default: training ran 1.8x slower on 2 cores."""
    import ray

    settings = DistillRunSettings(executor="ray", workers=1)
    try:
        run_training(synthesized_run, tiny, config(steps=1), settings)
    finally:
        ray.shutdown()
    record = json.loads(synthesized_run.metrics.read_text().splitlines()[-1])
    assert settings.worker_threads() == max(1, os.cpu_count() // 1)
    assert record["threads"] == settings.worker_threads()


def test_auto_executor_trains_in_this_process_unless_a_cluster_or_more_workers_ask_for_ray(
    tiny, synthesized_run, monkeypatch
):
    """On one box Ray's processes cost a quarter of the training speed (BENCHMARKS.md): `auto` starts no Ray
    for one worker, and goes to Ray for a cluster (`RAY_ADDRESS`, or a process already in Ray) or N workers."""
    import ray

    ray.shutdown()  # a local Ray that an earlier test started in this process
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run_training(synthesized_run, tiny, config(steps=1), DistillRunSettings())
    assert synthesized_run.final_prefix.is_file() and not ray.is_initialized()
    assert not runs_on_ray("auto", 1) and runs_on_ray("auto", 2)
    assert runs_on_ray("ray", 1) and not runs_on_ray("local", 2)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # a build run by the scheduler's Ray actor
    assert runs_on_ray("auto", 1)
    monkeypatch.undo()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert runs_on_ray("auto", 1)


# ---- issue 14: training stops on non-finite values -------------------------------------------


# A finite starting prefix so large that attention overflows: the loss is NaN from the first step.
OVERFLOWING_START = torch.full((P, 128), 3e38)


def test_a_diverging_training_stops_at_its_first_step_with_one_line(tiny, synthesized_run):
    from cartridges.stages.distillation.config import TrainingDiverged

    with pytest.raises(
        TrainingDiverged, match=r"training stopped at step 1: the loss is nan \(not finite\)"
    ) as stopped:
        run_training(synthesized_run, tiny, config(steps=6, checkpoint_every=1), LOCAL, start_from=OVERFLOWING_START)
    assert "no checkpoint had been written and nothing is published" in str(stopped.value)
    assert "Lower distill.lr (distill.fitted_start_lr from a matched block; now 0.01)" in str(
        stopped.value
    ) and "\n" not in str(stopped.value)
    assert not synthesized_run.final_prefix.exists() and not list(synthesized_run.checkpoints.glob("step-*"))


def test_a_diverging_ray_training_is_one_line_too(tiny, synthesized_run):
    """Under Ray Train the worker's error arrives wrapped in Ray's exceptions; the driver reports the worker's line."""
    import ray

    from cartridges.stages.distillation.config import TrainingDiverged

    settings = DistillRunSettings(executor="ray", workers=1, threads=1)
    try:
        with pytest.raises(TrainingDiverged, match=r"training stopped at step 1: the loss is nan \(not finite\)"):
            run_training(synthesized_run, tiny, config(steps=4), settings, start_from=OVERFLOWING_START)
    finally:
        ray.shutdown()
    assert not synthesized_run.final_prefix.exists()


@pytest.mark.parametrize("bad_step", [1, 3])
def test_a_nan_loss_at_any_step_stops_before_the_checkpoint_of_that_step(tiny, synthesized_run, monkeypatch, bad_step):
    from cartridges.stages.distillation import train as distill
    from cartridges.stages.distillation.config import TrainingDiverged

    calls = []

    def poisoned(logits, batch, ce_weight=0.0):
        loss, stats = distillation_loss(logits, batch, ce_weight)
        if torch.is_grad_enabled():  # a training step, not the held-out evaluation
            calls.append(1)
        return (loss * float("nan"), stats) if len(calls) == bad_step and torch.is_grad_enabled() else (loss, stats)

    monkeypatch.setattr(distill, "distillation_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=f"training stopped at step {bad_step}: the loss is nan"):
        run_training(synthesized_run, tiny, config(steps=4, checkpoint_every=1), LOCAL)
    steps = sorted(p.name for p in synthesized_run.checkpoints.glob("step-*"))
    assert steps == [f"step-{s:06d}" for s in range(1, bad_step)]


def test_a_fitted_start_trains_at_its_own_rate_and_says_what_made_it(tiny, synthesized_run):
    """From a `matched` block the optimizer runs at `fitted_start_lr` (the schedule's rates are its, not
    `lr`'s), and the initial prefix file names the init; from the first tokens, at `lr`."""
    import json

    from cartridges.stages.distillation.init.prefix import init_used

    run_training(synthesized_run, tiny, config(steps=2, warmup_steps=0, init="matched", fitted_start_lr=1e-3), LOCAL)
    rates = [json.loads(line)["lr"] for line in synthesized_run.metrics.read_text().splitlines()]
    # Cosine decay over 2 steps without warmup: half the peak after the first step, zero after the second.
    assert rates == [pytest.approx(0.5e-3), pytest.approx(0.0, abs=1e-12)]
    assert init_used(synthesized_run) == "matched"
    assert for_start(config(), "first_tokens").lr == 1e-2 and for_start(config(), "matched_omp").lr == 1e-3
    assert for_start(config(fitted_start_lr=None), "matched_omp").lr == 1e-2


def test_a_long_training_log_becomes_a_curve_of_at_most_curve_points_steps_with_every_evaluation(tmp_path):
    import json

    from cartridges.stages.distillation.artifact import CURVE_POINTS, training_curve
    from cartridges.stages.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    run.metrics.parent.mkdir(parents=True, exist_ok=True)
    records = [{"step": s, "kd": 1 / s, "ce": 2.0, "topk_kl": 3 / s, "lr": 0.1} for s in range(1, 1025)]
    for record in records[99::100]:
        record |= {"eval_topk_kl": record["step"] / 1000, "qa_gold_nll": 5.0}
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    curve = training_curve(run)
    assert len(curve["step"]) <= CURVE_POINTS and curve["step"][0] == 1 and curve["step"][-1] == 1024
    assert all(curve["kd"][i] == 1 / step for i, step in enumerate(curve["step"]))
    assert curve["eval_step"] == [float(s) for s in range(100, 1025, 100)]
    assert curve["eval_topk_kl"] == [s / 1000 for s in range(100, 1025, 100)] and curve["qa_gold_nll"] == [5.0] * 10
