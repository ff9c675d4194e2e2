"""Ingest: read a corpus folder into cleaned, deduplicated documents with a content fingerprint."""

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from cartridges.errors import CartridgeError
from cartridges.hashing import sha256_bytes, sha256_of_named_hashes

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst"}
DOCUMENT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Document:
    path: str  # relative to the corpus root, with '/' separators
    title: str
    text: str
    sha256: str


@dataclass(frozen=True)
class Corpus:
    root: Path
    documents: list[Document]
    skipped: list[str]

    @property
    def content_fingerprint(self) -> str:
        """sha256 over sorted (relative path, content hash) pairs; see `fingerprint` for the tokenizer part."""
        return sha256_of_named_hashes((doc.path, doc.sha256) for doc in self.documents)

    def fingerprint(self, tokenizer_fingerprint: str) -> str:
        return sha256_of_named_hashes([("content", self.content_fingerprint), ("tokenizer", tokenizer_fingerprint)])

    @property
    def text(self) -> str:
        """All documents in path order, as one text (the order `init` reads tokens in)."""
        return DOCUMENT_SEPARATOR.join(doc.text for doc in self.documents)


def normalize_text(text: str) -> str:
    """Unicode NFC, unified newlines, no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _decode(data: bytes) -> str | None:
    """Decode UTF-8 (with or without BOM), else Latin-1 unless the bytes look binary."""
    if b"\x00" in data[:4096]:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _title(relative: str, text: str) -> str:
    first = text.lstrip().split("\n", 1)[0].lstrip("#").strip()
    return first[:120] if first else Path(relative).stem


def read_corpus(folder: Path) -> Corpus:
    """Read every supported file under `folder`; identical documents are kept once."""
    if not folder.exists():
        raise CartridgeError(f"corpus folder {folder} does not exist: pass a folder of .txt/.md files")
    if not folder.is_dir():
        raise CartridgeError(f"corpus {folder} is not a folder: pass a folder of .txt/.md files")
    documents: list[Document] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in Path(relative).parts):
            continue
        text = _decode(path.read_bytes()) if path.suffix.lower() in TEXT_SUFFIXES else None
        if text is None:
            skipped.append(relative)
            continue
        text = normalize_text(text)
        digest = sha256_bytes(text.encode())
        if not text or digest in seen:
            continue
        seen.add(digest)
        documents.append(Document(path=relative, title=_title(relative, text), text=text, sha256=digest))
    if not documents:
        what = f"; unsupported or binary files skipped: {', '.join(skipped[:5])}" if skipped else ""
        raise CartridgeError(f"corpus folder {folder} has no readable text ({', '.join(sorted(TEXT_SUFFIXES))}){what}")
    return Corpus(root=folder, documents=documents, skipped=skipped)
