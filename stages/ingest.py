"""Ingest: read a corpus folder into cleaned, deduplicated documents, fingerprint it, chunk it by tokens.

Outputs (in the run folder, each written atomically): `documents.parquet`, `chunks.parquet`.
"""

import math
import os
import re
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from cartridges.atomic import write_parquet_atomically
from cartridges.errors import CartridgeError
from cartridges.hashing import sha256_bytes, sha256_of_named_hashes
from cartridges.models import LoadedModel
from cartridges.regular_files import MIB, UnreadableFile, read_regular
from cartridges.stages.config import BuildConfig
from cartridges.stages.readers import READERS
from cartridges.stages.records import IngestRecord, Skipped, read_record
from cartridges.stages.run_dir import RunDir
from cartridges.stages.run_mirror import RunMirror
from cartridges.tokenizing import token_offsets

DOCUMENT_SEPARATOR = "\n\n"
MAX_FILE_BYTES = 256 * MIB  # a corpus file larger than this is listed as skipped, never read
LINK_REASON = "symbolic link: links are not followed (copy the file or folder into the corpus)"


@dataclass(frozen=True)
class Document:
    path: str  # relative to the corpus root, '/' separators; `file.jsonl#2` for the third record of a file
    title: str
    text: str
    sha256: str


@dataclass(frozen=True)
class Corpus:
    root: Path
    documents: list[Document]
    skipped: list[Skipped]

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


@dataclass(frozen=True)
class Chunk:
    chunk_id: int
    doc_id: int
    token_start: int
    token_end: int
    char_start: int
    char_end: int
    text: str

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start


