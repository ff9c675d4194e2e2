"""The documented cluster recipe (docs/cluster/rayjob.yaml) asks for what this version accepts."""

import shlex
from pathlib import Path

import yaml

from cartridges.pipeline.build_config import load_build_config

RECIPE = Path(__file__).resolve().parents[1] / "docs" / "cluster" / "rayjob.yaml"


def test_the_rayjob_recipe_runs_a_valid_build_with_its_state_on_the_object_store(cli):
    job = yaml.safe_load(RECIPE.read_text())
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:2] == ["cartridges", "build"]
    options = command[3:]
    overrides = [options[i + 1] for i, option in enumerate(options) if option == "--set"]
    config_name = options[options.index("--config") + 1]
    config = load_build_config(config_name, [o for o in overrides if not o.startswith("model=")])
    assert config.synthesis_run.gpus_per_engine == 1 and config.distill_run.use_gpu
    code, usage, _ = cli("build", "--help")  # every option the recipe passes exists
    assert code == 0
    for option in {o for o in options if o.startswith("--")}:
        assert option in usage, f"{option} is not an option of `cartridges build`"

    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["CARTRIDGES_REGISTRY"].startswith("s3://") and env["CARTRIDGES_RUNS"].startswith("s3://")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the scheduler actor and the stages stay off the head


def test_the_runs_root_comes_from_the_config_else_the_environment(monkeypatch):
    monkeypatch.delenv("CARTRIDGES_RUNS", raising=False)
    assert load_build_config("tiny").runs_url() is None
    monkeypatch.setenv("CARTRIDGES_RUNS", "s3://bucket/runs")
    assert load_build_config("tiny").runs_url() == "s3://bucket/runs"
    assert load_build_config("tiny", ["runs_root=gs://other/runs"]).runs_url() == "gs://other/runs"
    assert (
        load_build_config("tiny", ["runs_root=gs://other/runs"]).fingerprint()
        == load_build_config("tiny").fingerprint()
    )
