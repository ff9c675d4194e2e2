"""Where all state lives: `$CARTRIDGES_HOME` (default `~/.cache/cartridges`)."""

import os
from pathlib import Path


def cartridges_home() -> Path:
    """The root folder for the model cache, the registry and run folders."""
    return Path(os.environ.get("CARTRIDGES_HOME", Path.home() / ".cache" / "cartridges")).expanduser()


def default_registry_url() -> str:
    return str(cartridges_home() / "registry")


def models_dir() -> Path:
    return cartridges_home() / "models"


def runs_dir() -> Path:
    """This machine's run folders (a build's working copy when its runs root is an object store)."""
    return cartridges_home() / "runs"
