"""Open cartridges by registry reference or folder, and load them onto their model."""

from collections.abc import Sequence
from pathlib import Path

from cartridges.artifact import Cartridge, load_artifact
from cartridges.manifest import MANIFEST_FILE, Manifest
from cartridges.models import DEFAULT_MODEL, EMBEDDED_MODEL_NAME, load_model
from cartridges.registry import Registry
from cartridges.runtime import CartridgeRuntime


def open_cartridge(ref: str, registry: Registry) -> Cartridge:
    """A registry reference (`legal@3`) or a path to an artifact folder, verified on load."""
    path = Path(ref).expanduser()
    if (path / MANIFEST_FILE).is_file():
        return load_artifact(path)
    return load_artifact(registry.local_path(ref))


def model_spec_for(manifest: Manifest) -> str:
    """The model a cartridge was built for, as a spec `load_model` understands."""
    return DEFAULT_MODEL if manifest.model_id == f"embedded:{EMBEDDED_MODEL_NAME}" else manifest.model_id


def load(refs: Sequence[str], registry: Registry, model: str | None = None) -> CartridgeRuntime:
    """Load cartridges (composed in the given order) onto `model`, or the model the first was built for."""
    cartridges = [open_cartridge(ref, registry) for ref in refs]
    loaded = load_model(model or model_spec_for(cartridges[0].manifest))
    return CartridgeRuntime(loaded, cartridges)
