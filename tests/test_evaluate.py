"""Metrics on hand-made logits, candidate selection, and the QA loader's errors."""

import json
import math

import pytest
import torch

from cartridges.errors import CartridgeError
from cartridges.kv_layout import kv_shape
from cartridges.layout import chat_token_ids
from cartridges.qa import QACorpus, Question, find_corpus, load_qa_file, load_qa_files
from cartridges.runtime import prefix_cache
from cartridges.stages.evaluation.answer_scoring import answer_token_ids, mean_answer_nll
from cartridges.stages.evaluation.contexts import Context, FixedContext, corpus_kv
from cartridges.stages.evaluation.evaluate import mean_and_se, paired_gain, rank_candidates, score_corpus


def test_mean_answer_nll_equals_hand_computation(tiny):
    vocab = len(tiny.tokenizer)
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))

    def forward(ids, mask):  # a bigram "model": logits depend only on the current token
        return table[ids]

    pairs = [("How long?", "three days"), ("Who pays?", "the tenant")]
    got = mean_answer_nll(forward, tiny.tokenizer, pairs, batch_size=2)
    for (question, answer), value in zip(pairs, got):
        prompt = chat_token_ids(tiny.tokenizer, [{"role": "user", "content": question}])
        tokens = answer_token_ids(tiny.tokenizer, answer)
        previous = [prompt[-1], *tokens[:-1]]
        expected = -sum(torch.log_softmax(table[p], -1)[t].item() for p, t in zip(previous, tokens)) / len(tokens)
        assert value == pytest.approx(expected, rel=1e-5)


def corpus_of(answers: list[tuple[str, str]]) -> QACorpus:
    questions = tuple(
        Question(id=str(i), question=f"q{i}?", answer=a, answer_type=t) for i, (a, t) in enumerate(answers)
    )
    return QACorpus(id="c", title="", text="Some statute text.", questions=questions)


def test_rank_candidates_use_same_type_answers_and_skip_yes_no():
    corpus = corpus_of(
        [("3 days", "duration"), ("10 days", "duration"), ("5 days", "duration"), ("Yes", "yes_no"), ("No", "yes_no")]
    )
    candidates = rank_candidates(corpus, corpus.questions[0], distractors=8, seed=0)
    assert candidates[0] == "3 days" and sorted(candidates[1:]) == ["10 days", "5 days"]
    assert rank_candidates(corpus, corpus.questions[3], 8, 0) is None
    assert len(rank_candidates(corpus, corpus.questions[0], distractors=1, seed=0)) == 2


def test_score_corpus_rank_accuracy_against_hand_made_preferences(tiny, monkeypatch):
    """With a fake model that prefers one answer per question, rank accuracy counts exactly those hits."""
    corpus = corpus_of([("alpha", "category"), ("beta", "category"), ("gamma", "category")])
    preferred = {"q0?": "alpha", "q1?": "gamma", "q2?": "gamma"}  # right, wrong, right

    def fake_nll(forward, tokenizer, pairs, batch_size=8, pad_token_id=0):
        return [0.1 if preferred.get(q) == a else 1.0 for q, a in pairs]

    monkeypatch.setattr("cartridges.stages.evaluation.evaluate.mean_answer_nll", fake_nll)
    score = score_corpus(tiny, corpus, FixedContext(Context(None)), "none", distractors=8)
    assert score.ranked_questions == 3 and score.rank_accuracy == pytest.approx(2 / 3)
    assert score.nll == pytest.approx((0.1 + 1.0 + 0.1) / 3)
    # the other answers' mean NLL minus the gold one's: 0.9 (q0), (1.0 + 0.1) / 2 - 1.0 (q1), 0.9 (q2)
    assert score.per_question_margin == pytest.approx((0.9, -0.45, 0.9))
    assert score.contrastive_margin == pytest.approx(1.35 / 3)


def test_mean_and_se():
    mean, se = mean_and_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and se == pytest.approx(math.sqrt(1.6666666 / 4), rel=1e-5)


def test_paired_gain_removes_the_spread_both_methods_share():
    baseline = [5.0, 1.0, 9.0, 3.0]
    method = [4.0, 0.5, 8.0, 2.5]  # gains 1, 0.5, 1, 0.5: mean 0.75, sample variance 1/12
    gain, se = paired_gain(baseline, method)
    assert gain == pytest.approx(0.75) and se == pytest.approx(math.sqrt(1 / 12 / 4))
    assert se < mean_and_se(baseline)[1]
    with pytest.raises(ValueError, match="same questions: 4 vs 3"):
        paired_gain(baseline, method[:3])


def test_score_corpus_budget_accounting(tiny):
    corpus = corpus_of([("alpha", "category"), ("beta", "category")])
    corpus = QACorpus("c", "", "Section 1. Rent is due monthly. " * 20, corpus.questions)
    prefix = corpus_kv(tiny, corpus.text, 16)
    assert prefix.shape[0] == 16
    assert score_corpus(tiny, corpus, FixedContext(Context(prefix)), "truncated", distractors=0).kv_tokens == 16


