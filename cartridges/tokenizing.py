"""Tokenize long texts in bounded pieces: memory stays proportional to what is kept.

A fast tokenizer run on one long string keeps an encoding (ids, offsets, token strings, masks)
for every token at once: gigabytes for a one-line file of tens of megabytes (BENCHMARKS.md, "Memory
of a long one-line corpus file"). Here a text is cut into
pieces of about `PIECE_CHARS` characters just before a whitespace character that follows a
non-whitespace one. Tokenizers split words at whitespace before merging (byte-level BPE and
SentencePiece alike), so a cut there leaves every token as the whole text would have it.
"""

from collections.abc import Iterator

import numpy as np
from transformers import PreTrainedTokenizerBase

PIECE_CHARS = 1 << 20


def text_pieces(text: str, piece_chars: int = PIECE_CHARS) -> Iterator[tuple[int, str]]:
    """(start offset, piece) covering `text` in order, each cut just before whitespace where there is some."""
    start = 0
    while start < len(text):
        end = _cut(text, start, piece_chars)
        yield start, text[start:end]
        start = end


def _cut(text: str, start: int, piece_chars: int) -> int:
    """An end for the piece at `start`: the last whitespace after a non-space within the budget,
    else the first one after it, else the end of the text."""
    limit = start + piece_chars
    if limit >= len(text):
        return len(text)
    for search in (range(limit, start, -1), range(limit + 1, len(text))):
        for end in search:
            if text[end].isspace() and not text[end - 1].isspace():
                return end
    return len(text)


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Tokens of `text` without special tokens, counted piece by piece."""
    return sum(len(tokenizer(piece, add_special_tokens=False)["input_ids"]) for _, piece in text_pieces(text))


def token_offsets(tokenizer: PreTrainedTokenizerBase, text: str) -> np.ndarray:
    """[tokens, 2] character (start, end) of every token of `text`, without special tokens."""
    parts = [np.zeros((0, 2), dtype=np.int64)]
    for start, piece in text_pieces(text):
        offsets = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        parts.append(np.asarray(offsets, dtype=np.int64).reshape(-1, 2) + start)
    return np.concatenate(parts)


def leading_token_ids(
    tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int, add_special_tokens: bool = True
) -> list[int]:
    """The first `max_tokens` token ids of `text`, tokenizing only as much of its beginning as they need."""
    chars = max(64, max_tokens * 8)
    while True:
        end = _cut(text, 0, chars)
        ids = tokenizer(text[:end], add_special_tokens=add_special_tokens)["input_ids"]
        if len(ids) >= max_tokens or end >= len(text):
            return ids[:max_tokens]
        chars *= 2
