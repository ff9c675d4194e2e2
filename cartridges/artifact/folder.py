"""Save and load cartridge artifacts: a PEFT CARTRIDGE adapter folder plus `manifest.json`.

The tensors live in `adapter_model.safetensors` under PEFT's key `prompt_embeddings`, shaped
`[num_tokens, num_layers * 2 * num_kv_heads * head_dim]`, so `PeftModel.from_pretrained` loads a
cartridge with no code of ours. Nothing is pickled.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import CartridgeConfig
from safetensors.torch import save_file

from cartridges.artifact.integrity import EXTRA_FILES_KEY, PROMPT_EMBEDDINGS_KEY, bound_metadata, inspect_artifact
from cartridges.artifact.manifest import ADAPTER_WEIGHTS_FILE, MANIFEST_FILE, Manifest, payload_checksums
from cartridges.artifact.precision import decode, encode
from cartridges.atomic import write_folder_atomically
from cartridges.errors import CartridgeError
from cartridges.kv_layout import kv_shape
from cartridges.models import LoadedModel, model_spec_of


@dataclass(frozen=True)
class Cartridge:
    """A loaded, verified artifact."""

    manifest: Manifest
    prompt_embeddings: torch.Tensor
    path: Path


def check_kv_shape(manifest: Manifest, model_config, label: str) -> None:
    """The prefix's (layers, KV heads, head dim) must be the model's: a manifest that claims another
    shape (matching fingerprints, edited fields) would index past the model's layers."""
    claimed = (manifest.num_layers, manifest.num_kv_heads, manifest.head_dim)
    actual = kv_shape(model_config)
    if claimed != actual:
        raise CartridgeError(
            f"{label} holds keys and values for {claimed[0]} layers x {claimed[1]} KV heads x {claimed[2]} dims, but "
            f"{manifest.model_id} has {actual[0]} x {actual[1]} x {actual[2]}: the manifest does not describe this "
            "model; the artifact is damaged: remove it and rebuild"
        )


def to_model_dtype(prefix: torch.Tensor, loaded: LoadedModel, label: str) -> torch.Tensor:
    """The prefix on the model's device and in its dtype, refused when a value does not fit that dtype
    (a float32 value past float16's 65,504 is infinite in a half-precision model)."""
    converted = prefix.to(loaded.model.device, loaded.model.dtype)
    if converted.dtype == prefix.dtype:  # no narrowing: the values are those checked when the cartridge loaded
        return converted
    bad = non_finite_count(converted)
    if bad:
        raise CartridgeError(
            f"{label}: {bad} of {converted.numel()} prefix values are out of the range of {loaded.model.dtype} "
            f"(the model's dtype); load the model in float32 or rebuild the cartridge for it"
        )
    return converted


def describe_model(loaded: LoadedModel) -> dict:
    """The manifest fields that tie an artifact to the model it was built for."""
    num_layers, num_kv_heads, head_dim = kv_shape(loaded.model.config)
    return {
        "model_id": loaded.model_id,
        "model_fingerprint": loaded.fingerprint,
        "tokenizer_fingerprint": loaded.tokenizer_fingerprint,
        "num_layers": num_layers,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
    }


def non_finite_count(tensor: torch.Tensor, rows: int = 4096) -> int:
    """NaN and infinite values, counted a block of rows at a time: a library's prefix is gigabytes, and a
    mask of it at once would be another gigabyte per 1G values."""
    if tensor.dim() == 0:
        return int(~torch.isfinite(tensor))
    return sum(int((~torch.isfinite(tensor[row : row + rows])).sum()) for row in range(0, tensor.shape[0], rows))


