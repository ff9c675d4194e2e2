"""Local copies of a remote registry's artifacts, under `$CARTRIDGES_HOME/cache/artifacts/<manifest digest>/`.

The key is the sha256 of the manifest's bytes, and the manifest holds every payload checksum, so
the key names the content: the registry reads the remote manifest on every resolve (one small
read), and a version replaced or edited on the remote maps to a new folder instead of a stale copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cartridges.artifact.manifest import MANIFEST_FILE, Manifest, manifest_digest, payload_files, verify_payload
from cartridges.atomic import write_folder_atomically
from cartridges.home import cartridges_home

if TYPE_CHECKING:
    from cartridges.registry.store import Registry


def cached_copy(registry: Registry, name: str, version: int) -> Path:
    """The cached folder of `name@version`, downloaded (and checked) when the cache lacks its manifest's digest."""
    manifest_bytes = registry.manifest_bytes(name, version)
    cached = cartridges_home() / "cache" / "artifacts" / manifest_digest(manifest_bytes)
    if not (cached / MANIFEST_FILE).is_file():
        # a concurrent download that won holds the same content
        write_folder_atomically(cached, lambda folder: download(registry, name, version, manifest_bytes, folder))
    return cached


def download(registry: Registry, name: str, version: int, manifest_bytes: bytes, folder: Path) -> None:
    """The payload of `name@version` and the given manifest bytes into `folder`, checked against each other."""
    manifest = Manifest.from_json(manifest_bytes, f"{registry.url}/{name}/{version}")
    for file in payload_files(manifest.method):
        registry.fs.get_file(registry.path(name, version, file), str(folder / file))
    (folder / MANIFEST_FILE).write_bytes(manifest_bytes)
    verify_payload(folder, manifest)
