"""Text extraction per file format. Each reader takes a file's bytes (read by `ingest` through
`regular_files`, so never a device or a pipe) and returns (title or None, text) records, or None when
they cannot be read as that format."""

import codecs
import io
import json
from collections.abc import Callable

from charset_normalizer import from_bytes

Record = tuple[str | None, str]


# Byte-order marks, longest first (the UTF-32 LE mark begins with the UTF-16 LE one).
BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def decode_bytes(data: bytes) -> str | None:
    """Text of a file's bytes, or None when they are not text.

    A byte-order mark decides first (UTF-8/16/32); then UTF-8; then charset-normalizer's detection.
    Detection cannot tell the Western code pages apart on short texts (it read Latin-1 "préavis"
    as cp1006 "prﻠavis"), so Windows-1252, the superset of Latin-1, wins whenever it reads the
    bytes at least as cleanly as the detected code page.
    """
    for mark, codec in BYTE_ORDER_MARKS:
        if data.startswith(mark):
            try:
                return data.decode(codec)
            except UnicodeDecodeError:
                return None
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    best = from_bytes(data).best()
    if best is None:
        return None
    western = from_bytes(data, cp_isolation=["cp1252"]).best()
    return str(western if western is not None and western.chaos <= best.chaos else best)


def read_plain(data: bytes) -> list[Record] | None:
    text = decode_bytes(data)
    return None if text is None else [(None, text)]


def read_html(data: bytes) -> list[Record] | None:
    from bs4 import BeautifulSoup

    markup = decode_bytes(data)
    if markup is None:
        return None
    soup = BeautifulSoup(markup, "html.parser")
    for hidden in soup(["script", "style", "noscript", "template"]):
        hidden.decompose()
    title = soup.title.get_text(strip=True) if soup.title else None
    body = soup.body or soup
    return [(title or None, body.get_text("\n"))]


def read_pdf(data: bytes) -> list[Record] | None:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        text = "\n\n".join(page.extract_text() or "" for page in reader.pages)
        title = reader.metadata.title if reader.metadata else None
    except (PdfReadError, ValueError, OSError):
        return None
    return [(title or None, text)]


def _text_record(item: object) -> Record | None:
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        title = item.get("title")
        return (title if isinstance(title, str) else None, item["text"])
    return None


def read_json(data: bytes) -> list[Record] | None:
    """A JSON object with `text`, or a list of such objects."""
    text = decode_bytes(data)
    try:
        data = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        return None
    items = data if isinstance(data, list) else [data]
    records = [r for r in map(_text_record, items) if r is not None]
    return records or None


def read_jsonl(data: bytes) -> list[Record] | None:
    """One JSON object with a `text` field per line."""
    text = decode_bytes(data)
    if text is None:
        return None
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = _text_record(json.loads(line))
        except json.JSONDecodeError:
            return None
        if record is not None:
            records.append(record)
    return records or None


READERS: dict[str, Callable[[bytes], list[Record] | None]] = {
    ".txt": read_plain,
    ".md": read_plain,
    ".markdown": read_plain,
    ".rst": read_plain,
    ".html": read_html,
    ".htm": read_html,
    ".pdf": read_pdf,
    ".json": read_json,
    ".jsonl": read_jsonl,
}
