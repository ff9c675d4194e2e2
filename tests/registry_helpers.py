"""Real artifact folders without a model: a random prefix of the declared KV shape (2 layers, 2 KV heads, head_dim 16)."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from cartridges.artifact.folder import save_artifact
from cartridges.artifact.integrity import BOUND_MANIFEST_KEY
from cartridges.artifact.manifest import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    MANIFEST_FILE,
    CorpusInfo,
    Manifest,
    strict_json,
)
from cartridges.hashing import sha256_file
from cartridges.kv_layout import cartridge_peft_config

MODEL_CONFIG = LlamaConfig(
    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, hidden_size=32, head_dim=16, vocab_size=16
)
WIDTH = 2 * 2 * 2 * 16  # layers x (K, V) x KV heads x head_dim


def fake_manifest(name: str = "legal", num_tokens: int = 4) -> Manifest:
    return Manifest(
        name=name,
        model_id="test",
        model_fingerprint="m" * 64,
        tokenizer_fingerprint="t" * 64,
        num_tokens=num_tokens,
        num_frozen_tokens=1,
        num_layers=2,
        num_kv_heads=2,
        head_dim=16,
        dtype="float32",
        corpus=[CorpusInfo(fingerprint="c" * 64, num_documents=1, num_tokens=10, source="test")],
        method="init",
    )


def fake_artifact(
    folder: Path, name: str = "legal", payload_bytes: int = 2048, prefix: torch.Tensor | None = None
) -> Path:
    """An artifact of about `payload_bytes` of random float32 prefix (or the given prefix)."""
    if prefix is None:
        prefix = torch.randn(max(2, payload_bytes // (WIDTH * 4)), WIDTH)
    config = cartridge_peft_config(MODEL_CONFIG, prefix.shape[0])
    save_artifact(folder, prefix, config, fake_manifest(name, prefix.shape[0]))
    return folder


def forge(folder: Path, tensors: dict | None = None, raw: bytes | None = None, **changes) -> Path:
    """Rewrite an artifact as a faulty writer would: new tensors (or raw bytes) and manifest fields, with
    the adapter config, the manifest bound into the payload and every checksum made to agree."""
    manifest = json.loads((folder / MANIFEST_FILE).read_text()) | changes
    config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
    config.update(
        {
            key: manifest[field]
            for key, field in (
                ("num_virtual_tokens", "num_tokens"),
                ("num_frozen_tokens", "num_frozen_tokens"),
                ("num_layers", "num_layers"),
                ("num_attention_heads", "num_kv_heads"),
            )
        }
        | {"token_dim": manifest["num_kv_heads"] * manifest["head_dim"]}
    )
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(config))
    weights = folder / ADAPTER_WEIGHTS_FILE
    if raw is not None:
        weights.write_bytes(raw)
    else:
        bound = {k: v for k, v in manifest.items() if k not in ("name", "version", "files")}
        save_file(tensors or load_file(str(weights)), str(weights), metadata={BOUND_MANIFEST_KEY: strict_json(bound)})
    manifest["files"] = {name: sha256_file(folder / name) for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return folder
