"""Build configurations from YAML: a file in `configs/` (or the user's), layered over the code defaults
(`stages/config.py`), then `--set key.sub=value` overrides; validated by pydantic, errors name the key."""

from pathlib import Path

import yaml
from pydantic import ValidationError

from cartridges.errors import CartridgeError, first_problem, invalid_settings
from cartridges.regular_files import read_regular_text
from cartridges.stages.config import BuildConfig

__all__ = ["BuildConfig", "load_build_config", "parse_yaml", "resolve_config_path"]

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


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
