"""The one wiring of the stages: any run of consecutive stages hands on through the run folder, so a
build done in parts (as `cartridges synthesize` then `cartridges distill`) publishes what one whole build
publishes."""

import pytest
import torch

from cartridges.artifact.folder import load_artifact
from cartridges.errors import CartridgeError
from cartridges.pipeline.build_config import load_build_config
from cartridges.pipeline.stage_runner import StageJob, run_stages
from cartridges.registry.store import Registry
from cartridges.stages.ingest import read_corpus
from cartridges.stages.run_dir import RunDir
from cartridges.stages.run_mirror import RunMirror


def test_stages_run_in_parts_publish_what_a_whole_run_publishes(tiny, tiny_model_dir, long_corpus, tmp_path):
    config = load_build_config("tiny", [f"model={tiny_model_dir}"])
    corpus = read_corpus(long_corpus)
    registry = Registry(tmp_path / "registry")

    def job(folder: str, *stages: str, name: str) -> StageJob:
        mirror = RunMirror(RunDir(tmp_path / folder), None)
        return StageJob(mirror, tiny, config, stages, corpus=corpus, name=name, registry=registry)

    whole = run_stages(job("whole", "ingest", "synthesize", "distill", "evaluate", "publish", name="whole"))
    parts = [("ingest",), ("synthesize",), ("distill",), ("publish",)]
    records = [run_stages(job("parts", *stages, name="parts")) for stages in parts]
    assert set(records[0].seconds) == {"ingest"} and records[0].synthesis is None  # nothing later was read
    assert records[-1].published.ref == "parts@1" and records[-1].distilled == whole.distilled
    prefixes = [load_artifact(registry.local_path(ref)).prompt_embeddings for ref in ("whole@1", "parts@1")]
    assert torch.equal(*prefixes)
    assert run_stages(job("parts", "publish", name="parts")).distilled is None  # published: nothing runs


def test_a_stage_needs_the_records_of_the_stages_before_it(tiny, tiny_model_dir, tmp_path):
    config = load_build_config("tiny", [f"model={tiny_model_dir}"])
    empty = RunMirror(RunDir(tmp_path / "empty"), None)
    with pytest.raises(CartridgeError, match=r"has no summary.json yet: run the synthesize stage first"):
        run_stages(StageJob(empty, tiny, config, ("distill",)))
    with pytest.raises(CartridgeError, match="unknown stage 'train'"):
        run_stages(StageJob(empty, tiny, config, ("train",)))
