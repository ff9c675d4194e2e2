"""A trained prefix as a published artifact: the distilled cartridge's manifest (config, data
fingerprint, warm start, reuse, final training metrics, evaluation) and its files."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from cartridges.artifact import NUM_FROZEN_TOKENS, cartridge_peft_config, describe_model, save_artifact
from cartridges.manifest import CorpusInfo, Manifest
from cartridges.stages.distill import DistillConfig
from cartridges.stages.records import IngestRecord, SynthesisSummary
from cartridges.stages.run_dir import RunDir
from cartridges.stages.training_data import data_fingerprint


def final_metrics(run: RunDir) -> dict[str, float]:
    """The last value of each metric in the training log."""
    metrics: dict[str, float] = {}
    for line in run.metrics.read_text().splitlines():
        metrics |= {k: float(v) for k, v in json.loads(line).items() if isinstance(v, (int, float))}
    return metrics


@dataclass(frozen=True)
class TrainedRun:
    """A run whose training finished: what its manifest says about the corpus, the data and the start."""

    run: RunDir
    ingested: IngestRecord
    synthesis: SynthesisSummary
    config: DistillConfig
    parent: str | None = None  # the version training warm-started from
    evaluation: dict[str, float] = field(default_factory=dict)


def publishable_manifest(loaded, trained: TrainedRun, name: str) -> Manifest:
    """The manifest of a distilled cartridge: config, data fingerprint, init, final training metrics and any evaluation."""
    ingested, synthesis = trained.ingested, trained.synthesis
    return Manifest(
        name=name,
        **describe_model(loaded),
        num_tokens=trained.config.num_tokens,
        num_frozen_tokens=NUM_FROZEN_TOKENS,
        dtype=trained.config.precision,
        corpus=[
            CorpusInfo(
                fingerprint=ingested.corpus_fingerprint,
                num_documents=ingested.num_documents,
                num_tokens=ingested.num_tokens,
                source=ingested.source,
            )
        ],
        method="distilled",
        method_config=trained.config.model_dump()
        | {
            "data_fingerprint": data_fingerprint(trained.run.shards),
            "run": str(trained.run.root),
            "warm_start_from": trained.parent,
            "reused_samples": synthesis.reused,
            "reused_from": synthesis.reused_from,
        },
        parent=trained.parent,
        metrics=final_metrics(trained.run) | trained.evaluation,
    )


def save_distilled(loaded, trained: TrainedRun, name: str, destination: Path):
    """Write the trained prefix as a cartridge artifact (a PEFT adapter plus manifest)."""
    prefix = load_file(str(trained.run.final_prefix))["prefix"]
    manifest = publishable_manifest(loaded, trained, name)
    return save_artifact(
        destination, prefix, cartridge_peft_config(loaded.model.config, trained.config.num_tokens, 1), manifest
    )
