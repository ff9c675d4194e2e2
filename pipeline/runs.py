"""Scratch folders under `$CARTRIDGES_HOME/tmp/` (gone when the command ends); run folders are `home.runs_dir()`."""

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cartridges.home import cartridges_home

SCRATCH_DIR = "tmp"


def scratch_root() -> Path:
    return cartridges_home() / SCRATCH_DIR


@contextmanager
def scratch_folder(label: str) -> Iterator[Path]:
    """An empty folder for an artifact on its way to the registry, removed when the block ends, whether
    it succeeded or failed; one left by a killed process is removed by `cartridges gc`."""
    root = scratch_root()
    for attempt in range(3):
        root.mkdir(parents=True, exist_ok=True)
        try:
            path = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=root))
            break
        except FileNotFoundError:  # another command removed the empty root just now
            if attempt == 2:
                raise
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        try:
            root.rmdir()  # only when empty: no other command's scratch folder in it
        except OSError:
            pass
