"""Is an artifact folder what its manifest says? Every check short of loading the model, without torch.

Used on load, on publish and by `cartridges verify`, so all three check the same things: the
manifest's format, its name and version against where it sits, the payload checksums, the adapter
config and the tensor's shape and dtype against the manifest, the manifest against the identity
bound into the payload when it was saved (format 2), and that every prefix value is finite as the
runtime will read it (float32, int8 dequantised: `inspect_artifact`, which `load_artifact` takes its
tensor from, so what is checked is what is used). A library's prefix (every unit's rows, gigabytes for a
large corpus) is not read into memory: it is mapped from the file at its stored precision, its values
checked a block of rows at a time, and a request reads only the rows of the units it routes to.
Kept free of torch (numpy reads the tensor) so that `verify` and `publish` start in a fraction of a second.
"""

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from cartridges.artifact.manifest import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    PAYLOAD_FILES,
    PRECISIONS,
    Manifest,
    parse_strict_json,
    payload_files,
    strict_json,
    verify_payload,
)
from cartridges.errors import CartridgeError

PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"
SCALE_SUFFIX = (
    "_scale"  # an int8 prefix keeps its per-channel scales under "<key>_scale" (cartridges/artifact/precision.py)
)
BOUND_MANIFEST_KEY = "cartridges.manifest"  # safetensors header metadata: the manifest fields the payload binds
EXTRA_FILES_KEY = "payload_sha256"  # method_config: sha256 of an artifact's own further files (a library's), bound
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "I8": "int8"}  # the stored dtypes the format defines


def check_artifact(folder: Path, expected: tuple[str, int] | None = None) -> Manifest:
    """Raise a CartridgeError naming the first problem; `expected`: (name, version) of its registry location."""
    return inspect_artifact(folder, expected)[0]


def inspect_artifact(folder: Path, expected: tuple[str, int] | None = None) -> tuple[Manifest, np.ndarray]:
    """`check_artifact`, and the prefix as the runtime will use it: float32, an int8 prefix dequantised (a
    library's: mapped at its stored precision; its users convert the rows they read).

    Finiteness is checked on those values, not on the stored ones: an int8 value times a scale near
    float32's largest, or a stored value beyond float32's range, is infinite once loaded.
    """
    manifest = Manifest.read(folder)
    if expected is not None and (manifest.name, manifest.version) != expected:
        raise CartridgeError(
            f"{folder}: manifest says {manifest.name}@{manifest.version} but it is stored as {expected[0]}@{expected[1]}; "
            "the manifest was edited or moved: restore it"
        )
    verify_payload(folder, manifest)
    _check_adapter_config(folder, manifest)
    path = folder / ADAPTER_WEIGHTS_FILE
    try:
        bound, prefix = _read_prefix(path, manifest)
    except SafetensorError as exc:  # a pickle, a truncated file, a damaged header (checksums fixed to match)
        raise CartridgeError(
            f"{path}: not a readable safetensors file ({' '.join(str(exc).split())[:120]}); "
            "the artifact is damaged: remove it and rebuild"
        ) from None
    _check_bound_manifest(folder, manifest, bound)
    _check_extra_files(folder, manifest)
    non_finite = non_finite_values(prefix)
    if non_finite:
        raise CartridgeError(
            f"{folder}: {non_finite} of {prefix.size} prefix values are NaN or infinite as loaded (float32"
            f"{', after dequantisation' if manifest.dtype == 'int8' else ''}); the cartridge is unusable: remove it and rebuild"
        )
    return manifest, prefix


CHECK_ROWS = 1024  # rows of a prefix converted to float32 at a time to check their values


def non_finite_values(prefix: np.ndarray) -> int:
    """NaN and infinite values of a prefix as the runtime reads it (float32), a block of rows at a time, so a
    mapped library is checked without a float32 copy of it, and with plain reads of its file: its mapping's
    pages are only brought in for the rows a request uses."""
    return sum(int((~np.isfinite(block.astype(np.float32))).sum()) for block in _row_blocks(prefix))


def _row_blocks(prefix: np.ndarray):
    if not isinstance(prefix, np.memmap):
        yield from (prefix[row : row + CHECK_ROWS] for row in range(0, prefix.shape[0], CHECK_ROWS))
        return
    rows, width = prefix.shape
    row_bytes = width * prefix.dtype.itemsize
    with open(prefix.filename, "rb") as stream:
        stream.seek(prefix.offset)
        for row in range(0, rows, CHECK_ROWS):
            count = min(CHECK_ROWS, rows - row)
            yield np.frombuffer(stream.read(count * row_bytes), dtype=prefix.dtype).reshape(count, width)


