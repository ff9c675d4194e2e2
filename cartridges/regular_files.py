"""Read only regular files, and only up to a bound: the one way this tool reads a file that a user or a
registry hands it (corpus documents, manifests, aliases, configs, QA sets).

A path can name a device (`/dev/zero` never ends, `/dev/urandom` neither), a FIFO (opening it for
reading blocks until a writer comes), a socket or a folder, directly or through a symbolic link.
Each is refused before a byte is read: the file is opened without blocking, `fstat` of the open
descriptor says what it is (no race between a check and the open), and a regular file is read to at
most `limit` bytes.
"""

import os
import stat
from pathlib import Path
from typing import BinaryIO

from cartridges.errors import CartridgeError

MIB = 1 << 20
SMALL_FILE_LIMIT = 16 * MIB  # manifests, aliases, configs, state and QA files: far smaller in practice


class UnreadableFile(CartridgeError):
    """A path that is not a regular file, or is larger than allowed; `reason` says which (no path)."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


def _open_regular(path: Path | str, follow_links: bool) -> tuple[int, os.stat_result]:
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as exc:  # O_NOFOLLOW on a link: ELOOP
        raise UnreadableFile(path, f"cannot read: {exc.strerror or exc}") from None
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        raise UnreadableFile(path, f"{file_kind(info.st_mode)}, not a regular file")
    return descriptor, info


def read_regular(path: Path | str, limit: int = SMALL_FILE_LIMIT, follow_links: bool = True) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; anything else raises `UnreadableFile`."""
    descriptor, info = _open_regular(path, follow_links)
    with os.fdopen(descriptor, "rb") as handle:
        if info.st_size > limit:
            raise UnreadableFile(path, f"{info.st_size:,} bytes, over the limit of {limit:,}")
        data = handle.read(limit + 1)
    if len(data) > limit:  # it grew while being read
        raise UnreadableFile(path, f"over the limit of {limit:,} bytes")
    return data


def read_regular_text(path: Path | str, limit: int = SMALL_FILE_LIMIT, what: str = "file") -> str:
    """A small UTF-8 text file (a config, a JSON record); not UTF-8 is one line naming the file."""
    try:
        return read_regular(path, limit).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CartridgeError(f"{what} {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None


def open_regular(path: Path | str) -> BinaryIO:
    """A regular file (through links) opened for reading, of any size; anything else raises `UnreadableFile`
    before a byte is read (what hashing a payload or model file goes through)."""
    descriptor, _ = _open_regular(path, follow_links=True)
    return os.fdopen(descriptor, "rb")


def require_folder_possible(folder: Path, what: str) -> None:
    """Raise unless `folder` is a folder or could be made one (no file is there or above it)."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise CartridgeError(f"{what} {folder}: {existing} is a file, not a folder; pass another folder")
