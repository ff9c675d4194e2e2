"""Open cartridges by registry reference or folder, and load them onto their model.

A reference may name a library (`cartridges/library`): its units are chosen per request by the
router, so a runtime over it exists per request (`routed`), not once per process.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cartridges.artifact.folder import Cartridge, load_artifact
from cartridges.artifact.manifest import MANIFEST_FILE
from cartridges.errors import CartridgeError
from cartridges.library.library import Library, RoutedUnit, is_library, library_of
from cartridges.models import LoadedModel, load_model, model_spec_of
from cartridges.registry.names import folder_of
from cartridges.registry.store import Registry
from cartridges.runtime import CartridgeRuntime


def open_cartridge(ref: str, registry: Registry) -> Cartridge:
    """A registry reference (`legal@3`) or an explicit folder (`./legal`, `path:legal`), checked on load."""
    folder = folder_of(ref)
    if folder is not None:
        if not (folder / MANIFEST_FILE).is_file():
            raise CartridgeError(f"{folder} is not a cartridge folder ({MANIFEST_FILE} is missing)")
        return load_artifact(folder)
    try:
        where, path = registry.locate(ref)
    except CartridgeError as exc:
        if (Path(ref) / MANIFEST_FILE).is_file():
            raise CartridgeError(f"{exc}; a cartridge folder ./{ref} is here: pass ./{ref} to use it") from None
        raise
    return load_artifact(path, expected=where)


@dataclass(frozen=True)
class Opened:
    """Cartridges and libraries in the order given, on their model."""

    loaded: LoadedModel
    items: list[Cartridge | Library]

    @property
    def has_library(self) -> bool:
        return any(isinstance(item, Library) for item in self.items)

    def routed(self, query: str, budget: int | None = None) -> tuple[CartridgeRuntime, list[RoutedUnit]]:
        """A runtime for one request: each library replaced by the units its router picks for `query`."""
        if budget is not None and not self.has_library:
            raise CartridgeError("--budget is the KV tokens a library routes per question; these are single cartridges")
        parts: list[Cartridge] = []
        chosen: list[RoutedUnit] = []
        for item in self.items:
            if isinstance(item, Library):
                units = item.route(query, budget)
                chosen += units
                parts += item.parts(units, self.loaded.model)
            else:
                parts.append(item)
        return CartridgeRuntime(self.loaded, parts), chosen


def open_all(refs: Sequence[str], registry: Registry, model: str | None = None) -> Opened:
    """Open every reference (a library's router and table included) and load the model the first was built for."""
    cartridges = [open_cartridge(ref, registry) for ref in refs]
    items = [library_of(c) if is_library(c) else c for c in cartridges]
    return Opened(load_model(model or model_spec_of(cartridges[0].manifest.model_id)), items)


def load(refs: Sequence[str], registry: Registry, model: str | None = None) -> CartridgeRuntime:
    """Load cartridges (composed in the given order) onto `model`, or the model the first was built for."""
    opened = open_all(refs, registry, model)
    if opened.has_library:
        raise CartridgeError(
            "a library picks its units per question: use `cartridges ask` or `cartridges chat` with it, or pass "
            "single cartridges here"
        )
    return CartridgeRuntime(opened.loaded, opened.items)


def describe_units(units: Sequence[RoutedUnit]) -> str:
    """`units: a.txt#2 (7.31), b.txt (3.02); 512 KV tokens` for a usage line."""
    tokens = sum(r.unit.num_tokens for r in units)
    return f"units: {', '.join(r.describe() for r in units)}; {tokens} KV tokens"
