"""Real artifact folders without a model: a random prefix of the declared KV shape (2 layers, 2 KV heads, head_dim 16)."""

from pathlib import Path

import torch
from transformers import LlamaConfig

from cartridges.artifact import cartridge_peft_config, save_artifact
from cartridges.manifest import CorpusInfo, Manifest

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
