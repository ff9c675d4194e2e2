import codecs
import os
from pathlib import Path

import pytest

from cartridges.errors import CartridgeError
from cartridges.hashing import sha256_of_named_hashes
from cartridges.stages.ingest import normalize_text, read_corpus


def test_reads_text_and_markdown_recursively_in_path_order(corpus_dir):
    corpus = read_corpus(corpus_dir)
    assert [d.path for d in corpus.documents] == ["a_statute.txt", "sub/b_notes.md"]
    assert corpus.documents[1].title == "Notes"
    assert corpus.text == corpus.documents[0].text + "\n\n" + corpus.documents[1].text


def test_identical_documents_are_kept_once_and_binaries_skipped(corpus_dir):
    (corpus_dir / "copy.txt").write_text((corpus_dir / "a_statute.txt").read_text())
    (corpus_dir / "image.png").write_bytes(b"\x89PNG\x00\x00")
    corpus = read_corpus(corpus_dir)
    assert len(corpus.documents) == 2
    assert [(s.path, s.reason) for s in corpus.skipped] == [
        ("copy.txt", "same text as a_statute.txt"),
        ("image.png", "unsupported file type .png"),
    ]


def test_fingerprint_is_stable_and_changes_on_edit(corpus_dir):
    first = read_corpus(corpus_dir)
    expected = sha256_of_named_hashes((d.path, d.sha256) for d in first.documents)
    assert first.content_fingerprint == expected == read_corpus(corpus_dir).content_fingerprint
    assert first.fingerprint("tok-a") != first.fingerprint("tok-b")
    (corpus_dir / "a_statute.txt").write_text("Section 1. Changed.")
    assert read_corpus(corpus_dir).content_fingerprint != first.content_fingerprint


def test_normalize_text():
    assert normalize_text("a  \r\nb\r\n\n\n\nc\t \n") == "a\nb\n\nc"


def test_missing_folder(tmp_path):
    with pytest.raises(CartridgeError, match="does not exist"):
        read_corpus(tmp_path / "nope")


def test_empty_folder(tmp_path):
    with pytest.raises(CartridgeError, match="has no readable text"):
        read_corpus(tmp_path)


