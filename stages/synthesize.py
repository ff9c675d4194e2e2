"""Synthesize: self-study conversations about corpus chunks, with the teacher's top-k log-probabilities.

For each planned sample (a seeded random chunk and seed kind) the model writes a user message
about the chunk (turn A), then answers it with the chunk in context (turn B), or the answer is
real corpus text (corpus-answered kinds). The chunk-in-context teacher scores every answer token:
top-k ids and log-probabilities plus the answer token's own log-probability.
Given an earlier run, planned samples of chunks that did not change take that run's samples
instead of being made (see `sample_reuse`).

Work is cut into shards of `shard_size` planned samples. Each shard is written atomically as
`synthesis/shards/shard-NNNNN.parquet`, so a rerun skips completed shards (resume). Shards run as Ray
Data `map_batches` over a pool of engine actors (`RAY_ADDRESS` points at a cluster).
"""

import json
import logging
import time
import warnings
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from cartridges.atomic import write_text_atomically
from cartridges.cluster import cpus_per_actor, init_ray, on_local_ray
from cartridges.errors import CartridgeError
from cartridges.progress import ThroughputProgress
from cartridges.runtime import pad_token_id
from cartridges.stages.engines import make_engine
from cartridges.stages.ingest import read_chunks, read_titles
from cartridges.stages.records import IngestRecord, ShardStats, SynthesisSummary
from cartridges.stages.run_dir import RunDir
from cartridges.stages.sample_builder import SampleBuilder
from cartridges.stages.sample_plan import PlannedSample, chunk_keys, keys_of, plan_samples
from cartridges.stages.sample_reuse import assign_reused, incompatibility, read_reused, reused_source, write_reused
from cartridges.stages.shards import SAMPLE_SCHEMA, num_shards, read_shard_stats, write_shard
from cartridges.stages.synthesis_config import SynthesisConfig, SynthesisRunSettings, max_prompt_tokens


def plan_run(config: SynthesisConfig, keys: list[str]) -> list[PlannedSample]:
    return plan_samples(config.samples, config.seed, config.kinds, keys)


class SynthesisWorker:
    """Ray Data callable class: the engine is built once per actor; each row is one shard to make."""

    def __init__(self, run_dir: str, model_path: str, model_fingerprint: str, config_json: str, settings_json: str):
        from transformers import AutoTokenizer

        self.run = RunDir(Path(run_dir))
        config = SynthesisConfig.model_validate_json(config_json)
        settings = SynthesisRunSettings.model_validate_json(settings_json)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        chunks = read_chunks(self.run)
        titles = read_titles(self.run)
        engine = make_engine(
            settings.engine,
            model_path,
            max_model_len=max_prompt_tokens(config) + config.max_answer_tokens + 8,
            top_k=config.top_k,
            batch_size=settings.batch_size,
            pad_token_id=pad_token_id(tokenizer),
            threads=settings.threads,
            seed=config.seed,
        )
        self.builder = SampleBuilder(engine, tokenizer, config, chunks, titles, model_fingerprint)
        self.plan = plan_run(config, keys_of(chunks, titles))
        self.shard_size = config.shard_size
        self.reused = read_reused(self.run.reused_samples)

    def run_shard(self, shard: int) -> ShardStats:
        started = time.perf_counter()
        planned = self.plan[shard * self.shard_size : (shard + 1) * self.shard_size]
        reused = [self.reused[p.sample_id] for p in planned if p.sample_id in self.reused]
        made, made_stats = self.builder.build([p for p in planned if p.sample_id not in self.reused])
        rows = sorted(made + reused, key=lambda row: row["sample_id"])
        stats = ShardStats(
            **made_stats,
            shard=shard,
            samples=len(rows),
            planned=len(planned),
            reused=len(reused),
            kinds=dict(Counter(row["seed_kind"] for row in rows)),
            seconds=time.perf_counter() - started,
            engine=self.builder.engine.name,
        )
        write_shard(self.run.shard(shard), rows, stats)
        return stats

    def __call__(self, batch: dict) -> dict:
        results = [self.run_shard(int(shard)) for shard in batch["shard"]]
        return {"stats": [r.model_dump_json() for r in results]}


def _check_run_config(run: RunDir, record: dict) -> None:
    """A run folder holds one synthesis: resuming with other settings would mix two plans."""
    path = run.synthesis_config
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = sorted(k for k in record.keys() | previous.keys() if record.get(k) != previous.get(k))
        if changed:
            raise CartridgeError(
                f"{run.root} was synthesized with other settings ({', '.join(changed)} differ): "
                "rerun with the same settings to resume, or pass a new --out folder"
            )
    else:
        write_text_atomically(path, json.dumps(record, indent=2, sort_keys=True))


