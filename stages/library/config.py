"""How a corpus larger than one unit becomes a library (`library` section of the build config)."""

from typing import Literal

from pydantic import BaseModel, Field

from cartridges.artifact.precision import Precision
from cartridges.library.index import Order, Positions
from cartridges.settings import STRICT_SETTINGS

UnitInit = Literal["kv", "first_tokens", "select", "matched"]


class LibraryConfig(BaseModel):
    model_config = STRICT_SETTINGS

    # Off by default: a library is loaded whole (its units' KV in float32: 46 KB a corpus token for SmolLM2-135M with
    # `kv` units, 9.5 GB for the 206k-token default corpus), and it is measured on two collections only.
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
