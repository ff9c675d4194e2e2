"""Reuse the synthesized samples of chunks that did not change since an earlier run.

A sample depends only on its chunk's title and text (with `teacher_context: window`, also on the
text of the chunk's block, which the teacher reads), its seed kind and seed, the teacher model and
the sampling settings. The sample plan keeps untouched chunks' samples in place when a corpus is
edited (`sample_plan`), so a planned sample whose previous namesake (same sample id) was drawn
from the same chunk content with the same kind and seed is the sample a fresh run would make: it is
taken as it is, with only its chunk and document ids renumbered for the new corpus.

The assignment is made once per run and written to one Parquet file, so a resumed run and every
shard worker see the same one.
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cartridges.atomic import write_parquet_atomically
from cartridges.stages.ingest import Chunk
from cartridges.stages.synthesis.config import with_added_defaults
from cartridges.stages.synthesis.sample_plan import PlannedSample

SOURCE_KEY = b"cartridges.reused_from"
# Settings a reused sample must share with the new run; seed and kinds are checked per sample.
SAMPLE_SHAPING = (
    "teacher_context",
    "top_k",
    "max_message_tokens",
    "max_answer_tokens",
    "temperature",
    "top_p",
    "corpus_description",
    "max_attempts",
)


def incompatibility(previous_record: dict, config: dict, model_fingerprint: str) -> str | None:
    """Why the previous run's samples cannot stand in for this run's, or None when they can."""
    if previous_record.get("model_fingerprint") != model_fingerprint:
        return "another model"
    previous = with_added_defaults(previous_record.get("config", {}))
    changed = [k for k in SAMPLE_SHAPING if previous.get(k) != config.get(k)]
    return f"other settings ({', '.join(changed)})" if changed else None


def assign_reused(
    planned: list[PlannedSample],
    keys: list[str],
    chunks: list[Chunk],
    previous_rows: list[dict],
    previous_keys: list[str],
) -> list[dict]:
    """The previous rows that are exactly the planned samples, renumbered for this run's chunks.
    `keys`, `previous_keys`: per chunk id, what its samples depend on (`teacher_context.teacher_keys`)."""
    previous = {row["sample_id"]: row for row in previous_rows}
    reused = []
    for sample in planned:
        row = previous.get(sample.sample_id)
        if row and (previous_keys[row["chunk_id"]], row["seed_kind"], row["seed"]) == (
            keys[sample.chunk_id],
            sample.kind,
            sample.seed,
        ):
            chunk = chunks[sample.chunk_id]
            reused.append(row | {"chunk_id": chunk.chunk_id, "doc_id": chunk.doc_id})
    return reused


def write_reused(path: Path, rows: list[dict], schema: pa.Schema, source: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata({SOURCE_KEY: str(source).encode()})
    write_parquet_atomically(path, table)


def read_reused(path: Path) -> dict[int, dict]:
    """The reused rows by sample id (none when the file is absent)."""
    return {row["sample_id"]: row for row in pq.read_table(path).to_pylist()} if path.is_file() else {}


def reused_source(path: Path) -> str | None:
    """The run the reused rows came from, read from the file's schema alone."""
    return pq.read_schema(path).metadata[SOURCE_KEY].decode() if path.is_file() else None
