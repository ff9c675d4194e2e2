"""`cartridges build` end to end on the tiny config; configs validated with errors that name the key."""

import json
import sys

import pytest

from cartridges.errors import CartridgeError
from cartridges.pipeline.build_config import CONFIGS_DIR, load_build_config
from cartridges.pipeline.cli import main


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["cartridges", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_shipped_configs_validate():
    for path in sorted(CONFIGS_DIR.glob("*.yaml")):
        load_build_config(str(path))
    default = load_build_config("default")
    assert default.distill.lr == pytest.approx(2e-3) and set(default.synthesis.kinds) == {"quote", "continuation", "fill_span"}


def test_overrides_apply_and_only_decisive_settings_change_the_fingerprint():
    base = load_build_config("tiny")
    assert load_build_config("tiny", ["distill.steps=7"]).distill.steps == 7
    assert load_build_config("tiny", ["distill.steps=7"]).fingerprint() != base.fingerprint()
    assert load_build_config("tiny", ["training.threads=1"]).fingerprint() == base.fingerprint()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["distill.stepz=3"], r"distill\.stepz: Extra inputs are not permitted"),
        (["distill.lr=-1"], r"distill\.lr: Input should be greater than 0"),
        (["synthesis.kinds={magic: 1}"], r"synthesis\.kinds: Value error, unknown seed kind"),
        (["steps"], "expected KEY=VALUE"),
    ],
)
def test_bad_settings_name_the_key(overrides, message):
    with pytest.raises(CartridgeError, match=message):
        load_build_config("tiny", overrides)


def test_unknown_config_names_the_shipped_ones():
    with pytest.raises(CartridgeError, match="neither a YAML file nor a shipped config .*default.*tiny"):
        load_build_config("nonexistent")


def test_build_publishes_a_distilled_cartridge_and_a_second_run_does_nothing(monkeypatch, capsys, tiny_model_dir, long_corpus, cartridges_home):
    args = ["build", str(long_corpus), "--name", "legal", "--config", "tiny", "--set", f"model={tiny_model_dir}"]
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "published legal@1" in out and "4 samples" in out
    manifest = json.loads((cartridges_home / "registry" / "legal" / "1" / "manifest.json").read_text())
    assert manifest["method"] == "distilled" and manifest["num_tokens"] == 8 and manifest["method_config"]["steps"] == 2
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and "nothing to do: legal@1" in out
    assert not (cartridges_home / "registry" / "legal" / "2").exists()
