"""Text extraction per file format. Each reader returns (title or None, text) records, or None
when the file cannot be read as that format."""

import json
from collections.abc import Callable
from pathlib import Path

from charset_normalizer import from_bytes

Record = tuple[str | None, str]


def decode_bytes(data: bytes) -> str | None:
    """UTF-8 first (BOM tolerated); otherwise the encoding charset-normalizer detects; None if binary."""
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        best = from_bytes(data).best()
        return str(best) if best is not None else None


def read_plain(path: Path) -> list[Record] | None:
    text = decode_bytes(path.read_bytes())
    return None if text is None else [(None, text)]


def read_html(path: Path) -> list[Record] | None:
    from bs4 import BeautifulSoup

    markup = decode_bytes(path.read_bytes())
    if markup is None:
        return None
    soup = BeautifulSoup(markup, "html.parser")
    for hidden in soup(["script", "style", "noscript", "template"]):
        hidden.decompose()
    title = soup.title.get_text(strip=True) if soup.title else None
    body = soup.body or soup
    return [(title or None, body.get_text("\n"))]


def read_pdf(path: Path) -> list[Record] | None:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
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


def read_json(path: Path) -> list[Record] | None:
    """A JSON object with `text`, or a list of such objects."""
    text = decode_bytes(path.read_bytes())
    try:
        data = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        return None
    items = data if isinstance(data, list) else [data]
    records = [r for r in map(_text_record, items) if r is not None]
    return records or None


def read_jsonl(path: Path) -> list[Record] | None:
    """One JSON object with a `text` field per line."""
    text = decode_bytes(path.read_bytes())
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


READERS: dict[str, Callable[[Path], list[Record] | None]] = {
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