def test_folder_without_readable_text(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01")
    (tmp_path / "b.txt").write_text("   \n\n ")
    with pytest.raises(CartridgeError, match=r"has no readable text.*skipped: a\.bin"):
        read_corpus(tmp_path)


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(CartridgeError, match="is not a folder"):
        read_corpus(tmp_path / "a.txt")


def test_reads_html_pdf_json_jsonl_and_detects_encodings(tmp_path):
    from reportlab.pdfgen import canvas

    (tmp_path / "page.html").write_text(
        "<html><head><title>Lease Act</title><style>p{}</style></head><body><h1>Part 1</h1><p>Rent is due monthly.</p>"
        "<script>var x = 1;</script></body></html>"
    )
    pdf = canvas.Canvas(str(tmp_path / "scan.pdf"))
    pdf.drawString(72, 720, "Deposits are returned within 30 days.")
    pdf.save()
    (tmp_path / "one.json").write_text('{"title": "Rules", "text": "Pets need consent."}')
    (tmp_path / "many.jsonl").write_text('{"text": "First record."}\n{"text": "Second record."}\n')
    german = (
        "Der Mieter zahlt die Miete für den Monat im Voraus. Die Kündigung muss schriftlich erfolgen. Für Schäden an "
        "der Wohnung haftet der Mieter, soweit er sie verschuldet hat. Über Ausnahmen entscheidet das Gericht."
    )
    (tmp_path / "latin.txt").write_bytes(german.encode("latin-1"))
    (tmp_path / "tool.exe").write_bytes(b"MZ\x00\x00")
    corpus = read_corpus(tmp_path)
    by_path = {d.path: d for d in corpus.documents}
    assert by_path["page.html"].title == "Lease Act"
    assert "Rent is due monthly." in by_path["page.html"].text and "var x" not in by_path["page.html"].text
    assert "Deposits are returned within 30 days." in by_path["scan.pdf"].text
    assert (by_path["one.json"].title, by_path["one.json"].text) == ("Rules", "Pets need consent.")
    assert by_path["many.jsonl#1"].text == "Second record."
    assert by_path["latin.txt"].text == german
    assert [s.path for s in corpus.skipped] == ["tool.exe"]


def test_json_without_text_field_is_skipped(tmp_path):
    (tmp_path / "data.json").write_text('{"body": "no text field"}')
    (tmp_path / "ok.txt").write_text("Some text.")
    assert [str(s) for s in read_corpus(tmp_path).skipped] == [
        "data.json (not readable as .json (binary, damaged or no text))"
    ]


def test_chunks_respect_bounds_and_cover_documents(tiny, tmp_path):
    from cartridges.stages.ingest import chunk_corpus

    (tmp_path / "long.txt").write_text(" ".join(f"Clause {i} requires notice." for i in range(200)))
    (tmp_path / "short.txt").write_text("A short rule.")
    corpus = read_corpus(tmp_path)
    chunks = chunk_corpus(corpus, tiny.tokenizer, min_tokens=40, max_tokens=100)
    for doc_id, doc in enumerate(corpus.documents):
        own = [c for c in chunks if c.doc_id == doc_id]
        total = len(tiny.tokenizer(doc.text, add_special_tokens=False)["input_ids"])
        assert own[0].token_start == 0 and own[-1].token_end == total
        assert all(a.token_end == b.token_start for a, b in zip(own, own[1:]))
        for chunk in own:
            assert chunk.num_tokens <= 100
            assert chunk.num_tokens >= 40 or len(own) == 1
            assert chunk.text == doc.text[chunk.char_start : chunk.char_end]
    assert [c.chunk_id for c in chunks] == list(range(len(chunks)))
    assert len([c for c in chunks if c.doc_id == 0]) > 1


def test_chunk_bounds_are_validated(tiny, corpus_dir):
    from cartridges.stages.ingest import chunk_corpus

    with pytest.raises(CartridgeError, match=r"min \(300\) <= max / 2 \(100\)"):
        chunk_corpus(read_corpus(corpus_dir), tiny.tokenizer, 300, 200)


def test_ingest_writes_parquet_and_reuses_it(tiny, corpus_dir, tmp_path):
    import pyarrow.parquet as pq

    from cartridges.stages.ingest import ingest, read_chunks
    from cartridges.stages.records import IngestRecord, read_record
    from cartridges.stages.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    record = ingest(corpus_dir, run, tiny.tokenizer, tiny.tokenizer_fingerprint, 8, 32)
    documents = pq.read_table(tmp_path / "run" / "documents.parquet").to_pylist()
    assert [d["path"] for d in documents] == ["a_statute.txt", "sub/b_notes.md"]
    chunks = read_chunks(run)
    assert len(chunks) == record.num_chunks == pq.read_table(tmp_path / "run" / "chunks.parquet").num_rows
    assert record.num_tokens == sum(c.num_tokens for c in chunks) and record.num_documents == 2
    assert record.corpus_fingerprint == read_corpus(corpus_dir).fingerprint(tiny.tokenizer_fingerprint)
    assert read_record(tmp_path / "run" / "ingest.json", IngestRecord) == record  # what it returns is what it wrote
    before = run.chunks.stat().st_mtime_ns
    assert ingest(corpus_dir, run, tiny.tokenizer, tiny.tokenizer_fingerprint, 8, 32) == record
    assert run.chunks.stat().st_mtime_ns == before


# ---- issue 14: decoding and reporting what is skipped ------------------------------------------


@pytest.mark.parametrize(
    "text, encode",
    [
        ("Le préavis doit être donné par écrit.", lambda t: t.encode("latin-1")),
        ("préavis", lambda t: t.encode("latin-1")),
        ("Kündigung", lambda t: t.encode("cp1252")),
        ("Zażółć gęślą jaźń, wynajmujący musi.", lambda t: t.encode("cp1250")),
        ("Арендодатель должен уведомить арендатора за тридцать дней.", lambda t: t.encode("cp1251")),
        ("Notice — “thirty days” (préavis)", lambda t: t.encode("utf-16")),
        ("Notice — “thirty days” (préavis)", lambda t: codecs.BOM_UTF16_BE + t.encode("utf-16-be")),
        ("Notice (préavis)", lambda t: t.encode("utf-32")),
        ("Notice (préavis)", lambda t: codecs.BOM_UTF8 + t.encode("utf-8")),
        ("Notice (préavis)", lambda t: t.encode("utf-8")),
    ],
)
def test_encodings_are_decoded_as_written(tmp_path, text, encode):
    (tmp_path / "doc.txt").write_bytes(encode(text))
    corpus = read_corpus(tmp_path)
    assert [d.text for d in corpus.documents] == [text] and corpus.skipped == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file and folder whatever its permissions")
def test_unreadable_files_and_folders_are_reported_with_the_reason(tmp_path):
    (tmp_path / "ok.txt").write_text("Readable text.")
    (tmp_path / "secret.txt").write_text("Hidden by permissions.")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "inside.txt").write_text("Never listed.")
    (tmp_path / "secret.txt").chmod(0)
    (tmp_path / "locked").chmod(0)
    try:
        corpus = read_corpus(tmp_path)
    finally:
        (tmp_path / "locked").chmod(0o755)
        (tmp_path / "secret.txt").chmod(0o644)
    assert [d.path for d in corpus.documents] == ["ok.txt"]
    assert [str(s) for s in corpus.skipped] == [
        "locked/ (folder not readable: Permission denied)",
        "secret.txt (cannot read: Permission denied)",
    ]


