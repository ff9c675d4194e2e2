"""A run folder kept on an object store (`runs_root: s3://bucket/runs`) for machines that share no disk.

Every process works in a local copy of the run (`$CARTRIDGES_HOME/runs/<run>` on its own machine) and
exchanges files with the run's folder on the store: the build's driver pulls what an earlier build
(on any machine) left before it starts, and pushes each stage's outputs (each synthesis shard as it
is written); a training worker on another node pulls the run's inputs into its own copy, and rank 0
pushes each checkpoint and step record. Every file of a run is written once, atomically (and a
single object put is atomic on a store), except `distill/metrics.jsonl`, which only grows: so a file
is copied when the other side lacks it or holds less of it, and never overwrites a longer copy.
A checkpoint is complete when its `state.json` exists: it is copied after the checkpoint's tensors.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cartridges.errors import CartridgeError
from cartridges.registry.object_store import open_store, protocols, require_bucket, storage_problem
from cartridges.regular_files import require_folder_possible
from cartridges.stages.distillation.checkpoints import STATE_FILE
from cartridges.stages.run_dir import RunDir

KEPT_LOCAL = ("build.lock", "distill/artifact", "distill/ray")  # this machine's lock, scratch and Ray Train state


def _copy_order(relative: str) -> tuple[bool, str]:
    """Completeness markers go last, so a copy cut short never looks complete."""
    return relative.rsplit("/", 1)[-1] == STATE_FILE, relative


def _stored_size(fs, path: str) -> int:
    try:
        return fs.size(path)
    except FileNotFoundError:
        return -1


@dataclass(frozen=True)
class RunMirror:
    local: RunDir
    url: str | None  # the run's folder on the store; None: the run lives on this disk alone

    @property
    def remote(self) -> bool:
        return self.url is not None

    def _store(self):
        return open_store(self.url, "runs root")

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """A runs root that cannot be read or written (a file, a read-only folder, no space) is one line."""
        try:
            yield
        except OSError as exc:
            if storage_problem(exc) is not None and not isinstance(exc, PermissionError):
                raise  # an unreachable store or missing credentials: the CLI says it in its words
            raise CartridgeError(
                f"runs root {self.url}: {exc.strerror or type(exc).__name__}; pass a writable folder or bucket as runs_root"
            ) from None

    def _remote_sizes(self, fs, root: str, under: str = "") -> dict[str, int]:
        """Size of every stored file under `under` (a folder or one file), by its path relative to the run."""
        base = "/".join(p for p in (root, under) if p)
        found = fs.find(base, detail=True) if fs.exists(base) else {}
        return {path[len(root) :].lstrip("/"): info["size"] for path, info in found.items() if info["type"] == "file"}

    def check(self) -> None:
        """Before any work: the runs root can be a folder (nothing is a file there) or its bucket exists."""
        if not self.remote:
            return
        with self._errors():
            fs, root = self._store()
            require_bucket(fs, root, self.url, "runs root")
            if "file" in protocols(fs):
                require_folder_possible(Path(root), "runs root")

    def pull(self, under: str = "") -> int:
        """Copy the store's files (under `under`, relative to the run) that this copy lacks or holds less of; returns how many."""
        if not self.remote:
            return 0
        with self._errors():
            return self._pull(under)

    def _pull(self, under: str) -> int:
        fs, root = self._store()
        root = root.rstrip("/")
        copied = 0
        for relative, size in sorted(
            self._remote_sizes(fs, root, under).items(), key=lambda item: _copy_order(item[0])
        ):
            target = self.local.root / relative
            if target.is_file() and target.stat().st_size >= size:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.pull")
            try:
                fs.get_file(f"{root}/{relative}", str(partial))
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
            copied += 1
        return copied

    def push(self, *paths: Path) -> int:
        """Copy local files (or every file under local folders) that the store lacks or holds less of; returns how many."""
        if not self.remote:
            return 0
        with self._errors():
            return self._push(paths)

    def _push(self, paths: tuple[Path, ...]) -> int:
        fs, root = self._store()  # the bucket was checked once, before the build (`check`): put_file creates none
        files = [f for path in paths for f in ([path] if path.is_file() else sorted(path.rglob("*"))) if f.is_file()]
        relatives = [f.relative_to(self.local.root).as_posix() for f in files]
        wanted = [r for r in relatives if not r.startswith(KEPT_LOCAL) and not r.rsplit("/", 1)[-1].startswith(".")]
        # A few files (a shard, a checkpoint, the step log) are looked up one by one; a whole run in one listing.
        listed = self._remote_sizes(fs, root.rstrip("/")) if len(wanted) > 8 else None
        copied = 0
        for relative in sorted(wanted, key=_copy_order):
            local = self.local.root / relative
            stored = (
                listed.get(relative, -1) if listed is not None else _stored_size(fs, f"{root.rstrip('/')}/{relative}")
            )
            if stored >= local.stat().st_size:
                continue
            if "file" in protocols(fs):  # a folder (a shared mount) needs its subfolders; a bucket has none
                fs.makedirs(f"{root.rstrip('/')}/{relative}".rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(local), f"{root.rstrip('/')}/{relative}")
            copied += 1
        return copied

    def remove(self, path: Path) -> None:
        """Delete a file from the store's copy (a record that no longer holds, such as an old failure)."""
        if not self.remote:
            return
        fs, root = self._store()
        stored = f"{root.rstrip('/')}/{path.relative_to(self.local.root).as_posix()}"
        if fs.exists(stored):
            fs.rm(stored)

    def push_all(self) -> int:
        return self.push(self.local.root)
