"""Evaluate: gold-answer NLL and rank accuracy on real QA sets, for any context block.

Every method is a KV prefix in front of the identical chat (see `cartridges.layout`): `none` (no
prefix), `icl` (the KV of the whole corpus), `truncated` (KV of its first B tokens, = an `init`
cartridge) and `cartridge` (a trained prefix). Scoring is shared, so only the prefix differs.
"""

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cartridges.artifact import kv_shape
from cartridges.layout import context_token_ids
from cartridges.models import LoadedModel
from cartridges.qa import QACorpus, Question
from cartridges.runtime import prefix_logits
from cartridges.stages.answer_scoring import mean_answer_nll
from cartridges.stages.initialize import kv_prefix_of_tokens

EXCLUDED_FROM_RANKING = ("yes_no",)


@dataclass(frozen=True)
class CorpusScore:
    corpus_id: str
    method: str
    kv_tokens: int
    nll: float  # mean over questions of the mean NLL per gold-answer token
    nll_se: float
    rank_accuracy: float | None
    ranked_questions: int
    questions: int


def corpus_prefix(loaded: LoadedModel, corpus: QACorpus, max_tokens: int | None) -> torch.Tensor:
    """KV of the corpus text (or its first `max_tokens` tokens) in the cartridge layout."""
    return kv_prefix_of_tokens(loaded, context_token_ids(loaded.tokenizer, corpus.text, max_tokens))


def rank_candidates(corpus: QACorpus, question: Question, distractors: int, seed: int) -> list[str] | None:
    """The gold answer first, then up to `distractors` other gold answers of the same type in the corpus."""
    if question.answer_type in EXCLUDED_FROM_RANKING:
        return None
    others = sorted({q.answer for q in corpus.questions if q.answer_type == question.answer_type and q.answer != question.answer and q.answer not in question.alt_answers})
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


@torch.no_grad()
def score_corpus(loaded: LoadedModel, corpus: QACorpus, prefix: torch.Tensor | None, method: str, distractors: int = 8, batch_size: int = 8, seed: int = 0) -> CorpusScore:
    shape = kv_shape(loaded.model.config)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return prefix_logits(loaded.model, prefix, shape, ids, mask)

    gold = mean_answer_nll(forward, loaded.tokenizer, [(q.question, q.answer) for q in corpus.questions], batch_size, pad)
    ranked = correct = 0
    if distractors > 0:
        for question in corpus.questions:
            candidates = rank_candidates(corpus, question, distractors, seed)
            if candidates is None:
                continue
            scores = mean_answer_nll(forward, loaded.tokenizer, [(question.question, c) for c in candidates], batch_size, pad)
            ranked += 1
            correct += int(min(range(len(scores)), key=scores.__getitem__) == 0)
    nll, se = mean_and_se(gold)
    return CorpusScore(
        corpus_id=corpus.id,
        method=method,
        kv_tokens=0 if prefix is None else prefix.shape[0],
        nll=nll,
        nll_se=se,
        rank_accuracy=correct / ranked if ranked else None,
        ranked_questions=ranked,
        questions=len(corpus.questions),
    )
