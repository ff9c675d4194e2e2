"""A library's unit table (`library.json`) and its router: BM25 over the units' text (bm25s, saved with
its own `save`, read back with `allow_pickle=False`).

The table says, for each unit, where its rows sit in the library's one prefix tensor, how many KV
tokens it holds, the text it was made from (its digest), and whether it was built by this version or
taken from an earlier one by digest.
"""

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cartridges.artifact.manifest import LIBRARY_INDEX_FILE, ROUTER_FILES, parse_strict_json, strict_json
from cartridges.errors import CartridgeError, invalid_settings

Order = Literal["best_first", "best_last"]  # composition order of routed units: best score first or nearest the chat
# Where a routed unit's keys are read: each at 0..n-1 as it was made (`own`), or moved on by the rows before it in
# the block so the composed units read as one run of positions (`contiguous`; then the order matters).
Positions = Literal["own", "contiguous"]


class UnitRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    source: str = Field(description="the document the unit is (part of)")
    title: str
    digest: str = Field(description="sha256 of source, tokenizer and text (`units.unit_digest`)")
    text_tokens: int = Field(ge=1, description="tokens of the unit's text")
    offset: int = Field(ge=0, description="first row of the unit's prefix in the library's tensor")
    num_tokens: int = Field(ge=1, description="KV tokens of the unit's prefix")
    init: str = Field(description="what made the unit's prefix (kv, select, matched, first_tokens)")
    reused_from: str | None = Field(None, description="the version its prefix was taken from by digest, if any")


class LibraryIndex(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = 1
    unit_tokens: int = Field(ge=1, description="the most text tokens a unit holds")
    default_budget: int = Field(ge=1, description="KV tokens routed per request when none is asked for")
    order: Order = "best_last"
    positions: Positions = "contiguous"
    units: list[UnitRecord] = Field(min_length=1)

    def to_json(self) -> str:
        return strict_json(self.model_dump(), indent=2) + "\n"

    @classmethod
    def read(cls, folder: Path) -> "LibraryIndex":
        path = folder / LIBRARY_INDEX_FILE
        return cls.parse(path.read_bytes(), str(path))

    @classmethod
    def parse(cls, data: bytes, source: str) -> "LibraryIndex":
        try:
            return cls.model_validate(parse_strict_json(data))
        except ValueError as exc:
            if isinstance(exc, ValidationError):
                raise invalid_settings(exc, source, "library field") from None
            raise CartridgeError(f"{source}: not valid JSON ({exc}); the library is damaged") from None

    def check_rows(self, total: int, where: str) -> None:
        """The units' rows must tile the tensor: contiguous from row 0 to its last row, in table order."""
        row = 0
        for unit in self.units:
            if unit.offset != row:
                raise CartridgeError(
                    f"{where}: unit {unit.id} starts at row {unit.offset}, not {row}: the library is damaged"
                )
            row += unit.num_tokens
        if row != total:
            raise CartridgeError(
                f"{where}: the units hold {row} rows but the prefix has {total}: the library is damaged"
            )
        if len({unit.id for unit in self.units}) != len(self.units):
            raise CartridgeError(f"{where}: two units share an id: the library is damaged")


def _tokens(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class Router:
    """BM25 scores of a request's text against every unit."""

    def __init__(self, retriever, num_units: int):
        self.retriever, self.num_units = retriever, num_units

    @classmethod
    def build(cls, texts: list[str]) -> "Router":
        import bm25s

        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        return cls(retriever, len(texts))

    def save(self, folder: Path) -> None:
        self.retriever.save(str(folder), **ROUTER_FILES, show_progress=False)

    @classmethod
    def load(cls, folder: Path, num_units: int) -> "Router":
        import bm25s

        try:
            retriever = bm25s.BM25.load(str(folder), **ROUTER_FILES, allow_pickle=False, show_progress=False)
        except (OSError, ValueError, KeyError) as exc:
            raise CartridgeError(f"{folder}: the router index cannot be read ({exc}); the library is damaged") from None
        if int(retriever.scores.get("num_docs", -1)) != num_units:
            raise CartridgeError(
                f"{folder}: the router indexes {retriever.scores.get('num_docs')} units, the table {num_units}"
            )
        return cls(retriever, num_units)

    def scores(self, query: str) -> np.ndarray:
        """One BM25 score per unit (all 0 when no word of the query is in any unit)."""
        words = _tokens([query])[0]
        if not words:
            return np.zeros(self.num_units, dtype=np.float32)
        return np.asarray(self.retriever.get_scores(words), dtype=np.float32)
