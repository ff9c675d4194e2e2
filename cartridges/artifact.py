"""Save and load cartridge artifacts: a PEFT CARTRIDGE adapter folder plus `manifest.json`.

The tensors live in `adapter_model.safetensors` under PEFT's key `prompt_embeddings`, shaped
`[num_tokens, num_layers * 2 * num_kv_heads * head_dim]`, so `PeftModel.from_pretrained` loads a
cartridge with no code of ours. Nothing is pickled.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import CartridgeConfig
from peft.utils.other import _prepare_prompt_learning_config
from safetensors.torch import load_file, save_file

from cartridges.atomic import write_folder_atomically
from cartridges.errors import CartridgeError
from cartridges.integrity import PROMPT_EMBEDDINGS_KEY, bound_metadata, check_artifact
from cartridges.manifest import ADAPTER_WEIGHTS_FILE, MANIFEST_FILE, Manifest, payload_checksums
from cartridges.models import LoadedModel, model_spec_of
from cartridges.precision import decode, encode


@dataclass(frozen=True)
class Cartridge:
    """A loaded, verified artifact."""

    manifest: Manifest
    prompt_embeddings: torch.Tensor
    path: Path


def cartridge_peft_config(model_config, num_tokens: int, num_frozen_tokens: int = 1) -> CartridgeConfig:
    """PEFT's config for a prefix of `num_tokens`, with the KV shape filled in from the model config."""
    config = CartridgeConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_tokens,
        num_frozen_tokens=num_frozen_tokens,
        base_model_name_or_path=getattr(model_config, "_name_or_path", None) or None,
    )
    return _prepare_prompt_learning_config(config, model_config)


def kv_shape(model_config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) as PEFT lays out the prefix."""
    config = _prepare_prompt_learning_config(CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=1), model_config)
    return config.num_layers, config.num_attention_heads, config.token_dim // config.num_attention_heads


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


def non_finite_count(tensor: torch.Tensor) -> int:
    return int((~torch.isfinite(tensor)).sum())


def save_artifact(
    destination: Path, prompt_embeddings: torch.Tensor, peft_config: CartridgeConfig, manifest: Manifest
) -> Manifest:
    """Write a complete artifact folder (temp folder, then one rename); returns the manifest with its file checksums.

    The manifest's identity (every field but name, version and files) is written into the
    safetensors header, so the payload checksum covers it: an edited manifest no longer matches.
    A prefix with NaN or infinite values is refused: it would answer nothing and spread by warm start.
    The prefix is stored at the precision `manifest.dtype` names (cartridges/precision.py).
    """
    tensor = prompt_embeddings.detach().to("cpu").contiguous()
    bad = non_finite_count(tensor)
    if bad:
        raise CartridgeError(
            f"refusing to save cartridge {manifest.name}: {bad} of {tensor.numel()} prefix values are NaN or infinite "
            "(training diverged); lower distill.lr or start from another prefix"
        )
    stored = encode(PROMPT_EMBEDDINGS_KEY, tensor, manifest.dtype)  # the manifest names the stored precision
    exists = CartridgeError(f"{destination} already exists: choose another output folder or remove it")
    if destination.exists():
        raise exists
    final = manifest

    def write(folder: Path) -> None:
        nonlocal final
        peft_config.save_pretrained(str(folder))
        save_file(stored, str(folder / ADAPTER_WEIGHTS_FILE), metadata=bound_metadata(manifest))
        final = manifest.model_copy(update={"files": payload_checksums(folder)})
        (folder / MANIFEST_FILE).write_text(final.to_json())

    if not write_folder_atomically(destination, write):
        raise exists
    return final


def load_artifact(folder: Path, expected: tuple[str, int] | None = None) -> Cartridge:
    """Check an artifact (`integrity.check_artifact`: checksums, shapes, bound manifest, finiteness;
    `expected`: its registry name and version), then read its tensor (safetensors only)."""
    manifest = check_artifact(folder, expected)
    embeddings = decode(PROMPT_EMBEDDINGS_KEY, load_file(str(folder / ADAPTER_WEIGHTS_FILE)))
    return Cartridge(manifest=manifest, prompt_embeddings=embeddings, path=folder)


def check_compatible(cartridge: Cartridge, loaded: LoadedModel) -> None:
    """Refuse a cartridge built for another model or tokenizer, naming both sides."""
    m = cartridge.manifest
    label = f"cartridge {m.name}" + (f"@{m.version}" if m.version else "")
    if m.model_fingerprint != loaded.fingerprint:
        raise CartridgeError(
            f"{label} was built for model {m.model_id} (fingerprint {m.model_fingerprint[:12]}), but the loaded model is "
            f"{loaded.model_id} (fingerprint {loaded.fingerprint[:12]}): load it with --model {model_spec_of(m.model_id)}"
        )
    if m.tokenizer_fingerprint != loaded.tokenizer_fingerprint:
        raise CartridgeError(
            f"{label} was built with tokenizer {m.tokenizer_fingerprint[:12]}, but {loaded.model_id} uses tokenizer "
            f"{loaded.tokenizer_fingerprint[:12]}: use the model and tokenizer it was built with"
        )
