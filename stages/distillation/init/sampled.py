"""Init `sampled`: the KV of short spans of corpus tokens sampled from across the whole corpus.

Sampled Chunk Initialization (arXiv 2508.17032) starts a cartridge from pieces of the corpus
rather than from its beginning, so that the keys the prefix starts with already point at every
part of the corpus. The spans are drawn by stratified sampling: the corpus's token stream is cut
into as many equal strata as there are spans and one span is drawn at a random offset inside each,
so the spans never overlap, keep the corpus order, and cover the corpus evenly however long it is
(sampling chunks with replacement repeated the same text in a corpus of a few chunks). The chosen
tokens are then prefilled as one text at positions 0..P-1, like the first-tokens init.
"""

import math
import random

from transformers import PreTrainedTokenizerBase

from cartridges.layout import context_token_ids


def sampled_token_ids(
    tokenizer: PreTrainedTokenizerBase, text: str, num_tokens: int, span_tokens: int, seed: int
) -> list[int]:
    """The tokenizer's BOS (if any), then spans of `span_tokens` corpus tokens, one from each of the
    equal strata of the corpus, in corpus order: `num_tokens` ids in all (fewer only when the corpus
    is shorter, in which case it is the whole corpus, as the first-tokens init would be)."""
    lead = context_token_ids(tokenizer, "", None)  # BOS, if the tokenizer has one
    corpus = tokenizer(text, add_special_tokens=False)["input_ids"]
    wanted = num_tokens - len(lead)
    if len(corpus) <= wanted:
        return (lead + corpus)[:num_tokens]
    spans = math.ceil(wanted / span_tokens)
    stratum = len(corpus) / spans
    rng = random.Random(seed)
    ids = list(lead)
    for index in range(spans):
        low, high = math.floor(index * stratum), math.floor((index + 1) * stratum)
        start = rng.randint(low, max(low, high - span_tokens))
        ids += corpus[start : min(start + span_tokens, high)]
    # Each stratum gives a whole span, or all of itself when it is shorter than one: either way the
    # spans hold at least `wanted` tokens.
    return ids[:num_tokens]
