"""`cartridges gc`: remove what interrupted or finished work left behind, never what a build still needs.

Removed, when older than a safe age (nothing a live process is writing): the registry's upload
folders of killed publishers (and on object stores the files moved into a claimed version number
before its publisher stopped: the claim stays, so the number stays taken), scratch folders of killed commands, run folders that hold nothing,
the artifact copies of the commands before scratch folders existed; and, in published builds,
the artifact copy and the checkpoints (the registry has the artifact; a published build does
not resume). Kept: unfinished builds (they resume), the synthesis and prefixes of published
builds (the next build reuses their samples), and any run folder whose build lock is held.
"""

import re
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock, Timeout

from cartridges.home import runs_dir
from cartridges.pipeline.runs import scratch_root
from cartridges.registry.layout import CLAIM_FILE, STAGING
from cartridges.registry.store import Registry
from cartridges.stages.run_dir import RunDir

# Run folders that `init`, `compose` and `distill` made before they used scratch folders: <name>-<UTC stamp>-<6 hex>.
LEGACY_COPY = re.compile(r"^.+-\d{8}T\d{6}Z-[0-9a-f]{6}$")


@dataclass(frozen=True)
class Removal:
    path: str
    reason: str
    bytes: int


def parse_age(text: str) -> float:
    """`90s`, `30m`, `1h`, `2d` or plain seconds -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        from cartridges.errors import CartridgeError

        raise CartridgeError(f"--older-than {text!r}: expected a number with an optional unit s, m, h or d (e.g. 1h)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _age(path: Path) -> float:
    """Seconds since anything in `path` last changed."""
    stamps = [path.stat().st_mtime, *(p.stat().st_mtime for p in path.rglob("*") if not p.is_symlink())]
    return time.time() - max(stamps)


def _remove(path: Path, reason: str, dry_run: bool) -> Removal:
    removal = Removal(str(path), reason, _size(path))
    if not dry_run:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return removal


def collect_garbage(registry: Registry, older_than_seconds: float, dry_run: bool = False) -> list[Removal]:
    removed: list[Removal] = []
    for upload in stale_uploads(registry, older_than_seconds):
        removed.append(Removal(upload, "upload of a publish that did not finish", 0))
        if not dry_run:
            with registry.writing("remove an old upload"):
                registry.fs.rm(upload, recursive=True)
    for version_folder in stale_claims(registry, older_than_seconds):
        partial = [path for path in registry.fs.find(version_folder) if not path.endswith(f"/{CLAIM_FILE}")]
        if not partial:
            continue
        removed.append(Removal(version_folder, "files of a publish that took this number and did not finish", 0))
        if not dry_run:
            with registry.writing("remove the files of an unfinished publish"):
                registry.fs.rm(partial)  # the claim stays: the number is never given to another artifact
    scratch = scratch_root()
    for folder in sorted(scratch.iterdir()) if scratch.is_dir() else []:
        if _age(folder) >= older_than_seconds:
            removed.append(_remove(folder, "scratch folder of a command that did not finish", dry_run))
    runs = runs_dir()
    for run in sorted(runs.iterdir()) if runs.is_dir() else []:
        if run.is_dir() and _age(run) >= older_than_seconds:
            removed += _clean_run(run, dry_run)
    return removed


def stale_uploads(registry: Registry, older_than_seconds: float) -> list[str]:
    """Upload folders under the registry's `.staging/` untouched for `older_than_seconds`: left by killed publishers."""
    uploads = [registry.path(STAGING, name) for name, _ in registry.children(registry.path(STAGING))]
    return [path for path in uploads if _store_age(registry, path) >= older_than_seconds]


def stale_claims(registry: Registry, older_than_seconds: float) -> list[str]:
    """Version folders on an object store whose publisher took the number and stopped before the manifest
    (claim.json without manifest.json), untouched for `older_than_seconds`."""
    if registry.is_local:
        return []
    found = []
    for name in registry.name_folders():
        unfinished = set(registry.claimed(name)) - set(registry.versions(name)) - set(registry.retired(name))
        found += [registry.path(name, v) for v in sorted(unfinished)]
    return [path for path in found if _store_age(registry, path) >= older_than_seconds]


def _store_age(registry: Registry, path: str) -> float:
    """Seconds since anything under a store path last changed (0 when the store cannot say: treated as new)."""
    stamps = []
    for item in [path, *registry.fs.find(path)]:
        try:
            stamp = registry.fs.modified(item)
        except (NotImplementedError, OSError, KeyError):  # object stores keep no times for "folders"
            continue
        stamps.append(stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC))
    return (datetime.now(UTC) - max(stamps)).total_seconds() if stamps else 0.0


def _clean_run(folder: Path, dry_run: bool) -> list[Removal]:
    run = RunDir(folder)
    if LEGACY_COPY.match(folder.name) and not run.lock.exists():
        return [_remove(folder, "artifact copy of an earlier init/compose/distill (the registry has it)", dry_run)]
    lock = FileLock(run.lock)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return []  # a build is running in it
    try:
        contents = set(folder.iterdir()) - {run.lock}
        if not contents:
            return [_remove(folder, "empty run folder of a build that stopped before its first stage", dry_run)]
        if run.published not in contents:
            return []  # unfinished: running the build again resumes it
        return [
            _remove(part, "published build: the registry has the artifact, it will not resume", dry_run)
            for part in run.disposable_after_publish()
            if part.exists()
        ]
    finally:
        lock.release()