def mapped_tensor(path: Path, key: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor of a safetensors file (whose header was read and checked) mapped, not read: its pages are read
    when used. Copy-on-write, so torch can wrap it; nothing is ever written back to the file."""
    with path.open("rb") as stream:
        header_size = int.from_bytes(stream.read(8), "little")
        header = json.loads(stream.read(header_size))
    begin, _ = header[key]["data_offsets"]
    return np.memmap(path, dtype=np.dtype(dtype), mode="c", offset=8 + header_size + begin, shape=shape)


def bound_metadata(manifest: Manifest) -> dict[str, str]:
    """The safetensors header metadata that binds `manifest` into the payload."""
    return {BOUND_MANIFEST_KEY: strict_json(manifest.bound_fields())}


def _read_prefix(path: Path, manifest: Manifest) -> tuple[str | None, np.ndarray]:
    """(bound manifest, float32 prefix) of a payload whose tensors match the manifest's shape and dtype; a
    library's prefix mapped at its stored precision (float16 or float32; int8 is read and dequantised)."""
    width = manifest.num_layers * 2 * manifest.num_kv_heads * manifest.head_dim
    with safe_open(str(path), framework="numpy") as weights:
        if PROMPT_EMBEDDINGS_KEY not in weights.keys():
            raise CartridgeError(f"{path}: no {PROMPT_EMBEDDINGS_KEY!r} tensor")
        bound = (weights.metadata() or {}).get(BOUND_MANIFEST_KEY)
        stored = weights.get_slice(PROMPT_EMBEDDINGS_KEY)
        shape, dtype = tuple(stored.get_shape()), SAFETENSORS_DTYPES.get(stored.get_dtype())
        if dtype is None:
            raise CartridgeError(
                f"{path}: the prefix is stored as {stored.get_dtype()}, which the format does not define "
                f"({', '.join(PRECISIONS)}): rebuild or re-save it at one of those"
            )
        if shape != (manifest.num_tokens, width):
            raise CartridgeError(
                f"{path}: tensor shape {shape} does not match the manifest ({manifest.num_tokens}, {width})"
            )
        if dtype != manifest.dtype:
            raise CartridgeError(f"{path}: tensor dtype {dtype} does not match the manifest's {manifest.dtype}")
        if manifest.method == "library" and dtype != "int8":  # read per request, a unit's rows at a time
            return bound, mapped_tensor(path, PROMPT_EMBEDDINGS_KEY, dtype, shape)
        values = weights.get_tensor(PROMPT_EMBEDDINGS_KEY)
        scales = _read_scales(path, weights, width) if dtype == "int8" else None
    return bound, dequantize(values, scales)


def dequantize(values: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """The float32 prefix of stored values: int8 times its column's scale, other dtypes converted."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow becomes inf, which the caller counts
        if scales is None:
            return values.astype(np.float32)
        return values.astype(np.float32) * scales.astype(np.float32)


def _read_scales(path: Path, weights, width: int) -> np.ndarray:
    """An int8 prefix is only as good as its per-channel scales: one finite, positive float32 scale per column."""
    key = PROMPT_EMBEDDINGS_KEY + SCALE_SUFFIX
    if key not in weights.keys():
        raise CartridgeError(f"{path}: an int8 prefix without its {key!r} tensor cannot be read: rebuild it")
    stored = weights.get_slice(key)
    if stored.get_dtype() != "F32" or tuple(stored.get_shape()) != (width,):
        raise CartridgeError(
            f"{path}: {key} must be {width} float32 scales, not {stored.get_dtype()} {tuple(stored.get_shape())}"
        )
    scales = weights.get_tensor(key)
    if not (np.isfinite(scales) & (scales > 0)).all():
        raise CartridgeError(f"{path}: {key} must hold {width} finite positive scales: rebuild the cartridge")
    return scales


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


def _check_extra_files(folder: Path, manifest: Manifest) -> None:
    """A library's own files (unit table, router) must be the ones it was saved with: their checksums are
    bound into the payload with the rest of its identity, so editing a file and its checksum is caught."""
    extra = [name for name in payload_files(manifest.method) if name not in PAYLOAD_FILES]
    if not extra:
        return
    bound = manifest.method_config.get(EXTRA_FILES_KEY)
    if not isinstance(bound, dict) or any(bound.get(name) != manifest.files.get(name) for name in extra):
        raise CartridgeError(
            f"{folder}: the library's files ({', '.join(extra)}) differ from what it was saved with; "
            "the artifact was edited: remove it and rebuild"
        )
    from cartridges.library.index import LibraryIndex

    LibraryIndex.read(folder).check_rows(manifest.num_tokens, str(folder))


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