def save_artifact(
    destination: Path,
    prompt_embeddings: torch.Tensor,
    peft_config: CartridgeConfig,
    manifest: Manifest,
    write_extra: Callable[[Path], dict[str, str]] | None = None,
) -> Manifest:
    """Write a complete artifact folder (temp folder, then one rename); returns the manifest with its file checksums.

    The manifest's identity (every field but name, version and files) is written into the
    safetensors header, so the payload checksum covers it: an edited manifest no longer matches.
    A prefix with NaN or infinite values is refused: it would answer nothing and spread by warm start.
    The prefix is stored at the precision `manifest.dtype` names (cartridges/artifact/precision.py).
    `write_extra(folder)` writes an artifact's own further files (a library's unit table and router) and
    returns their sha256 by name, which go into `method_config["payload_sha256"]` and so are bound too.
    """
    tensor = prompt_embeddings.detach().to("cpu").contiguous()
    bad = non_finite_count(tensor)
    if bad:
        raise CartridgeError(
            f"refusing to save cartridge {manifest.name}: {bad} of {tensor.numel()} prefix values are NaN or infinite "
            "(training diverged); lower distill.lr or start from another prefix"
        )
    stored = encode(PROMPT_EMBEDDINGS_KEY, tensor, manifest.dtype)  # the manifest names the stored precision
    # as a load will read it back: int8 times its scales; float16 and float32 widen to float32 exactly
    readback = decode(PROMPT_EMBEDDINGS_KEY, stored) if manifest.dtype == "int8" else stored[PROMPT_EMBEDDINGS_KEY]
    out_of_range = non_finite_count(readback)
    if out_of_range:
        raise CartridgeError(
            f"refusing to save cartridge {manifest.name}: {out_of_range} prefix values do not fit {manifest.dtype} "
            "(they would load as infinite); save it at float32"
        )
    exists = CartridgeError(f"{destination} already exists: choose another output folder or remove it")
    if destination.exists():
        raise exists
    final = manifest

    def write(folder: Path) -> None:
        nonlocal final
        bound = manifest
        if write_extra is not None:
            extra = write_extra(folder)
            bound = manifest.model_copy(update={"method_config": {**manifest.method_config, EXTRA_FILES_KEY: extra}})
        peft_config.save_pretrained(str(folder))
        save_file(stored, str(folder / ADAPTER_WEIGHTS_FILE), metadata=bound_metadata(bound))
        final = bound.model_copy(update={"files": payload_checksums(folder, bound.method)})
        (folder / MANIFEST_FILE).write_text(final.to_json())

    if not write_folder_atomically(destination, write):
        raise exists
    return final


def load_artifact(folder: Path, expected: tuple[str, int] | None = None) -> Cartridge:
    """Check an artifact and read its tensor as checked (`integrity.inspect_artifact`: checksums, shapes,
    bound manifest, finiteness of the float32 values; `expected`: its registry name and version)."""
    manifest, prefix = inspect_artifact(folder, expected)
    return Cartridge(manifest=manifest, prompt_embeddings=torch.from_numpy(prefix), path=folder)


def check_compatible(cartridge: Cartridge, loaded: LoadedModel) -> None:
    """Refuse a cartridge built for another model or tokenizer, or whose KV shape is not the model's, naming both sides."""
    m = cartridge.manifest
    _check_model_identity(
        m, loaded.model_id, loaded.fingerprint, loaded.tokenizer_fingerprint, loaded.model.config, _label(m)
    )


def check_against_model_files(manifest: Manifest) -> str | None:
    """What `verify` checks of the model a manifest names without loading its weights: the fingerprints
    and the KV shape, as a load would. None when done; else why it could not be (the model is not on
    this machine: nothing is downloaded to verify)."""
    from transformers import AutoConfig

    from cartridges.models import is_default_model, model_fingerprint, resolve_model_path, tokenizer_fingerprint

    spec = model_spec_of(manifest.model_id)
    if not is_default_model(spec) and not Path(spec).expanduser().is_dir():
        return f"model {manifest.model_id} is not on this machine, so the fingerprints and KV shape were not checked against it"
    path = resolve_model_path(spec)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CartridgeError(f"cannot read the config of model {path}: {' '.join(str(exc).split())[:200]}") from None
    _check_model_identity(
        manifest, manifest.model_id, model_fingerprint(path), tokenizer_fingerprint(path), config, _label(manifest)
    )
    return None


def _label(m: Manifest) -> str:
    return f"cartridge {m.name}" + (f"@{m.version}" if m.version else "")


def _check_model_identity(
    m: Manifest, model_id: str, fingerprint: str, tokenizer_print: str, model_config, label: str
) -> None:
    if m.model_fingerprint != fingerprint:
        raise CartridgeError(
            f"{label} was built for model {m.model_id} (fingerprint {m.model_fingerprint[:12]}), but the loaded model is "
            f"{model_id} (fingerprint {fingerprint[:12]}): load it with --model {model_spec_of(m.model_id)}"
        )
    if m.tokenizer_fingerprint != tokenizer_print:
        raise CartridgeError(
            f"{label} was built with tokenizer {m.tokenizer_fingerprint[:12]}, but {model_id} uses tokenizer "
            f"{tokenizer_print[:12]}: use the model and tokenizer it was built with"
        )
    check_kv_shape(m, model_config, label)
