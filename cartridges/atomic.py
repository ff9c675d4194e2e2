"""Write files so that readers see the old file or the complete new one, never a partial one."""

import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary path next to `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomically(path: Path, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text))


def write_parquet_atomically(path: Path, table: pa.Table) -> Path:
    return write_atomically(path, lambda tmp: pq.write_table(table, tmp))


def write_folder_atomically(destination: Path, write: Callable[[Path], None]) -> bool:
    """Fill a temporary folder next to `destination` with `write(tmp)`, then rename it into place.

    Returns False (and discards the new folder) when `destination` appeared meanwhile: another
    writer finished first, and a complete folder is never replaced.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    try:
        write(staging)
        return rename_unless_exists(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def rename_unless_exists(source: str | Path, destination: str | Path) -> bool:
    """Rename a complete folder into place in one step; False if `destination` already exists
    (a non-empty folder is never replaced by rename(2))."""
    try:
        os.rename(source, destination)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    return True
