"""What a user reads: each method's greedy answer, scored against the gold answers.

Gold NLL can improve while answers read worse (a prefix that learned the corpus's style makes every
plausible answer likelier), so evaluation also generates the answer and scores it the way SQuAD
does: after SQuAD's normalisation (lower case, no punctuation, no articles, single spaces), token F1
and exact match against the best of the gold answer and its alternatives; and, because a chat model
answers in sentences, whether a gold answer appears whole in the answer (containment).
"""

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from cartridges.kv_layout import kv_shape
from cartridges.layout import chat_token_ids
from cartridges.models import LoadedModel
from cartridges.runtime import stop_token_ids
from cartridges.serving.batch_decoder import BatchDecoder
from cartridges.serving.generation import Generation, Sampling
from cartridges.stages.evaluation.contexts import Context

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's official answer normalisation."""
    return " ".join(ARTICLES.sub(" ", text.lower().translate(PUNCTUATION)).split())


def token_f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize(prediction).split(), normalize(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    same = sum((Counter(predicted) & Counter(expected)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class AnswerScore:
    f1: float
    exact: bool
    contains: bool  # a gold answer appears whole (normalised) in the answer


def score_answer(prediction: str, golds: Sequence[str]) -> AnswerScore:
    """The best score over the gold answer and its alternatives."""
    normalized = normalize(prediction)
    return AnswerScore(
        f1=max(token_f1(prediction, gold) for gold in golds),
        exact=any(normalized == normalize(gold) for gold in golds),
        contains=any(normalize(gold) and f" {normalize(gold)} " in f" {normalized} " for gold in golds),
    )


def greedy_answers(
    loaded: LoadedModel, contexts: Sequence[Context], questions: Sequence[str], max_tokens: int, batch: int = 16
) -> list[str]:
    """Each question's greedy answer after its context block, decoded together in batches of `batch`."""
    model = loaded.model
    stops = stop_token_ids(loaded)
    decoder = BatchDecoder(model, kv_shape(model.config), max_batch=batch, prefill_order="arrival")  # as scored before
    try:
        generations = [
            decoder.submit(
                Generation(
                    None if context.prefix is None else context.prefix.to(model.device, model.dtype),
                    chat_token_ids(loaded.tokenizer, [{"role": "user", "content": question}]),
                    Sampling(max_tokens),
                    stops,
                    context.start_position,
                    context.key_bias,
                )
            )
            for context, question in zip(contexts, questions, strict=True)
        ]
        return [loaded.tokenizer.decode(list(g.tokens()), skip_special_tokens=True).strip() for g in generations]
    finally:
        decoder.close()
