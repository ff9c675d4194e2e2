"""`cartridges ls`: every live version with its aliases, and what is in the registry folder but not
usable (a `lost+found`, a numbered folder without manifest, a manifest of a newer format), reported
with the reason instead of failing the whole listing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cartridges.artifact.manifest import MANIFEST_FILE, Manifest
from cartridges.errors import CartridgeError
from cartridges.registry.layout import ALIASES_DIR, LEGACY_ALIASES_FILE
from cartridges.registry.names import is_version

if TYPE_CHECKING:
    from cartridges.registry.store import Registry


@dataclass(frozen=True)
class Entry:
    """One usable version: its stored manifest (which names it, checked against where it sits) and the
    aliases that point at it."""

    manifest: Manifest
    aliases: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version


@dataclass(frozen=True)
class Skipped:
    """Something in the registry folder that is not a usable version, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class Listing:
    entries: list[Entry]
    skipped: list[Skipped]


def list_registry(registry: Registry) -> Listing:
    """Every live version with its aliases; what cannot be listed is reported, not raised."""
    entries, skipped = [], []
    names = set(registry.name_folders())
    for child, kind in registry.children(registry.root):
        if kind == "directory" and not child.startswith(".") and child not in names:
            skipped.append(Skipped(child, "not a cartridge name (lowercase letters, digits, '.', '_', '-')"))
    for name in sorted(names):
        try:
            by_version: dict[int, list[str]] = {}
            for alias, version in registry.aliases(name).items():
                by_version.setdefault(version, []).append(alias)
        except CartridgeError as exc:
            skipped.append(Skipped(f"{name}/{ALIASES_DIR}", str(exc)))
            by_version = {}
        for child, _ in registry.children(registry.path(name)):
            if not (is_version(child) or child.startswith(".") or child in (ALIASES_DIR, LEGACY_ALIASES_FILE)):
                skipped.append(Skipped(f"{name}/{child}", "not a version (versions are numbers of ASCII digits)"))
        live, retired = set(registry.versions(name)), set(registry.retired(name))
        claimed = set(registry.claimed(name)) if not registry.is_local else set()
        for version in sorted(registry.numbered(name)):
            if version in retired:
                continue
            if version not in live:
                reason = (
                    "claimed by a publish that has not finished (still uploading, or its publisher stopped); "
                    "the number stays taken"
                    if version in claimed
                    else f"no {MANIFEST_FILE} (incomplete or damaged)"
                )
                skipped.append(Skipped(f"{name}/{version}", reason))
                continue
            try:
                manifest = registry.stored_manifest(name, version)
            except FileNotFoundError:  # removed since it was listed
                continue
            except CartridgeError as exc:
                skipped.append(Skipped(f"{name}/{version}", str(exc)))
                continue
            if (manifest.name, manifest.version) != (name, version):  # a folder moved or copied by hand
                skipped.append(
                    Skipped(f"{name}/{version}", f"its manifest names {manifest.label}, not {name}@{version}")
                )
                continue
            entries.append(Entry(manifest, tuple(sorted(by_version.get(version, [])))))
    return Listing(entries, skipped)
