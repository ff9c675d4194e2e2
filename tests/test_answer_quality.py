"""Greedy answers and their SQuAD-style scores."""

import pytest

from cartridges.artifact.folder import load_artifact
from cartridges.qa import QACorpus, Question
from cartridges.runtime import CartridgeRuntime
from cartridges.stages.distillation.init.first_tokens import init_cartridge
from cartridges.stages.evaluation.answer_quality import greedy_answers, normalize, score_answer, token_f1
from cartridges.stages.evaluation.contexts import Context, FixedContext
from cartridges.stages.evaluation.evaluate import score_corpus
from cartridges.stages.ingest import read_corpus


@pytest.mark.parametrize(
    ("prediction", "gold", "f1"),
    [
        ("The Normans", "Normans", 1.0),  # articles and case go
        ("in the 10th and 11th centuries", "10th and 11th centuries", 2 * (4 / 5) / (4 / 5 + 1)),  # "in" stays
        ("Rollo, a Viking leader", "Rollo", 2 * (1 / 3) * 1 / (1 / 3 + 1)),
        ("Denmark, Iceland and Norway", "Norway", 2 * (1 / 4) / (1 / 4 + 1)),
        ("nothing in common", "Rollo", 0.0),
        ("", "", 1.0),
    ],
)
def test_token_f1_follows_squads_official_definition(prediction, gold, f1):
    assert token_f1(prediction, gold) == pytest.approx(f1)


def test_scores_take_the_best_gold_answer_and_containment_needs_whole_words():
    assert normalize("  The Duchy of  Normandy! ") == "duchy of normandy"
    score = score_answer("It was the duchy of Normandy.", ["France", "Duchy of Normandy"])
    assert score.contains and not score.exact and score.f1 == pytest.approx(2 * 0.6 * 1 / 1.6)
    assert score_answer("Normandy", ["normandy"]).exact
    assert not score_answer("Normandyland", ["Normandy"]).contains  # a whole-word match, not a substring


def test_greedy_answers_equal_hf_generate_and_score_one_when_gold_is_what_the_model_says(lively, corpus_dir, tmp_path):
    init_cartridge(lively, read_corpus(corpus_dir), 20, "legal", tmp_path / "legal")
    cartridge = load_artifact(tmp_path / "legal")
    questions = ["How many days notice?", "Who repairs the heating?", "What is the deposit?"]
    context = Context(cartridge.prompt_embeddings)
    answers = greedy_answers(lively, [context] * 3, questions, max_tokens=8)
    runtime = CartridgeRuntime(lively, [cartridge])
    assert answers == [runtime.generate([{"role": "user", "content": q}], max_new_tokens=8) for q in questions]
    # The model's own answers as gold: F1 1 where the answer has words, and answers in corpus order.
    corpus = QACorpus(
        "self",
        "self",
        "text",
        tuple(Question(str(i), q, a or "-", "span") for i, (q, a) in enumerate(zip(questions, answers, strict=True))),
    )
    score = score_corpus(lively, corpus, FixedContext(context), "cartridge", distractors=0, answer_tokens=8)
    assert score.answers == tuple(answers)
    assert score.per_question_f1 == tuple(1.0 if normalize(a) else 0.0 for a in answers)
    assert score.answer_f1 == pytest.approx(sum(score.per_question_f1) / 3)
