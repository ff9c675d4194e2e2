import json

import pytest

from cartridges.artifact.folder import load_artifact
from cartridges.artifact.manifest import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, FORMAT_VERSION, MANIFEST_FILE
from cartridges.errors import CartridgeError
from cartridges.hashing import sha256_file
from cartridges.stages.distillation.init.first_tokens import init_cartridge
from cartridges.stages.ingest import read_corpus


@pytest.fixture
def artifact(tiny, corpus_dir, tmp_path):
    init_cartridge(tiny, read_corpus(corpus_dir), 16, "legal", tmp_path / "art")
    return tmp_path / "art"


def test_folder_is_a_peft_adapter_with_checksummed_manifest(artifact):
    assert sorted(p.name for p in artifact.iterdir()) == sorted(
        [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MANIFEST_FILE]
    )
    config = json.loads((artifact / ADAPTER_CONFIG_FILE).read_text())
    assert (config["peft_type"], config["num_virtual_tokens"], config["num_frozen_tokens"]) == ("CARTRIDGE", 16, 1)
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["files"] == {
        name: sha256_file(artifact / name) for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)
    }


def test_tampered_tensor_is_refused_on_load(artifact):
    data = bytearray((artifact / ADAPTER_WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (artifact / ADAPTER_WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CartridgeError, match=f"{ADAPTER_WEIGHTS_FILE}: checksum mismatch"):
        load_artifact(artifact)


def test_newer_format_version_is_refused(artifact):
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (artifact / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CartridgeError, match=f"format v{FORMAT_VERSION + 1} is newer than this tool supports"):
        load_artifact(artifact)


def test_manifest_errors_name_the_field(artifact):
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    manifest["num_tokens"] = "many"
    (artifact / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CartridgeError, match="invalid manifest field 'num_tokens'"):
        load_artifact(artifact)
    (artifact / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CartridgeError, match="not valid JSON"):
        load_artifact(artifact)


def test_existing_destination_is_not_overwritten(tiny, corpus_dir, artifact):
    before = (artifact / ADAPTER_WEIGHTS_FILE).read_bytes()
    with pytest.raises(CartridgeError, match="already exists"):
        init_cartridge(tiny, read_corpus(corpus_dir), 8, "legal", artifact)
    assert (artifact / ADAPTER_WEIGHTS_FILE).read_bytes() == before
    assert [p.name for p in artifact.parent.iterdir() if p.name.startswith(".")] == []
