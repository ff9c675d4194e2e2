"""The distill stage: train the cartridge's prefix on the run's synthesis (resuming from its checkpoints),
starting from a warm-start version, or from the prefix `distill.init` makes."""

from dataclasses import dataclass

import torch

from cartridges.models import LoadedModel
from cartridges.stages.config import BuildConfig
from cartridges.stages.distillation.artifact import final_metrics
from cartridges.stages.distillation.init.prefix import init_used
from cartridges.stages.distillation.run import run_training
from cartridges.stages.records import DistillRecord, SynthesisSummary
from cartridges.stages.run_mirror import RunMirror


@dataclass(frozen=True)
class DistillInputs:
    model: LoadedModel
    synthesis: SynthesisSummary
    parent: str | None = None  # the published version training warm-starts from
    start_from: torch.Tensor | None = None  # its prefix (None: `distill.init`'s, or the run resumes)
    qa_pairs: tuple[tuple[str, str], ...] = ()  # held-out questions for gold NLL at every eval


def run(mirror: RunMirror, inputs: DistillInputs, config: BuildConfig) -> DistillRecord:
    """Train `config.distill` as `config.distill_run` says (in-process or Ray Train); the prefix is
    `distill/final_prefix.safetensors`, the step log `distill/metrics.jsonl`, the record `distill/record.json`."""
    run_training(
        mirror.local,
        inputs.model,
        config.distill,
        config.distill_run,
        list(inputs.qa_pairs),
        start_from=inputs.start_from,
        mirror=mirror,
    )
    record = DistillRecord(
        steps=config.distill.steps,
        parent=inputs.parent,
        init=init_used(mirror.local),
        metrics=final_metrics(mirror.local, inputs.synthesis.samples),
    )
    record.write(mirror.local.distill_record)
    return record
