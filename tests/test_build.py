"""`cartridges build` end to end on the tiny config; configs validated with errors that name the key."""

import json

import pyarrow.parquet as pq
import pytest
import torch

from cartridges.errors import CartridgeError
from cartridges.pipeline.build_config import CONFIGS_DIR, load_build_config


def test_shipped_configs_validate():
    for path in sorted(CONFIGS_DIR.glob("*.yaml")):
        load_build_config(str(path))
    default = load_build_config("default")
    assert default.distill.lr == pytest.approx(6e-3) and set(default.synthesis.kinds) == {
        "quote",
        "continuation",
        "fill_span",
    }


def test_the_code_defaults_are_the_default_config():
    """Defaults are defined once: `configs/default.yaml` states them for a reader, it changes nothing."""
    from cartridges.stages.config import BuildConfig

    assert BuildConfig() == load_build_config("default")
    assert BuildConfig().fingerprint() == load_build_config("default").fingerprint()


def test_a_users_yaml_of_one_key_changes_that_key_only(tmp_path):
    """Issue 37: `--config my.yaml` took the code defaults of the old recipe for every key it did not set
    (96 steps at 2e-3, 256 samples, 2,048-token chunks) instead of the default build's."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("distill:\n  num_tokens: 512\n")
    default, changed = load_build_config("default").model_dump(), load_build_config(str(mine)).model_dump()
    assert changed["distill"].pop("num_tokens") == 512 and default["distill"].pop("num_tokens") == 256
    assert changed == default


def test_overrides_apply_and_only_decisive_settings_change_the_fingerprint():
    base = load_build_config("tiny")
    assert load_build_config("tiny", ["distill.steps=7"]).distill.steps == 7
    assert load_build_config("tiny", ["distill.steps=7"]).fingerprint() != base.fingerprint()
    assert load_build_config("tiny", ["distill_run.threads=1"]).fingerprint() == base.fingerprint()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["distill.stepz=3"], r"distill\.stepz': Extra inputs are not permitted"),
        (["distill.lr=-1"], r"distill\.lr': Input should be greater than 0"),
        (["synthesis.kinds={magic: 1}"], r"synthesis\.kinds': Value error, unknown seed kind"),
        (["steps"], "expected KEY=VALUE"),
    ],
)
def test_bad_settings_name_the_key(overrides, message):
    with pytest.raises(CartridgeError, match=message):
        load_build_config("tiny", overrides)


def test_a_config_written_before_the_rename_of_training_to_distill_run_still_loads(tmp_path):
    older = tmp_path / "older.yaml"
    older.write_text("training:\n  executor: local\n  workers: 2\n")
    config = load_build_config(str(older))
    assert (config.distill_run.executor, config.distill_run.workers) == ("local", 2)
    newer = tmp_path / "newer.yaml"
    newer.write_text(older.read_text().replace("training:", "distill_run:"))
    assert load_build_config(str(newer)) == config


def test_unknown_config_names_the_shipped_ones():
    with pytest.raises(CartridgeError, match="neither a YAML file nor a shipped config .*default.*tiny"):
        load_build_config("nonexistent")


def test_build_publishes_a_distilled_cartridge_and_a_second_run_does_nothing(
    cli, tiny_model_dir, long_corpus, cartridges_home
):
    args = ["build", str(long_corpus), "--name", "legal", "--config", "tiny", "--set", f"model={tiny_model_dir}"]
    code, out, err = cli(*args)
    assert code == 0, err
    assert "published legal@1" in out and "4 samples" in out
    manifest = json.loads((cartridges_home / "registry" / "legal" / "1" / "manifest.json").read_text())
    assert manifest["method"] == "distilled" and manifest["num_tokens"] == 8 and manifest["method_config"]["steps"] == 2
    # the typed subset of the training log, not how the run went (threads, tokens/s, ETA)
    assert set(manifest["metrics"]) == {"steps", "samples", "kd", "ce", "topk_kl"}
    assert (manifest["metrics"]["steps"], manifest["metrics"]["samples"]) == (2, 4)
    run = next((cartridges_home / "runs").glob("legal-*"))
    logged = json.loads((run / "distill" / "metrics.jsonl").read_text().splitlines()[-1])
    assert manifest["metrics"]["kd"] == logged["kd"] and "eta_seconds" in logged
    every_step = [json.loads(line) for line in (run / "distill" / "metrics.jsonl").read_text().splitlines()]
    curve = manifest["method_config"]["training_curve"]  # the registry page's plot: every step of this short run
    assert curve["step"] == [r["step"] for r in every_step] and curve["kd"] == [r["kd"] for r in every_step]
    assert curve["eval_topk_kl"] == [r["eval_topk_kl"] for r in every_step if "eval_topk_kl" in r]
    handed_on = json.loads((run / "distill" / "record.json").read_text())  # the distill stage's record
    assert handed_on == {"steps": 2, "parent": None, "init": "first_tokens", "metrics": manifest["metrics"]}
    code, out, err = cli(*args)
    assert code == 0 and "nothing to do: legal@1" in out
    assert not (cartridges_home / "registry" / "legal" / "2").exists()


def test_an_edited_corpus_rebuilds_warm_started_from_the_previous_version(
    cli, tiny_model_dir, long_corpus, cartridges_home
):
    from safetensors.torch import load_file

    from cartridges.artifact.folder import load_artifact
    from cartridges.pipeline.build import build_run_dir
    from cartridges.pipeline.build_config import load_build_config
    from cartridges.registry.store import Registry

    args = ["build", str(long_corpus), "--name", "legal", "--config", "tiny", "--set", f"model={tiny_model_dir}"]
    code, out, err = cli(*args)
    assert code == 0 and "steps from the first_tokens init" in " ".join(out.split()), err  # rich wraps lines
    (long_corpus / "amendment.txt").write_text(
        "Section 61. A landlord must return the deposit within thirty days. " * 6
    )
    code, out, err = cli(*args)
    assert code == 0 and "published legal@2" in out and "warm-started from legal@1" in out, err
    registry = Registry(cartridges_home / "registry")
    second = registry.show("legal@2")
    assert second.parent == "legal@1" and second.method_config["warm_start_from"] == "legal@1"
    assert second.method_config["init_used"] == "warm_start"
    first_prefix = load_artifact(registry.local_path("legal@1")).prompt_embeddings
    runs = sorted((cartridges_home / "runs").glob("legal-*"), key=lambda p: (p / "published.json").stat().st_mtime)
    # Every sample of the unchanged statute is taken from the first run; those of the new file are made.
    documents = pq.read_table(runs[-1] / "documents.parquet").column("path").to_pylist()
    rows = pq.read_table(runs[-1] / "synthesis" / "shards").to_pylist()
    unchanged = [row for row in rows if documents[row["doc_id"]] == "statute.txt"]
    assert second.method_config["reused_samples"] == len(unchanged) > 0 and second.method_config["reused_from"] == str(
        runs[0]
    )
    assert f"{len(unchanged)} reused from" in out
    assert load_file(str(runs[-1] / "distill" / "init_prefix.safetensors"))["prefix"].equal(first_prefix)
    assert build_run_dir("legal", "x", load_build_config("tiny")) != build_run_dir(
        "legal", "x", load_build_config("tiny", ["warm_start=false"])
    )


class Killed(Exception):
    pass


def kill_after(monkeypatch, target: str, calls: int):
    """Make `target` (module.attr) raise after it has run `calls` times, like a process killed there."""
    module_name, attr = target.rsplit(".", 1)
    import importlib

    owner = importlib.import_module(module_name)
    original, done = getattr(owner, attr), []

    def wrapper(*args, **kwargs):
        if len(done) >= calls:
            raise Killed(target)
        done.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, wrapper)
    return lambda: monkeypatch.setattr(owner, attr, original)


def test_a_build_killed_in_synthesis_and_in_training_resumes_to_the_same_cartridge(
    monkeypatch, tiny_model_dir, long_corpus, tmp_path
):
    from cartridges.artifact.folder import load_artifact
    from cartridges.pipeline.build import build
    from cartridges.pipeline.build_config import load_build_config
    from cartridges.registry.store import Registry

    config = load_build_config("tiny", [f"model={tiny_model_dir}", "distill.steps=3"])
    monkeypatch.setenv("CARTRIDGES_HOME", str(tmp_path / "reference"))
    reference = Registry(tmp_path / "reference" / "registry")
    build(long_corpus, "legal", config, reference)

    monkeypatch.setenv("CARTRIDGES_HOME", str(tmp_path / "resumed"))
    resumed = Registry(tmp_path / "resumed" / "registry")
    restore = kill_after(
        monkeypatch, "cartridges.stages.synthesis.synthesize.write_shard", 1
    )  # dies after its first shard
    with pytest.raises(Killed):
        build(long_corpus, "legal", config, resumed)
    restore()
    restore = kill_after(
        monkeypatch, "cartridges.stages.distillation.worker.save_checkpoint", 1
    )  # dies after its first checkpoint
    with pytest.raises(Killed):
        build(long_corpus, "legal", config, resumed)
    restore()
    result = build(long_corpus, "legal", config, resumed)
    assert result.built and result.ref == "legal@1"
    expected = load_artifact(reference.local_path("legal@1")).prompt_embeddings
    got = load_artifact(resumed.local_path("legal@1")).prompt_embeddings
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


def test_build_with_held_out_questions_records_their_scores_in_the_manifest(
    cli, tiny_model_dir, long_corpus, cartridges_home, tmp_path
):
    from cartridges.stages.ingest import read_corpus

    qa = tmp_path / "qa.json"
    pairs = [
        ("When is rent due?", "before day 3"),
        ("How much in unit 5?", "50 dollars"),
        ("And unit 7?", "70 dollars"),
    ]
    questions = [{"id": str(i), "question": q, "answer": a, "answer_type": "value"} for i, (q, a) in enumerate(pairs)]
    qa.write_text(
        json.dumps({"corpora": [{"id": "statute", "text": read_corpus(long_corpus).text, "questions": questions}]})
    )
    args = [
        "build",
        str(long_corpus),
        "--config",
        "tiny",
        "--set",
        f"model={tiny_model_dir}",
        "--qa",
        str(qa),
        "--qa-corpus",
        "statute",
    ]
    code, out, err = cli(*args)
    assert code == 0 and "evaluate" in out and "qa_cartridge_nll" in out, err
    metrics = json.loads(cli("show", "legal@1")[1])["metrics"]
    # The same numbers, computed independently by `cartridges eval` on the published cartridge and with no context.
    for method, eval_args in (
        ("cartridge", ["--cartridge", "legal@1"]),
        ("none", ["--method", "none", "--model", str(tiny_model_dir)]),
    ):
        out_file = tmp_path / f"{method}.json"
        assert cli("eval", *eval_args, "--qa", str(qa), "--out", str(out_file))[0] == 0
        score = json.loads(out_file.read_text())["scores"][0]
        assert metrics[f"qa_{method}_nll"] == pytest.approx(score["nll"], abs=1e-5)
        assert metrics[f"qa_{method}_rank_accuracy"] == score["rank_accuracy"]
    assert "qa_start_nll" in metrics
    # Training logged the same gold NLL at its last step, from inside the training loop.
    assert metrics["qa_gold_nll"] == pytest.approx(metrics["qa_cartridge_nll"], abs=1e-4)


def test_build_qa_options_come_together(cli, long_corpus):
    code, _, err = cli("build", str(long_corpus), "--config", "tiny", "--qa-corpus", "statute")
    assert code == 2 and "--qa-corpus needs --qa FILE" in err and "Traceback" not in err


def test_a_second_build_of_the_same_run_while_one_holds_it_fails_with_the_fix(
    cli, tiny_model_dir, long_corpus, cartridges_home
):
    from filelock import FileLock

    from cartridges.stages.run_dir import RunDir

    args = ["build", str(long_corpus), "--name", "legal", "--config", "tiny", "--set", f"model={tiny_model_dir}"]
    assert cli(*args)[0] == 0
    (run_dir,) = (cartridges_home / "runs").glob("legal-*")
    with FileLock(RunDir(run_dir).lock):  # what a build still running elsewhere holds
        code, out, err = cli(*args)
    assert (
        code == 2
        and "another build of 'legal' with this corpus and config is running" in err
        and "Traceback" not in err
    )
    code, out, err = cli(*args)  # the lock is free again
    assert code == 0 and "nothing to do: legal@1" in out


# ---- issue 14: a build never publishes a non-finite cartridge --------------------------------


def poison_training_at(monkeypatch, bad_step: int) -> None:
    """The distillation loss turns NaN at training step `bad_step` (a fault no config can cause since lr is bounded)."""
    from cartridges.stages.distillation import train as distill
    from cartridges.stages.distillation.training_data import distillation_loss

    steps = []

    def poisoned(logits, batch, ce_weight=0.0):
        loss, stats = distillation_loss(logits, batch, ce_weight)
        if not torch.is_grad_enabled():  # the held-out evaluation
            return loss, stats
        steps.append(1)
        return (loss * float("nan") if len(steps) == bad_step else loss), stats

    monkeypatch.setattr(distill, "distillation_loss", poisoned)


def _registry_files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("bad_step", sorted(__import__("random").Random(14).sample(range(1, 5), 2)))
def test_a_build_whose_training_goes_non_finite_publishes_nothing_and_the_schedule_keeps_the_last_good_version(
    monkeypatch, tiny_model_dir, long_corpus, cartridges_home, bad_step
):
    from datetime import UTC, datetime, timedelta

    from cartridges.pipeline.scheduler import Scheduler, build_schedule
    from cartridges.registry.store import Registry

    registry = Registry(cartridges_home / "registry")
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    scheduler = Scheduler(registry, build_schedule(registry.url), lambda: now[0])
    overrides = [f"model={tiny_model_dir}", "distill.steps=4", "distill.checkpoint_every=1"]
    scheduler.add("legal", str(long_corpus), "0 2 * * *", config="tiny", overrides=overrides)
    now[0] += timedelta(hours=2)
    assert [o.status for o in scheduler.tick()] == ["published"]
    before = _registry_files(cartridges_home / "registry" / "legal")

    (long_corpus / "amendment.txt").write_text(
        "Section 61. A landlord must return the deposit within thirty days. " * 6
    )
    poison_training_at(monkeypatch, bad_step)
    now[0] += timedelta(days=1)
    [outcome] = scheduler.tick()
    assert outcome.status == "failed" and f"training stopped at step {bad_step}: the loss is nan" in outcome.detail
    assert _registry_files(cartridges_home / "registry" / "legal") == before
    assert not list((cartridges_home / "registry").glob(".staging/*"))
    assert registry.resolve("legal@latest") == ("legal", 1)
    assert registry.verify("legal@latest").version == 1
    run = max((cartridges_home / "runs").glob("legal-*"), key=lambda p: p.stat().st_mtime)
    assert sorted(p.name for p in run.glob("distill/checkpoints/step-*")) == [
        f"step-{s:06d}" for s in range(1, bad_step)
    ]


def test_a_build_that_diverges_is_one_line_on_the_command_line(
    cli, monkeypatch, tiny_model_dir, long_corpus, cartridges_home
):
    poison_training_at(monkeypatch, 1)
    code, _, err = cli(
        "build", str(long_corpus), "--name", "legal", "--config", "tiny", "--set", f"model={tiny_model_dir}"
    )
    assert (
        code == 2
        and err.strip().splitlines()[-1].startswith("error: training stopped at step 1")
        and "Traceback" not in err
    )
    assert not (cartridges_home / "registry" / "legal").exists()


def test_warm_start_refuses_a_damaged_parent(cli, tiny_model_dir, long_corpus, cartridges_home):
    from safetensors.torch import save_file

    from cartridges.artifact.integrity import bound_metadata
    from cartridges.artifact.manifest import ADAPTER_WEIGHTS_FILE, Manifest
    from cartridges.hashing import sha256_file

    args = ["build", str(long_corpus), "--name", "legal", "--config", "tiny", "--set", f"model={tiny_model_dir}"]
    assert cli(*args)[0] == 0
    # An older tool published a NaN prefix with matching checksums.
    version = cartridges_home / "registry" / "legal" / "1"
    manifest = Manifest.read(version)
    save_file(
        {"prompt_embeddings": torch.full((8, 128), float("nan"))},
        str(version / ADAPTER_WEIGHTS_FILE),
        metadata=bound_metadata(manifest),
    )
    (version / "manifest.json").write_text(
        manifest.model_copy(
            update={"files": manifest.files | {ADAPTER_WEIGHTS_FILE: sha256_file(version / ADAPTER_WEIGHTS_FILE)}}
        ).to_json()
    )
    (long_corpus / "amendment.txt").write_text(
        "Section 61. A landlord must return the deposit within thirty days. " * 6
    )
    code, _, err = cli(*args)
    assert (
        code == 2
        and "cannot warm-start from legal@latest" in err
        and "NaN or infinite" in err
        and "warm_start=false" in err
    )
    code, out, err = cli(*args, "--set", "warm_start=false")
    assert code == 0 and "published legal@2" in out, err


def test_the_build_summary_reports_skipped_files_with_the_reason(cli, tiny_model_dir, long_corpus):
    (long_corpus / "scan.png").write_bytes(b"\x89PNG\x00\x00")
    (long_corpus / "copy.txt").write_text((long_corpus / "statute.txt").read_text())
    code, out, err = cli(
        "build", str(long_corpus), "--name", "legal", "--config", "tiny", "--set", f"model={tiny_model_dir}"
    )
    assert code == 0 and "published legal@1" in out, err
    assert (
        "skipped 2 file(s) or folder(s): scan.png (unsupported file type .png); statute.txt (same text as copy.txt)"
        in err
    )


def test_config_show_prints_what_a_build_with_those_flags_uses(cli, tmp_path):
    import yaml

    mine = tmp_path / "mine.yaml"
    mine.write_text("distill:\n  num_tokens: 512\n")
    code, out, err = cli("config", "show", "--config", str(mine), "--set", "distill.steps=64")
    assert code == 0, err
    shown = yaml.safe_load(out)
    assert shown == load_build_config(str(mine), ["distill.steps=64"]).model_dump(mode="json")
    assert (shown["distill"]["num_tokens"], shown["distill"]["steps"], shown["distill"]["lr"]) == (512, 64, 0.006)
