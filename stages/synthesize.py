"""Synthesize: self-study conversations about corpus chunks, with the teacher's top-k log-probabilities.

For each planned sample (a seeded random chunk and seed kind) the model writes a user message
about the chunk (turn A), then answers it with the chunk in context (turn B), or the answer is
real corpus text (corpus-answered kinds). The chunk-in-context teacher scores every answer token:
top-k ids and log-probabilities plus the answer token's own log-probability.
Given an earlier run, planned samples of chunks that did not change take that run's samples
instead of being made (see `sample_reuse`).

Work is cut into shards of `shard_size` planned samples. Each shard is written atomically as
`synthesis/shard-NNNNN.parquet`, so a rerun skips completed shards (resume). Shards run as Ray
Data `map_batches` over a pool of engine actors (`RAY_ADDRESS` points at a cluster).
"""

import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, field_validator

from cartridges.atomic import write_parquet_atomically, write_text_atomically
from cartridges.cluster import init_ray
from cartridges.errors import CartridgeError
from cartridges.layout import chat_token_ids, context_token_ids
from cartridges.progress import ThroughputProgress
from cartridges.runtime import pad_token_id
from cartridges.settings import STRICT_SETTINGS
from cartridges.stages.engines import Engine, EngineName, SamplingConfig, TokenScores, make_engine
from cartridges.stages.ingest import INGEST_FILE, Chunk, read_chunks, read_titles
from cartridges.stages.quality import answer_problem, message_problem
from cartridges.stages.sample_plan import PlannedSample, chunk_keys, keys_of, plan_samples
from cartridges.stages.sample_reuse import assign_reused, incompatibility, read_reused, reused_source, write_reused
from cartridges.stages.seed_prompts import (
    ALL_KINDS,
    CORPUS_ANSWERED,
    corpus_answer,
    message_instruction,
    writer_excerpt,
)

SYNTHESIS_DIR = "synthesis"
SHARDS_DIR = "shards"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
REUSED_FILE = "reused.parquet"
STATS_METADATA_KEY = b"cartridges.shard_stats"
ATTEMPT_SEED_STRIDE = 1_000_003
WORDS_PER_TOKEN = 0.75
WRITER_EXCERPT_WORDS = 250
PROMPT_OVERHEAD_TOKENS = 256  # title, chat template and system instruction around chunk and message

# Measured with SmolLM2-135M as teacher (BENCHMARKS.md, distillation sweep): cartridges trained on the
# corpus-answered kinds alone beat those trained on every kind; a stronger teacher may profit from
# adding model-written kinds (--kinds question=2,use_case=1,quote=1,...).
DEFAULT_KINDS = {"quote": 1.0, "continuation": 1.0, "fill_span": 1.0}
# Every kind, model-written and corpus-answered (the default before that sweep; the benchmarks' `all` mix).
EVERY_KIND = {
    "question": 2.0,
    "use_case": 1.0,
    "summarization": 1.0,
    "structuring": 1.0,
    "creative": 0.5,
    "generic": 0.5,
    "quote": 2.0,
    "continuation": 2.0,
    "fill_span": 1.0,
}

SAMPLE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("chunk_id", pa.int32()),
        ("doc_id", pa.int32()),
        ("seed_kind", pa.string()),
        ("seed", pa.int64()),
        ("answer_source", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("answer_ids", pa.list_(pa.int32())),
        ("topk_ids", pa.list_(pa.list_(pa.int32()))),
        ("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
        ("token_logprobs", pa.list_(pa.float32())),
        ("truncated", pa.bool_()),
        ("teacher_prompt_tokens", pa.int32()),
        ("engine", pa.string()),
        ("model_fingerprint", pa.string()),
    ]
)