def normalize_text(text: str) -> str:
    """Unicode NFC, unified newlines, no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _title(given: str | None, relative: str, text: str) -> str:
    if given and given.strip():
        return given.strip()[:120]
    first = text.split("\n", 1)[0].lstrip("#").strip()
    return first[:120] if first else Path(relative).stem


def _corpus_files(folder: Path, skipped: list[Skipped]) -> list[Path]:
    """Every non-hidden entry under `folder` that is not a folder, sorted; folders that cannot be listed
    and links to folders go to `skipped` (links to files are skipped when read: links are never followed)."""

    def unlisted(error: OSError) -> None:
        where = Path(error.filename).relative_to(folder).as_posix() if error.filename else "."
        skipped.append(Skipped(path=where + "/", reason=f"folder not readable: {error.strerror or error}"))

    files = []
    for root, folders, names in os.walk(folder, onerror=unlisted):
        linked = [f for f in folders if not f.startswith(".") and os.path.islink(os.path.join(root, f))]
        skipped.extend(
            Skipped(path=(Path(root) / f).relative_to(folder).as_posix() + "/", reason=LINK_REASON) for f in linked
        )
        folders[:] = sorted(f for f in folders if not f.startswith(".") and f not in linked)
        files += [Path(root) / name for name in names if not name.startswith(".")]
    return sorted(files)


def _read_records(path: Path) -> tuple[list | None, str]:
    """(records, reason if none): the file's (title, text) records by its format. Only regular files of
    at most `MAX_FILE_BYTES` are read: a link, a device, a pipe or a socket is a reason, not a hang."""
    if path.is_symlink():
        return None, LINK_REASON
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        return None, f"unsupported file type {path.suffix or '(none)'}"
    try:
        data = read_regular(path, MAX_FILE_BYTES, follow_links=False)
    except UnreadableFile as exc:
        return None, exc.reason
    records = reader(data)
    return records, "" if records is not None else f"not readable as {path.suffix.lower()} (binary, damaged or no text)"


def read_corpus(folder: Path) -> Corpus:
    """Read every supported file under `folder` (hidden files and folders are ignored); identical
    documents are kept once. Every file or folder that is not read is reported with its reason."""
    supported = ", ".join(sorted(READERS))
    if not folder.exists():
        raise CartridgeError(f"corpus folder {folder} does not exist: pass a folder of documents ({supported})")
    if not folder.is_dir():
        raise CartridgeError(f"corpus {folder} is not a folder: pass a folder of documents ({supported})")
    documents: list[Document] = []
    skipped: list[Skipped] = []
    seen: dict[str, str] = {}
    for path in _corpus_files(folder, skipped):
        relative = path.relative_to(folder).as_posix()
        records, reason = _read_records(path)
        if records is None:
            skipped.append(Skipped(path=relative, reason=reason))
            continue
        for index, (title, raw) in enumerate(records):
            name = relative if len(records) == 1 else f"{relative}#{index}"
            text = normalize_text(raw)
            digest = sha256_bytes(text.encode())
            if not text:
                skipped.append(Skipped(path=name, reason="no text"))
            elif digest in seen:
                skipped.append(Skipped(path=name, reason=f"same text as {seen[digest]}"))
            else:
                seen[digest] = name
                documents.append(Document(path=name, title=_title(title, relative, text), text=text, sha256=digest))
    if not documents:
        what = f"; skipped: {', '.join(map(str, skipped[:5]))}" if skipped else ""
        raise CartridgeError(f"corpus folder {folder} has no readable text ({supported}){what}")
    return Corpus(root=folder, documents=documents, skipped=skipped)


def _balanced_bounds(length: int, max_tokens: int) -> list[tuple[int, int]]:
    """Split [0, length) into the fewest near-equal parts of at most `max_tokens` each.

    Equal parts keep every part above max_tokens / 2 whenever a split happens, so no runt tail.
    """
    parts = max(1, math.ceil(length / max_tokens))
    cuts = [round(i * length / parts) for i in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def chunk_corpus(corpus: Corpus, tokenizer: PreTrainedTokenizerBase, min_tokens: int, max_tokens: int) -> list[Chunk]:
    """Token-level chunks within documents. A document shorter than `min_tokens` stays one chunk."""
    if not 0 < min_tokens <= max_tokens // 2:
        raise CartridgeError(f"chunk sizes must satisfy 0 < min ({min_tokens}) <= max / 2 ({max_tokens // 2})")
    chunks: list[Chunk] = []
    for doc_id, doc in enumerate(corpus.documents):
        offsets = token_offsets(tokenizer, doc.text)  # in pieces: a 40 MB one-line file stays small
        for start, end in _balanced_bounds(len(offsets), max_tokens):
            if start == end:
                continue
            char_start, char_end = int(offsets[start][0]), int(offsets[end - 1][1])
            chunks.append(Chunk(len(chunks), doc_id, start, end, char_start, char_end, doc.text[char_start:char_end]))
    return chunks


def write_ingest_outputs(run: RunDir, corpus: Corpus, chunks: list[Chunk]) -> None:
    doc_tokens = [0] * len(corpus.documents)
    for chunk in chunks:
        doc_tokens[chunk.doc_id] = max(doc_tokens[chunk.doc_id], chunk.token_end)
    documents = pa.Table.from_pylist(
        [{"doc_id": i, **asdict(doc), "num_tokens": doc_tokens[i]} for i, doc in enumerate(corpus.documents)]
    )
    write_parquet_atomically(run.documents, documents)
    write_parquet_atomically(
        run.chunks, pa.Table.from_pylist([asdict(c) | {"num_tokens": c.num_tokens} for c in chunks])
    )


def read_titles(run: RunDir) -> list[str]:
    """Document titles by document id."""
    import pyarrow.parquet as pq

    return pq.read_table(run.documents, columns=["title"]).column("title").to_pylist()


def read_chunks(run: RunDir) -> list[Chunk]:
    import pyarrow.parquet as pq

    rows = pq.read_table(run.chunks).to_pylist()
    return [Chunk(**{k: v for k, v in row.items() if k != "num_tokens"}) for row in rows]


def ingest(
    corpus: Corpus | Path,
    run: RunDir,
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_fingerprint: str,
    min_tokens: int,
    max_tokens: int,
) -> IngestRecord:
    """Chunk and write a corpus (or the corpus folder it reads) into the run folder; reuses earlier outputs
    of the same corpus and chunking (its fingerprint decides)."""
    if isinstance(corpus, Path):
        corpus = read_corpus(corpus)
    fingerprint = corpus.fingerprint(tokenizer_fingerprint)
    if run.ingest_record.is_file():
        done = read_record(run.ingest_record, IngestRecord)
        if (done.corpus_fingerprint, done.chunk_min_tokens, done.chunk_max_tokens) == (
            fingerprint,
            min_tokens,
            max_tokens,
        ):
            return done
    chunks = chunk_corpus(corpus, tokenizer, min_tokens, max_tokens)
    write_ingest_outputs(run, corpus, chunks)
    record = IngestRecord(
        corpus_fingerprint=fingerprint,
        chunk_min_tokens=min_tokens,
        chunk_max_tokens=max_tokens,
        source=str(corpus.root),
        num_documents=len(corpus.documents),
        num_chunks=len(chunks),
        num_tokens=sum(c.num_tokens for c in chunks),
        skipped=corpus.skipped,
    )
    record.write(run.ingest_record)
    return record


@dataclass(frozen=True)
class IngestInputs:
    corpus: Corpus  # read already, so that a bad folder fails before the model loads
    model: LoadedModel  # its tokenizer chunks the corpus


def run(mirror: RunMirror, inputs: IngestInputs, config: BuildConfig) -> IngestRecord:
    """The ingest stage: the corpus chunked as `config.synthesis` asks, into `documents.parquet`,
    `chunks.parquet` and `ingest.json` (skipped when those hold this corpus and chunking already)."""
    synthesis = config.synthesis
    return ingest(
        inputs.corpus,
        mirror.local,
        inputs.model.tokenizer,
        inputs.model.tokenizer_fingerprint,
        synthesis.chunk_min_tokens,
        synthesis.chunk_max_tokens,
    )
