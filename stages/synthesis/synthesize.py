"""Synthesize: self-study conversations about corpus chunks, with the teacher's top-k log-probabilities.

For each planned sample (a seeded random chunk and seed kind) the model writes a user message
about the chunk (turn A), then answers it with the chunk in context (turn B), or the answer is
real corpus text (corpus-answered kinds). The chunk-in-context teacher scores every answer token:
top-k ids and log-probabilities plus the answer token's own log-probability.
Given an earlier run, planned samples of chunks that did not change take that run's samples
instead of being made (see `sample_reuse`).

Work is cut into shards of `shard_size` planned samples. Shards run as Ray Data `map_batches` over a
pool of engine actors (`RAY_ADDRESS` points at a cluster). The actors share no disk with the driver:
they get the chunks and reused samples by value, load the model on their own node (`model_on_this_node`)
and return each shard's Parquet bytes, which the driver writes atomically as
`synthesis/shards/shard-NNNNN.parquet`, so a rerun skips completed shards (resume). Each shard records
the Ray node that made it.
"""

import json
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow.parquet as pq

from cartridges.atomic import write_text_atomically
from cartridges.cluster import actor_pool_rows, cpus_per_actor, node_label, runs_on_ray
from cartridges.errors import CartridgeError
from cartridges.models import ModelRef, model_on_this_node
from cartridges.progress import ThroughputProgress
from cartridges.runtime import pad_token_id
from cartridges.stages.ingest import Chunk, read_chunks, read_titles
from cartridges.stages.records import IngestRecord, ShardStats, SynthesisSummary
from cartridges.stages.run_dir import RunDir
from cartridges.stages.run_mirror import RunMirror
from cartridges.stages.synthesis.config import (
    SynthesisConfig,
    SynthesisRunSettings,
    max_prompt_tokens,
    teacher_context_tokens,
    with_added_defaults,
)
from cartridges.stages.synthesis.engine_choice import make_engine, resolved_engine
from cartridges.stages.synthesis.sample_builder import SampleBuilder
from cartridges.stages.synthesis.sample_plan import PlannedSample, keys_of, plan_samples
from cartridges.stages.synthesis.sample_reuse import (
    assign_reused,
    incompatibility,
    read_reused,
    reused_source,
    write_reused,
)
from cartridges.stages.synthesis.shards import SAMPLE_SCHEMA, num_shards, read_shard_stats, shard_bytes, write_shard
from cartridges.stages.synthesis.teacher_context import teacher_keys, teacher_texts

ENGINE_START_TIMEOUT_S = 900  # a cold vLLM engine on a large model takes minutes; an autoscaler adds nodes in minutes


def plan_run(config: SynthesisConfig, keys: list[str]) -> list[PlannedSample]:
    return plan_samples(config.samples, config.seed, config.kinds, keys, config.samples_per_chunk)


@dataclass(frozen=True)
class ShardInputs:
    """What every engine actor needs of the run folder, sent by value (an actor on another node has no
    access to the driver's disk)."""

    chunks: list[Chunk]
    titles: list[str]
    reused: dict[int, dict]

    @classmethod
    def of(cls, run: RunDir) -> "ShardInputs":
        return cls(read_chunks(run), read_titles(run), read_reused(run.reused_samples))


class SynthesisWorker:
    """Ray Data callable class: the engine is built once per actor; each row is one shard to make, and
    comes back as its stats and Parquet bytes."""

    def __init__(
        self,
        inputs: ShardInputs,
        model: ModelRef,
        config_json: str,
        settings_json: str,
    ):
        from transformers import AutoTokenizer

        config = SynthesisConfig.model_validate_json(config_json)
        settings = SynthesisRunSettings.model_validate_json(settings_json)
        path = str(model_on_this_node(model))
        tokenizer = AutoTokenizer.from_pretrained(path)
        window = model_window(path)
        texts = teacher_texts_of(inputs.chunks, inputs.titles, config, tokenizer, window)
        engine = make_engine(
            resolved_engine(settings.engine, config.kinds),
            path,
            max_model_len=min(max_prompt_tokens(config, window) + config.max_answer_tokens + 8, window),
            top_k=config.top_k,
            batch_size=settings.batch_size,
            pad_token_id=pad_token_id(tokenizer),
            threads=settings.threads,
            seed=config.seed,
        )
        self.builder = SampleBuilder(engine, tokenizer, config, inputs.chunks, inputs.titles, texts, model.fingerprint)
        self.plan = plan_run(config, keys_of(inputs.chunks, inputs.titles))
        self.shard_size = config.shard_size
        self.reused = inputs.reused
        self.node = node_label()

    def make_shard(self, shard: int) -> tuple[ShardStats, bytes]:
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
            node=self.node,
        )
        return stats, shard_bytes(rows, stats)

    def __call__(self, batch: dict) -> dict:
        made = [self.make_shard(int(shard)) for shard in batch["shard"]]
        return {"stats": [stats.model_dump_json() for stats, _ in made], "parquet": [data for _, data in made]}


def model_window(path: str) -> int:
    """The positions the model reads (its config, without loading weights)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).max_position_embeddings


def teacher_texts_of(chunks: list[Chunk], titles: list[str], config: SynthesisConfig, tokenizer, window: int):
    """What the teacher reads for each chunk id (`teacher_context`); a window's blocks are packed with
    the model's tokenizer to its window (neither is read for `chunk`)."""
    return teacher_texts(chunks, titles, tokenizer, config.teacher_context, teacher_context_tokens(config, window))


