"""Filters for degenerate synthetic samples (weak teachers produce many)."""

from collections import Counter

from cartridges.stages.synthesis.seed_prompts import QUESTION_KINDS

MIN_MESSAGE_WORDS = 3
MAX_NGRAM_REPEATS = 3
NGRAM = 4
MIN_DISTINCT_RATIO = 0.3


def is_repetitive(tokens: list[int]) -> bool:
    """A 4-gram seen more than 3 times, or too few distinct tokens in a longer text."""
    if len(tokens) >= 20 and len(set(tokens)) / len(tokens) < MIN_DISTINCT_RATIO:
        return True
    grams = Counter(tuple(tokens[i : i + NGRAM]) for i in range(len(tokens) - NGRAM + 1))
    return bool(grams) and max(grams.values()) > MAX_NGRAM_REPEATS


def message_problem(kind: str, message: str, message_tokens: list[int], finished: bool) -> str | None:
    """Why a model-written user message is unusable, or None."""
    if len(message.split()) < MIN_MESSAGE_WORDS:
        return "empty_message"
    if not finished:
        return "message_truncated"
    if kind in QUESTION_KINDS and "?" not in message:
        return "no_question"
    if is_repetitive(message_tokens):
        return "repetitive_message"
    return None


def answer_problem(answer_text: str, answer_tokens: list[int]) -> str | None:
    if not answer_text.strip():
        return "empty_answer"
    if is_repetitive(answer_tokens):
        return "repetitive_answer"
    return None
