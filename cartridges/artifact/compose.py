"""Publishable composition: several cartridges concatenated into one artifact."""

from dataclasses import replace
from pathlib import Path

from peft import PeftConfig

from cartridges.artifact.folder import Cartridge, save_artifact
from cartridges.artifact.manifest import Manifest, tool_version, utc_now
from cartridges.errors import CartridgeError
from cartridges.runtime import concat_prefixes


def _label(cartridge: Cartridge) -> str:
    m = cartridge.manifest
    return m.label if m.version is not None else str(cartridge.path)


def compose(sources: list[Cartridge], name: str, destination: Path) -> Manifest:
    """Write a `composed` artifact of `sources` in order (as PEFT's `compose_cartridge_adapters`: the
    prefixes concatenated, the first one's frozen sink kept); refuses cartridges of different models."""
    if len(sources) < 2:
        raise CartridgeError("compose needs at least two cartridges")
    prefix = concat_prefixes(sources)
    first = sources[0].manifest
    manifest = first.model_copy(
        update={
            "name": name,
            "version": None,
            "num_tokens": prefix.shape[0],
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
    peft_config = replace(PeftConfig.from_pretrained(str(sources[0].path)), num_virtual_tokens=prefix.shape[0])
    return save_artifact(destination, prefix, peft_config, manifest)
