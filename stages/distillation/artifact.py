"""A trained prefix as a published artifact: the distilled cartridge's manifest (config, data
fingerprint, warm start, reuse, final training metrics, evaluation) and its files."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file

from cartridges.artifact.folder import describe_model, save_artifact
from cartridges.artifact.manifest import CorpusInfo, Manifest
from cartridges.kv_layout import NUM_FROZEN_TOKENS, cartridge_peft_config
from cartridges.stages.distillation.config import DistillConfig
from cartridges.stages.distillation.init.prefix import init_used
from cartridges.stages.distillation.training_data import data_fingerprint
from cartridges.stages.records import IngestRecord, SynthesisSummary
from cartridges.stages.run_dir import RunDir


class TrainingMetrics(BaseModel):
    """What a distilled cartridge's manifest says of its training: the last value of each in the training
    log (`distill/metrics.jsonl`). How the run went (threads, tokens/s, ETA, learning rate) stays in the log."""

    model_config = ConfigDict(extra="ignore")

    steps: int = Field(validation_alias="step", description="optimizer steps taken")
    samples: int = Field(description="synthetic samples the run had (training and held out)")
    kd: float = Field(description="top-k distillation loss of the last step")
    ce: float = Field(description="cross-entropy of the sampled answer tokens, last step")
    topk_kl: float = Field(description="top-k KL to the teacher on the last step's batch")
    eval_topk_kl: float | None = Field(None, description="top-k KL on the held-out samples, last evaluation")
    qa_gold_nll: float | None = Field(None, description="gold-answer NLL of held-out questions (a build given --qa)")


def last_logged(run: RunDir) -> dict[str, float]:
    """The last value of each number in the training log."""
    last: dict[str, float] = {}
    for line in run.metrics.read_text().splitlines():
        last |= {k: float(v) for k, v in json.loads(line).items() if isinstance(v, (int, float))}
    return last


CURVE_POINTS = 400  # most training steps a manifest's curve keeps (evenly spaced, the last always)


def training_curve(run: RunDir) -> dict[str, list[float]]:
    """Loss and KL over steps from the training log, for plots of how a build trained (the registry page):
    `step`, `kd`, `ce` and `topk_kl` of the training batches, thinned to at most `CURVE_POINTS` steps, and
    `eval_step` with `eval_topk_kl` (and `qa_gold_nll` where scored) at every evaluation."""
    records = [json.loads(line) for line in run.metrics.read_text().splitlines() if line.strip()]
    stride = max(1, -(-len(records) // CURVE_POINTS))
    kept = [r for i, r in enumerate(records) if i % stride == 0 or i == len(records) - 1]
    curve = {key: [float(r[key]) for r in kept] for key in ("step", "kd", "ce", "topk_kl")}
    evaluated = [r for r in records if "eval_topk_kl" in r]
    curve["eval_step"] = [float(r["step"]) for r in evaluated]
    curve["eval_topk_kl"] = [float(r["eval_topk_kl"]) for r in evaluated]
    if evaluated and all("qa_gold_nll" in r for r in evaluated):
        curve["qa_gold_nll"] = [float(r["qa_gold_nll"]) for r in evaluated]
    return curve


def final_metrics(run: RunDir, samples: int) -> dict[str, float]:
    """The manifest's training metrics: the `TrainingMetrics` among the last values of the training log."""
    metrics = TrainingMetrics.model_validate(last_logged(run) | {"samples": samples}).model_dump(exclude_none=True)
    return {key: float(value) for key, value in metrics.items()}


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
            "init_used": init_used(trained.run),
            "reused_samples": synthesis.reused,
            "reused_from": synthesis.reused_from,
            "training_curve": training_curve(trained.run),
        },
        parent=trained.parent,
        metrics=final_metrics(trained.run, synthesis.samples) | trained.evaluation,
    )


def save_distilled(loaded, trained: TrainedRun, name: str, destination: Path):
    """Write the trained prefix as a cartridge artifact (a PEFT adapter plus manifest)."""
    prefix = load_file(str(trained.run.final_prefix))["prefix"]
    manifest = publishable_manifest(loaded, trained, name)
    return save_artifact(
        destination, prefix, cartridge_peft_config(loaded.model.config, trained.config.num_tokens), manifest
    )
