"""What the teacher reads while it answers and scores a sample: its chunk, or a window of the corpus.

A chunk is 512-2048 tokens, so a teacher that reads only its chunk cannot use what the rest of the
corpus says, although `icl`, the ceiling a cartridge is measured against, reads all of it. With
`teacher_context: window` the corpus is cut into blocks of consecutive chunks, each as long as the
model's window allows after the sample's own tokens (`synthesis_config.teacher_context_tokens`),
and a sample's teacher reads its chunk's block: the whole corpus when it fits. Blocks are fixed (not
centred on each chunk) so that every sample of a block shares one prefix, which the HF engine
prefills once for all of them.

A block's text is each of its documents' title and text, as a chunk's is, joined like documents are.
"""

from dataclasses import dataclass

from cartridges.hashing import sha256_bytes
from cartridges.stages.ingest import DOCUMENT_SEPARATOR, Chunk
from cartridges.stages.synthesis.sample_plan import keys_of


def titled(title: str, text: str) -> str:
    """Corpus text as the teacher reads it: the document's title, a blank line, the text."""
    return f"{title}\n\n{text}"


@dataclass(frozen=True)
class TeacherBlock:
    chunk_ids: tuple[int, ...]  # consecutive
    text: str


def _document_parts(chunks: list[Chunk]) -> list[tuple[int, str]]:
    """(doc id, text) of each document's run of consecutive chunks. Chunks are contiguous token
    spans; a gap between two (whitespace some tokenizers leave out of every token) becomes one space."""
    parts: list[tuple[int, str]] = []
    previous: Chunk | None = None
    for chunk in chunks:
        if previous is not None and previous.doc_id == chunk.doc_id:
            gap = " " if chunk.char_start > previous.char_end else ""
            parts[-1] = (chunk.doc_id, parts[-1][1] + gap + chunk.text)
        else:
            parts.append((chunk.doc_id, chunk.text))
        previous = chunk
    return parts


def block_text(chunks: list[Chunk], titles: list[str]) -> str:
    return DOCUMENT_SEPARATOR.join(titled(titles[doc_id], text) for doc_id, text in _document_parts(chunks))


def teacher_blocks(chunks: list[Chunk], titles: list[str], tokenizer, max_tokens: int) -> list[TeacherBlock]:
    """Consecutive chunks packed greedily into blocks whose text has at most `max_tokens` tokens
    (counted with the tokenizer, titles included); a chunk that alone exceeds it is a block alone."""
    title_tokens = [len(tokenizer(f"{title}\n\n", add_special_tokens=False)["input_ids"]) + 2 for title in titles]
    blocks: list[list[Chunk]] = []
    used = 0
    for chunk in chunks:
        cost = chunk.num_tokens
        if not blocks or blocks[-1][-1].doc_id != chunk.doc_id:
            cost += title_tokens[chunk.doc_id]  # a document starting in the block brings its title
        if blocks and used + cost <= max_tokens:
            blocks[-1].append(chunk)
            used += cost
        else:
            blocks.append([chunk])
            used = chunk.num_tokens + title_tokens[chunk.doc_id]
    return [TeacherBlock(tuple(c.chunk_id for c in block), block_text(block, titles)) for block in blocks]


def teacher_texts(
    chunks: list[Chunk], titles: list[str], tokenizer, teacher_context: str, max_tokens: int
) -> list[str]:
    """What the teacher reads for each chunk id."""
    if teacher_context == "chunk":
        return [titled(titles[c.doc_id], c.text) for c in chunks]
    texts = [""] * len(chunks)
    for block in teacher_blocks(chunks, titles, tokenizer, max_tokens):
        for chunk_id in block.chunk_ids:
            texts[chunk_id] = block.text
    return texts


def teacher_keys(chunks: list[Chunk], titles: list[str], texts: list[str], teacher_context: str) -> list[str]:
    """Per chunk id, the content a sample of it depends on: its chunk (title and text), or with a
    window also the text of its whole block (an edit elsewhere in the block changes the teacher)."""
    keys = keys_of(chunks, titles)
    if teacher_context == "chunk":
        return keys
    return [sha256_bytes(f"{key}\x00{text}".encode()) for key, text in zip(keys, texts, strict=True)]
