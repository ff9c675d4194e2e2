"""Storage precision of an artifact's prefix: round trips against independent bounds, what PEFT loads,
refused damage, and the build setting that chooses it."""

import json

import pytest
import torch
from peft_check import IDS, ours_and_peft_logits
from registry_helpers import MODEL_CONFIG, fake_manifest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cartridges.artifact.folder import load_artifact, save_artifact
from cartridges.artifact.integrity import PROMPT_EMBEDDINGS_KEY, SCALE_SUFFIX, check_artifact
from cartridges.artifact.manifest import ADAPTER_WEIGHTS_FILE
from cartridges.errors import CartridgeError
from cartridges.hashing import sha256_file
from cartridges.kv_layout import cartridge_peft_config
from cartridges.runtime import CartridgeRuntime
from cartridges.stages.distillation.init.first_tokens import init_cartridge
from cartridges.stages.ingest import read_corpus


def saved(folder, prefix: torch.Tensor, precision: str):
    manifest = fake_manifest(num_tokens=prefix.shape[0]).model_copy(update={"dtype": precision})
    save_artifact(folder, prefix, cartridge_peft_config(MODEL_CONFIG, prefix.shape[0]), manifest)
    return folder


def test_each_precision_round_trips_within_its_own_rounding(tmp_path):
    torch.manual_seed(0)
    prefix = torch.randn(12, 128) * torch.logspace(-2, 1, 128)  # channels of very different ranges
    sizes = {}
    for precision in ("float32", "float16", "int8"):
        folder = saved(tmp_path / precision, prefix, precision)
        loaded = load_artifact(folder)
        assert loaded.manifest.dtype == precision and loaded.prompt_embeddings.dtype == torch.float32
        assert loaded.manifest.kv_bytes == loaded.prompt_embeddings.numel() * 4  # loaded memory, not disk
        sizes[precision] = (folder / ADAPTER_WEIGHTS_FILE).stat().st_size
        if precision == "float32":
            assert torch.equal(loaded.prompt_embeddings, prefix)
        elif precision == "float16":
            assert torch.equal(loaded.prompt_embeddings, prefix.half().float())
        else:  # every value within half a step of its channel's grid, the step being the channel's max / 127
            step = prefix.abs().amax(dim=0) / 127
            assert ((loaded.prompt_embeddings - prefix).abs() <= step / 2 + 1e-6).all()
            assert not torch.equal(loaded.prompt_embeddings, prefix)
    assert sizes["int8"] < sizes["float16"] < sizes["float32"]
    assert sizes["float32"] - sizes["float16"] >= prefix.numel() * 2 - 64


def test_peft_loads_a_float16_cartridge_like_our_runtime(tiny, corpus_dir, tmp_path):
    init_cartridge(tiny, read_corpus(corpus_dir), 16, "legal", tmp_path / "fp32")
    fp32 = load_artifact(tmp_path / "fp32")
    manifest = fp32.manifest.model_copy(update={"dtype": "float16", "files": {}})
    config = cartridge_peft_config(tiny.model.config, 16)
    save_artifact(tmp_path / "fp16", fp32.prompt_embeddings, config, manifest)
    cartridge = load_artifact(tmp_path / "fp16")
    ours, theirs = ours_and_peft_logits(tiny, cartridge)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    full = CartridgeRuntime(tiny, [fp32]).logits(IDS)[0]
    torch.testing.assert_close(ours, full, atol=1e-2, rtol=0)


def test_an_int8_prefix_without_usable_scales_is_refused(tmp_path):
    folder = saved(tmp_path / "int8", torch.randn(4, 128), "int8")
    path = folder / ADAPTER_WEIGHTS_FILE
    tensors = load_file(str(path))
    tensors[PROMPT_EMBEDDINGS_KEY + SCALE_SUFFIX][3] = float("nan")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(path), metadata=metadata)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][ADAPTER_WEIGHTS_FILE] = sha256_file(path)  # as a faulty writer would: checksums agree
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CartridgeError, match="finite positive scales: rebuild"):
        check_artifact(folder)


def test_an_unknown_precision_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(CartridgeError, match="unknown precision 'int4'"):
        saved(tmp_path / "x", torch.randn(4, 128), "int4")
    assert not (tmp_path / "x").exists()
