"""The synthesize stage: self-study conversations with the teacher's top-k log-probabilities, as shards."""

from dataclasses import dataclass

from cartridges.models import ModelRef
from cartridges.stages.config import BuildConfig
from cartridges.stages.records import IngestRecord, SynthesisSummary
from cartridges.stages.run_dir import RunDir
from cartridges.stages.run_mirror import RunMirror
from cartridges.stages.synthesis.synthesize import synthesize


@dataclass(frozen=True)
class SynthesisInputs:
    ingested: IngestRecord  # the ingest stage's record (its chunks are in the run folder)
    model: ModelRef  # the teacher: engines load it themselves, in this process or in Ray actors
    reuse_from: RunDir | None = None  # an earlier run whose samples of unchanged chunks are taken


def run(mirror: RunMirror, inputs: SynthesisInputs, config: BuildConfig) -> SynthesisSummary:
    """Make every missing shard of `config.synthesis`'s plan, run as `config.synthesis_run` says; each
    shard is pushed to the run's object store copy as it is written. Returns `synthesis/summary.json`."""
    return synthesize(
        mirror.local, inputs.ingested, inputs.model, config.synthesis, config.synthesis_run, inputs.reuse_from, mirror
    )
