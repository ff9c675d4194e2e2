"""Content hashes used for fingerprints and artifact checksums."""

import hashlib
from collections.abc import Iterable
from pathlib import Path

from cartridges.regular_files import open_regular

CHUNK_BYTES = 1 << 20


def sha256_file(path: Path) -> str:
    """sha256 of a regular file: a device or a FIFO in its place is refused, not hashed forever."""
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_of_named_hashes(pairs: Iterable[tuple[str, str]]) -> str:
    """One hash over (name, hash) pairs, independent of the order they come in."""
    digest = hashlib.sha256()
    for name, value in sorted(pairs):
        digest.update(f"{name}\0{value}\n".encode())
    return digest.hexdigest()