def run_teacher_keys(run: RunDir, config: SynthesisConfig, tokenizer, window: int) -> list[str]:
    """Per chunk id of the run folder, the content its samples depend on (`teacher_context.teacher_keys`)."""
    chunks, titles = read_chunks(run), read_titles(run)
    texts = teacher_texts_of(chunks, titles, config, tokenizer, window)
    return teacher_keys(chunks, titles, texts, config.teacher_context)


def _check_run_config(run: RunDir, record: dict) -> None:
    """A run folder holds one synthesis: resuming with other settings would mix two plans."""
    path = run.synthesis_config
    if path.is_file():
        previous = json.loads(path.read_text())
        previous["config"] = with_added_defaults(previous.get("config", {}))
        changed = sorted(k for k in record.keys() | previous.keys() if record.get(k) != previous.get(k))
        if changed:
            raise CartridgeError(
                f"{run.root} was synthesized with other settings ({', '.join(changed)} differ): "
                "rerun with the same settings to resume, or pass a new --out folder"
            )
    else:
        write_text_atomically(path, json.dumps(record, indent=2, sort_keys=True))


def _run_shards(pending: list[int], worker_args: dict, settings: SynthesisRunSettings, on_done) -> None:
    """Make the pending shards; `on_done(stats, parquet_bytes)` as each arrives (in this process)."""
    if not runs_on_ray(settings.executor, settings.engines):
        worker = SynthesisWorker(**worker_args)
        try:
            for shard in pending:
                on_done(*worker.make_shard(shard))
        finally:
            worker.builder.engine.close()
        return
    import ray

    cpus = cpus_per_actor(settings.engines, settings.cpus_per_engine)
    # each engine one shard at a time: shards are long
    dataset = actor_pool_rows(
        [{"shard": shard} for shard in pending],
        SynthesisWorker,
        worker_args,
        settings.engines,
        cpus,
        settings.gpus_per_engine,
        ENGINE_START_TIMEOUT_S,
    )
    try:
        for row in dataset.iter_rows():
            on_done(ShardStats.model_validate_json(row["stats"]), row["parquet"])
    except ray.exceptions.GetTimeoutError:
        raise CartridgeError(
            f"the cluster did not start {settings.engines} engine actor(s) with {cpus} CPU and {settings.gpus_per_engine} GPU each "
            f"within {ENGINE_START_TIMEOUT_S} s: add nodes, or lower synthesis_run.engines, cpus_per_engine or gpus_per_engine"
        ) from None


def prepare_reuse(run: RunDir, previous: RunDir, config: SynthesisConfig, model: ModelRef) -> str | None:
    """Pick the previous run's samples that stand in for planned ones (once per run); returns why none could be."""
    if run.reused_samples.is_file():
        return None
    if not previous.synthesis_config.is_file():
        raise CartridgeError(
            f"{previous.root} holds no synthesis ({previous.synthesis_config} is missing): "
            "pass the --out folder of an earlier run"
        )
    record = json.loads(previous.synthesis_config.read_text())
    refused = incompatibility(record, config.model_dump(), model.fingerprint)
    rows: list[dict] = []
    if refused is None:
        shards = sorted(previous.shards.glob("shard-*.parquet"))
        previous_rows = [row for shard in shards for row in pq.read_table(shard).to_pylist()]
        chunks = read_chunks(run)
        planned = plan_run(config, keys_of(chunks, read_titles(run)))
        tokenizer, window = None, 0
        if config.teacher_context != "chunk":  # blocks are packed with the model's tokenizer to its window
            from transformers import AutoTokenizer

            path = str(model_on_this_node(model))
            tokenizer, window = AutoTokenizer.from_pretrained(path), model_window(path)
        keys, previous_keys = (run_teacher_keys(folder, config, tokenizer, window) for folder in (run, previous))
        rows = assign_reused(planned, keys, chunks, previous_rows, previous_keys)
    write_reused(run.reused_samples, rows, SAMPLE_SCHEMA, previous.root)
    return refused


def synthesize(
    run: RunDir,
    ingested: IngestRecord,
    model: ModelRef,
    config: SynthesisConfig,
    settings: SynthesisRunSettings,
    reuse_from: RunDir | None = None,
    mirror: RunMirror | None = None,
) -> SynthesisSummary:
    """Make every missing shard of the run's plan; returns the summary (also written to summary.json).

    Expects the ingest outputs (`ingested`, and `chunks.parquet`, `documents.parquet`) in the run folder.
    `reuse_from`: an earlier run folder whose samples of unchanged chunks are taken instead of made.
    `mirror`: the run's copy on an object store, which gets each shard as it is written.
    """
    record = {
        "config": config.model_dump(),
        "corpus_fingerprint": ingested.corpus_fingerprint,
        "model_fingerprint": model.fingerprint,
    }
    _check_run_config(run, record | {"reuse_from": str(reuse_from.root) if reuse_from else None})
    reuse_refused = prepare_reuse(run, reuse_from, config, model) if reuse_from else None
    pending = [s for s in range(num_shards(config)) if not run.shard(s).is_file()]
    started = time.perf_counter()
    if pending:
        worker_args = {
            "inputs": ShardInputs.of(run),
            "model": model,
            "config_json": config.model_dump_json(),
            "settings_json": settings.model_dump_json(),
        }
        todo = sum(min(config.shard_size, config.samples - s * config.shard_size) for s in pending)
        with ThroughputProgress("synthesize", total=todo) as progress:

            def keep(stats: ShardStats, data: bytes) -> None:
                write_shard(run.shard(stats.shard), data)
                if mirror is not None:
                    mirror.push(run.shard(stats.shard))
                progress.advance(stats.planned, stats.generated_tokens)

            _run_shards(pending, worker_args, settings, keep)
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
