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
    assert len(corpus.documents) == 2 and corpus.skipped == ["image.png"]


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
