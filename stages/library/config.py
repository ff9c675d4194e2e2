"""How a corpus larger than one unit becomes a library (`library` section of the build config)."""

from typing import Literal

from pydantic import BaseModel, Field

from cartridges.artifact.precision import Precision
from cartridges.cluster import Executor
from cartridges.library.index import Order, Positions
from cartridges.settings import STRICT_SETTINGS

UnitInit = Literal["kv", "first_tokens", "select", "matched"]


class LibraryConfig(BaseModel):
    model_config = STRICT_SETTINGS

    # Off by default: measured on two collections only, it trails BM25 retrieval on statutes (BENCHMARKS.md
    # "Libraries"), and its KV is stored whole (23 KB a corpus token for SmolLM2-135M at fp16: 5.2 GB for the
    # default corpus), though mapped from its file when used, not loaded.
    enabled: bool = Field(
        False, description="a corpus of more than unit_tokens tokens builds a library; false: one cartridge"
    )
    # Measured on squad-all (BENCHMARKS.md "Libraries"): units of 256 tokens kept as their own KV beat units of
    # 1,024 tokens compressed 4x by `select` at every budget (B=1,024: 4.12 against 4.88 nats) and build in 64 s
    # against 155 s, for 4x the stored KV (fp16: 23 KB a corpus token for SmolLM2-135M).
    unit_tokens: int = Field(
        256, ge=16, description="the most text tokens of a unit (a long document is cut into sections)"
    )
    init: UnitInit = Field(
        "kv",
        description="a unit's prefix: its whole KV (kv), its first tokens' KV, or the closed-form `select` / `matched` block",
    )
    ratio: float = Field(0.25, gt=0, le=1, description="a unit's KV tokens per text token (not for kv)")
    min_tokens: int = Field(
        64, ge=2, description="the fewest KV tokens of a unit's prefix (a shorter unit keeps its whole KV)"
    )
    max_tokens: int = Field(512, ge=2, description="the most KV tokens of a unit's prefix")
    default_budget: int = Field(1024, ge=2, description="KV tokens routed per request when a request names none")
    # Measured on squad-all at B=1,024 (BENCHMARKS.md "Libraries"): contiguous positions with the best unit nearest
    # the chat 4.88 nats, against 5.27 for each unit at its own positions (in any order) and 5.30 contiguous best first.
    order: Order = Field("best_last", description="composition order of the routed units")
    positions: Positions = Field("contiguous", description="units read at their own positions or one run of them")
    precision: Precision = Field("float16", description="how the units' prefixes are stored")

    def unit_budget(self, text_tokens: int) -> int:
        """A unit's KV tokens: its text tokens times the ratio, within [min_tokens, max_tokens] (kv: all of them)."""
        if self.init == "kv":
            return text_tokens
        return min(text_tokens, max(self.min_tokens, min(self.max_tokens, round(self.ratio * text_tokens))))

    def recipe(self) -> dict:
        """What decides a unit's prefix given its text: a unit is reused from another version only when equal."""
        return self.model_dump(include={"init", "ratio", "min_tokens", "max_tokens", "precision"})


class LibraryRunSettings(BaseModel):
    """How a library's units are made; does not change them."""

    model_config = STRICT_SETTINGS

    workers: int = Field(1, ge=1, description="workers making units, each with its own model (Ray actors)")
    cpus_per_worker: float | None = Field(
        None, gt=0, description="Ray CPUs per worker (default: this machine's cores / workers)"
    )
    gpus_per_worker: float = Field(0, ge=0, description="Ray GPUs per worker")
    executor: Executor = Field("auto", description="ray, local, or auto: Ray with RAY_ADDRESS or workers > 1")
