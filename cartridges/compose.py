"""Publishable composition: several cartridges concatenated into one artifact."""

from pathlib import Path

from cartridges.artifact import Cartridge, compose_artifacts
from cartridges.errors import CartridgeError
from cartridges.manifest import Manifest, tool_version, utc_now
from cartridges.runtime import check_same_model


def _label(cartridge: Cartridge) -> str:
    m = cartridge.manifest
    return f"{m.name}@{m.version}" if m.version else str(cartridge.path)


def compose(sources: list[Cartridge], name: str, destination: Path) -> Manifest:
    """Write a `composed` artifact of `sources` in order; refuses cartridges of different models."""
    if len(sources) < 2:
        raise CartridgeError("compose needs at least two cartridges")
    check_same_model(sources)
    first = sources[0].manifest
    manifest = first.model_copy(
        update={
            "name": name,
            "version": None,
            "num_tokens": sum(s.manifest.num_tokens for s in sources),
            "corpus": [info for s in sources for info in s.manifest.corpus],
            "method": "composed",
            "method_config": {"sources": [_label(s) for s in sources], "order": "concatenated along the sequence"},
            "metrics": {},
            "parent": "+".join(_label(s) for s in sources),
            "files": {},
            "created_at": utc_now(),
            "tool_version": tool_version(),
        }
    )
    return compose_artifacts(destination, sources, manifest)
