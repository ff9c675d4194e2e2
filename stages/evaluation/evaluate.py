"""Evaluate: gold-answer NLL and rank accuracy on real QA sets, for any context block.

Every method is a context source (`cartridges.stages.evaluation.contexts`): a KV prefix in front of the
identical chat (see `cartridges.layout`). Scoring is shared, so only the prefix differs.
"""

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from cartridges.kv_layout import kv_shape
from cartridges.models import LoadedModel
from cartridges.qa import QACorpus, Question
from cartridges.serving.packed_attention import packed_logits, use_packed_attention
from cartridges.stages.evaluation.answer_scoring import Forward, mean_answer_nll
from cartridges.stages.evaluation.contexts import Context, ContextSource

EXCLUDED_FROM_RANKING = ("yes_no",)


@dataclass(frozen=True)
class CorpusScore:
    corpus_id: str
    method: str
    kv_tokens: int  # the largest context block any question got
    nll: float  # mean over questions of the mean NLL per gold-answer token
    nll_se: float
    rank_accuracy: float | None
    ranked_questions: int
    questions: int
    per_question_nll: tuple[float, ...] = ()  # in corpus order, for paired comparisons between methods
    # Over the ranked questions: the mean NLL of the other answers minus the gold answer's (nats; higher:
    # the context favours the right answer, not just answers in the corpus's style), and per question.
    contrastive_margin: float | None = None
    per_question_margin: tuple[float, ...] = ()
    # With `answer_tokens`: the greedy answers and their SQuAD-style scores (stages/evaluation/answer_quality.py).
    answer_f1: float | None = None
    exact_match: float | None = None
    answer_contains: float | None = None
    per_question_f1: tuple[float, ...] = ()
    answers: tuple[str, ...] = ()


def rank_candidates(corpus: QACorpus, question: Question, distractors: int, seed: int) -> list[str] | None:
    """The gold answer first, then up to `distractors` other gold answers of the same type in the corpus."""
    if question.answer_type in EXCLUDED_FROM_RANKING:
        return None
    others = sorted(
        {
            q.answer
            for q in corpus.questions
            if q.answer_type == question.answer_type
            and q.answer != question.answer
            and q.answer not in question.alt_answers
        }
    )
    if not others:
        return None
    random.Random(f"{seed}:{question.id}").shuffle(others)
    return [question.answer, *others[:distractors]]


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def paired_gain(baseline: Sequence[float], method: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the per-question NLL gain of `method` over `baseline` on the same questions.

    Pairing removes the spread between questions that both share, so this SE is far smaller than
    the two means' SEs combined as if independent."""
    if len(baseline) != len(method):
        raise ValueError(f"paired scores need the same questions: {len(baseline)} vs {len(method)} per-question NLLs")
    return mean_and_se([a - b for a, b in zip(baseline, method)])


def _forward(loaded: LoadedModel, context: Context) -> Forward:
    """Logits of right-padded rows after the context block, computed in one packed pass: the block's
    keys and values are read from one copy (a padded batch copies the block per row: 1.3 GB for 8
    rows after a 3.5k-token article with SmolLM2) and padding is not computed."""
    model, shape = loaded.model, kv_shape(loaded.model.config)
    use_packed_attention(model)

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(dim=-1).tolist()
        rows = [ids[row, :length].tolist() for row, length in enumerate(lengths)]
        per_row = packed_logits(model, shape, context.prefix, rows, lengths, context.start_position, context.key_bias)
        logits = per_row[0].new_zeros(*ids.shape, per_row[0].shape[-1])
        for row, values in enumerate(per_row):
            logits[row, : values.shape[0]] = values
        return logits

    return forward


@torch.no_grad()
def score_corpus(
    loaded: LoadedModel,
    corpus: QACorpus,
    source: ContextSource,
    method: str,
    distractors: int = 8,
    batch_size: int = 8,
    seed: int = 0,
    answer_tokens: int = 0,
    on_scored: Callable[[int], None] = lambda questions: None,
) -> CorpusScore:
    """Gold-answer NLL and rank accuracy of every question, each after its context block; with
    `answer_tokens`, also its greedy answer of up to that many tokens, scored against the gold answers.
    `on_scored(n)`: n more questions scored (gold answer and candidates), for progress."""
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    contexts = [source.context(q) for q in corpus.questions]
    groups: dict[int, list[int]] = {}  # questions that share one context block are scored in batches
    for index, context in enumerate(contexts):
        groups.setdefault(id(context), []).append(index)
    gold = [0.0] * len(corpus.questions)
    ranked = correct = 0
    margins: list[float] = []
    for indices in groups.values():
        forward = _forward(loaded, contexts[indices[0]])
        questions = [corpus.questions[i] for i in indices]
        for i, value in zip(
            indices,
            mean_answer_nll(forward, loaded.tokenizer, [(q.question, q.answer) for q in questions], batch_size, pad),
        ):
            gold[i] = value
        for question in questions if distractors > 0 else ():
            candidates = rank_candidates(corpus, question, distractors, seed)
            if candidates is not None:
                scores = mean_answer_nll(
                    forward, loaded.tokenizer, [(question.question, c) for c in candidates], batch_size, pad
                )
                ranked += 1
                correct += int(min(range(len(scores)), key=scores.__getitem__) == 0)
                margins.append(sum(scores[1:]) / (len(scores) - 1) - scores[0])
            on_scored(1)
        if distractors <= 0:
            on_scored(len(questions))
    nll, se = mean_and_se(gold)
    answers = _answers(loaded, corpus, contexts, answer_tokens) if answer_tokens else {}
    return CorpusScore(
        corpus_id=corpus.id,
        method=method,
        kv_tokens=max(c.kv_tokens for c in contexts),
        nll=nll,
        nll_se=se,
        rank_accuracy=correct / ranked if ranked else None,
        contrastive_margin=sum(margins) / len(margins) if margins else None,
        per_question_margin=tuple(margins),
        ranked_questions=ranked,
        questions=len(corpus.questions),
        per_question_nll=tuple(gold),
        **answers,
    )


def _answers(loaded: LoadedModel, corpus: QACorpus, contexts: list[Context], max_tokens: int) -> dict:
    from cartridges.stages.evaluation.answer_quality import greedy_answers, score_answer

    questions = corpus.questions
    answers = greedy_answers(loaded, contexts, [q.question for q in questions], max_tokens)
    scores = [score_answer(a, [q.answer, *q.alt_answers]) for a, q in zip(answers, questions, strict=True)]
    return {
        "answer_f1": sum(s.f1 for s in scores) / len(scores),
        "exact_match": sum(s.exact for s in scores) / len(scores),
        "answer_contains": sum(s.contains for s in scores) / len(scores),
        "per_question_f1": tuple(s.f1 for s in scores),
        "answers": tuple(answers),
    }
