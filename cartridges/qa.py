"""Read third-party QA sets (corpora with questions) in the common format of `shared/data/qa`."""

import json
from dataclasses import dataclass
from pathlib import Path

from cartridges.errors import CartridgeError
from cartridges.regular_files import MIB, read_regular_text

QA_FILE_LIMIT = 256 * MIB

DEFAULT_QA_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "qa"


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answer: str
    answer_type: str
    alt_answers: tuple[str, ...] = ()


@dataclass(frozen=True)
class QACorpus:
    """One corpus of a QA file: its text and the held-out questions about it."""

    id: str
    title: str
    text: str
    questions: tuple[Question, ...]


def _require(item: dict, field: str, where: str):
    if field not in item:
        raise CartridgeError(f"{where}: missing field {field!r}; see shared/data/qa/README.md for the format")
    return item[field]


def load_qa_file(path: Path) -> list[QACorpus]:
    if not path.is_file():
        raise CartridgeError(f"QA file {path} does not exist: pass --qa with a JSON file in the shared/data/qa format")
    try:
        data = json.loads(read_regular_text(path, QA_FILE_LIMIT, "QA file"))
    except json.JSONDecodeError as exc:
        raise CartridgeError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    corpora = []
    for index, raw in enumerate(_require(data, "corpora", str(path))):
        where = f"{path}: corpora[{index}]"
        text = _require(raw, "text", where)
        if not isinstance(text, str) or not text.strip():
            raise CartridgeError(f"{where}: corpus text is empty")
        questions = []
        for q_index, q in enumerate(_require(raw, "questions", where)):
            q_where = f"{where}.questions[{q_index}]"
            questions.append(
                Question(
                    id=str(_require(q, "id", q_where)),
                    question=_require(q, "question", q_where),
                    answer=_require(q, "answer", q_where),
                    answer_type=_require(q, "answer_type", q_where),
                    alt_answers=tuple(q.get("alt_answers", ())),
                )
            )
        if not questions:
            raise CartridgeError(f"{where}: corpus has no questions")
        corpora.append(
            QACorpus(id=_require(raw, "id", where), title=raw.get("title", ""), text=text, questions=tuple(questions))
        )
    return corpora


def find_corpus(path: Path, corpus_id: str) -> QACorpus:
    corpora = load_qa_file(path)
    for corpus in corpora:
        if corpus.id == corpus_id:
            return corpus
    raise CartridgeError(f"{path} has no corpus {corpus_id!r} (available: {', '.join(c.id for c in corpora)})")


def load_qa_files(paths: list[Path] | None, corpus_ids: list[str] | None = None) -> list[QACorpus]:
    """Corpora of several QA files (default: every file in DEFAULT_QA_DIR), optionally only `corpus_ids`, in that order."""
    if not paths:
        paths = sorted(DEFAULT_QA_DIR.glob("*.json"))
        if not paths:
            raise CartridgeError(f"no QA files in {DEFAULT_QA_DIR.resolve()}: pass --qa FILE (shared/data/qa format)")
    corpora = {c.id: c for path in paths for c in load_qa_file(path)}
    if not corpus_ids:
        return list(corpora.values())
    missing = [c for c in corpus_ids if c not in corpora]
    if missing:
        raise CartridgeError(
            f"no QA corpus {', '.join(map(repr, missing))} in {', '.join(map(str, paths))} (available: {', '.join(corpora)})"
        )
    return [corpora[c] for c in dict.fromkeys(corpus_ids)]