class SynthesisConfig(BaseModel):
    """Settings that decide which samples are made; changing one needs a new run folder."""

    model_config = STRICT_SETTINGS

    samples: int = Field(256, ge=1, description="number of samples to write")
    seed: int = Field(0, description="seed of the sample plan (chunks, kinds, sampling seeds)")
    kinds: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_KINDS), description="seed kind -> weight")
    top_k: int = Field(20, ge=1, le=100, description="teacher log-probabilities kept per answer token")
    max_message_tokens: int = Field(96, ge=8)
    max_answer_tokens: int = Field(192, ge=8)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    chunk_min_tokens: int = Field(512, ge=1)
    chunk_max_tokens: int = Field(2048, ge=2)
    corpus_description: str | None = Field(
        None, description="one line about the corpus; default: 'a corpus of N documents'"
    )
    shard_size: int = Field(32, ge=1)
    max_attempts: int = Field(3, ge=1, description="tries per sample when filters reject it")

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, kinds: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(kinds) - set(ALL_KINDS))
        if unknown:
            raise ValueError(f"unknown seed kind(s) {unknown}; known: {', '.join(ALL_KINDS)}")
        if any(w < 0 for w in kinds.values()) or sum(kinds.values()) <= 0:
            raise ValueError("kind weights must be >= 0 with a positive sum")
        return kinds


class RunSettings(BaseModel):
    """How the work runs; does not change which samples are made (except HF batching, see docs)."""

    model_config = STRICT_SETTINGS

    engine: EngineName = "auto"
    engines: int = Field(1, ge=1, description="engine actors (one per GPU on GPU nodes)")
    batch_size: int = Field(16, ge=1, description="HF engine batch size")
    threads: int | None = Field(None, ge=1, description="torch threads per HF engine")
    cpus_per_engine: float | None = Field(
        None, gt=0, description="Ray CPUs per engine actor (default: this machine's cores / engines)"
    )
    executor: Literal["ray", "local"] = "ray"


def plan_run(config: SynthesisConfig, keys: list[str]) -> list[PlannedSample]:
    return plan_samples(config.samples, config.seed, config.kinds, keys)


def shard_path(run_dir: Path, shard: int) -> Path:
    return run_dir / SYNTHESIS_DIR / SHARDS_DIR / f"shard-{shard:05d}.parquet"


