"""Build configurations: YAML files in `configs/`, validated by pydantic, overridable per key.

A config names everything that decides the cartridge (model, synthesis, distillation) and how the
work runs (engines, executors). Its fingerprint covers only the former, so running the same build
on more machines or another executor does not count as a change.
"""

import json
import os
from pathlib import Path

import yaml
from pydantic import AliasChoices, BaseModel, Field, ValidationError

from cartridges.errors import CartridgeError, first_problem, invalid_settings
from cartridges.hashing import sha256_bytes
from cartridges.regular_files import read_regular_text
from cartridges.settings import STRICT_SETTINGS
from cartridges.stages.distill import DistillConfig
from cartridges.stages.distill_run import DistillRunSettings
from cartridges.stages.synthesis_config import SynthesisConfig, SynthesisRunSettings

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


class BuildConfig(BaseModel):
    model_config = STRICT_SETTINGS

    model: str = Field(
        "default", description="'default' (embedded SmolLM2-135M-Instruct), an HF model folder or hub id"
    )
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    synthesis_run: SynthesisRunSettings = Field(default_factory=SynthesisRunSettings)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    # `training` is this section's name in configs written before it was named after its stage.
    distill_run: DistillRunSettings = Field(
        default_factory=DistillRunSettings, validation_alias=AliasChoices("distill_run", "training")
    )
    warm_start: bool = Field(
        True, description="start training from the latest published version of the same name when it fits"
    )
    reuse_samples: bool = Field(
        True, description="take the samples of unchanged chunks from the last build of the same name"
    )
    runs_root: str | None = Field(
        None,
        description="an fsspec URL (s3://bucket/runs) that keeps run folders for machines that share no disk "
        "(default: $CARTRIDGES_RUNS, else each machine's $CARTRIDGES_HOME/runs only)",
    )

    def runs_url(self) -> str | None:
        return self.runs_root or os.environ.get("CARTRIDGES_RUNS") or None

    def fingerprint(self) -> str:
        """sha256 of the settings that change the result (not of how the work is run)."""
        decisive = self.model_dump(include={"model", "synthesis", "distill", "warm_start", "reuse_samples"})
        return sha256_bytes(json.dumps(decisive, sort_keys=True).encode())


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise CartridgeError(f"--set {dotted}: {key} is not a section")
        tree = node
    tree[leaf] = value


def resolve_config_path(spec: str) -> Path:
    """A YAML path, or the name of a config shipped in configs/ (`default`, `tiny`, `gpu`)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    shipped = CONFIGS_DIR / f"{spec}.yaml"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
    raise CartridgeError(f"config {spec!r} is neither a YAML file nor a shipped config ({known})")


def load_build_config(spec: str = "default", overrides: list[str] = ()) -> BuildConfig:
    """Read a config and apply `key.sub=value` overrides (values parsed as YAML); errors name the key."""
    path = resolve_config_path(spec)
    try:
        data = parse_yaml(read_regular_text(path, what="config")) or {}
    except yaml.YAMLError as exc:
        raise CartridgeError(f"{path}: not valid YAML ({_one_line(exc)})") from None
    if not isinstance(data, dict):
        raise CartridgeError(f"{path}: expected a mapping of settings at the top level")
    keys = []
    for item in overrides:
        key, sep, value = item.partition("=")
        keys.append(key.strip())
        if not sep or not key:
            raise CartridgeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set distill.steps=100")
        try:
            parsed = parse_yaml(value)
        except yaml.YAMLError as exc:
            raise CartridgeError(
                f"--set {item!r}: the value is not valid YAML ({_one_line(exc)}); quote text values, e.g. key='[a'"
            ) from None
        _set(data, key.strip(), parsed)
    try:
        return BuildConfig.model_validate(data)
    except ValidationError as exc:
        where = first_problem(exc)[0]
        given = [key for key in keys if where == key or where.startswith(key + ".") or key.startswith(where + ".")]
        raise invalid_settings(exc, f"--set {given[-1]}" if given else str(path)) from None


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases (`*name`): a few lines of nested aliases expand to billions of values
    (a "billion laughs"), and a config never needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a config: write the value out", mark
            )
        return super().compose_node(parent, index)


def parse_yaml(text: str):
    """A config or `--set` value: YAML's safe subset, without aliases."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
