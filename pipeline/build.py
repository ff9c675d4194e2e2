"""`cartridges build`: ingest -> synthesize -> distill -> evaluate -> publish, resumable and idempotent.

The run folder is named after the cartridge, the corpus fingerprint and the config fingerprint, so
the same command finds its own unfinished run and continues it: ingest is skipped when done,
synthesis makes only missing shards, training resumes from its last checkpoint. A run that has
published records the version in `published.json`; running it again does nothing. A changed
corpus or config makes a new run, whose prefix starts from the latest published version of the
same name (same model and size; `warm_start: false` to start from the corpus tokens instead), and
takes the samples of unchanged chunks from the run that built that version (`reuse_samples: false`
to make every sample anew). Given held-out questions about the corpus (a QA set), the evaluate
stage scores the trained prefix, the prefix training started from and no context on them, and the
numbers go into the manifest's metrics. A run folder is built by one process at a time (a lock file
in it); a second build of the same corpus and config stops with a message instead of racing.
"""

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file

from cartridges.atomic import write_text_atomically
from cartridges.errors import CartridgeError
from cartridges.home import runs_dir
from cartridges.loading import open_cartridge
from cartridges.models import LoadedModel, load_model
from cartridges.pipeline.build_config import BuildConfig
from cartridges.qa import QACorpus
from cartridges.registry import Registry
from cartridges.stages.contexts import Context, FixedContext
from cartridges.stages.distill import check_training_fits_window
from cartridges.stages.distill_artifact import TrainedRun, save_distilled
from cartridges.stages.distill_run import run_training
from cartridges.stages.evaluate import score_corpus
from cartridges.stages.ingest import Corpus, ingest, read_corpus
from cartridges.stages.records import IngestRecord, PublishedRecord, SynthesisSummary, WarmStartRecord, read_record
from cartridges.stages.run_dir import RunDir
from cartridges.stages.run_mirror import RunMirror
from cartridges.stages.synthesis_config import check_fits_window
from cartridges.stages.synthesize import synthesize


@dataclass(frozen=True)
class BuildResult:
    run: RunDir
    ref: str
    built: bool  # False: this corpus and config were already published
    seconds: dict[str, float] = field(default_factory=dict)
    ingested: IngestRecord | None = None  # the rest: only for a build that ran
    synthesis: SynthesisSummary | None = None
    steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    parent: str | None = None  # the version training warm-started from


def build_run_dir(name: str, corpus_fingerprint: str, config: BuildConfig) -> RunDir:
    return RunDir(runs_dir() / f"{name}-{corpus_fingerprint[:12]}-{config.fingerprint()[:12]}")


def latest_compatible(registry: Registry, name: str, loaded, num_tokens: int) -> tuple[str, torch.Tensor] | None:
    """The latest published version of `name` and its prefix, if it was built for this model at this size."""
    if not registry.versions(name):
        return None
    try:
        cartridge = open_cartridge(f"{name}@latest", registry)
    except CartridgeError as exc:  # a damaged or non-finite parent would spread to every later version
        raise CartridgeError(
            f"cannot warm-start from {name}@latest: {exc}. Remove that version (`cartridges rm`) or build with --set warm_start=false"
        ) from None
    manifest = cartridge.manifest
    if manifest.model_fingerprint != loaded.fingerprint or manifest.num_tokens != num_tokens:
        return None
    return manifest.label, cartridge.prompt_embeddings


def previous_run(name: str, current: RunDir) -> RunDir | None:
    """The folder of the last build of `name` that published on this machine, if it is still there."""
    runs = [
        run
        for run in (RunDir(folder) for folder in runs_dir().iterdir() if folder.is_dir())
        if run != current and run.published.is_file() and read_record(run.published, PublishedRecord).name == name
    ]
    return max(runs, key=lambda run: run.published.stat().st_mtime, default=None)


def warm_start(
    run: RunDir, registry: Registry, name: str, loaded, config: BuildConfig
) -> tuple[str | None, torch.Tensor | None]:
    """The version training starts from and its prefix, chosen once per run (`warm_start.json`); the prefix
    is None when there is none, or when training has already written its initial prefix (it resumes)."""
    if run.warm_start.is_file():
        parent = read_record(run.warm_start, WarmStartRecord).parent
        if parent is None or run.init_prefix.is_file():
            return parent, None
        return parent, open_cartridge(parent, registry).prompt_embeddings
    previous = latest_compatible(registry, name, loaded, config.distill.num_tokens) if config.warm_start else None
    parent, prefix = previous if previous is not None else (None, None)
    WarmStartRecord(parent=parent).write(run.warm_start)
    return parent, prefix


@contextmanager
def building_alone(run: RunDir, name: str) -> Iterator[None]:
    """Hold the run folder's lock, so that a second build of the same corpus and config (a nightly
    schedule and a manual run, say) fails at once instead of racing the first. The OS releases the
    lock when its process dies, so a killed build leaves nothing to clean up."""
    lock = FileLock(run.lock)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise CartridgeError(
            f"another build of {name!r} with this corpus and config is running (it holds {run.lock}); "
            "wait for it to finish, then run the command again to resume it or see its result"
        ) from None
    try:
        yield
    finally:
        lock.release()


