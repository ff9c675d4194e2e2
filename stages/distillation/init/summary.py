"""Init `summary`: the KV of summaries the model writes of chunks spread across the corpus.

The paper suggests starting a cartridge from a summary of the corpus rather than its first tokens
(HazyResearch's `initialization/summarization.py`): P tokens of the model's own condensed reading
of the whole corpus instead of P tokens of its beginning. Chunks are taken evenly spaced across
the corpus, one summary of at least `summary_tokens` tokens each, so a long corpus is summarised
from samples of all of it. Each summary is greedy and exactly as long as its share of the prefix
(special tokens, the end of turn among them, are suppressed), so the prefix has exactly P tokens
whatever the model would have stopped at; a small model forced on past its end tends to loop, so no
`REPEAT_NGRAM` tokens of its own summary may repeat (the chunk's phrases may: names and dates should
be copied). The summaries are prefilled as one text at positions 0..P-1, like the first-tokens init.
Cost: one prefill of each summarised chunk and P decode steps.
"""

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from cartridges.layout import chat_token_ids, context_token_ids
from cartridges.models import LoadedModel
from cartridges.runtime import pad_token_id
from cartridges.stages.ingest import DOCUMENT_SEPARATOR

SUMMARY_REQUEST = (
    "Summarize the text below for a reader who will answer questions about it. Keep the names, numbers, "
    "dates and definitions it gives.\n\n{chunk}"
)
REPEAT_NGRAM = 6


class NoRepeatInGenerated(LogitsProcessor):
    """Bans the token that would repeat an n-gram of the generated text; unlike transformers'
    `no_repeat_ngram_size`, the prompt's n-grams stay allowed."""

    def __init__(self, prompt_length: int, size: int):
        self.prompt_length, self.size = prompt_length, size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, ids in enumerate(input_ids[:, self.prompt_length :].tolist()):
            if len(ids) < self.size:
                continue
            tail = ids[len(ids) - self.size + 1 :]
            banned = [
                ids[i + self.size - 1] for i in range(len(ids) - self.size + 1) if ids[i : i + self.size - 1] == tail
            ]
            scores[row, banned] = float("-inf")
        return scores


def summarised_chunk_indices(num_chunks: int, num_summaries: int) -> list[int]:
    """`num_summaries` chunk indices evenly spaced over the corpus (the middle of each equal stratum)."""
    return [int((index + 0.5) * num_chunks / num_summaries) for index in range(num_summaries)]


def summary_budgets(total: int, parts: int) -> list[int]:
    """`total` tokens split into `parts` shares that differ by at most one."""
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


@torch.no_grad()
def greedy_summary(loaded: LoadedModel, chunk: str, num_tokens: int) -> list[int]:
    """The model's greedy summary of `chunk`, exactly `num_tokens` tokens, with no special token."""
    prompt = chat_token_ids(loaded.tokenizer, [{"role": "user", "content": SUMMARY_REQUEST.format(chunk=chunk)}])
    input_ids = torch.tensor([prompt], device=loaded.model.device)
    output = loaded.model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=num_tokens,
        min_new_tokens=num_tokens,
        do_sample=False,
        suppress_tokens=list(loaded.tokenizer.all_special_ids),
        logits_processor=LogitsProcessorList([NoRepeatInGenerated(len(prompt), REPEAT_NGRAM)]),
        pad_token_id=pad_token_id(loaded.tokenizer),
    )
    return output[0, len(prompt) :].tolist()


def summary_token_ids(loaded: LoadedModel, chunks: list[str], num_tokens: int, summary_tokens: int) -> list[int]:
    """The tokenizer's BOS (if any), then summaries of evenly spaced chunks in corpus order, separated as
    documents are: `num_tokens` ids in all."""
    tokenizer = loaded.tokenizer
    lead = context_token_ids(tokenizer, "", None)  # BOS, if the tokenizer has one
    separator = tokenizer(DOCUMENT_SEPARATOR, add_special_tokens=False)["input_ids"]
    wanted = num_tokens - len(lead)
    count = max(1, min(len(chunks), (wanted + len(separator)) // (summary_tokens + len(separator))))
    budgets = summary_budgets(wanted - (count - 1) * len(separator), count)
    ids = list(lead)
    for position, (index, budget) in enumerate(zip(summarised_chunk_indices(len(chunks), count), budgets)):
        ids += (separator if position else []) + greedy_summary(loaded, chunks[index], budget)
    return ids
