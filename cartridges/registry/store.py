"""A registry of immutable, versioned cartridges on a local folder or any fsspec URL.

Its layout, readable without this code, is in `registry.layout`. A version becomes visible in one
step. On a local filesystem the complete staging folder is renamed to `<name>/<N>`: the rename is
atomic and fails when `<N>` exists, so a crash never leaves a half version and concurrent publishers
get distinct versions. Object stores have no folder
rename: there the publisher first creates `<name>/<N>/claim.json` with a conditional write (S3
`If-None-Match: *`, GCS generation precondition; `object_store`), which exactly one publisher in
any process or node wins, then moves the files in with the manifest last (a version without one is
not listed). Removing a version leaves its folder behind holding only `retired.json`, so the number
stays taken.

Remote artifacts are cached by their manifest's digest (`artifact_cache`).
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fsspec.implementations.local import LocalFileSystem

from cartridges.artifact.integrity import check_artifact
from cartridges.artifact.manifest import MANIFEST_FILE, Manifest, parse_strict_json, payload_files, strict_json, utc_now
from cartridges.atomic import rename_unless_exists, write_atomically
from cartridges.errors import CartridgeError, NotFound, short_list
from cartridges.registry.artifact_cache import cached_copy, download
from cartridges.registry.layout import (
    ALIASES_DIR,
    CLAIM_FILE,
    LEGACY_ALIASES_FILE,
    RETIRED_FILE,
    STAGING,
    STATE,
)
from cartridges.registry.names import LATEST, NAME_PATTERN, Ref, is_version, parse_ref, validate_name, validate_new_name
from cartridges.registry.object_store import create_exclusively, open_store, require_bucket, require_conditional_writes
from cartridges.regular_files import SMALL_FILE_LIMIT, UnreadableFile, read_regular

if TYPE_CHECKING:
    from cartridges.registry.listing import Listing

MAX_PUBLISH_ATTEMPTS = 1000


class Registry:
    """Read, publish, alias and retire versions; `list()` (registry_listing) reports the rest."""

    def __init__(self, root: str | Path):
        self.url = str(root)
        self.fs, self.root = open_store(self.url, "registry")
        self.is_local = isinstance(self.fs, LocalFileSystem)

    @property
    def is_transient(self) -> bool:
        """A registry that lives only inside this process (fsspec's memory://)."""
        return "memory" in self.fs.protocol

    def path(self, *parts: object) -> str:
        """The store path of `parts` under the registry root."""
        return "/".join([self.root.rstrip("/"), *(str(p) for p in parts)])

    @contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """A registry that cannot be written (read-only, no space, no such bucket) is one line naming the registry."""
        require_bucket(self.fs, self.root, self.url, "registry")
        try:
            yield
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise CartridgeError(
                f"cannot {what} in the registry {self.url}: {reason}; check that it is writable or pass --registry"
            ) from None

    # ---- reading -------------------------------------------------------------------------
    def children(self, folder: str) -> list[tuple[str, str]]:
        """(base name, type) of the entries of a folder; none when it does not exist."""
        if not self.fs.exists(folder):
            return []
        return [(Path(e["name"]).name, e["type"]) for e in self.fs.ls(folder, detail=True)]

    def numbered(self, name: str) -> dict[int, str]:
        """Every version folder of `name` (live, retired or damaged) by number."""
        folders = self.children(self.path(validate_name(name)))
        return {int(n): self.path(name, n) for n, kind in folders if kind == "directory" and is_version(n)}

    def _with_file(self, name: str, file: str) -> set[int]:
        found = self.fs.glob(self.path(name, "*", file))
        return {int(parts[-2]) for parts in (p.split("/") for p in found) if is_version(parts[-2])}

    def versions(self, name: str) -> list[int]:
        """Live versions: complete (manifest present) and not removed."""
        validate_name(name)
        return sorted(self._with_file(name, MANIFEST_FILE) - self._with_file(name, RETIRED_FILE))

    def claimed(self, name: str) -> list[int]:
        """Numbers an object-store publisher took (`claim.json`), committed or not."""
        validate_name(name)
        return sorted(self._with_file(name, CLAIM_FILE))

    def retired(self, name: str) -> list[int]:
        validate_name(name)
        return sorted(self._with_file(name, RETIRED_FILE))

    def names(self) -> list[str]:
        """Cartridge names that have at least one live version."""
        return [name for name in self.name_folders() if self.versions(name)]

    def name_folders(self) -> list[str]:
        return sorted(
            n
            for n, kind in self.children(self.root)
            if kind == "directory" and NAME_PATTERN.fullmatch(n) and ".." not in n
        )

    def read_small_file(self, path: str) -> bytes:
        """A manifest, alias or state file: a regular file of at most `SMALL_FILE_LIMIT` bytes (a link to
        a device or a pipe in a local registry is refused, not read forever)."""
        if self.is_local:
            return read_regular(path, SMALL_FILE_LIMIT)
        data = self.fs.cat_file(path, start=0, end=SMALL_FILE_LIMIT + 1)  # one ranged read, bounded
        if len(data) > SMALL_FILE_LIMIT:
            raise UnreadableFile(path, f"over the limit of {SMALL_FILE_LIMIT:,} bytes")
        return data

    def _read_json(self, path: str) -> dict:
        try:
            data = parse_strict_json(self.read_small_file(path))
        except ValueError as exc:
            raise CartridgeError(f"{path} is damaged ({exc}): fix or delete it") from None
        if not isinstance(data, dict):
            raise CartridgeError(f"{path} is damaged (expected a JSON object): fix or delete it")
        return data

    def aliases(self, name: str) -> dict[str, int]:
        """alias -> version; one file per alias (an older registry's aliases.json is read beneath them)."""
        legacy_path = self.path(validate_name(name), LEGACY_ALIASES_FILE)
        found = dict(self._read_json(legacy_path)) if self.fs.exists(legacy_path) else {}
        for path in self.fs.glob(self.path(name, ALIASES_DIR, "*.json")):
            alias = Path(path).name.removesuffix(".json")
            if not alias.startswith("."):
                found[alias] = self._read_json(path).get("version")
        bad = sorted(
            alias for alias, version in found.items() if not isinstance(version, int) or isinstance(version, bool)
        )
        if bad:
            raise CartridgeError(
                f"{name}: alias {bad[0]!r} does not hold a version number: set it again with `cartridges alias {name}@N {bad[0]}`"
            )
        return found

    def resolve(self, ref: str | Ref) -> tuple[str, int]:
        """`name`, `name@3`, `name@latest` or `name@<alias>` -> (name, live version)."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        versions = self.versions(parsed.name)
        if not versions:
            retired = self.retired(parsed.name)
            if retired:
                were = short_list([f"@{v}" for v in retired]) + (" was" if len(retired) == 1 else " were")
                raise NotFound(
                    f"{parsed.name} has no versions left: {were} removed (numbers are never reused); publish a new one"
                )
            known = short_list(self.names()) or "none"
            raise NotFound(f"no cartridge named {parsed.name!r} in {self.url} (available: {known})")
        if parsed.selector == LATEST:
            return parsed.name, versions[-1]
        if is_version(parsed.selector):
            return parsed.name, self._live(parsed.name, int(parsed.selector), versions)
        aliases = self.aliases(parsed.name)
        if parsed.selector not in aliases:
            known = ", ".join(sorted(aliases)) or "none"
            raise NotFound(f"{parsed.name} has no alias {parsed.selector!r} (aliases: {known}; or use @latest / @N)")
        target = aliases[parsed.selector]
        if target not in versions:
            raise NotFound(
                f"alias {parsed.name}@{parsed.selector} points at {parsed.name}@{target}, which no longer exists: "
                f"`cartridges alias {parsed.name}@N {parsed.selector}` to move it, or `--remove` it"
            )
        return parsed.name, target

    def _live(self, name: str, version: int, versions: list[int]) -> int:
        if version in versions:
            return version
        if version in self.retired(name):
            raise NotFound(f"{name}@{version} was removed (versions: {short_list(versions)})")
        raise NotFound(f"{name} has no version {version} (versions: {short_list(versions)})")

    def manifest_bytes(self, name: str, version: int) -> bytes:
        return self.read_small_file(self.path(name, version, MANIFEST_FILE))

    def stored_manifest(self, name: str, version: int) -> Manifest:
        return Manifest.from_json(self.manifest_bytes(name, version), f"{self.url}/{name}/{version}")

    def show(self, ref: str | Ref) -> Manifest:
        return self.stored_manifest(*self.resolve(ref))

    def list(self) -> Listing:
        """Every live version with its aliases; what cannot be listed is reported, not raised."""
        from cartridges.registry.listing import list_registry

        return list_registry(self)

    def local_path(self, ref: str | Ref) -> Path:
        """A local folder holding the artifact; a remote one is cached by its manifest's digest."""
        return self.locate(ref)[1]

    def locate(self, ref: str | Ref) -> tuple[tuple[str, int], Path]:
        """((name, version), local folder) of a reference; a remote artifact is cached by its manifest's digest."""
        name, version = self.resolve(ref)
        if self.is_local:
            return (name, version), Path(self.path(name, version))
        return (name, version), cached_copy(self, name, version)

    def verify(self, ref: str | Ref) -> Manifest:
        """Every check loading makes (checksums, shapes, bound identity, finiteness, name and version
        against the location), on the stored bytes: a remote version is downloaded afresh."""
        name, version = self.resolve(ref)
        if self.is_local:
            return check_artifact(Path(self.path(name, version)), expected=(name, version))
        with tempfile.TemporaryDirectory(prefix="cartridges-verify-") as scratch:
            download(self, name, version, self.manifest_bytes(name, version), Path(scratch))
            return check_artifact(Path(scratch), expected=(name, version))

    # ---- writing -------------------------------------------------------------------------
    def publish(self, folder: Path, name: str) -> Manifest:
        """Publish a local artifact folder as the next version of `name`; returns the stored manifest.

        The artifact is checked as a load would check it (checksums, shapes, finiteness) before
        anything is written, so a refused artifact leaves the registry as it was.
        """
        validate_new_name(name)
        manifest = check_artifact(folder)
        if not self.is_local:
            require_conditional_writes(self.fs, self.url, f"publish {name}")
        with self.writing(f"publish {name}"):
            staging = self.path(STAGING, uuid.uuid4().hex)
            self.fs.makedirs(staging, exist_ok=True)
            try:
                for file in payload_files(manifest.method):
                    self.fs.put_file(str(folder / file), f"{staging}/{file}")
                version = 0
                for _ in range(MAX_PUBLISH_ATTEMPTS):
                    # retired and claimed numbers count: never reused; a number just lost is not tried again
                    version = max(max(self.numbered(name), default=0), version) + 1
                    stored = manifest.model_copy(update={"name": name, "version": version})
                    self.fs.pipe_file(f"{staging}/{MANIFEST_FILE}", stored.to_json().encode())
                    if self._commit(staging, self.path(name, version)):
                        return stored
            finally:
                if self.fs.exists(staging):
                    self.fs.rm(staging, recursive=True)
        raise CartridgeError(f"could not publish {name}: too many concurrent publishers, try again")

    def find_published(self, name: str, folder: Path) -> Manifest | None:
        """The stored manifest of a live version of `name` with the same payload as `folder`, if any."""
        files = Manifest.read(folder).files
        for version in reversed(self.versions(name)):
            stored = self.stored_manifest(name, version)
            if stored.files == files:
                return stored
        return None

    def _commit(self, staging: str, target: str) -> bool:
        """Make `staging` visible as `target` in one step; False if `target` already exists."""
        if self.is_local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            return rename_unless_exists(staging, target)
        claim = strict_json({"staging": staging.rsplit("/", 1)[-1], "claimed_at": utc_now()}).encode()
        if not create_exclusively(self.fs, f"{target}/{CLAIM_FILE}", claim):
            return False
        staged = sorted(Path(p).name for p in self.fs.find(staging) if Path(p).name != MANIFEST_FILE)
        for file in (*staged, MANIFEST_FILE):  # manifest last: a version without one is not listed
            self.fs.mv(f"{staging}/{file}", f"{target}/{file}")
        return True

    def set_alias(self, ref: str | Ref, alias: str) -> tuple[str, int]:
        """Point `alias` (e.g. `stable`) at the version `ref` resolves to (one file per alias, replaced atomically)."""
        validate_name(alias, "alias")
        if alias == LATEST or alias.isdigit():  # aliases are ASCII (validate_name)
            raise CartridgeError(f"alias {alias!r} is reserved: 'latest' and numbers always mean versions")
        name, version = self.resolve(ref)
        with self.writing(f"set alias {name}@{alias}"):
            self._migrate_legacy_aliases(name)
            self._write_json(self.path(name, ALIASES_DIR, f"{alias}.json"), {"version": version})
        return name, version

    def remove_alias(self, name: str, alias: str) -> None:
        if alias not in self.aliases(name):
            raise CartridgeError(f"{name} has no alias {alias!r}")
        with self.writing(f"remove alias {name}@{alias}"):
            self._migrate_legacy_aliases(name)
            self.fs.rm(self.path(name, ALIASES_DIR, f"{alias}.json"))

    def _migrate_legacy_aliases(self, name: str) -> None:
        """Move an older registry's aliases.json into one file per alias before changing any alias."""
        legacy = self.path(name, LEGACY_ALIASES_FILE)
        if not self.fs.exists(legacy):
            return
        current = {Path(p).name.removesuffix(".json") for p in self.fs.glob(self.path(name, ALIASES_DIR, "*.json"))}
        for alias, version in self._read_json(legacy).items():
            if alias not in current:
                self._write_json(self.path(name, ALIASES_DIR, f"{alias}.json"), {"version": version})
        self.fs.rm(legacy)

    def remove(self, ref: str | Ref, force: bool = False) -> tuple[str, int]:
        """Retire one version: its files go, its number stays taken. Refused while an alias points
        at it unless `force` (which drops the alias)."""
        name, version = self.resolve(ref)
        pointing = sorted(a for a, v in self.aliases(name).items() if v == version)
        if pointing and not force:
            raise CartridgeError(
                f"{name}@{version} is aliased as {', '.join(pointing)}: move the alias first or pass --force"
            )
        with self.writing(f"remove {name}@{version}"):
            for alias in pointing:
                self.remove_alias(name, alias)
            # The marker retires the version in one step; the files go after it.
            self._write_json(self.path(name, version, RETIRED_FILE), {"version": version, "removed_at": utc_now()})
            for file in (MANIFEST_FILE, *payload_files("library")):  # a cartridge's files and a library's own
                path = self.path(name, version, file)
                if self.fs.exists(path):
                    self.fs.rm(path)
        return name, version

    def read_state(self, file: str) -> dict:
        """A JSON state file under `.state/` ({} when absent)."""
        path = self.path(STATE, file)
        return self._read_json(path) if self.fs.exists(path) else {}

    def write_state(self, file: str, data: dict) -> None:
        with self.writing(f"write {file}"):
            self.fs.makedirs(self.path(STATE), exist_ok=True)
            self._write_json(self.path(STATE, file), data)

    def _write_json(self, path: str, data: dict) -> None:
        payload = strict_json(data, indent=2).encode()
        if self.is_local:
            write_atomically(Path(path), lambda tmp: tmp.write_bytes(payload))
        else:
            self.fs.pipe_file(path, payload)
