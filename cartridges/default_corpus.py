"""The default corpus: license texts shipped by the installed Python packages.

Real legal text on any machine, gathered at run time from `*.dist-info` folders (LICENSE, COPYING,
NOTICE files), deduplicated, so nothing is copied into the repository.
"""

import re
from importlib import metadata
from pathlib import Path

from cartridges.atomic import write_folder_atomically
from cartridges.errors import CartridgeError
from cartridges.hashing import sha256_bytes
from cartridges.home import cartridges_home

LICENSE_NAME = re.compile(r"(^|/)(licen[cs]e|copying|notice)[^/]*$", re.IGNORECASE)
MIN_CHARS = 200


def default_corpus_dir() -> Path:
    return cartridges_home() / "corpora" / "licenses"


def _normalized(text: str) -> str:
    return " ".join(text.split()).lower()


def gather_license_corpus(destination: Path | None = None) -> Path:
    """Write one .txt per distinct license text into `destination` (once) and return it."""
    destination = destination or default_corpus_dir()
    if destination.is_dir() and any(destination.iterdir()):
        return destination
    found: dict[str, tuple[str, str]] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or "unknown"
        for file in dist.files or []:
            if not LICENSE_NAME.search(str(file)) or ".dist-info" not in str(file):
                continue
            try:
                text = Path(str(dist.locate_file(file))).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            key = sha256_bytes(_normalized(text).encode())
            if len(text) >= MIN_CHARS and key not in found:
                found[key] = (f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}-{Path(str(file)).name}", text)
    if not found:
        raise CartridgeError("no license texts found in the installed packages: pass --corpus DIR")

    def write(folder: Path) -> None:
        for index, (filename, text) in enumerate(found.values()):
            target = folder / f"{filename.removesuffix('.txt')}.txt"
            if target.exists():  # two different texts under the same file name
                target = target.with_stem(f"{target.stem}-{index}")
            target.write_text(text, encoding="utf-8")

    if destination.exists():
        destination.rmdir()  # empty, checked above
    write_folder_atomically(destination, write)
    return destination
