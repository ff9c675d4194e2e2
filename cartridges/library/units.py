"""A library's units: each document, a long one cut into sections of at most `unit_tokens` tokens.

Cuts fall at the coarsest boundary that makes a section fit: a heading or a blank line first, then a
line, then a sentence, then a word; only a single word longer than a unit is cut between tokens.
A unit's digest covers its source, its text and the tokenizer, so a rebuild after an edit rebuilds
the units whose digest changed and takes the others from the version before.
"""

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cartridges.hashing import sha256_bytes

# Coarsest first: before a markdown heading, a blank line, a line, a sentence, a word.
BOUNDARIES = (r"\n(?=#)", r"\n\n", r"\n", r"(?<=[.!?;:])\s", r"\s")


@dataclass(frozen=True)
class Unit:
    id: str  # the document's path, with `#k` for the k-th section of a cut document
    source: str  # the document's path in the corpus
    title: str
    text: str
    num_tokens: int  # tokens of `text` under the model's tokenizer (no special tokens)
    digest: str

    def router_text(self) -> str:
        """What the router indexes: the title and the file name carry what the text may not say (a
        statute's state is in its file name, not in every section)."""
        stem = re.sub(r"[-_./#]+", " ", self.source)
        return f"{self.title}\n{stem}\n{self.text}"


def unit_digest(source: str, text: str, tokenizer_fingerprint: str) -> str:
    return sha256_bytes(f"{source}\0{tokenizer_fingerprint}\0{text}".encode())


def sections(text: str, count: Callable[[str], int], limit: int, level: int = 0) -> list[str]:
    """`text` cut into pieces of at most `limit` tokens (by `count`) at the coarsest boundary that works,
    neighbouring pieces packed together while they fit."""
    if count(text) <= limit:
        return [text]
    if level == len(BOUNDARIES):
        return _token_slices(text, count, limit)
    pieces = [p for p in re.split(f"({BOUNDARIES[level]})", text)]
    # keep each separator with the piece before it, so the pieces join back into the text
    joined = [pieces[i] + (pieces[i + 1] if i + 1 < len(pieces) else "") for i in range(0, len(pieces), 2)]
    small = [s for piece in joined if piece for s in sections(piece, count, limit, level + 1)]
    return _packed(small, count, limit)


def _packed(pieces: Sequence[str], count: Callable[[str], int], limit: int) -> list[str]:
    packed: list[str] = []
    for piece in pieces:
        if packed and count(packed[-1] + piece) <= limit:
            packed[-1] += piece
        else:
            packed.append(piece)
    return packed


def _token_slices(text: str, count: Callable[[str], int], limit: int) -> list[str]:
    """A word longer than a unit: cut by characters, each slice the longest that fits (binary search)."""
    out, start = [], 0
    while start < len(text):
        low, high = start + 1, len(text)
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if count(text[start:middle]) <= limit else (low, middle - 1)
        out.append(text[start:low])
        start = low
    return out


def split_units(documents, tokenizer, tokenizer_fingerprint: str, unit_tokens: int) -> list[Unit]:
    """The units of `documents` (records with path, title and text), in corpus order."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    units = []
    for document in documents:
        parts = [p.strip() for p in sections(document.text, count, unit_tokens)]
        parts = [p for p in parts if p]
        for index, text in enumerate(parts):
            unit_id = document.path if len(parts) == 1 else f"{document.path}#{index + 1}"
            units.append(
                Unit(
                    id=unit_id,
                    source=document.path,
                    title=document.title,
                    text=text,
                    num_tokens=count(text),
                    digest=unit_digest(unit_id, text, tokenizer_fingerprint),
                )
            )
    return units