def _run_shards(pending: list[int], worker_args: dict, settings: SynthesisRunSettings, on_done) -> None:
    if settings.executor == "local":
        worker = SynthesisWorker(**worker_args)
        try:
            for shard in pending:
                on_done(worker.run_shard(shard))
        finally:
            worker.builder.engine.close()
        return
    import ray

    init_ray()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours show shards and rates; Ray Data's own lines (it warns that
    context.print_on_execution_start = False  # its bars are off, announces each finished dataset) are noise here
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # Ray Data passes every actor its map function through the object store, and Ray logs an error-level
    # line for each actor that may restart with such arguments (ray-project/ray#53727). On a local Ray an
    # engine that dies is a crash of this machine's process (out of memory, a bug) that a restart repeats:
    # the run stops and the next one resumes from its finished shards. A cluster keeps Ray's restarts,
    # which replace engines on lost nodes.
    # Ray 2.60 (pinned) takes max_restarts only among its deprecated free-form remote arguments.
    restarts = {"max_restarts": 0} if on_local_ray() else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        dataset = ray.data.from_items([{"shard": shard} for shard in pending]).map_batches(
            SynthesisWorker,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=settings.engines),
            num_cpus=cpus_per_actor(settings.engines, settings.cpus_per_engine),
            fn_constructor_kwargs=worker_args,
            **restarts,
        )
    for row in dataset.iter_rows():
        on_done(ShardStats.model_validate_json(row["stats"]))


def prepare_reuse(run: RunDir, previous: RunDir, config: SynthesisConfig, model_fingerprint: str) -> str | None:
    """Pick the previous run's samples that stand in for planned ones (once per run); returns why none could be."""
    if run.reused_samples.is_file():
        return None
    if not previous.synthesis_config.is_file():
        raise CartridgeError(
            f"{previous.root} holds no synthesis ({previous.synthesis_config} is missing): "
            "pass the --out folder of an earlier run"
        )
    record = json.loads(previous.synthesis_config.read_text())
    refused = incompatibility(record, config.model_dump(), model_fingerprint)
    rows: list[dict] = []
    if refused is None:
        shards = sorted(previous.shards.glob("shard-*.parquet"))
        previous_rows = [row for shard in shards for row in pq.read_table(shard).to_pylist()]
        chunks = read_chunks(run)
        keys = keys_of(chunks, read_titles(run))
        rows = assign_reused(plan_run(config, keys), keys, chunks, previous_rows, chunk_keys(previous))
    write_reused(run.reused_samples, rows, SAMPLE_SCHEMA, previous.root)
    return refused


def synthesize(
    run: RunDir,
    ingested: IngestRecord,
    model_path: Path,
    model_fingerprint: str,
    config: SynthesisConfig,
    settings: SynthesisRunSettings,
    reuse_from: RunDir | None = None,
) -> SynthesisSummary:
    """Make every missing shard of the run's plan; returns the summary (also written to summary.json).

    Expects the ingest outputs (`ingested`, and `chunks.parquet`, `documents.parquet`) in the run folder.
    `reuse_from`: an earlier run folder whose samples of unchanged chunks are taken instead of made.
    """
    record = {
        "config": config.model_dump(),
        "corpus_fingerprint": ingested.corpus_fingerprint,
        "model_fingerprint": model_fingerprint,
    }
    _check_run_config(run, record | {"reuse_from": str(reuse_from.root) if reuse_from else None})
    reuse_refused = prepare_reuse(run, reuse_from, config, model_fingerprint) if reuse_from else None
    pending = [s for s in range(num_shards(config)) if not run.shard(s).is_file()]
    started = time.perf_counter()
    if pending:
        worker_args = {
            "run_dir": str(run.root),
            "model_path": str(model_path),
            "model_fingerprint": model_fingerprint,
            "config_json": config.model_dump_json(),
            "settings_json": settings.model_dump_json(),
        }
        todo = sum(min(config.shard_size, config.samples - s * config.shard_size) for s in pending)
        with ThroughputProgress("synthesize", total=todo) as progress:
            _run_shards(
                pending, worker_args, settings, lambda stats: progress.advance(stats.planned, stats.generated_tokens)
            )
    summary = summarize(run, config).model_copy(
        update={
            "wall_seconds_this_run": time.perf_counter() - started,
            "shards_made_this_run": len(pending),
            "reuse_refused": reuse_refused,
        }
    )
    summary.write(run.synthesis_summary)
    return summary


def summarize(run: RunDir, config: SynthesisConfig) -> SynthesisSummary:
    """Totals over all shards of the run (also those made by earlier, interrupted runs)."""
    stats = [read_shard_stats(run.shard(s)) for s in range(num_shards(config))]
    kinds: Counter = Counter()
    rejected: Counter = Counter()
    for shard in stats:
        kinds.update(shard.kinds)
        rejected.update(shard.rejected)
    seconds = sum(s.seconds for s in stats)
    tokens = sum(s.generated_tokens for s in stats)
    samples = sum(s.samples for s in stats)
    reused = sum(s.reused for s in stats)
    made = samples - reused
    return SynthesisSummary(
        samples=samples,
        reused=reused,
        reused_from=reused_source(run.reused_samples),
        planned=config.samples,
        unfilled=sum(s.unfilled for s in stats),
        kinds=dict(sorted(kinds.items())),
        rejected=dict(sorted(rejected.items())),
        generated_tokens=tokens,
        engine_seconds=seconds,
        samples_per_second=made / seconds if seconds else 0.0,
        generated_tokens_per_second=tokens / seconds if seconds else 0.0,
        engines=sorted({s.engine for s in stats}),
    )
