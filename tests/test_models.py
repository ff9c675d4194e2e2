import shutil

import pytest

from cartridges.errors import CartridgeError
from cartridges.hashing import sha256_file, sha256_of_named_hashes
from cartridges.models import model_fingerprint, resolve_model_path, tokenizer_fingerprint


def test_fingerprint_covers_config_weights_and_tokenizer(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    expected = sha256_of_named_hashes(
        [("config.json", sha256_file(copy / "config.json")), ("model.safetensors", sha256_file(copy / "model.safetensors")), ("tokenizer", tokenizer_fingerprint(copy))]
    )
    assert model_fingerprint(copy) == expected == model_fingerprint(tiny_model_dir)
    config = (copy / "config.json").read_text()
    (copy / "config.json").write_text(config.replace('"hidden_act": "silu"', '"hidden_act": "gelu"'))
    assert model_fingerprint(copy) != expected


def test_tokenizer_edit_changes_both_fingerprints(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    before = (model_fingerprint(copy), tokenizer_fingerprint(copy))
    with open(copy / "tokenizer_config.json", "a") as handle:
        handle.write("\n")
    after = (model_fingerprint(copy), tokenizer_fingerprint(copy))
    assert before[0] != after[0] and before[1] != after[1]


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(CartridgeError, match="not a Hugging Face model folder"):
        resolve_model_path(str(tmp_path))


def test_bad_model_spec_is_rejected():
    with pytest.raises(CartridgeError, match="neither a local folder nor a hub id"):
        resolve_model_path("no-such-folder")
