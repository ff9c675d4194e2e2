"""Synthesis shards: the Parquet schema of a sample (docs/format.md), where shards live in the run
folder, and their writing (atomic, with per-shard counts in the schema metadata) and reading."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cartridges.atomic import write_parquet_atomically
from cartridges.stages.synthesis_config import SynthesisConfig

SYNTHESIS_DIR = "synthesis"
SHARDS_DIR = "shards"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
REUSED_FILE = "reused.parquet"
STATS_METADATA_KEY = b"cartridges.shard_stats"

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


def shard_path(run_dir: Path, shard: int) -> Path:
    return run_dir / SYNTHESIS_DIR / SHARDS_DIR / f"shard-{shard:05d}.parquet"


def num_shards(config: SynthesisConfig) -> int:
    return -(-config.samples // config.shard_size)


def write_shard(path: Path, rows: list[dict], stats: dict) -> None:
    table = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    table = table.replace_schema_metadata({STATS_METADATA_KEY: json.dumps(stats).encode()})
    write_parquet_atomically(path, table)


def read_shard_stats(path: Path) -> dict:
    return json.loads(pq.read_schema(path).metadata[STATS_METADATA_KEY])
