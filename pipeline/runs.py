"""Run folders: one per build, under `$CARTRIDGES_HOME/runs/`."""

import uuid
from datetime import UTC, datetime
from pathlib import Path

from cartridges.home import cartridges_home


def new_run_dir(name: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = cartridges_home() / "runs" / f"{name}-{stamp}-{uuid.uuid4().hex[:6]}"
    path.mkdir(parents=True)
    return path