def test_unreadable_files_and_folders_are_reported_as_root_sees_them(tmp_path, monkeypatch):
    """The same report where permissions cannot stop the reader (root, as in CI): the OS errors are injected."""
    (tmp_path / "ok.txt").write_text("Readable text.")
    (tmp_path / "secret.txt").write_text("Hidden by permissions.")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "inside.txt").write_text("Never listed.")
    real_open, real_scandir = os.open, os.scandir

    def open_file(path, flags, *args):
        if Path(path).name == "secret.txt":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    def scandir(path="."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "open", open_file)
    monkeypatch.setattr(os, "scandir", scandir)
    corpus = read_corpus(tmp_path)
    assert [d.path for d in corpus.documents] == ["ok.txt"]
    assert [str(s) for s in corpus.skipped] == [
        "locked/ (folder not readable: Permission denied)",
        "secret.txt (cannot read: Permission denied)",
    ]


def test_an_unreadable_only_file_is_one_line_naming_it(tmp_path, monkeypatch):
    (tmp_path / "secret.txt").write_text("x")
    monkeypatch.setattr(
        os, "open", lambda path, *_: (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(path)))
    )
    with pytest.raises(CartridgeError, match=r"no readable text.*secret\.txt \(cannot read: Permission denied\)"):
        read_corpus(tmp_path)


def test_a_one_line_corpus_is_chunked_like_whole_text_tokenization(tiny, tmp_path):
    """Documents are tokenized in bounded pieces (memory): the chunks equal those of the whole text tokenized at once."""
    from cartridges import tokenizing
    from cartridges.stages.ingest import chunk_corpus

    words = "landlord tenant notice rent deposit lease premises court eviction days".split()
    (tmp_path / "one_line.txt").write_text(
        " ".join(words[(i * 7) % 10] + ("." if i % 11 == 0 else "") for i in range(30_000))
    )
    corpus = read_corpus(tmp_path)
    whole = chunk_corpus(corpus, tiny.tokenizer, 200, 500)
    offsets = tiny.tokenizer(corpus.documents[0].text, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    assert whole[-1].token_end == len(offsets)
    tokenizing_piece = tokenizing.PIECE_CHARS
    try:
        tokenizing.PIECE_CHARS = 1000  # many pieces
        pieces = chunk_corpus(corpus, tiny.tokenizer, 200, 500)
    finally:
        tokenizing.PIECE_CHARS = tokenizing_piece
    assert pieces == whole
    assert all(c.char_start == offsets[c.token_start][0] and c.char_end == offsets[c.token_end - 1][1] for c in whole)


def read_within(folder: Path, seconds: float = 20.0):
    """`read_corpus(folder)`, failing the test if it has not returned within `seconds` (a FIFO read blocks forever)."""
    import threading

    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("corpus", read_corpus(folder)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"read_corpus still running after {seconds} s"
    return outcome["corpus"]


def test_only_regular_files_are_read_and_every_link_device_and_pipe_is_listed(tmp_path):
    """The rule: regular files only, links never followed (to a file or a folder, inside or outside the
    corpus); each thing not read is listed with its reason. /dev/zero behind a link was read until memory
    ran out, and a FIFO named *.txt blocked forever."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("A file outside the corpus.")
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "ok.txt").write_text("Section 1. Readable text.")
    (corpus / "sub" / "inner.md").write_text("Section 2. Also read.")
    (corpus / "zero.txt").symlink_to("/dev/zero")
    (corpus / "random.md").symlink_to("/dev/urandom")
    os.mkfifo(corpus / "pipe.txt")
    (corpus / "leak.txt").symlink_to(outside / "secret.txt")
    (corpus / "inside-link.txt").symlink_to(corpus / "ok.txt")
    (corpus / "linked-folder").symlink_to(outside)
    (corpus / "dangling.txt").symlink_to(tmp_path / "nowhere.txt")
    read = read_within(corpus)
    assert [d.path for d in read.documents] == ["ok.txt", "sub/inner.md"]
    reasons = {s.path: s.reason for s in read.skipped}
    links = ["dangling.txt", "inside-link.txt", "leak.txt", "linked-folder/", "random.md", "zero.txt"]
    assert all("symbolic link: links are not followed" in reasons.pop(path) for path in links), reasons
    assert reasons == {"pipe.txt": "a named pipe (FIFO), not a regular file"}


def test_a_file_over_the_size_bound_is_listed_not_read(tmp_path, monkeypatch):
    from cartridges.stages import ingest

    monkeypatch.setattr(ingest, "MAX_FILE_BYTES", 100)
    (tmp_path / "small.txt").write_text("Short enough.")
    (tmp_path / "big.txt").write_text("x" * 101)
    read = read_corpus(tmp_path)
    assert [d.path for d in read.documents] == ["small.txt"]
    assert [str(s) for s in read.skipped] == ["big.txt (101 bytes, over the limit of 100)"]