def num_shards(config: SynthesisConfig) -> int:
    return -(-config.samples // config.shard_size)


@dataclass
class Draft:
    """A sample on its way through the turns."""

    planned: PlannedSample
    chunk: Chunk
    title: str
    passage: str | None = None
    message: str | None = None
    corpus_text: str | None = None
    excerpt: str | None = None
    prompt: list[int] | None = None
    answer: list[int] | None = None
    scores: TokenScores | None = None
    truncated: bool = False


class SampleBuilder:
    """Turns planned samples into rows with one engine (the expensive state of a worker)."""

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        config: SynthesisConfig,
        chunks: list[Chunk],
        titles: list[str],
        model_fingerprint: str,
    ):
        self.engine, self.tokenizer, self.config = engine, tokenizer, config
        self.chunks, self.titles, self.model_fingerprint = chunks, titles, model_fingerprint
        self.description = config.corpus_description or f"a corpus of {len(titles)} documents"
        stops = {tokenizer.eos_token_id, *_as_list(getattr(tokenizer, "eos_token_ids", None))}
        self.stop_ids = tuple(sorted(t for t in stops if t is not None))
        self.message_sampling = SamplingConfig(
            config.max_message_tokens, config.temperature, config.top_p, self.stop_ids
        )
        self.answer_sampling = SamplingConfig(config.max_answer_tokens, config.temperature, config.top_p, self.stop_ids)

    def build(self, planned: list[PlannedSample]) -> tuple[list[dict], dict]:
        """Rows for `planned` (rejected samples retried with new seeds) and what making them took."""
        rows: list[dict] = []
        rejected: Counter = Counter()
        generated = 0
        pending = planned
        for attempt in range(self.config.max_attempts):
            if not pending:
                break
            made, failed, tokens = self._attempt(pending, attempt)
            rows += made
            generated += tokens
            rejected.update(reason for _, reason in failed)
            pending = [p for p, _ in failed]
        return rows, {"generated_tokens": generated, "rejected": dict(rejected), "unfilled": len(pending)}

    def _attempt(
        self, pending: list[PlannedSample], attempt: int
    ) -> tuple[list[dict], list[tuple[PlannedSample, str]], int]:
        failed: list[tuple[PlannedSample, str]] = []
        drafts: list[Draft] = []
        max_words = int(self.config.max_answer_tokens * WORDS_PER_TOKEN)
        for planned in pending:
            chunk = self.chunks[planned.chunk_id]
            draft = Draft(planned, chunk, self.titles[chunk.doc_id])
            rng = random.Random(planned.seed + attempt * ATTEMPT_SEED_STRIDE)
            if planned.kind in CORPUS_ANSWERED:
                found = corpus_answer(planned.kind, chunk.text, rng, max_words)
                if found is None:
                    failed.append((planned, "chunk_too_short"))
                    continue
                draft.passage, draft.message, draft.corpus_text = found.passage, found.message, found.answer
            if draft.message is None:
                draft.excerpt = writer_excerpt(chunk.text, rng, WRITER_EXCERPT_WORDS, around=draft.passage)
            drafts.append(draft)
        generated = self._write_messages([d for d in drafts if d.message is None], attempt, failed)
        drafts = [d for d in drafts if d.message is not None]
        for draft in drafts:
            context = context_token_ids(self.tokenizer, f"{draft.title}\n\n{draft.chunk.text}")
            draft.prompt = context + chat_token_ids(self.tokenizer, [{"role": "user", "content": draft.message}])
        generated += self._write_answers(drafts, attempt)
        kept = []
        for draft in drafts:
            problem = answer_problem(self.tokenizer.decode(draft.answer, skip_special_tokens=True), draft.answer)
            if problem:
                failed.append((draft.planned, problem))
            else:
                kept.append(draft)
        to_score = [d for d in kept if d.scores is None]
        if to_score:
            for draft, scores in zip(
                to_score,
                self.engine.score([d.prompt for d in to_score], [d.answer for d in to_score], self.config.top_k),
            ):
                draft.scores = scores
        return [self._row(d) for d in kept], failed, generated

    def _seeds(self, drafts: list[Draft], attempt: int, turn: int) -> list[int]:
        return [(d.planned.seed + attempt * ATTEMPT_SEED_STRIDE + turn) % 2**31 for d in drafts]

    def _write_messages(self, drafts: list[Draft], attempt: int, failed: list) -> int:
        """Turn A: the model reads the chunk and writes the user message."""
        if not drafts:
            return 0
        prompts = []
        for d in drafts:
            system = f'The following is an excerpt of "{d.title}", from {self.description}.\n\n{d.excerpt}'
            user = message_instruction(d.planned.kind, d.passage)
            prompts.append(
                chat_token_ids(
                    self.tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": user}]
                )
            )
        outputs = [
            c.token_ids for c in self.engine.generate(prompts, self.message_sampling, self._seeds(drafts, attempt, 0))
        ]
        for draft, tokens in zip(drafts, outputs):
            finished = bool(tokens) and tokens[-1] in self.stop_ids
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip().strip('"').strip()
            problem = message_problem(draft.planned.kind, text, tokens, finished)
            if problem:
                failed.append((draft.planned, problem))
            else:
                draft.message = text
        return sum(len(t) for t in outputs)

    def _write_answers(self, drafts: list[Draft], attempt: int) -> int:
        """Turn B: the teacher answers with the chunk in context (its top-k recorded while it generates),
        or the answer is the corpus text (scored later in one pass)."""
        for draft in drafts:
            if draft.corpus_text is not None:
                tokens = self.tokenizer(draft.corpus_text, add_special_tokens=False)["input_ids"]
                draft.truncated = len(tokens) >= self.config.max_answer_tokens
                draft.answer = tokens[: self.config.max_answer_tokens - 1] + [self.stop_ids[0]]
        model_answered = [d for d in drafts if d.corpus_text is None]
        if not model_answered:
            return 0
        seeds = self._seeds(model_answered, attempt, 1)
        outputs = self.engine.generate(
            [d.prompt for d in model_answered], self.answer_sampling, seeds, top_k=self.config.top_k
        )
        for draft, completion in zip(model_answered, outputs):
            draft.answer, draft.scores = completion.token_ids, completion.scores
            draft.truncated = not completion.token_ids or completion.token_ids[-1] not in self.stop_ids
        return sum(len(c.token_ids) for c in outputs)

    def _row(self, draft: Draft) -> dict:
        answer_text = self.tokenizer.decode(draft.answer, skip_special_tokens=True).strip()
        return {
            "sample_id": draft.planned.sample_id,
            "chunk_id": draft.chunk.chunk_id,
            "doc_id": draft.chunk.doc_id,
            "seed_kind": draft.planned.kind,
            "seed": draft.planned.seed,
            "answer_source": "corpus" if draft.corpus_text is not None else "model",
            "messages": [{"role": "user", "content": draft.message}, {"role": "assistant", "content": answer_text}],
            "answer_ids": draft.answer,
            "topk_ids": draft.scores.topk_ids,
            "topk_logprobs": draft.scores.topk_logprobs,
            "token_logprobs": draft.scores.token_logprobs,
            "truncated": draft.truncated,
            "teacher_prompt_tokens": len(draft.prompt),
            "engine": self.engine.name,
            "model_fingerprint": self.model_fingerprint,
        }


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, set)) else [value]


