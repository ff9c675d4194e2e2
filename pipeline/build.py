"""`cartridges build`: ingest -> synthesize -> distill -> publish, resumable and idempotent.

The run folder is named after the cartridge, the corpus fingerprint and the config fingerprint, so
the same command finds its own unfinished run and continues it: ingest is skipped when done,
synthesis makes only missing shards, training resumes from its last checkpoint. A run that has
published records the version in `published.json`; running it again does nothing. A changed
corpus or config makes a new run, whose prefix starts from the latest published version of the
same name (same model and size; `warm_start: false` to start from the corpus tokens instead).
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from cartridges.artifact import load_artifact
from cartridges.atomic import write_atomically, write_text_atomically
from cartridges.home import cartridges_home
from cartridges.models import load_model
from cartridges.pipeline.build_config import BuildConfig
from cartridges.registry import Registry
from cartridges.stages.distill import DISTILL_DIR, INIT_FILE, run_training, save_distilled
from cartridges.stages.ingest import ingest_corpus, read_corpus
from cartridges.stages.synthesize import check_fits_window, synthesize

PUBLISHED_FILE = "published.json"


@dataclass
class BuildResult:
    run_dir: Path
    ref: str
    built: bool  # False: this corpus and config were already published
    seconds: dict[str, float] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


def build_run_dir(name: str, corpus_fingerprint: str, config: BuildConfig) -> Path:
    return cartridges_home() / "runs" / f"{name}-{corpus_fingerprint[:12]}-{config.fingerprint()[:12]}"


def latest_compatible(registry: Registry, name: str, loaded, num_tokens: int) -> tuple[str, torch.Tensor] | None:
    """The latest published version of `name` and its prefix, if it was built for this model at this size."""
    if not registry.versions(name):
        return None
    cartridge = load_artifact(registry.local_path(f"{name}@latest"))
    manifest = cartridge.manifest
    if manifest.model_fingerprint != loaded.fingerprint or manifest.num_tokens != num_tokens:
        return None
    return f"{manifest.name}@{manifest.version}", cartridge.prompt_embeddings


def warm_start(run_dir: Path, registry: Registry, name: str, loaded, config: BuildConfig) -> str | None:
    """Seed the run's initial prefix from the previous version (once per run); returns its reference."""
    record = run_dir / "warm_start.json"
    if record.is_file():
        return json.loads(record.read_text())["parent"]
    previous = latest_compatible(registry, name, loaded, config.distill.num_tokens) if config.warm_start else None
    parent = None
    if previous is not None:
        parent, prefix = previous
        (run_dir / DISTILL_DIR).mkdir(parents=True, exist_ok=True)
        write_atomically(run_dir / DISTILL_DIR / INIT_FILE, lambda tmp: save_file({"prefix": prefix.contiguous()}, str(tmp)))
    write_text_atomically(record, json.dumps({"parent": parent}))
    return parent


def build(corpus_dir: Path, name: str, config: BuildConfig, registry: Registry, on_stage=lambda stage: None) -> BuildResult:
    corpus = read_corpus(corpus_dir)  # a bad folder fails before the model loads
    loaded = load_model(config.model)
    run_dir = build_run_dir(name, corpus.fingerprint(loaded.tokenizer_fingerprint), config)
    published = run_dir / PUBLISHED_FILE
    if published.is_file():
        return BuildResult(run_dir, json.loads(published.read_text())["ref"], built=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def stage(label: str, work):
        on_stage(label)
        started = time.perf_counter()
        result = work()
        seconds[label] = time.perf_counter() - started
        return result

    check_fits_window(config.synthesis, loaded.model.config.max_position_embeddings)
    stage("ingest", lambda: ingest_corpus(corpus, run_dir, loaded.tokenizer, loaded.tokenizer_fingerprint,
                                          config.synthesis.chunk_min_tokens, config.synthesis.chunk_max_tokens))
    parent = warm_start(run_dir, registry, name, loaded, config)
    synthesis = stage("synthesize", lambda: synthesize(run_dir, loaded.path, loaded.fingerprint, config.synthesis, config.synthesis_run))
    stage("distill", lambda: run_training(run_dir, loaded, config.distill, config.training))

    def publish():
        artifact = run_dir / DISTILL_DIR / "artifact"
        if not artifact.exists():  # written atomically: a folder that exists is complete
            save_distilled(loaded, run_dir, name, config.distill, artifact, parent)
        return registry.publish(artifact, name)

    manifest = stage("publish", publish)
    ref = f"{manifest.name}@{manifest.version}"
    write_text_atomically(published, json.dumps({"ref": ref, "config_fingerprint": config.fingerprint(), "seconds": seconds}, indent=2))
    summary = {"documents": len(corpus.documents), "samples": synthesis["samples"], "kinds": synthesis["kinds"],
               "steps": config.distill.steps, "metrics": manifest.metrics, "parent": parent}
    return BuildResult(run_dir, ref, built=True, seconds=seconds, summary=summary)
