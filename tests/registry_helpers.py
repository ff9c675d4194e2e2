"""Build artifact folders without a model (the registry never looks inside the tensors)."""

import json
import os
from pathlib import Path

from cartridges.manifest import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MANIFEST_FILE, CorpusInfo, Manifest, payload_checksums


def fake_artifact(folder: Path, name: str = "legal", payload_bytes: int = 1024) -> Path:
    folder.mkdir(parents=True)
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps({"peft_type": "CARTRIDGE"}))
    (folder / ADAPTER_WEIGHTS_FILE).write_bytes(os.urandom(payload_bytes))
    manifest = Manifest(
        name=name,
        model_id="test",
        model_fingerprint="m" * 64,
        tokenizer_fingerprint="t" * 64,
        num_tokens=4,
        num_frozen_tokens=1,
        num_layers=2,
        num_kv_heads=2,
        head_dim=16,
        dtype="float32",
        corpus=[CorpusInfo(fingerprint="c" * 64, num_documents=1, num_tokens=10, source="test")],
        method="init",
    )
    manifest = manifest.model_copy(update={"files": payload_checksums(folder)})
    (folder / MANIFEST_FILE).write_text(manifest.to_json())
    return folder
