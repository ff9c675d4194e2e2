"""Registries on an object store: an S3-compatible server on 127.0.0.1 and the real s3fs client (issue 18)."""

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

from cartridges.registry.store import Registry

QUESTION = "How many days notice must a landlord give?"


def ask_in_fresh_process(home: Path, registry: str, model: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cartridges.pipeline.cli", "ask", "legal@1", QUESTION, "--model", str(model)]
    command += ["--registry", registry, "--max-new-tokens", "12"]
    env = os.environ | {"CARTRIDGES_HOME": str(home)}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


class FrozenClock(datetime):
    """The manifest's `created_at` (bound into the payload's checksum) the same for both builds, which
    on a slow machine can fall into different seconds."""

    @classmethod
    def now(cls, tz=None):
        return datetime(2026, 1, 1, tzinfo=tz)


def test_ask_from_a_fresh_process_reads_the_cartridge_from_s3(
    cli, s3_bucket, corpus_dir, lively_model_dir, tmp_path, monkeypatch
):
    """Published to s3:// by one process, answered by another whose home holds nothing: the answer is the
    one the same artifact gives from a local registry, and the fresh home now caches it by digest."""
    monkeypatch.setattr("cartridges.artifact.manifest.datetime", FrozenClock)
    remote = f"{s3_bucket}/registry"
    code, _, err = cli("init", "--corpus", str(corpus_dir), "--model", str(lively_model_dir), "--tokens", "16")
    assert code == 0, err
    code, _, err = cli(
        "init", "--corpus", str(corpus_dir), "--model", str(lively_model_dir), "--tokens", "16", "--registry", remote
    )
    assert code == 0, err
    local = str(Path(os.environ["CARTRIDGES_HOME"]) / "registry")
    assert Registry(remote).show("legal@1").files == Registry(local).show("legal@1").files

    fresh_home = tmp_path / "fresh-home"
    from_s3 = ask_in_fresh_process(fresh_home, remote, lively_model_dir)
    from_folder = ask_in_fresh_process(tmp_path / "other-home", local, lively_model_dir)
    assert from_s3.returncode == 0, from_s3.stderr
    assert from_s3.stdout.strip() and from_s3.stdout == from_folder.stdout
    assert not (fresh_home / "registry").exists()
    [cached] = (fresh_home / "cache" / "artifacts").iterdir()
    assert (cached / "manifest.json").read_bytes() == Registry(remote).manifest_bytes("legal", 1)


def test_a_run_mirror_copies_what_the_other_side_lacks_and_never_shortens_a_file(s3_bucket, tmp_path):
    from cartridges.stages.run_dir import RunDir
    from cartridges.stages.run_mirror import RunMirror

    here = RunMirror(RunDir(tmp_path / "a"), f"{s3_bucket}/runs/r1")
    there = RunMirror(RunDir(tmp_path / "b"), here.url)
    step = here.local.checkpoints / "step-000001"
    step.mkdir(parents=True)
    (step / "tensors.safetensors").write_bytes(b"t" * 100)
    (step / "state.json").write_text("{}")
    here.local.metrics.write_text('{"step": 1}\n')
    (here.local.root / "build.lock").write_text("")
    assert here.push_all() == 3  # the lock stays on its machine
    assert there.pull() == 3 and not (there.local.root / "build.lock").exists()
    assert (there.local.checkpoints / "step-000001" / "tensors.safetensors").read_bytes() == b"t" * 100

    with here.local.metrics.open("a") as log:
        log.write('{"step": 2}\n')
    assert here.push(here.local.metrics) == 1 and here.push(here.local.metrics) == 0
    assert there.pull("distill/metrics.jsonl") == 1
    assert there.local.metrics.read_text().splitlines() == ['{"step": 1}', '{"step": 2}']
    there.local.metrics.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')  # a longer copy is never cut back
    assert there.pull() == 0 and len(there.local.metrics.read_text().splitlines()) == 3
    here.remove(here.local.metrics)  # gone from the store, kept here
    assert here.local.metrics.is_file() and here.push(here.local.metrics) == 1


def test_a_build_stopped_on_one_machine_resumes_on_another_from_the_runs_root(
    monkeypatch, s3_bucket, tiny_model_dir, long_corpus, tmp_path
):
    """Machine A synthesizes and stops in training; machine B (another home, nothing shared but the store)
    makes no shard again and publishes the cartridge an uninterrupted build makes."""
    from test_build import Killed, kill_after

    from cartridges.artifact.folder import load_artifact
    from cartridges.pipeline.build import build
    from cartridges.pipeline.build_config import load_build_config

    settings = [f"model={tiny_model_dir}", "distill.steps=3", f"runs_root={s3_bucket}/runs"]
    config = load_build_config("tiny", settings)
    monkeypatch.setenv("CARTRIDGES_HOME", str(tmp_path / "reference"))
    reference = Registry(tmp_path / "reference" / "registry")
    build(long_corpus, "legal", config, reference)
    expected = load_artifact(reference.local_path("legal@1")).prompt_embeddings

    config = load_build_config("tiny", [*settings[:2], f"runs_root={s3_bucket}/other-runs"])
    registry = Registry(f"{s3_bucket}/registry")
    monkeypatch.setenv("CARTRIDGES_HOME", str(tmp_path / "machine-a"))
    restore = kill_after(
        monkeypatch, "cartridges.stages.distillation.worker.save_checkpoint", 1
    )  # after its first checkpoint
    with pytest.raises(Killed):
        build(long_corpus, "legal", config, registry)
    restore()
    import s3fs

    stored = s3fs.S3FileSystem(skip_instance_cache=True)
    assert stored.glob(f"{s3_bucket}/other-runs/*/distill/checkpoints/step-000001/state.json")  # pushed by A
    monkeypatch.setenv("CARTRIDGES_HOME", str(tmp_path / "machine-b"))
    result = build(long_corpus, "legal", config, registry)
    assert result.built and result.ref == "legal@1"
    assert result.synthesis.shards_made_this_run == 0 and result.synthesis.samples == config.synthesis.samples
    metrics = result.run.metrics.read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3]  # step 1 on A; B resumed at its checkpoint
    got = load_artifact(registry.local_path("legal@1")).prompt_embeddings
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


