"""Artifacts damaged or forged the way a faulty writer or a hostile user would (checksums and the bound
manifest made to agree), against what `verify`, a load, a publish and `ask` do with them: every one
refused in one line, and what a load returns equal to an independent decode of the stored bytes."""

import dataclasses
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from registry_helpers import MODEL_CONFIG, WIDTH, fake_manifest, forge
from safetensors import safe_open
from safetensors.torch import load_file

from cartridges.artifact.folder import load_artifact, save_artifact
from cartridges.artifact.integrity import PROMPT_EMBEDDINGS_KEY, SCALE_SUFFIX, check_artifact
from cartridges.artifact.manifest import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MANIFEST_FILE
from cartridges.errors import CartridgeError
from cartridges.kv_layout import cartridge_peft_config
from cartridges.models import load_model
from cartridges.registry.store import Registry
from cartridges.runtime import CartridgeRuntime
from cartridges.stages.distillation.init.first_tokens import init_cartridge
from cartridges.stages.ingest import read_corpus

KEY, SCALES = PROMPT_EMBEDDINGS_KEY, PROMPT_EMBEDDINGS_KEY + SCALE_SUFFIX


def saved(folder: Path, prefix: torch.Tensor, precision: str = "float32") -> Path:
    manifest = fake_manifest(num_tokens=prefix.shape[0]).model_copy(update={"dtype": precision})
    save_artifact(folder, prefix, cartridge_peft_config(MODEL_CONFIG, prefix.shape[0]), manifest)
    return folder


def one_line_exit_2(cli, *args: str) -> str:
    code, out, err = cli(*args)
    lines = err.strip().splitlines()
    assert code == 2 and lines and lines[-1].startswith("error: ") and "Traceback" not in err, (out, err)
    return lines[-1]


def refused_everywhere(cli, folder: Path, message: str, tmp_path: Path) -> None:
    """check_artifact, load_artifact, a publish and `cartridges verify` all refuse, naming `message`."""
    for attempt in (check_artifact, load_artifact, lambda f: Registry(tmp_path / "reg").publish(f, "legal")):
        with pytest.raises(CartridgeError, match=message):
            attempt(folder)
    assert message in one_line_exit_2(cli, "verify", str(folder))
    assert not (tmp_path / "reg" / "legal").exists()


@pytest.mark.parametrize("precision", ["float32", "float16", "int8"])
def test_a_load_returns_what_an_independent_decode_of_the_stored_bytes_gives(tmp_path, precision):
    torch.manual_seed(1)
    prefix = torch.randn(6, WIDTH) * torch.logspace(-3, 2, WIDTH)
    folder = saved(tmp_path / precision, prefix, precision)
    with safe_open(str(folder / ADAPTER_WEIGHTS_FILE), framework="numpy") as stored:
        values = stored.get_tensor(KEY).astype(np.float64)  # in float64: no overflow, then float32 as the runtime
        expected = values * stored.get_tensor(SCALES).astype(np.float64) if precision == "int8" else values
    loaded = load_artifact(folder).prompt_embeddings
    assert loaded.dtype == torch.float32 and torch.isfinite(loaded).all()
    assert torch.equal(loaded, torch.from_numpy(expected.astype(np.float32)))


@pytest.mark.parametrize(
    "stored, scales, dtype, message",
    [
        # float64 is no format dtype: 1e300 passed verify and loaded as inf
        (np.full((4, WIDTH), 1e300), None, "float32", "stored as F64, which the format does not define"),
        (np.full((4, WIDTH), 1e300), None, "float64", "invalid manifest field 'dtype'"),
        (np.ones((4, WIDTH), np.float16), None, "float32", "tensor dtype float16 does not match the manifest"),
        (np.array([[np.inf] * WIDTH] * 4, np.float16), None, "float16", "NaN or infinite as loaded"),
        # int8 times a scale near float32's largest: finite as stored, infinite as loaded
        (np.full((4, WIDTH), 127, np.int8), np.full(WIDTH, 3e38, np.float32), "int8", "NaN or infinite as loaded"),
        (np.full((4, WIDTH), 1, np.int8), np.full(WIDTH, 1.0, np.float64), "int8", "must be 128 float32 scales"),
    ],
    ids=[
        "float64-manifest-float32",
        "float64-manifest",
        "dtype-mismatch",
        "float16-inf",
        "int8-scale-3e38",
        "f64-scales",
    ],
)
def test_values_infinite_once_loaded_or_dtypes_the_format_lacks_are_refused_everywhere(
    cli, tmp_path, stored, scales, dtype, message
):
    folder = saved(tmp_path / "art", torch.randn(4, WIDTH))
    tensors = {KEY: torch.from_numpy(stored)} | ({SCALES: torch.from_numpy(scales)} if scales is not None else {})
    refused_everywhere(cli, forge(folder, tensors, dtype=dtype), message, tmp_path)


def test_a_bfloat16_prefix_is_refused(cli, tmp_path):
    folder = saved(tmp_path / "art", torch.randn(4, WIDTH))
    forge(folder, {KEY: torch.randn(4, WIDTH).to(torch.bfloat16)})
    refused_everywhere(cli, folder, "stored as BF16, which the format does not define", tmp_path)


def test_saving_values_a_precision_cannot_hold_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(CartridgeError, match="do not fit float16"):
        saved(tmp_path / "x", torch.full((4, WIDTH), 1e5), "float16")
    assert not (tmp_path / "x").exists()


