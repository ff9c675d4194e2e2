"""Is an artifact folder what its manifest says? Every check short of loading the model, without torch.

Used on load, on publish and by `cartridges verify`, so all three check the same things: the
manifest's format, its name and version against where it sits, the payload checksums, the adapter
config and the tensor's shape and dtype against the manifest, the manifest against the identity
bound into the payload when it was saved (format 2), and that every prefix value is finite.
Kept free of torch (numpy reads the tensor) so that `verify` and `publish` start in a fraction of a second.
"""

from pathlib import Path

import numpy as np
from safetensors import safe_open

from cartridges.errors import CartridgeError
from cartridges.manifest import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    Manifest,
    parse_strict_json,
    strict_json,
    verify_payload,
)

PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"
SCALE_SUFFIX = "_scale"  # an int8 prefix keeps its per-channel scales under "<key>_scale" (cartridges/precision.py)
BOUND_MANIFEST_KEY = "cartridges.manifest"  # safetensors header metadata: the manifest fields the payload binds
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I8": "int8"}


def check_artifact(folder: Path, expected: tuple[str, int] | None = None) -> Manifest:
    """Raise a CartridgeError naming the first problem; `expected`: (name, version) of its registry location."""
    manifest = Manifest.read(folder)
    if expected is not None and (manifest.name, manifest.version) != expected:
        raise CartridgeError(
            f"{folder}: manifest says {manifest.name}@{manifest.version} but it is stored as {expected[0]}@{expected[1]}; "
            "the manifest was edited or moved: restore it"
        )
    verify_payload(folder, manifest)
    _check_adapter_config(folder, manifest)
    bound, shape, dtype, non_finite, size = _inspect_prefix(folder / ADAPTER_WEIGHTS_FILE)
    width = manifest.num_layers * 2 * manifest.num_kv_heads * manifest.head_dim
    if shape != (manifest.num_tokens, width):
        raise CartridgeError(
            f"{folder}: tensor shape {shape} does not match the manifest ({manifest.num_tokens}, {width})"
        )
    if dtype != manifest.dtype:
        raise CartridgeError(f"{folder}: tensor dtype {dtype} does not match the manifest's {manifest.dtype}")
    if dtype == "int8":
        _check_scales(folder / ADAPTER_WEIGHTS_FILE, width)
    _check_bound_manifest(folder, manifest, bound)
    if non_finite:
        raise CartridgeError(
            f"{folder}: {non_finite} of {size} prefix values are NaN or infinite; the cartridge is unusable: remove it and rebuild"
        )
    return manifest


def bound_metadata(manifest: Manifest) -> dict[str, str]:
    """The safetensors header metadata that binds `manifest` into the payload."""
    return {BOUND_MANIFEST_KEY: strict_json(manifest.bound_fields())}


def _inspect_prefix(path: Path) -> tuple[str | None, tuple[int, ...], str, int, int]:
    """(bound manifest, shape, dtype, non-finite count, size) of the prefix tensor."""
    with safe_open(str(path), framework="numpy") as weights:
        if PROMPT_EMBEDDINGS_KEY not in weights.keys():
            raise CartridgeError(f"{path}: no {PROMPT_EMBEDDINGS_KEY!r} tensor")
        bound = (weights.metadata() or {}).get(BOUND_MANIFEST_KEY)
        tensor = weights.get_slice(PROMPT_EMBEDDINGS_KEY)
        shape, dtype = tuple(tensor.get_shape()), SAFETENSORS_DTYPES.get(tensor.get_dtype(), tensor.get_dtype())
        if dtype == "bfloat16":
            return bound, shape, dtype, _non_finite_bfloat16(path), int(np.prod(shape))
        values = weights.get_tensor(PROMPT_EMBEDDINGS_KEY)
    return bound, shape, dtype, int((~np.isfinite(values)).sum()), int(values.size)


def _check_scales(path: Path, width: int) -> None:
    """An int8 prefix is only as good as its per-channel scales: one finite, positive scale per column."""
    key = PROMPT_EMBEDDINGS_KEY + SCALE_SUFFIX
    with safe_open(str(path), framework="numpy") as weights:
        if key not in weights.keys():
            raise CartridgeError(f"{path}: an int8 prefix without its {key!r} tensor cannot be read: rebuild it")
        scales = weights.get_tensor(key)
    if scales.shape != (width,) or not (np.isfinite(scales) & (scales > 0)).all():
        raise CartridgeError(f"{path}: {key} must hold {width} finite positive scales: rebuild the cartridge")


def _non_finite_bfloat16(path: Path) -> int:
    """numpy has no bfloat16; such a prefix (not written by this tool today) is read with torch."""
    import torch

    with safe_open(str(path), framework="pt") as weights:
        return int((~torch.isfinite(weights.get_tensor(PROMPT_EMBEDDINGS_KEY))).sum())


def _check_adapter_config(folder: Path, manifest: Manifest) -> None:
    """PEFT loads the adapter by its config: it must describe the same prefix as the manifest."""
    try:
        config = parse_strict_json((folder / ADAPTER_CONFIG_FILE).read_bytes())
    except ValueError as exc:
        raise CartridgeError(f"{folder}: {ADAPTER_CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CartridgeError(f"{folder}: {ADAPTER_CONFIG_FILE} is not a JSON object")
    expected = {
        "peft_type": "CARTRIDGE",
        "num_virtual_tokens": manifest.num_tokens,
        "num_frozen_tokens": manifest.num_frozen_tokens,
        "num_layers": manifest.num_layers,
        "num_attention_heads": manifest.num_kv_heads,
        "token_dim": manifest.num_kv_heads * manifest.head_dim,
    }
    differing = [
        f"{key} {config.get(key)!r} vs {value!r}" for key, value in expected.items() if config.get(key) != value
    ]
    if differing:
        raise CartridgeError(f"{folder}: {ADAPTER_CONFIG_FILE} does not match the manifest ({'; '.join(differing)})")


def _check_bound_manifest(folder: Path, manifest: Manifest, bound: str | None) -> None:
    """The manifest must equal the identity written into the payload when it was saved (format 2)."""
    if bound is None:
        if manifest.format_version >= 2:
            raise CartridgeError(
                f"{folder}: {ADAPTER_WEIGHTS_FILE} carries no bound manifest, but the manifest says format 2"
            )
        return  # format 1: written before manifests were bound
    try:
        saved = parse_strict_json(bound)
    except ValueError as exc:
        raise CartridgeError(f"{folder}: the manifest bound into {ADAPTER_WEIGHTS_FILE} is damaged ({exc})") from None
    current = parse_strict_json(strict_json(manifest.bound_fields()))
    edited = sorted(key for key in current.keys() | saved.keys() if current.get(key) != saved.get(key))
    if edited:
        raise CartridgeError(
            f"{folder}: manifest field(s) {', '.join(edited)} differ from what the cartridge was saved with; "
            "the manifest was edited: restore it"
        )
