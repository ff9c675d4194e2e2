import shutil

import pytest

from cartridges.errors import CartridgeError
from cartridges.hashing import sha256_file, sha256_of_named_hashes
from cartridges.models import model_fingerprint, resolve_model_path, tokenizer_fingerprint


def test_fingerprint_covers_config_weights_and_tokenizer(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    expected = sha256_of_named_hashes(
        [
            ("config.json", sha256_file(copy / "config.json")),
            ("model.safetensors", sha256_file(copy / "model.safetensors")),
            ("tokenizer", tokenizer_fingerprint(copy)),
        ]
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
    with pytest.raises(CartridgeError, match="no-such-folder': no such folder, and not a hub id"):
        resolve_model_path("no-such-folder")


def test_a_mistyped_local_path_is_not_reported_as_a_hub_download(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CartridgeError, match=r"model 'models/smol': no such folder in models/ : check the path"):
        resolve_model_path("models/smol")


def test_the_embedded_model_id_is_a_model_spec(monkeypatch):
    from cartridges import models

    monkeypatch.setattr(models, "prepare_embedded_model", lambda: "prepared")
    assert resolve_model_path("embedded:SmolLM2-135M-Instruct") == resolve_model_path("default") == "prepared"
    assert models.model_spec_of("embedded:SmolLM2-135M-Instruct") == "default"


def test_garbage_weights_are_one_line(tiny_model_dir, tmp_path):
    from cartridges.models import load_model

    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    (copy / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(CartridgeError, match=r"cannot load the model in .*copy: "):
        load_model(str(copy))