def evaluate_run(run: RunDir, loaded, qa: QACorpus) -> dict[str, float]:
    """Gold-answer NLL (and rank accuracy) with no context, the starting prefix and the trained one."""
    record = run.evaluation
    recorded = json.loads(record.read_text()) if record.is_file() else {}
    if recorded.get("qa") == qa.id:
        return recorded["metrics"]
    prefixes = {
        "none": None,
        "start": load_file(str(run.init_prefix))["prefix"],
        "cartridge": load_file(str(run.final_prefix))["prefix"],
    }
    metrics: dict[str, float] = {}
    for method, prefix in prefixes.items():
        context = Context(None if prefix is None else prefix.to(loaded.model.device))
        score = score_corpus(loaded, qa, FixedContext(context), method)
        metrics[f"qa_{method}_nll"] = score.nll
        if score.rank_accuracy is not None:
            metrics[f"qa_{method}_rank_accuracy"] = score.rank_accuracy
    write_text_atomically(record, json.dumps({"qa": qa.id, "metrics": metrics}, indent=2))
    return metrics


def build(
    corpus_dir: Path,
    name: str,
    config: BuildConfig,
    registry: Registry,
    on_stage=lambda stage: None,
    qa: QACorpus | None = None,
) -> BuildResult:
    corpus = read_corpus(corpus_dir)  # a bad folder fails before the model loads
    loaded = load_model(config.model)
    window = loaded.model.config.max_position_embeddings
    check_fits_window(config.synthesis, window)
    check_training_fits_window(config.distill, window)
    run = build_run_dir(name, corpus.fingerprint(loaded.tokenizer_fingerprint), config)
    runs_url = config.runs_url()
    mirror = RunMirror(run, f"{runs_url.rstrip('/')}/{run.root.name}" if runs_url else None)
    mirror.check()  # a runs root that cannot be one is a line before any work
    run.root.mkdir(parents=True, exist_ok=True)
    try:
        with building_alone(run, name):
            mirror.pull()  # what a build of this run on another machine left: it resumes from there
            return _build_in(mirror, corpus, loaded, name, config, registry, on_stage, qa)
    finally:
        _remove_if_empty(run)


def _remove_if_empty(run: RunDir) -> None:
    """A build that failed before its first stage wrote anything leaves no folder behind."""
    if run.root.is_dir() and set(run.root.iterdir()) <= {run.lock}:
        shutil.rmtree(run.root, ignore_errors=True)


def _build_in(
    mirror: RunMirror,
    corpus: Corpus,
    loaded: LoadedModel,
    name: str,
    config: BuildConfig,
    registry: Registry,
    on_stage,
    qa: QACorpus | None,
) -> BuildResult:
    run = mirror.local
    if run.published.is_file():
        return BuildResult(run, read_record(run.published, PublishedRecord).ref, built=False)
    seconds: dict[str, float] = {}

    def stage(label: str, work):
        on_stage(label)
        started = time.perf_counter()
        result = work()
        mirror.push_all()  # the stage's outputs, for a build that resumes on another machine
        seconds[label] = time.perf_counter() - started
        return result

    ingested = stage(
        "ingest",
        lambda: ingest(
            corpus,
            run,
            loaded.tokenizer,
            loaded.tokenizer_fingerprint,
            config.synthesis.chunk_min_tokens,
            config.synthesis.chunk_max_tokens,
        ),
    )
    parent, parent_prefix = warm_start(run, registry, name, loaded, config)
    reuse_from = previous_run(name, run) if config.reuse_samples else None
    synthesis = stage(
        "synthesize",
        lambda: synthesize(run, ingested, loaded.ref, config.synthesis, config.synthesis_run, reuse_from, mirror),
    )
    qa_pairs = [(q.question, q.answer) for q in qa.questions] if qa is not None else []  # gold NLL at every eval_every
    stage(
        "distill",
        lambda: run_training(
            run, loaded, config.distill, config.distill_run, qa_pairs, start_from=parent_prefix, mirror=mirror
        ),
    )
    evaluation = stage("evaluate", lambda: evaluate_run(run, loaded, qa)) if qa is not None else {}
    trained = TrainedRun(run, ingested, synthesis, config.distill, parent, evaluation)

    def publish():
        if not run.artifact.exists():  # written atomically: a folder that exists is complete
            save_distilled(loaded, trained, name, run.artifact)
        # A build killed after publishing but before recording it finds its version instead of publishing a twin.
        return registry.find_published(name, run.artifact) or registry.publish(run.artifact, name)

    manifest = stage("publish", publish)
    PublishedRecord(ref=manifest.label, config_fingerprint=config.fingerprint(), seconds=seconds).write(run.published)
    mirror.push(run.published)
    shutil.rmtree(run.artifact)  # the registry holds it now
    return BuildResult(
        run,
        manifest.label,
        built=True,
        seconds=seconds,
        ingested=ingested,
        synthesis=synthesis,
        steps=config.distill.steps,
        metrics=manifest.metrics,
        parent=parent,
    )