def write_shard(path: Path, rows: list[dict], stats: dict) -> None:
    table = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    table = table.replace_schema_metadata({STATS_METADATA_KEY: json.dumps(stats).encode()})
    write_parquet_atomically(path, table)


def read_shard_stats(path: Path) -> dict:
    return json.loads(pq.read_schema(path).metadata[STATS_METADATA_KEY])


class SynthesisWorker:
    """Ray Data callable class: the engine is built once per actor; each row is one shard to make."""

    def __init__(self, run_dir: str, model_path: str, model_fingerprint: str, config_json: str, settings_json: str):
        from transformers import AutoTokenizer

        self.run_dir = Path(run_dir)
        config = SynthesisConfig.model_validate_json(config_json)
        settings = RunSettings.model_validate_json(settings_json)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        chunks = read_chunks(self.run_dir)
        titles = read_titles(self.run_dir)
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
        self.reused = read_reused(self.run_dir / SYNTHESIS_DIR / REUSED_FILE)

    def run_shard(self, shard: int) -> dict:
        started = time.perf_counter()
        planned = self.plan[shard * self.shard_size : (shard + 1) * self.shard_size]
        reused = [self.reused[p.sample_id] for p in planned if p.sample_id in self.reused]
        made, stats = self.builder.build([p for p in planned if p.sample_id not in self.reused])
        rows = sorted(made + reused, key=lambda row: row["sample_id"])
        stats |= {
            "shard": shard,
            "samples": len(rows),
            "planned": len(planned),
            "reused": len(reused),
            "kinds": dict(Counter(row["seed_kind"] for row in rows)),
            "seconds": time.perf_counter() - started,
            "engine": self.builder.engine.name,
        }
        write_shard(shard_path(self.run_dir, shard), rows, stats)
        return stats

    def __call__(self, batch: dict) -> dict:
        results = [self.run_shard(int(shard)) for shard in batch["shard"]]
        return {"stats": [json.dumps(r) for r in results]}


def max_prompt_tokens(config: SynthesisConfig) -> int:
    """Upper bound of a teacher prompt: chunk, title, chat template and the user message."""
    return config.chunk_max_tokens + PROMPT_OVERHEAD_TOKENS + config.max_message_tokens


def check_fits_window(config: SynthesisConfig, window: int) -> None:
    needed = max_prompt_tokens(config) + config.max_answer_tokens
    if needed > window:
        raise CartridgeError(
            f"chunk_max_tokens={config.chunk_max_tokens} plus prompt and answer needs {needed} tokens, more than "
            f"the model's window of {window}: lower chunk_max_tokens to {window - needed + config.chunk_max_tokens} or less"
        )


def _check_run_config(run_dir: Path, record: dict) -> None:
    """A run folder holds one synthesis: resuming with other settings would mix two plans."""
    path = run_dir / SYNTHESIS_DIR / CONFIG_FILE
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = sorted(k for k in record.keys() | previous.keys() if record.get(k) != previous.get(k))
        if changed:
            raise CartridgeError(
                f"{run_dir} was synthesized with other settings ({', '.join(changed)} differ): "
                "rerun with the same settings to resume, or pass a new --out folder"
            )
    else:
        write_text_atomically(path, json.dumps(record, indent=2, sort_keys=True))


def _run_shards(pending: list[int], worker_args: dict, settings: RunSettings, on_done) -> None:
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
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    dataset = ray.data.from_items([{"shard": shard} for shard in pending]).map_batches(
        SynthesisWorker,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=settings.engines),
        num_cpus=settings.cpus_per_engine or max(1, (os.cpu_count() or 1) // settings.engines),
        fn_constructor_kwargs=worker_args,
    )
    for row in dataset.iter_rows():
        on_done(json.loads(row["stats"]))


