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

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from cartridges.errors import CartridgeError
from cartridges.home import runs_dir
from cartridges.models import LoadedModel, load_model
from cartridges.pipeline.stage_runner import STAGES, StageJob, run_stages
from cartridges.qa import QACorpus
from cartridges.registry.store import Registry
from cartridges.stages.config import BuildConfig
from cartridges.stages.distillation.config import check_training_fits_window
from cartridges.stages.ingest import Corpus, read_corpus
from cartridges.stages.library.build import LibraryBuild, build_library, corpus_tokens
from cartridges.stages.records import IngestRecord, PublishedRecord, SynthesisSummary, read_record
from cartridges.stages.run_dir import RunDir
from cartridges.stages.run_mirror import RunMirror
from cartridges.stages.synthesis.config import check_fits_window


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
    init: str | None = None  # what made the prefix training started from


def build_run_dir(name: str, corpus_fingerprint: str, config: BuildConfig) -> RunDir:
    return RunDir(runs_dir() / f"{name}-{corpus_fingerprint[:12]}-{config.fingerprint()[:12]}")


def previous_run(name: str, current: RunDir) -> RunDir | None:
    """The folder of the last build of `name` that published on this machine, if it is still there."""
    runs = [
        run
        for run in (RunDir(folder) for folder in runs_dir().iterdir() if folder.is_dir())
        if run != current and run.published.is_file() and read_record(run.published, PublishedRecord).name == name
    ]
    return max(runs, key=lambda run: run.published.stat().st_mtime, default=None)


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


def build(
    corpus_dir: Path,
    name: str,
    config: BuildConfig,
    registry: Registry,
    on_stage=lambda stage: None,
    qa: QACorpus | None = None,
) -> BuildResult | LibraryBuild:
    """A corpus of more than `library.unit_tokens` tokens builds a library (`stages.library.build`) unless
    `library.enabled` is false; any other builds one trained cartridge through the stages."""
    corpus = read_corpus(corpus_dir)  # a bad folder fails before the model loads
    loaded = load_model(config.model)
    if config.library.enabled and corpus_tokens(loaded, corpus) > config.library.unit_tokens:
        return build_library(corpus, loaded, name, config.library, registry, config.library_run)
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
    job = StageJob(
        mirror,
        loaded,
        config,
        STAGES,
        corpus=corpus,
        reuse_from=previous_run(name, mirror.local) if config.reuse_samples else None,
        name=name,
        registry=registry,
        qa=qa,
        on_stage=on_stage,
    )
    records = run_stages(job)
    if records.distilled is None:  # published before: nothing ran
        return BuildResult(mirror.local, records.published.ref, built=False)
    return BuildResult(
        mirror.local,
        records.published.ref,
        built=True,
        seconds=records.seconds,
        ingested=records.ingested,
        synthesis=records.synthesis,
        steps=records.distilled.steps,
        metrics=records.published.metrics,
        parent=records.distilled.parent,
        init=records.distilled.init,
    )
