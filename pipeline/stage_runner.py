"""The one wiring of the stages: ingest -> synthesize -> distill -> evaluate -> publish.

Every stage is `run(run_folder, inputs, config) -> record` (`stages/`); this module is the only caller
of each, and the only place that turns one stage's record into the next one's inputs. `build` runs
them all; `cartridges synthesize` the first two into a folder of the user's; `cartridges distill` the
last ones on such a folder; the benchmarks whichever they measure. A stage that is not run hands on
the record it wrote into the run folder before. After each stage its outputs are pushed to the run's
object store copy (when it has one), so a build killed anywhere resumes on another machine.
"""

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cartridges.errors import CartridgeError
from cartridges.loading import open_cartridge
from cartridges.models import LoadedModel
from cartridges.qa import QACorpus
from cartridges.registry.store import Registry
from cartridges.stages import ingest, publish
from cartridges.stages.config import BuildConfig
from cartridges.stages.distillation import stage as distillation
from cartridges.stages.evaluation import stage as evaluation
from cartridges.stages.records import (
    DistillRecord,
    EvaluationRecord,
    IngestRecord,
    PublishedRecord,
    SynthesisSummary,
    WarmStartRecord,
    read_record,
)
from cartridges.stages.run_dir import RunDir
from cartridges.stages.run_mirror import RunMirror
from cartridges.stages.synthesis import stage as synthesis

STAGES = ("ingest", "synthesize", "distill", "evaluate", "publish")


@dataclass(frozen=True)
class StageJob:
    """Which stages to run on which run folder, and what they need beyond the config."""

    mirror: RunMirror
    model: LoadedModel
    config: BuildConfig
    stages: tuple[str, ...] = STAGES
    corpus: ingest.Corpus | None = None  # ingest
    reuse_from: RunDir | None = None  # synthesize: an earlier run whose unchanged chunks' samples are taken
    name: str | None = None  # distill (warm start) and publish
    registry: Registry | None = None
    qa: QACorpus | None = None  # distill (gold NLL per eval) and evaluate
    on_stage: Callable[[str], None] = lambda stage: None


@dataclass
class StageRecords:
    """What the stages handed on, and the wall seconds of each that ran."""

    seconds: dict[str, float] = field(default_factory=dict)
    ingested: IngestRecord | None = None
    synthesis: SynthesisSummary | None = None
    distilled: DistillRecord | None = None
    evaluation: EvaluationRecord | None = None
    published: PublishedRecord | None = None


def run_stages(job: StageJob) -> StageRecords:
    unknown = [stage for stage in job.stages if stage not in STAGES]
    if unknown:
        raise CartridgeError(f"unknown stage {unknown[0]!r}; the stages are {', '.join(STAGES)}")
    mirror, config, run = job.mirror, job.config, job.mirror.local
    records = StageRecords()
    if "publish" in job.stages and run.published.is_file():
        records.published = read_record(run.published, PublishedRecord)  # built already: nothing to do
        return records

    def stage(label: str, work):
        if label not in job.stages:
            return None
        job.on_stage(label)
        started = time.perf_counter()
        result = work()
        mirror.push_all()  # the stage's outputs, for a build that resumes on another machine
        records.seconds[label] = time.perf_counter() - started
        return result

    def later(*stages: str) -> bool:  # a record a stage to run needs, from the run folder
        return any(stage in job.stages for stage in stages)

    if "ingest" in job.stages:
        inputs = ingest.IngestInputs(_needs(job.corpus, "a corpus"), job.model)
        records.ingested = stage("ingest", lambda: ingest.run(mirror, inputs, config))
    elif later("synthesize", "publish"):
        records.ingested = _recorded(run, run.ingest_record, IngestRecord, "ingest")
    if "synthesize" in job.stages:
        inputs = synthesis.SynthesisInputs(records.ingested, job.model.ref, job.reuse_from)
        records.synthesis = stage("synthesize", lambda: synthesis.run(mirror, inputs, config))
    elif later("distill", "publish"):
        records.synthesis = _recorded(run, run.synthesis_summary, SynthesisSummary, "synthesize")
    if "distill" in job.stages:
        parent, start_from = warm_start(run, job.registry, job.name, job.model, config)
        qa_pairs = tuple((q.question, q.answer) for q in job.qa.questions) if job.qa is not None else ()
        inputs = distillation.DistillInputs(job.model, records.synthesis, parent, start_from, qa_pairs)
        records.distilled = stage("distill", lambda: distillation.run(mirror, inputs, config))
    elif later("publish"):
        records.distilled = _recorded(run, run.distill_record, DistillRecord, "distill")
    if job.qa is not None:
        inputs = evaluation.EvaluationInputs(job.model, job.qa)
        records.evaluation = stage("evaluate", lambda: evaluation.run(mirror, inputs, config))
    if "publish" in job.stages:
        inputs = publish.PublishInputs(
            job.model,
            _needs(job.name, "a name"),
            _needs(job.registry, "a registry"),
            records.ingested,
            records.synthesis,
            records.distilled,
            records.evaluation,
        )
        published = stage("publish", lambda: publish.run(mirror, inputs, config))
        records.published = published.model_copy(update={"seconds": records.seconds})
        records.published.write(run.published)
        mirror.push(run.published)
        shutil.rmtree(run.artifact)  # the registry holds it now
    return records


def _needs(value, what: str):
    if value is None:
        raise CartridgeError(f"these stages need {what}")  # a caller's mistake, not a user's
    return value


def _recorded(run: RunDir, path, kind, stage: str):
    """The record an earlier run of `stage` wrote into this run folder."""
    if not path.is_file():
        raise CartridgeError(f"{run.root} has no {path.name} yet: run the {stage} stage first (`cartridges {stage}`)")
    return read_record(path, kind)


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


def warm_start(
    run: RunDir, registry: Registry | None, name: str | None, loaded, config: BuildConfig
) -> tuple[str | None, torch.Tensor | None]:
    """The version training starts from and its prefix, chosen once per run (`warm_start.json`); the prefix
    is None when there is none, or when training has already written its initial prefix (it resumes)."""
    if run.warm_start.is_file():
        parent = read_record(run.warm_start, WarmStartRecord).parent
        if parent is None or run.init_prefix.is_file():
            return parent, None
        return parent, open_cartridge(parent, registry).prompt_embeddings
    wanted = config.warm_start and registry is not None and name is not None
    previous = latest_compatible(registry, name, loaded, config.distill.num_tokens) if wanted else None
    parent, prefix = previous if previous is not None else (None, None)
    WarmStartRecord(parent=parent).write(run.warm_start)
    return parent, prefix
