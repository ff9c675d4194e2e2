"""One run-folder layout: docs/format.md's list, `RunDir`, and the folder a real build leaves."""

import re
from pathlib import Path

from cartridges.stages.run_dir import RunDir, documented_layout

DOCS = Path(__file__).resolve().parents[1] / "docs" / "format.md"


def layout_in_the_docs() -> list[str]:
    """The paths of the code block under '# Run folder' in docs/format.md, relative to `<run>/`."""
    text = DOCS.read_text()
    block = text[text.index("# Run folder (one build)") :]
    block = block[block.index("```") + 3 :]
    block = block[: block.index("```")]
    return sorted(line.split()[0].removeprefix("<run>/") for line in block.strip().splitlines())


def as_pattern(documented: str) -> re.Pattern:
    pattern = re.escape(documented).replace("NNNNNN", r"\d{6}").replace("NNNNN", r"\d{5}")
    return re.compile(pattern + (".*" if documented.endswith("/") else ""))


def test_the_docs_list_exactly_the_paths_of_run_dir():
    assert layout_in_the_docs() == documented_layout()


def test_a_build_with_questions_and_a_warm_start_writes_only_documented_paths(
    cli, tiny_model_dir, long_corpus, cartridges_home, tmp_path
):
    import json

    from cartridges.stages.ingest import read_corpus

    qa = tmp_path / "qa.json"
    questions = [{"id": "1", "question": "When is rent due?", "answer": "before day 3", "answer_type": "value"}]
    qa.write_text(
        json.dumps({"corpora": [{"id": "statutes", "text": read_corpus(long_corpus).text, "questions": questions}]})
    )
    args = ["build", str(long_corpus), "--name", "legal", "--config", "tiny", "--set", f"model={tiny_model_dir}"]
    assert cli(*args, "--qa", str(qa), "--qa-corpus", "statutes")[0] == 0
    (long_corpus / "amendment.txt").write_text(
        "Section 61. A landlord must return the deposit within thirty days. " * 6
    )
    code, out, err = cli(*args)
    assert code == 0 and "warm-started from legal@1" in out, err

    patterns = [as_pattern(p) for p in documented_layout()]
    runs = sorted((cartridges_home / "runs").iterdir(), key=lambda run: RunDir(run).published.stat().st_mtime)
    seen: set[str] = set()
    for run in runs:
        for path in run.rglob("*"):
            if path.is_file():
                relative = path.relative_to(run).as_posix()
                matching = [p.pattern for p in patterns if p.fullmatch(relative)]
                assert matching, f"{relative} is not in docs/format.md's run folder layout"
                seen.add(relative)
    first, second = (RunDir(run) for run in runs)
    assert first.evaluation.is_file() and not second.evaluation.is_file()
    assert second.reused_samples.is_file() and json.loads(second.warm_start.read_text()) == {"parent": "legal@1"}
    for run in (first, second):  # what every published build keeps
        for path in (run.documents, run.chunks, run.ingest_record, run.synthesis_config, run.synthesis_summary):
            assert path.is_file(), path
        for path in (run.training_config, run.init_prefix, run.final_prefix, run.metrics, run.published, run.shard(0)):
            assert path.is_file(), path
        assert not run.artifact.exists() and not run.failure.exists()
