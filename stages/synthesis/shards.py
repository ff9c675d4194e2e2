"""Synthesis shards: the Parquet schema of a sample (docs/format.md), and their writing (atomic, with
the shard's counts in the schema metadata) and reading."""

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cartridges.atomic import write_atomically
from cartridges.stages.records import ShardStats
from cartridges.stages.synthesis.config import SynthesisConfig

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


def num_shards(config: SynthesisConfig) -> int:
    return -(-config.samples // config.shard_size)


def shard_bytes(rows: list[dict], stats: ShardStats) -> bytes:
    """The Parquet file of a shard, made where the shard was made (any node) and written by the driver."""
    table = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    table = table.replace_schema_metadata({STATS_METADATA_KEY: stats.model_dump_json().encode()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def write_shard(path: Path, data: bytes) -> None:
    write_atomically(path, lambda tmp: tmp.write_bytes(data))


def read_shard_stats(path: Path) -> ShardStats:
    return ShardStats.model_validate_json(pq.read_schema(path).metadata[STATS_METADATA_KEY])
