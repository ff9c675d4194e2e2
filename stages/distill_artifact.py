"""A trained prefix as a published artifact: the distilled cartridge's manifest (config, data
fingerprint, warm start, reuse, final training metrics, evaluation) and its files."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from cartridges.artifact import cartridge_peft_config, describe_model, save_artifact
from cartridges.manifest import CorpusInfo, Manifest
from cartridges.stages.distill import DISTILL_DIR, FINAL_FILE, METRICS_FILE, DistillConfig
from cartridges.stages.ingest import INGEST_FILE
from cartridges.stages.shards import SHARDS_DIR, SUMMARY_FILE, SYNTHESIS_DIR
from cartridges.stages.training_data import data_fingerprint


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The last value of each metric in the training log."""
    metrics: dict[str, float] = {}
    for line in (run_dir / DISTILL_DIR / METRICS_FILE).read_text().splitlines():
        metrics |= {k: float(v) for k, v in json.loads(line).items() if isinstance(v, (int, float))}
    return metrics


def publishable_manifest(
    loaded,
    run_dir: Path,
    name: str,
    config: DistillConfig,
    prefix: torch.Tensor,
    parent: str | None = None,
    evaluation: dict[str, float] | None = None,
):
    """The manifest of a distilled cartridge: config, data fingerprint, init, final training metrics and any evaluation."""
    ingest_record = json.loads((run_dir / INGEST_FILE).read_text())
    synthesis = json.loads((run_dir / SYNTHESIS_DIR / SUMMARY_FILE).read_text())
    return Manifest(
        name=name,
        **describe_model(loaded),
        num_tokens=config.num_tokens,
        num_frozen_tokens=1,
        dtype=str(prefix.dtype).removeprefix("torch."),
        corpus=[
            CorpusInfo(
                fingerprint=ingest_record["corpus_fingerprint"],
                num_documents=ingest_record["num_documents"],
                num_tokens=ingest_record["num_tokens"],
                source=ingest_record["source"],
            )
        ],
        method="distilled",
        method_config=config.model_dump()
        | {
            "data_fingerprint": data_fingerprint(run_dir / SYNTHESIS_DIR / SHARDS_DIR),
            "run": str(run_dir),
            "warm_start_from": parent,
            "reused_samples": synthesis.get("reused", 0),
            "reused_from": synthesis.get("reused_from"),
        },
        parent=parent,
        metrics=final_metrics(run_dir) | (evaluation or {}),
    )


def save_distilled(
    loaded,
    run_dir: Path,
    name: str,
    config: DistillConfig,
    destination: Path,
    parent: str | None = None,
    evaluation: dict[str, float] | None = None,
):
    """Write the trained prefix as a cartridge artifact (a PEFT adapter plus manifest); `parent`: the version it warm-started from."""
    prefix = load_file(str(run_dir / DISTILL_DIR / FINAL_FILE))["prefix"]
    manifest = publishable_manifest(loaded, run_dir, name, config, prefix, parent, evaluation)
    return save_artifact(
        destination, prefix, cartridge_peft_config(loaded.model.config, config.num_tokens, 1), manifest
    )
