"""Validation of cartridge names and references (`name`, `name@3`, `name@latest`, `name@stable`)."""

import re
from dataclasses import dataclass
from pathlib import Path

from cartridges.errors import CartridgeError

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ALIAS_PATTERN = NAME_PATTERN
VERSION_PATTERN = re.compile(r"^[0-9]{1,18}$")  # ASCII digits only: `str.isdigit` takes '²' and other scripts' digits
LATEST = "latest"
RESERVED_NAMES = frozenset({"default"})  # the server's id for the bare model


def is_version(text: str) -> bool:
    """A version number as written in a reference or a registry folder name: 1-18 ASCII digits."""
    return VERSION_PATTERN.fullmatch(text) is not None


def validate_name(name: str, what: str = "name") -> str:
    """Reject names that could escape the registry folder or break a URL (`/`, `..`, spaces...)."""
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise CartridgeError(
            f"invalid cartridge {what} {name!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', '..' or spaces)"
        )
    return name


def validate_new_name(name: str) -> str:
    """A name to publish under: valid, and not one the tools reserve (`default` is the bare model on the server)."""
    validate_name(name)
    if name in RESERVED_NAMES:
        raise CartridgeError(
            f"the cartridge name {name!r} is reserved (the server's id for the bare model): choose another"
        )
    return name


@dataclass(frozen=True)
class Ref:
    """A parsed reference: `selector` is a version number as text, an alias, or `latest`."""

    name: str
    selector: str = LATEST

    def __str__(self) -> str:
        return f"{self.name}@{self.selector}"


def parse_ref(text: str) -> Ref:
    name, _, selector = text.partition("@")
    validate_name(name)
    if not selector:
        return Ref(name)
    if not (is_version(selector) or ALIAS_PATTERN.fullmatch(selector)):
        raise CartridgeError(f"invalid reference {text!r}: expected NAME, NAME@VERSION, NAME@latest or NAME@ALIAS")
    return Ref(name, selector)


PATH_PREFIX = "path:"


def folder_of(ref: str) -> Path | None:
    """The folder a reference names, or None for a registry reference.

    A folder is always explicit: `path:legal`, or anything with a '/' (`./legal`, `/data/legal`,
    `~/legal`). Registry names cannot hold a '/', so `legal` always means the registry's, even when
    a folder called `legal` is in the current directory.
    """
    if ref.startswith(PATH_PREFIX):
        return Path(ref.removeprefix(PATH_PREFIX)).expanduser()
    if "/" in ref or ref.startswith("~") or ref in (".", ".."):
        return Path(ref).expanduser()
    return None