def test_score_corpus_reports_every_question_once_for_progress(tiny):
    """Ranked or not (a yes/no question has no candidates), with or without distractors: one count each."""
    corpus = corpus_of([("3 days", "duration"), ("10 days", "duration"), ("5 days", "duration"), ("Yes", "yes_no")])
    for distractors in (8, 0):
        counted = []
        score_corpus(
            tiny, corpus, FixedContext(Context(None)), "none", distractors=distractors, on_scored=counted.append
        )
        assert sum(counted) == len(corpus.questions)


def test_qa_loader_errors(tmp_path):
    with pytest.raises(CartridgeError, match="does not exist"):
        load_qa_file(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"corpora": [{"id": "x", "text": "t", "questions": [{"id": "1", "question": "q"}]}]}))
    with pytest.raises(CartridgeError, match=r"questions\[0\]: missing field 'answer'"):
        load_qa_file(bad)
    bad.write_text(json.dumps({"corpora": [{"id": "x", "text": "  ", "questions": []}]}))
    with pytest.raises(CartridgeError, match="corpus text is empty"):
        load_qa_file(bad)
    bad.write_text(json.dumps({"corpora": [{"id": "x", "text": "t", "questions": []}]}))
    with pytest.raises(CartridgeError, match="has no questions"):
        load_qa_file(bad)
    bad.write_text(
        json.dumps(
            {
                "corpora": [
                    {
                        "id": "x",
                        "text": "t",
                        "questions": [{"id": "1", "question": "q", "answer": "a", "answer_type": "value"}],
                    }
                ]
            }
        )
    )
    with pytest.raises(CartridgeError, match="no corpus 'y'.*available: x"):
        find_corpus(bad, "y")


def test_load_qa_files_selects_corpora_and_names_missing_ones(tmp_path):
    path = tmp_path / "qa.json"
    question = {"id": "1", "question": "q?", "answer": "a", "answer_type": "category"}
    path.write_text(json.dumps({"corpora": [{"id": i, "text": "t", "questions": [question]} for i in ("x", "y")]}))
    assert [c.id for c in load_qa_files([path], ["y", "x", "y"])] == ["y", "x"]
    assert [c.id for c in load_qa_files([path])] == ["x", "y"]
    with pytest.raises(CartridgeError, match=r"no QA corpus 'z'.*available: x, y"):
        load_qa_files([path], ["z"])
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"corpora": [{"id": "e", "text": "  ", "questions": [question]}]}))
    with pytest.raises(CartridgeError, match="corpus text is empty"):
        load_qa_files([empty])


def test_gold_nll_after_a_context_block_equals_one_plain_forward_pass(lively):
    """The packed scoring pass against the model run once over corpus, chat and answer (icl), and
    over the full corpus cache with the dropped positions masked (a compressed block read at the
    corpus's positions); rows of different lengths share a batch, so padding is exercised too."""
    tokenizer = lively.tokenizer
    text = "Section 4. A tenant may cure a default in rent within ten days of notice. " * 3
    questions = tuple(
        Question(id=str(i), question=q, answer=a, answer_type="other")
        for i, (q, a) in enumerate(
            [("How long to cure?", "ten days"), ("Who may cure a default in rent?", "a tenant"), ("What?", "rent")]
        )
    )
    corpus = QACorpus(id="c", title="", text=text, questions=questions)
    full = corpus_kv(lively, text)
    tokens = full.shape[0]
    kept = torch.cat([full[:1], full[tokens - 10 :]])  # a streaming-style block: the sink and the last 10
    mask_dropped = torch.ones(tokens, dtype=torch.long)
    mask_dropped[1 : tokens - 10] = 0
    for context, corpus_mask in (
        (Context(full), torch.ones(tokens, dtype=torch.long)),
        (Context(kept, tokens), mask_dropped),
    ):
        got = score_corpus(lively, corpus, FixedContext(context), "m", distractors=0, batch_size=2).per_question_nll
        for question, value in zip(questions, got, strict=True):
            chat = chat_token_ids(tokenizer, [{"role": "user", "content": question.question}])
            answer = answer_token_ids(tokenizer, question.answer)
            ids = torch.tensor([chat + answer])
            with torch.no_grad():
                logits = lively.model(
                    input_ids=ids,
                    attention_mask=torch.cat([corpus_mask, torch.ones(ids.shape[1], dtype=torch.long)])[None],
                    position_ids=torch.arange(tokens, tokens + ids.shape[1])[None],
                    past_key_values=prefix_cache(full, *kv_shape(lively.model.config)),
                    use_cache=True,
                ).logits[0]
            predicted = torch.log_softmax(logits[len(chat) - 1 : -1], dim=-1)
            expected = -predicted[range(len(answer)), answer].mean().item()
            assert value == pytest.approx(expected, abs=1e-4)
