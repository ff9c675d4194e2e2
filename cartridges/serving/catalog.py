"""The registry as JSON for the page and for scripts: `/v1/cartridges` (every name, its versions and
aliases), `/v1/cartridges/{ref}` (one version: manifest, lineage, evaluation, training curve, a library's
units), its `verify`, and `/v1/schedules`.

Everything here reads stored manifests and small files only (no tensor is loaded), so a listing of a
registry on an object store costs a few reads per version. A version removed between two reads is left
out of a listing, and a detail of it is a `NotFound` (the server's 404), never a half-filled answer.
"""

import re
from typing import Any

from cartridges.artifact.manifest import LIBRARY_INDEX_FILE, Manifest
from cartridges.errors import CartridgeError, NotFound
from cartridges.hashing import sha256_bytes
from cartridges.library.index import LibraryIndex
from cartridges.registry.schedule_state import schedules_and_history
from cartridges.registry.store import Registry

LINEAGE_LIMIT = 64  # parents followed; a chain longer than this (or a loop) stops with a note
# `qa_<method>_<measure>`: what the evaluate stage writes into a manifest's metrics (`qa_gold_nll` is training's)
EVALUATION_KEY = re.compile(r"qa_(?P<method>[a-z0-9]+)_(?P<measure>nll|rank_accuracy|f1)")


def summary(manifest: Manifest, aliases: list[str], size_bytes: int | None) -> dict[str, Any]:
    """What a listing shows of one version."""
    return {
        "ref": manifest.label,
        "name": manifest.name,
        "version": manifest.version,
        "aliases": sorted(aliases),
        "created_at": manifest.created_at,
        "method": manifest.method,
        "num_tokens": manifest.num_tokens,
        "dtype": manifest.dtype,
        "kv_bytes": manifest.kv_bytes,
        "size_bytes": size_bytes,
        "model_id": manifest.model_id,
        "documents": sum(c.num_documents for c in manifest.corpus),
        "corpus_tokens": sum(c.num_tokens for c in manifest.corpus),
        "parent": manifest.parent,
    }


def stored_size(registry: Registry, name: str, version: int) -> int | None:
    """Bytes the version's folder holds in the store; None when it is gone or cannot be read."""
    try:
        return int(registry.fs.du(registry.path(name, version)))
    except (OSError, ValueError):
        return None


def catalog(registry: Registry) -> dict[str, Any]:
    """Every name with its aliases and live versions (newest first), and what the registry could not list."""
    listing = registry.list()
    names: dict[str, dict[str, Any]] = {}
    for entry in listing.entries:
        group = names.setdefault(entry.name, {"name": entry.name, "aliases": {}, "versions": []})
        group["aliases"] |= {alias: entry.version for alias in entry.aliases}
        size = stored_size(registry, entry.name, entry.version)
        group["versions"].append(summary(entry.manifest, list(entry.aliases), size))
    for group in names.values():
        group["versions"].sort(key=lambda v: v["version"], reverse=True)
        group["latest"] = group["versions"][0]["ref"]
    return {
        "object": "list",
        "data": [names[name] for name in sorted(names)],
        "skipped": [{"path": s.path, "reason": s.reason} for s in listing.skipped],
    }


def lineage(registry: Registry, manifest: Manifest) -> list[dict[str, Any]]:
    """The chain of parents, nearest first: each found one with its method and creation time, a missing
    one (removed, or another registry's) marked as such, where the chain ends."""
    chain, seen, parent = [], {manifest.label}, manifest.parent
    while parent is not None and len(chain) < LINEAGE_LIMIT:
        if parent in seen:
            chain.append({"ref": parent, "found": False, "note": "a loop in the lineage"})
            break
        seen.add(parent)
        try:
            found = registry.show(parent)
        except CartridgeError:
            chain.append({"ref": parent, "found": False, "note": "not in this registry (removed or elsewhere)"})
            break
        chain.append({"ref": found.label, "found": True, "method": found.method, "created_at": found.created_at})
        parent = found.parent
    return chain


def evaluation_rows(metrics: dict[str, float]) -> list[dict[str, Any]]:
    """The build's QA scores as one row per context scored (`none`, `start`, `cartridge`, ...)."""
    rows: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        match = EVALUATION_KEY.fullmatch(key)
        if match and match["method"] != "gold":
            rows.setdefault(match["method"], {"method": match["method"]})[match["measure"]] = value
    return list(rows.values())


def library_units(registry: Registry, manifest: Manifest) -> dict[str, Any]:
    """A library's unit table as stored, checked against the manifest's checksum of it."""
    path = registry.path(manifest.name, manifest.version, LIBRARY_INDEX_FILE)
    data = registry.read_small_file(path)
    if sha256_bytes(data) != manifest.files.get(LIBRARY_INDEX_FILE):
        raise CartridgeError(f"{manifest.label}: {LIBRARY_INDEX_FILE} does not match its checksum; run verify")
    index = LibraryIndex.parse(data, f"{manifest.label}/{LIBRARY_INDEX_FILE}")
    return index.model_dump()


def detail(registry: Registry, reference: str) -> dict[str, Any]:
    """One version, everything the page shows of it. NotFound when the reference names no live version."""
    name, version = registry.resolve(reference)
    try:
        manifest = registry.stored_manifest(name, version)
    except FileNotFoundError:  # removed between resolving and reading
        raise NotFound(f"{name}@{version} was removed") from None
    aliases = [alias for alias, target in registry.aliases(name).items() if target == version]
    recipe = {key: value for key, value in manifest.method_config.items() if key != "training_curve"}
    found = summary(manifest, aliases, stored_size(registry, name, version)) | {
        "manifest": manifest.model_dump(),
        "recipe": recipe,
        "lineage": lineage(registry, manifest),
        "evaluation": evaluation_rows(manifest.metrics),
        "training_curve": manifest.method_config.get("training_curve"),
        "library": None,
        "library_problem": None,
    }
    if manifest.method == "library":
        try:
            found["library"] = library_units(registry, manifest)
        except (CartridgeError, OSError) as exc:
            found["library_problem"] = str(exc)
    return found


def verification(registry: Registry, reference: str) -> dict[str, Any]:
    """`cartridges verify` of one version, as a result: ok, or the one-line reason it would not load."""
    name, version = registry.resolve(reference)
    try:
        registry.verify(f"{name}@{version}")
    except NotFound:
        raise
    except (CartridgeError, OSError) as exc:
        return {"ref": f"{name}@{version}", "ok": False, "message": str(exc)}
    return {"ref": f"{name}@{version}", "ok": True, "message": "checksums, shapes, bound manifest, finite values"}


def schedules(registry: Registry) -> dict[str, Any]:
    """The nightly schedules and their history, newest outcome first."""
    found, history = schedules_and_history(registry)
    return {
        "schedules": [s.model_dump() for s in sorted(found, key=lambda s: s.name)],
        "history": [h.model_dump() for h in reversed(history)],
    }