def prepare_reuse(run_dir: Path, previous: Path, config: SynthesisConfig, model_fingerprint: str) -> str | None:
    """Pick the previous run's samples that stand in for planned ones (once per run); returns why none could be."""
    destination = run_dir / SYNTHESIS_DIR / REUSED_FILE
    if destination.is_file():
        return None
    previous_config = previous / SYNTHESIS_DIR / CONFIG_FILE
    if not previous_config.is_file():
        raise CartridgeError(
            f"{previous} holds no synthesis ({previous_config} is missing): pass the --out folder of an earlier run"
        )
    record = json.loads(previous_config.read_text())
    refused = incompatibility(record, config.model_dump(), model_fingerprint)
    rows: list[dict] = []
    if refused is None:
        shards = sorted((previous / SYNTHESIS_DIR / SHARDS_DIR).glob("shard-*.parquet"))
        previous_rows = [row for shard in shards for row in pq.read_table(shard).to_pylist()]
        chunks = read_chunks(run_dir)
        keys = keys_of(chunks, read_titles(run_dir))
        rows = assign_reused(plan_run(config, keys), keys, chunks, previous_rows, chunk_keys(previous))
    write_reused(destination, rows, SAMPLE_SCHEMA, previous)
    return refused


def synthesize(
    run_dir: Path,
    model_path: Path,
    model_fingerprint: str,
    config: SynthesisConfig,
    settings: RunSettings,
    reuse_from: Path | None = None,
) -> dict:
    """Make every missing shard of the run's plan; returns the summary (also written to summary.json).

    Expects the ingest outputs (`chunks.parquet`, `documents.parquet`, `ingest.json`) in `run_dir`.
    `reuse_from`: an earlier run folder whose samples of unchanged chunks are taken instead of made.
    """
    ingest_record = json.loads((run_dir / INGEST_FILE).read_text())
    record = {
        "config": config.model_dump(),
        "corpus_fingerprint": ingest_record["corpus_fingerprint"],
        "model_fingerprint": model_fingerprint,
    }
    _check_run_config(run_dir, record | {"reuse_from": str(reuse_from) if reuse_from else None})
    reuse_refused = prepare_reuse(run_dir, reuse_from, config, model_fingerprint) if reuse_from else None
    shards = range(num_shards(config))
    pending = [s for s in shards if not shard_path(run_dir, s).is_file()]
    started = time.perf_counter()
    if pending:
        worker_args = {
            "run_dir": str(run_dir),
            "model_path": str(model_path),
            "model_fingerprint": model_fingerprint,
            "config_json": config.model_dump_json(),
            "settings_json": settings.model_dump_json(),
        }
        todo = sum(min(config.shard_size, config.samples - s * config.shard_size) for s in pending)
        with ThroughputProgress("synthesize", total=todo) as progress:
            _run_shards(
                pending,
                worker_args,
                settings,
                lambda stats: progress.advance(stats["planned"], stats["generated_tokens"]),
            )
    summary = summarize(run_dir, config)
    summary["wall_seconds_this_run"] = time.perf_counter() - started
    summary["shards_made_this_run"] = len(pending)
    if reuse_refused:
        summary["reuse_refused"] = reuse_refused
    write_text_atomically(run_dir / SYNTHESIS_DIR / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True))
    return summary


def summarize(run_dir: Path, config: SynthesisConfig) -> dict:
    """Totals over all shards of the run (also those made by earlier, interrupted runs)."""
    stats = [read_shard_stats(shard_path(run_dir, s)) for s in range(num_shards(config))]
    kinds: Counter = Counter()
    rejected: Counter = Counter()
    for shard in stats:
        kinds.update(shard["kinds"])
        rejected.update(shard["rejected"])
    seconds = sum(s["seconds"] for s in stats)
    tokens = sum(s["generated_tokens"] for s in stats)
    samples = sum(s["samples"] for s in stats)
    reused = sum(s.get("reused", 0) for s in stats)
    made = samples - reused
    return {
        "samples": samples,
        "reused": reused,
        "reused_from": reused_source(run_dir / SYNTHESIS_DIR / REUSED_FILE),
        "planned": config.samples,
        "unfilled": sum(s["unfilled"] for s in stats),
        "kinds": dict(sorted(kinds.items())),
        "rejected": dict(sorted(rejected.items())),
        "generated_tokens": tokens,
        "engine_seconds": seconds,
        "samples_per_second": made / seconds if seconds else 0.0,
        "generated_tokens_per_second": tokens / seconds if seconds else 0.0,
        "engines": sorted({s["engine"] for s in stats}),
    }