PUBLISH_AND_DIE_AFTER_THE_CLAIM = """
import os, sys
from pathlib import Path
from cartridges.registry.store import Registry
registry = Registry(sys.argv[1])
real_move = registry.fs.mv
def move_one_then_die(*args, **kwargs):
    real_move(*args, **kwargs)
    os._exit(9)  # killed after the number was claimed and one file moved in, before the manifest
registry.fs.mv = move_one_then_die
registry.publish(Path(sys.argv[2]), "legal")
"""


def test_gc_clears_the_files_of_an_unfinished_publish_on_s3_and_keeps_its_number(s3_bucket, tmp_path):
    from registry_helpers import fake_artifact

    from cartridges.pipeline.gc import collect_garbage, parse_age

    registry = Registry(f"{s3_bucket}/registry")
    registry.publish(fake_artifact(tmp_path / "a"), "legal")
    killed = subprocess.run(
        [sys.executable, "-c", PUBLISH_AND_DIE_AFTER_THE_CLAIM, registry.url, str(fake_artifact(tmp_path / "b"))],
        env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert killed.returncode == 9
    assert registry.versions("legal") == [1] and registry.claimed("legal") == [1, 2]
    assert len(registry.fs.find(registry.path("legal", 2))) == 2  # the claim and one payload file
    assert collect_garbage(registry, parse_age("1h")) == []  # too young: it may be a live publish
    [removal] = [r for r in collect_garbage(registry, 0) if r.path == registry.path("legal", 2)]
    assert "did not finish" in removal.reason
    assert registry.fs.find(registry.path("legal", 2)) == [registry.path("legal", 2, "claim.json")]
    assert registry.publish(fake_artifact(tmp_path / "c"), "legal").version == 3  # 2 stays taken
    assert [s.path for s in registry.list().skipped] == ["legal/2"]


def test_a_writing_command_never_creates_a_bucket(cli, s3_bucket, corpus_dir, tiny_model_dir):
    """`init --registry s3://<mistyped bucket>/reg` created the bucket and published into it."""
    import s3fs

    typo = s3_bucket.removeprefix("s3://") + "-typo"
    code, _, err = cli(
        "init",
        "--corpus",
        str(corpus_dir),
        "--model",
        str(tiny_model_dir),
        "--tokens",
        "8",
        "--registry",
        f"s3://{typo}/reg",
    )
    assert code == 2 and f"bucket '{typo}' does not exist" in err and "Traceback" not in err
    assert not s3fs.S3FileSystem(skip_instance_cache=True).exists(typo)


@pytest.mark.parametrize(
    "environment, message",
    [
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:1"}, "cannot reach the object store"),
        ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, "no credentials for the object store"),
    ],
    ids=["endpoint-down", "no-credentials"],
)
def test_a_store_that_cannot_be_reached_or_used_is_one_line(tmp_path, environment, message):
    """In a fresh process (s3fs keeps clients per process): a 60-line NoCredentialsError traceback before."""
    from s3_server import S3_ENV

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | S3_ENV
    env |= {"AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    env = {k: v for k, v in (env | environment).items() if v is not None}
    command = [sys.executable, "-m", "cartridges.pipeline.cli", "ls", "--registry", "s3://some-bucket/reg"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
        done.stderr
    )