def test_a_prefix_beyond_the_models_dtype_is_refused_when_loaded_onto_it(tiny, tiny_model_dir, corpus_dir, tmp_path):
    init_cartridge(tiny, read_corpus(corpus_dir), 8, "legal", tmp_path / "art")
    cartridge = load_artifact(tmp_path / "art")
    large = dataclasses.replace(cartridge, prompt_embeddings=cartridge.prompt_embeddings * 0 + 1e5)
    CartridgeRuntime(tiny, [large])  # float32 holds it
    half = load_model(str(tiny_model_dir), dtype=torch.float16)
    with pytest.raises(CartridgeError, match="out of the range of torch.float16"):
        CartridgeRuntime(half, [large])


def pickled(tensor: torch.Tensor) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({KEY: tensor}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("damage", ["pickle", "truncated", "bad-header", "empty"])
def test_a_corrupt_payload_is_one_line_from_verify_and_ask(cli, tiny, tiny_model_dir, corpus_dir, tmp_path, damage):
    folder = tmp_path / "art"
    init_cartridge(tiny, read_corpus(corpus_dir), 8, "legal", folder)
    good = (folder / ADAPTER_WEIGHTS_FILE).read_bytes()
    raw = {
        "pickle": pickled(torch.zeros(8, 4)),
        "truncated": good[: len(good) // 2],
        "bad-header": (2**40).to_bytes(8, "little") + good[8:],
        "empty": b"",
    }[damage]
    forge(folder, raw=raw)
    assert "not a readable safetensors file" in one_line_exit_2(cli, "verify", str(folder))
    message = one_line_exit_2(cli, "ask", str(folder), "Who repairs?", "--model", str(tiny_model_dir))
    assert "not a readable safetensors file" in message


def test_a_manifest_claiming_another_kv_shape_is_refused_by_verify_and_ask(
    cli, tiny, tiny_model_dir, corpus_dir, tmp_path
):
    """Self-consistent (manifest, adapter config, tensor and bound manifest agree on one layer), but the
    model it names has two: `verify` checks it against the model, as a load does."""
    folder = tmp_path / "art"
    init_cartridge(tiny, read_corpus(corpus_dir), 8, "legal", folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["num_layers"] == 2
    half_width = load_file(str(folder / ADAPTER_WEIGHTS_FILE))[KEY][
        :, : manifest["num_kv_heads"] * manifest["head_dim"] * 2
    ]
    forge(folder, {KEY: half_width.contiguous()}, num_layers=1)
    check_artifact(folder)  # the artifact alone is consistent
    assert "the manifest does not describe this model" in one_line_exit_2(cli, "verify", str(folder))
    message = one_line_exit_2(cli, "ask", str(folder), "Who repairs?", "--model", str(tiny_model_dir))
    assert "holds keys and values for 1 layers" in message


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"num_frozen_tokens": 9}, "num_frozen_tokens 9 is more than num_tokens 4"),
        ({"num_frozen_tokens": -1}, "num_frozen_tokens"),
        ({"format_version": 0}, "format_version"),
        ({"format_version": -3}, "format_version"),
        ({"version": 0}, "version"),
    ],
)
def test_nonsense_metadata_is_refused(cli, tmp_path, changes, field):
    folder = forge(saved(tmp_path / "art", torch.randn(4, WIDTH)), **changes)
    with pytest.raises(CartridgeError, match=field):
        check_artifact(folder)
    assert field in one_line_exit_2(cli, "verify", str(folder))


def test_an_empty_prefix_is_refused(cli, tmp_path):
    folder = saved(tmp_path / "art", torch.randn(4, WIDTH))
    forge(folder, {KEY: torch.zeros(0, WIDTH)}, num_tokens=0, num_frozen_tokens=0)
    assert "num_tokens" in one_line_exit_2(cli, "verify", str(folder))


def finishes(call, seconds: float = 20.0):
    """`call()`'s result, or a failure if it has not returned within `seconds` (a read that blocks forever)."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.mark.parametrize("file", [MANIFEST_FILE, ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE])
@pytest.mark.parametrize("special", ["/dev/zero", "/dev/urandom", "fifo"])
def test_a_device_or_a_pipe_in_place_of_an_artifact_file_is_refused_not_read(cli, tmp_path, file, special):
    registry = Registry(tmp_path / "reg")
    registry.publish(saved(tmp_path / "art", torch.randn(4, WIDTH)), "legal")
    registry.publish(saved(tmp_path / "art2", torch.randn(4, WIDTH)), "tax")
    target = tmp_path / "reg" / "legal" / "1" / file
    target.unlink()
    if special == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to(special)
    with pytest.raises(CartridgeError, match="not a regular file"):
        finishes(lambda: check_artifact(target.parent))
    listing = finishes(registry.list)
    assert [entry.manifest.label for entry in listing.entries] == (
        ["tax@1"] if file == MANIFEST_FILE else ["legal@1", "tax@1"]
    )
    assert "not a regular file" in finishes(
        lambda: one_line_exit_2(cli, "verify", "legal@1", "--registry", str(registry.url))
    )


def test_the_payload_binds_its_manifest_under_the_key_the_format_names(tmp_path):
    """docs/format.md's header key, written out: artifacts published by earlier versions carry it, so a
    rename of the module that defines it must not rename the key."""
    folder = saved(tmp_path / "a", torch.randn(3, WIDTH))
    with safe_open(str(folder / ADAPTER_WEIGHTS_FILE), "pt") as stored:
        metadata = stored.metadata()
    assert set(metadata) == {"cartridges.manifest"}
    assert json.loads(metadata["cartridges.manifest"])["num_tokens"] == 3
    assert "`cartridges.manifest`" in (Path(__file__).resolve().parents[1] / "docs" / "format.md").read_text()
