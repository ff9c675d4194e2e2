"""What each stage hands to the next: typed records that are also what the stage writes into the run
folder (`ingest.json`, a shard's stats, `synthesis/summary.json`), so that a later stage, a resumed
run and the CLI read the same fields by name instead of string keys."""

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict

from cartridges.atomic import write_text_atomically


class StageRecord(BaseModel):
    """Read leniently (fields added later have defaults, unknown ones from a newer version are kept out)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    def write(self, path: Path) -> None:
        write_text_atomically(path, self.model_dump_json(indent=2))


Record = TypeVar("Record", bound=StageRecord)


def read_record(path: Path, kind: type[Record]) -> Record:
    return kind.model_validate_json(path.read_bytes())


class Skipped(StageRecord):
    """A file or folder of the corpus that was not read, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})"


class IngestRecord(StageRecord):
    """`ingest.json`: the corpus as chunked for this run."""

    corpus_fingerprint: str
    chunk_min_tokens: int
    chunk_max_tokens: int
    source: str
    num_documents: int
    num_chunks: int
    num_tokens: int
    skipped: list[Skipped] = []


class SampleCounts(StageRecord):
    """What a shard, or a whole synthesis, holds and what making it took."""

    samples: int
    planned: int
    reused: int = 0
    unfilled: int  # planned samples still rejected after every retry
    kinds: dict[str, int]
    rejected: dict[str, int]  # rejections by reason, retried ones included
    generated_tokens: int


class ShardStats(SampleCounts):
    """One shard's counts, kept in its Parquet schema metadata."""

    shard: int
    seconds: float
    engine: str
    node: str = ""  # the Ray node id that made it ("local" without Ray; "" in shards made before it was recorded)


class SynthesisSummary(SampleCounts):
    """`synthesis/summary.json`: totals over every shard of the run (also those of earlier, interrupted runs)."""

    reused_from: str | None
    engine_seconds: float
    samples_per_second: float
    generated_tokens_per_second: float
    engines: list[str]
    wall_seconds_this_run: float = 0.0
    shards_made_this_run: int = 0
    reuse_refused: str | None = None  # why an earlier run's samples could not stand in for planned ones


class WarmStartRecord(StageRecord):
    """`warm_start.json`: the version training starts from, chosen once per run (None: the corpus tokens)."""

    parent: str | None


class FailureRecord(StageRecord):
    """`distill/failure.json`: why training stopped (read by a Ray Train driver for its one line)."""

    step: int
    message: str


class PublishedRecord(StageRecord):
    """`published.json`: the version a build published; the same corpus and config build nothing more."""

    ref: str
    config_fingerprint: str | None = None
    seconds: dict[str, float] = {}  # wall time per stage
    metrics: dict[str, float] = {}  # the published manifest's

    @property
    def name(self) -> str:
        return self.ref.rpartition("@")[0]


class DistillRecord(StageRecord):
    """`distill/record.json`: what the distill stage hands on beside its final prefix, the version
    it warm-started from, and the manifest's training metrics (the `TrainingMetrics` of its step log)."""

    steps: int
    parent: str | None = None
    init: str | None = None  # what made the starting prefix (`distill.init: auto` resolved; warm_start)
    metrics: dict[str, float] = {}


class EvaluationRecord(StageRecord):
    """`evaluation.json`: gold-answer NLL and rank accuracy on a QA set's held-out questions, with no
    context, the starting prefix and the trained one."""

    qa: str
    metrics: dict[str, float]
