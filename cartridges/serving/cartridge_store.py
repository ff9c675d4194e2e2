"""Cartridges a server holds in memory: loaded once, checked on load, evicted least-recently-used.

A request names cartridges by registry reference. The reference is resolved on every request, so
when an alias moves (a nightly build publishes `legal@4` and `legal@latest` follows) the next
request gets the new version without a restart, while requests already running keep the tensor
they started with. Only registry references are accepted: a request never names a server path.
A composition is concatenated once and kept (as its parts are), so that the requests that compose the
same versions share one tensor: the decoder holds one copy of a prefix for all its rows.

A library is held like a cartridge, but its units' rows stay mapped from its file (checked once on load,
not counted against the memory budget): per request its router picks units for the request's text, and
their rows, read and converted to the model's dtype, compose like any cartridges; the composition is kept
under the units' ids, so a hot set of units is read and concatenated once.
"""

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cartridges.artifact.folder import check_compatible, load_artifact, to_model_dtype
from cartridges.errors import CartridgeError, NotFound
from cartridges.library.library import Library, RoutedUnit, is_library, library_of
from cartridges.models import LoadedModel
from cartridges.registry.names import Ref, parse_ref
from cartridges.registry.store import Registry
from cartridges.runtime import check_same_model


@dataclass(frozen=True)
class Routing:
    """What a library routes on: the request's text, its KV budget (None: the library's default), pinned unit ids."""

    text: str
    budget: int | None = None
    units: tuple[str, ...] = ()


class CartridgeStore:
    def __init__(self, registry: Registry, loaded: LoadedModel, budget_bytes: int = 2**30):
        self.registry = registry
        self.loaded = loaded
        self.budget_bytes = budget_bytes
        self._held: OrderedDict[str, tuple[object, torch.Tensor]] = OrderedDict()
        self._composed: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._libraries: dict[str, Library] = {}  # table and router of each held library version
        self._loading: dict[str, threading.Lock] = {}  # one load per label, however many requests wait for it

    def resolve(self, reference: str) -> str:
        """`legal`, `legal@3`, `legal@stable` -> `legal@3` now (NotFound, or CartridgeError for a bad name)."""
        name, version = self.registry.resolve(parse_ref(reference))
        return str(Ref(name, str(version)))

    def prefix(
        self, references: Sequence[str], routing: Routing | None = None
    ) -> tuple[list[str], torch.Tensor, list[RoutedUnit]]:
        """The versions the references name now, their prefixes composed in order on the model's device, and
        the units each library among them routed `routing`'s text to."""
        labels = [self.resolve(reference) for reference in references]
        loaded = [self._get(label) for label in labels]
        check_same_model([cartridge for cartridge, _ in loaded])
        parts, keys, units = [], [], []
        for label, (cartridge, prefix) in zip(labels, loaded, strict=True):
            if not is_library(cartridge):
                parts.append(prefix)
                keys.append(label)
                continue
            routing = routing or Routing("")
            library = self._library(label, cartridge)
            routed = library.route(routing.text, routing.budget, routing.units)
            units += routed
            parts += library.placed(routed, self.loaded.model)
            keys += [f"{label}/{r.unit.id}" for r in routed]
        if len(parts) == 1 and not units:  # the held tensor itself: no copy, and the decoder's prompt cache knows it
            return labels, parts[0], units
        key = tuple(keys)
        with self._lock:
            if key in self._composed:
                self._composed.move_to_end(key)
                return labels, self._composed[key], units
        composed = torch.cat(parts)
        with self._lock:
            composed = self._composed.setdefault(key, composed)
            self._evict()
        return labels, composed, units

    def _library(self, label: str, cartridge) -> Library:
        """The library's table and router (read once per version, checked against its tensor)."""
        with self._lock:
            held = self._libraries.get(label)
        if held is None:
            held = library_of(cartridge)
            with self._lock:
                held = self._libraries.setdefault(label, held)
        return held

    def _still_live(self, label: str) -> bool:
        name, _, version = label.partition("@")
        try:
            return int(version) in self.registry.versions(name)
        except (CartridgeError, OSError):
            return False

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return self._size()

    def _size(self) -> int:  # under the lock; a library's rows are mapped from its file, not held
        held = [prefix for cartridge, prefix in self._held.values() if not is_library(cartridge)]
        held += list(self._composed.values())
        return sum(prefix.numel() * prefix.element_size() for prefix in held)

    def _evict(self) -> None:  # under the lock: compositions first, then parts, least recently used first
        while self._size() > self.budget_bytes and self._composed:
            self._composed.popitem(last=False)
        while self._size() > self.budget_bytes and len(self._held) > 1:
            label, _ = self._held.popitem(last=False)
            self._libraries.pop(label, None)

    def _get(self, label: str):
        with self._lock:
            if label in self._held:
                self._held.move_to_end(label)
                return self._held[label]
            loading = self._loading.setdefault(label, threading.Lock())
        with loading:  # requests that arrive together for a new version wait for one load and share its tensor
            with self._lock:
                if label in self._held:
                    self._held.move_to_end(label)
                    return self._held[label]
            try:
                where, path = self.registry.locate(label)
                cartridge = load_artifact(path, expected=where)  # checksums, shapes, bound manifest, finiteness
            except (CartridgeError, OSError) as exc:
                if not self._still_live(label):  # `cartridges rm` took it away while it was being read
                    raise NotFound(f"{label} was removed") from None
                if isinstance(exc, CartridgeError):
                    raise
                raise CartridgeError(f"{label}: cannot be read ({exc.strerror or type(exc).__name__})") from None
            check_compatible(cartridge, self.loaded)  # another model or tokenizer: refused, naming both
            # a library stays mapped at its stored precision: each request converts the rows it routes to
            prefix = (
                cartridge.prompt_embeddings
                if is_library(cartridge)
                else to_model_dtype(cartridge.prompt_embeddings, self.loaded, label)
            )
            with self._lock:
                self._held[label] = (cartridge, prefix)
                self._loading.pop(label, None)
                entry = self._held[label]
                self._evict()
                return entry
