"""Seed prompt kinds: how each synthetic conversation's user message and answer come about.

Two families:
- model-written (`question`, `summarization`, `structuring`, `use_case`, `creative`, `generic`):
  the model reads the chunk and writes a user message; the teacher then writes the answer.
- corpus-answered (`quote`, `continuation`, `fill_span`): the answer is real corpus text, scored
  by the chunk-in-context teacher, so a weak teacher cannot put invented facts into the target.
"""

import random
import re
from dataclasses import dataclass

MESSAGE_INSTRUCTIONS = {
    "question": "Write one specific question about a fact stated in the document above (a number, a deadline, a condition, a name). Output only the question.",
    "summarization": "Write a request asking for a short summary of one specific part of the document above. Name the part. Output only the request.",
    "structuring": "Write a request asking to organise one part of the document above as a list or a table (for example its conditions, deadlines or parties). Output only the request.",
    "use_case": "Write a question that a person affected by the document above might ask about their own situation. Output only the question.",
    "creative": "Write a request for a short creative piece (a poem, a dialogue or an example scenario) based on a specific part of the document above. Output only the request.",
    "generic": "Write a message that a user might send to an assistant about the document above. Output only the message.",
    "quote": 'Write one question that is answered by this passage of the document, without quoting it:\n\n"{passage}"\n\nOutput only the question.',
}
CONTINUATION_MESSAGE = 'Continue the text of the document from: "{lead}"'
FILL_SPAN_MESSAGE = "Fill in the part marked [...] in this excerpt of the document:\n\n{excerpt}"

MODEL_ANSWERED = ("question", "summarization", "structuring", "use_case", "creative", "generic")
CORPUS_ANSWERED = ("quote", "continuation", "fill_span")
ALL_KINDS = MODEL_ANSWERED + CORPUS_ANSWERED
QUESTION_KINDS = ("question", "use_case", "quote")

SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")


@dataclass(frozen=True)
class CorpusAnswer:
    """A corpus-answered seed: the user message (or the passage to ask about) and the true answer."""

    message: str | None  # None: the model writes the message (kind `quote`)
    passage: str | None  # shown to the message writer for `quote`
    answer: str


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text) if s.strip()]


def _window(parts: list[str], start: int, max_words: int) -> list[str]:
    picked: list[str] = []
    for part in parts[start:]:
        if picked and sum(len(p.split()) for p in picked) + len(part.split()) > max_words:
            break
        picked.append(part)
    return picked


def corpus_answer(kind: str, chunk_text: str, rng: random.Random, max_answer_words: int) -> CorpusAnswer | None:
    """Pick the real text that answers a corpus-answered seed; None when the chunk is too short."""
    parts = sentences(chunk_text)
    if len(parts) < 3:
        return None
    if kind == "quote":
        start = rng.randrange(len(parts))
        passage = " ".join(_window(parts, start, max_answer_words))
        return CorpusAnswer(message=None, passage=passage, answer=passage)
    if kind == "continuation":
        cut = rng.randrange(1, len(parts) - 1)
        lead_words = " ".join(parts[:cut]).split()[-30:]
        answer = " ".join(_window(parts, cut, max_answer_words))
        return CorpusAnswer(message=CONTINUATION_MESSAGE.format(lead=" ".join(lead_words)), passage=None, answer=answer)
    if kind == "fill_span":
        target = rng.randrange(1, len(parts) - 1)
        before = " ".join(" ".join(parts[:target]).split()[-60:])
        after = " ".join(" ".join(parts[target + 1 :]).split()[:60])
        answer = " ".join(_window(parts, target, max_answer_words)[:1])
        return CorpusAnswer(
            message=FILL_SPAN_MESSAGE.format(excerpt=f"{before} [...] {after}"), passage=None, answer=answer
        )
    raise ValueError(f"{kind!r} is not a corpus-answered kind")


def message_instruction(kind: str, passage: str | None = None) -> str:
    return MESSAGE_INSTRUCTIONS[kind].format(passage=passage or "")


def writer_excerpt(chunk_text: str, rng: random.Random, max_words: int, around: str | None = None) -> str:
    """The part of the chunk the message writer reads: a window of whole sentences.

    A short window keeps turn A cheap and points a weak writer at one specific part; for `quote`
    the window starts at the passage so the question stays answerable by it.
    """
    parts = sentences(chunk_text)
    if around is not None and around in chunk_text:
        start = next((i for i, part in enumerate(parts) if around.startswith(part)), 0)
    else:
        start = rng.randrange(len(parts)) if parts else 0
    window = _window(parts, start, max_words)
    while start > 0 and sum(len(p.split()) for p in window) < max_words // 2:  # near the end: extend backwards
        start -= 1
        window = _window(parts, start, max_words)
    return " ".join(window)
