from cartridges.default_corpus import _normalized, gather_license_corpus
from cartridges.stages.ingest import read_corpus


def test_license_corpus_is_real_deduplicated_legal_text(tmp_path):
    folder = gather_license_corpus(tmp_path / "licenses")
    files = sorted(folder.glob("*.txt"))
    assert len(files) >= 5
    texts = [f.read_text() for f in files]
    assert len({_normalized(t) for t in texts}) == len(texts)
    assert any("Apache License" in t for t in texts) and any("Permission is hereby granted" in t for t in texts)
    assert len(read_corpus(folder).documents) == len(files)


def test_license_corpus_is_gathered_once(tmp_path):
    folder = gather_license_corpus(tmp_path / "licenses")
    marker = folder / "zz-local-note.txt"
    marker.write_text("kept")
    assert gather_license_corpus(folder) == folder and marker.read_text() == "kept"
