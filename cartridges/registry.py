"""A registry of immutable, versioned cartridges on a local folder or any fsspec URL.

Layout (readable without this code)::

    <root>/<name>/<version>/{manifest.json, adapter_config.json, adapter_model.safetensors}
    <root>/<name>/aliases.json          {"stable": 3, ...}
    <root>/.staging/<uuid>/             uploads in progress (never listed)
    <root>/.state/<file>.json           service state (the scheduler's schedules and history)

A version becomes visible in one step: the complete staging folder is renamed to `<name>/<N>`.
On a local filesystem that rename is atomic and fails when `<N>` exists, so a crash never leaves
a half version and concurrent publishers get distinct versions. Object stores have no atomic
folder rename; there the move is guarded by a lock within one process only.
"""

import json
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cartridges.atomic import rename_unless_exists, write_atomically, write_folder_atomically
from cartridges.errors import CartridgeError
from cartridges.home import cartridges_home
from cartridges.manifest import MANIFEST_FILE, PAYLOAD_FILES, Manifest, verify_payload
from cartridges.names import LATEST, Ref, parse_ref, validate_name

ALIASES_FILE = "aliases.json"
STAGING = ".staging"
STATE = ".state"  # service state kept with the registry (schedules, build history)
TRASH = ".trash"
MAX_PUBLISH_ATTEMPTS = 1000
_REMOTE_COMMIT_LOCK = threading.Lock()


@dataclass(frozen=True)
class Entry:
    name: str
    version: int
    manifest: Manifest
    aliases: tuple[str, ...]


