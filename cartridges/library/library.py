"""A loaded library: one cartridge per unit, all in one checked tensor, and the router that picks them.

Per request the router scores every unit against the request's text and takes units in score order
while their KV tokens fit the budget (a unit that does not fit is passed over for a smaller one; after
the first, only units that share a word with the request). The chosen units compose by concatenation,
as any cartridges do (`runtime.concat_prefixes`), in the library's order: best first, or best last
(nearest the chat); with `contiguous` positions each unit's keys are first moved on by the rows before
it (rotary positions compose), so the block reads as one run of positions. A request may pin units by
id instead.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cartridges.artifact.folder import Cartridge, load_artifact
from cartridges.errors import CartridgeError
from cartridges.kv_layout import kv_shape
from cartridges.library.index import LibraryIndex, Order, Positions, Router, UnitRecord
from cartridges.rotary import move_keys


@dataclass(frozen=True)
class RoutedUnit:
    unit: UnitRecord
    score: float

    def describe(self) -> str:
        return f"{self.unit.id} ({self.score:.2f})"


@dataclass(frozen=True)
class Library:
    cartridge: Cartridge  # every unit's prefix, in table order, checked as any artifact is, mapped from its file
    index: LibraryIndex
    router: Router

    @property
    def label(self) -> str:
        m = self.cartridge.manifest
        return m.label if m.version is not None else str(self.cartridge.path)

    def route(
        self,
        query: str,
        budget: int | None = None,
        pinned: Sequence[str] = (),
        exclude: frozenset[str] = frozenset(),
        order: Order | None = None,
    ) -> list[RoutedUnit]:
        """The units for a request, in composition order (the library's, or `order`); units of the
        documents in `exclude` are never picked (the evaluation's control)."""
        budget = self.index.default_budget if budget is None else budget
        scores = self.router.scores(query)
        if pinned:
            rows = [self._row(unit_id) for unit_id in pinned]
            return [RoutedUnit(self.index.units[row], float(scores[row])) for row in rows]
        chosen: list[RoutedUnit] = []
        used = 0
        for row in np.argsort(-scores, kind="stable"):
            unit = self.index.units[row]
            if chosen and scores[row] <= 0:
                break
            if unit.source in exclude:
                continue
            if used + unit.num_tokens <= budget:
                chosen.append(RoutedUnit(unit, float(scores[row])))
                used += unit.num_tokens
        if not chosen:
            smallest = min(unit.num_tokens for unit in self.index.units)
            raise CartridgeError(
                f"no unit of {self.label} fits a budget of {budget} KV tokens (the smallest holds {smallest}): raise the budget"
            )
        return chosen[::-1] if (order or self.index.order) == "best_last" else chosen

    def _row(self, unit_id: str) -> int:
        for row, unit in enumerate(self.index.units):
            if unit.id == unit_id:
                return row
        example = ", ".join(unit.id for unit in self.index.units[:3])
        raise CartridgeError(f"{self.label} has no unit {unit_id!r} ({len(self.index.units)} units, e.g. {example})")

    def unit(self, unit_id: str) -> UnitRecord:
        return self.index.units[self._row(unit_id)]

    def unit_prefix(self, unit: UnitRecord) -> torch.Tensor:
        """The unit's rows as float32 (read from the mapped file: only these rows)."""
        return self.cartridge.prompt_embeddings[unit.offset : unit.offset + unit.num_tokens].float()

    def placed(self, routed: Sequence[RoutedUnit], model, positions: Positions | None = None) -> list[torch.Tensor]:
        """The routed units' prefixes in order, on the model's device and in its dtype, each moved to its place
        in the block when the library's positions (or `positions`) are contiguous."""
        held = self.cartridge.prompt_embeddings  # mapped at the stored precision: only the routed rows are read
        parts = [held[r.unit.offset : r.unit.offset + r.unit.num_tokens].to(model.device, model.dtype) for r in routed]
        if (positions or self.index.positions) == "contiguous":
            parts = moved_to_their_places(model, parts)
        return parts

    def parts(self, routed: Sequence[RoutedUnit], model) -> list[Cartridge]:
        """The routed units as cartridges of their own, placed (`placed`), to compose."""
        manifest = self.cartridge.manifest
        return [
            Cartridge(
                manifest=manifest.model_copy(update={"num_tokens": p.shape[0], "name": f"{manifest.name}/{r.unit.id}"}),
                prompt_embeddings=p,
                path=self.cartridge.path,
            )
            for r, p in zip(routed, self.placed(routed, model), strict=True)
        ]


def moved_to_their_places(model, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each part's keys (read at 0..n-1) moved on by the rows of the parts before it."""
    layers, heads, _ = kv_shape(model.config)
    moved, offset = [], 0
    for part in parts:
        rows = part.shape[0]
        if offset:
            at = torch.arange(rows, device=part.device)[:, None, None].expand(rows, layers, heads)
            part = move_keys(model, part, at, at + offset)
        moved.append(part)
        offset += rows
    return moved


def is_library(cartridge: Cartridge) -> bool:
    return cartridge.manifest.method == "library"


def library_of(cartridge: Cartridge) -> Library:
    """The library a checked `library` artifact holds: its table must tile the tensor, its router index every unit."""
    index = LibraryIndex.read(cartridge.path)
    index.check_rows(cartridge.manifest.num_tokens, str(cartridge.path))
    return Library(cartridge, index, Router.load(cartridge.path, len(index.units)))


def load_library(folder: Path, expected: tuple[str, int] | None = None) -> Library:
    cartridge = load_artifact(folder, expected)
    if not is_library(cartridge):
        raise CartridgeError(f"{cartridge.manifest.label} is a single cartridge, not a library")
    return library_of(cartridge)
