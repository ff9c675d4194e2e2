"""Every path of a run folder (one build, or one `cartridges synthesize` + `distill`), in one place.

The stages, the build, resume, reuse and `cartridges gc` all find their files through `RunDir`;
docs/format.md lists the same layout, and a test holds the two (and a real build's folder) equal.
"""

from dataclasses import dataclass
from pathlib import Path

from cartridges.regular_files import require_folder_possible

SHARD_NAME = "shard-{:05d}.parquet"


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        """A run folder that cannot be one (a file is there, or above it) is one line before any work."""
        require_folder_possible(self.root, "run folder")

    # ingest
    @property
    def documents(self) -> Path:
        return self.root / "documents.parquet"

    @property
    def chunks(self) -> Path:
        return self.root / "chunks.parquet"

    @property
    def ingest_record(self) -> Path:
        return self.root / "ingest.json"

    # synthesize
    @property
    def synthesis(self) -> Path:
        return self.root / "synthesis"

    @property
    def synthesis_config(self) -> Path:
        return self.synthesis / "config.json"

    @property
    def shards(self) -> Path:
        return self.synthesis / "shards"

    def shard(self, index: int) -> Path:
        return self.shards / SHARD_NAME.format(index)

    @property
    def synthesis_summary(self) -> Path:
        return self.synthesis / "summary.json"

    @property
    def reused_samples(self) -> Path:
        return self.synthesis / "reused.parquet"

    # distill
    @property
    def distill(self) -> Path:
        return self.root / "distill"

    @property
    def training_config(self) -> Path:
        return self.distill / "config.json"

    @property
    def init_prefix(self) -> Path:
        return self.distill / "init_prefix.safetensors"

    @property
    def final_prefix(self) -> Path:
        return self.distill / "final_prefix.safetensors"

    @property
    def checkpoints(self) -> Path:
        return self.distill / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.distill / "metrics.jsonl"

    @property
    def failure(self) -> Path:
        return self.distill / "failure.json"

    @property
    def distill_record(self) -> Path:
        return self.distill / "record.json"

    @property
    def ray_storage(self) -> Path:
        return self.distill / "ray"

    @property
    def artifact(self) -> Path:
        return self.distill / "artifact"

    # build
    @property
    def warm_start(self) -> Path:
        return self.root / "warm_start.json"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.json"

    @property
    def published(self) -> Path:
        return self.root / "published.json"

    @property
    def lock(self) -> Path:
        return self.root / "build.lock"

    def disposable_after_publish(self) -> tuple[Path, ...]:
        """What a published build no longer needs: its artifact is in the registry and it will not resume."""
        return self.artifact, self.checkpoints, self.ray_storage


def documented_layout() -> list[str]:
    """Every file of a run folder relative to its root, as docs/format.md lists them (NNN for numbers)."""
    from cartridges.stages.distillation.checkpoints import STATE_FILE, TENSORS_FILE

    run = RunDir(Path("."))
    folders = {run.synthesis, run.shards, run.distill, run.checkpoints, run.artifact, run.ray_storage}
    files = [getattr(run, name) for name, value in vars(RunDir).items() if isinstance(value, property)]
    files = [str(path) for path in files if path not in folders]
    files += [str(run.shards / "shard-NNNNN.parquet"), str(run.artifact) + "/", str(run.ray_storage) + "/"]
    files += [str(run.checkpoints / "step-NNNNNN" / name) for name in (TENSORS_FILE, STATE_FILE)]
    return sorted(files)