class Registry:
    def __init__(self, root: str | Path):
        self.url = str(root)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def _path(self, *parts: object) -> str:
        return "/".join([self.root.rstrip("/"), *(str(p) for p in parts)])

    # ---- reading -------------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        entries = self.fs.ls(self.root, detail=True)
        return sorted(
            Path(e["name"]).name for e in entries if e["type"] == "directory" and not Path(e["name"]).name.startswith(".")
        )

    def versions(self, name: str) -> list[int]:
        folder = self._path(validate_name(name))
        if not self.fs.exists(folder):
            return []
        found = (Path(e["name"]).name for e in self.fs.ls(folder, detail=True) if e["type"] == "directory")
        return sorted(int(n) for n in found if n.isdigit())

    def aliases(self, name: str) -> dict[str, int]:
        path = self._path(validate_name(name), ALIASES_FILE)
        if not self.fs.exists(path):
            return {}
        return json.loads(self.fs.cat_file(path))

    def resolve(self, ref: str | Ref) -> tuple[str, int]:
        """`name`, `name@3`, `name@latest` or `name@<alias>` -> (name, version)."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        versions = self.versions(parsed.name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise CartridgeError(f"no cartridge named {parsed.name!r} in {self.url} (available: {known})")
        if parsed.selector == LATEST:
            return parsed.name, versions[-1]
        if parsed.selector.isdigit():
            version = int(parsed.selector)
            if version not in versions:
                raise CartridgeError(f"{parsed.name} has no version {version} (versions: {', '.join(map(str, versions))})")
            return parsed.name, version
        aliases = self.aliases(parsed.name)
        if parsed.selector not in aliases:
            known = ", ".join(sorted(aliases)) or "none"
            raise CartridgeError(f"{parsed.name} has no alias {parsed.selector!r} (aliases: {known}; or use @latest / @N)")
        return parsed.name, aliases[parsed.selector]

    def show(self, ref: str | Ref) -> Manifest:
        name, version = self.resolve(ref)
        path = self._path(name, version, MANIFEST_FILE)
        return Manifest.from_json(self.fs.cat_file(path).decode(), f"{self.url}/{name}/{version}")

    def list(self) -> list[Entry]:
        entries = []
        for name in self.names():
            by_version: dict[int, list[str]] = {}
            for alias, version in self.aliases(name).items():
                by_version.setdefault(version, []).append(alias)
            for version in self.versions(name):
                entries.append(Entry(name, version, self.show(Ref(name, str(version))), tuple(sorted(by_version.get(version, [])))))
        return entries

    def local_path(self, ref: str | Ref) -> Path:
        """A local folder holding the artifact (remote registries are copied into the cache once)."""
        name, version = self.resolve(ref)
        source = self._path(name, version)
        if self.is_local:
            return Path(source)
        cached = cartridges_home() / "cache" / self.fs.protocol[0] / self.root.strip("/") / name / str(version)
        if not (cached / MANIFEST_FILE).is_file():

            def download(folder: Path) -> None:
                for file in (*PAYLOAD_FILES, MANIFEST_FILE):
                    self.fs.get_file(f"{source}/{file}", str(folder / file))

            write_folder_atomically(cached, download)  # a concurrent download that won is as good
        return cached

    def verify(self, ref: str | Ref) -> Manifest:
        """Check every payload file against the manifest's sha256; raise on any mismatch."""
        folder = self.local_path(ref)
        manifest = Manifest.read(folder)
        verify_payload(folder, manifest)
        return manifest

    # ---- writing -------------------------------------------------------------------------
    def publish(self, folder: Path, name: str) -> Manifest:
        """Publish a local artifact folder as the next version of `name`; returns the stored manifest."""
        validate_name(name)
        manifest = Manifest.read(folder)
        verify_payload(folder, manifest)
        staging = self._path(STAGING, uuid.uuid4().hex)
        self.fs.makedirs(staging, exist_ok=True)
        self.fs.makedirs(self._path(name), exist_ok=True)
        try:
            for file in PAYLOAD_FILES:
                self.fs.put_file(str(folder / file), f"{staging}/{file}")
            for _ in range(MAX_PUBLISH_ATTEMPTS):
                versions = self.versions(name)
                version = (versions[-1] if versions else 0) + 1
                stored = manifest.model_copy(update={"name": name, "version": version})
                self.fs.pipe_file(f"{staging}/{MANIFEST_FILE}", stored.to_json().encode())
                if self._commit(staging, self._path(name, version)):
                    return stored
        finally:
            if self.fs.exists(staging):
                self.fs.rm(staging, recursive=True)
        raise CartridgeError(f"could not publish {name}: too many concurrent publishers, try again")

    def _commit(self, staging: str, target: str) -> bool:
        """Make `staging` visible as `target` in one step; False if `target` already exists."""
        if self.is_local:
            return rename_unless_exists(staging, target)
        with _REMOTE_COMMIT_LOCK:
            if self.fs.exists(target):
                return False
            self.fs.mv(staging, target, recursive=True)
            return True

    def set_alias(self, ref: str | Ref, alias: str) -> tuple[str, int]:
        """Point `alias` (e.g. `stable`) at the version `ref` resolves to."""
        validate_name(alias, "alias")
        if alias == LATEST or alias.isdigit():
            raise CartridgeError(f"alias {alias!r} is reserved: 'latest' and numbers always mean versions")
        name, version = self.resolve(ref)
        aliases = self.aliases(name) | {alias: version}
        self._write_json(self._path(name, ALIASES_FILE), aliases)
        return name, version

    def remove_alias(self, name: str, alias: str) -> None:
        aliases = self.aliases(name)
        if alias not in aliases:
            raise CartridgeError(f"{name} has no alias {alias!r}")
        del aliases[alias]
        self._write_json(self._path(name, ALIASES_FILE), aliases)

    def remove(self, ref: str | Ref, force: bool = False) -> tuple[str, int]:
        """Delete one version; refused while an alias points at it unless `force` (which drops the alias)."""
        name, version = self.resolve(ref)
        pointing = sorted(a for a, v in self.aliases(name).items() if v == version)
        if pointing and not force:
            raise CartridgeError(
                f"{name}@{version} is aliased as {', '.join(pointing)}: move the alias first or pass --force"
            )
        if pointing:
            self._write_json(self._path(name, ALIASES_FILE), {a: v for a, v in self.aliases(name).items() if v != version})
        target = self._path(name, version)
        if self.is_local:  # disappear in one step, then clean up
            trash = self._path(TRASH, uuid.uuid4().hex)
            self.fs.makedirs(self._path(TRASH), exist_ok=True)
            os.rename(target, trash)
            shutil.rmtree(trash)
        else:
            self.fs.rm(target, recursive=True)
        return name, version

    def read_state(self, file: str) -> dict:
        """A JSON state file under `.state/` ({} when absent)."""
        path = self._path(STATE, file)
        return json.loads(self.fs.cat_file(path)) if self.fs.exists(path) else {}

    def write_state(self, file: str, data: dict) -> None:
        self.fs.makedirs(self._path(STATE), exist_ok=True)
        self._write_json(self._path(STATE, file), data)

    def _write_json(self, path: str, data: dict) -> None:
        payload = json.dumps(data, indent=2, sort_keys=True).encode()
        if self.is_local:
            write_atomically(Path(path), lambda tmp: tmp.write_bytes(payload))
        else:
            self.fs.pipe_file(path, payload)
