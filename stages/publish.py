"""The publish stage: the trained prefix as an immutable registry version (a PEFT adapter plus manifest)."""

from dataclasses import dataclass

from cartridges.models import LoadedModel
from cartridges.registry.store import Registry
from cartridges.stages.config import BuildConfig
from cartridges.stages.distillation.artifact import TrainedRun, save_distilled
from cartridges.stages.records import DistillRecord, EvaluationRecord, IngestRecord, PublishedRecord, SynthesisSummary
from cartridges.stages.run_mirror import RunMirror


@dataclass(frozen=True)
class PublishInputs:
    model: LoadedModel
    name: str
    registry: Registry
    ingested: IngestRecord
    synthesis: SynthesisSummary
    distilled: DistillRecord
    evaluation: EvaluationRecord | None = None


def run(mirror: RunMirror, inputs: PublishInputs, config: BuildConfig) -> PublishedRecord:
    """Write the artifact into the run folder, then publish it; a run killed after publishing but before
    recording it finds its version instead of publishing a twin."""
    run_dir = mirror.local
    if not run_dir.artifact.exists():  # written atomically: a folder that exists is complete
        trained = TrainedRun(
            run_dir,
            inputs.ingested,
            inputs.synthesis,
            config.distill,
            inputs.distilled.parent,
            inputs.evaluation.metrics if inputs.evaluation else {},
        )
        save_distilled(inputs.model, trained, inputs.name, run_dir.artifact)
    registry = inputs.registry
    manifest = registry.find_published(inputs.name, run_dir.artifact) or registry.publish(run_dir.artifact, inputs.name)
    return PublishedRecord(ref=manifest.label, config_fingerprint=config.fingerprint(), metrics=manifest.metrics)
