"""Open cartridges by registry reference or folder, and load them onto their model."""

from collections.abc import Sequence
from pathlib import Path

from cartridges.artifact.folder import Cartridge, load_artifact
from cartridges.artifact.manifest import MANIFEST_FILE
from cartridges.errors import CartridgeError
from cartridges.models import load_model, model_spec_of
from cartridges.registry.names import folder_of
from cartridges.registry.store import Registry
from cartridges.runtime import CartridgeRuntime


def open_cartridge(ref: str, registry: Registry) -> Cartridge:
    """A registry reference (`legal@3`) or an explicit folder (`./legal`, `path:legal`), checked on load."""
    folder = folder_of(ref)
    if folder is not None:
        if not (folder / MANIFEST_FILE).is_file():
            raise CartridgeError(f"{folder} is not a cartridge folder ({MANIFEST_FILE} is missing)")
        return load_artifact(folder)
    try:
        where, path = registry.locate(ref)
    except CartridgeError as exc:
        if (Path(ref) / MANIFEST_FILE).is_file():
            raise CartridgeError(f"{exc}; a cartridge folder ./{ref} is here: pass ./{ref} to use it") from None
        raise
    return load_artifact(path, expected=where)


def load(refs: Sequence[str], registry: Registry, model: str | None = None) -> CartridgeRuntime:
    """Load cartridges (composed in the given order) onto `model`, or the model the first was built for."""
    cartridges = [open_cartridge(ref, registry) for ref in refs]
    loaded = load_model(model or model_spec_of(cartridges[0].manifest.model_id))
    return CartridgeRuntime(loaded, cartridges)
