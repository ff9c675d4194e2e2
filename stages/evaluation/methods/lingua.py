"""`lingua`: LLMLingua-style prompt compression (arXiv 2310.05736) of the corpus to a token budget,
with the scoring model itself as the small language model.

The `llmlingua` package (0.2.2) installs beside our pins but downloads tiktoken's encoding from the
network when it is constructed, which nothing here may do; this is its published algorithm:

1. Budget controller (coarse): sentences are ranked by their perplexity under the model and the
   most informative ones are kept, in corpus order, up to `COARSE_FACTOR` x the budget.
2. Iterative token-level compression (fine): the kept text is cut into segments; each segment's
   tokens are scored by their self-information (-log p) given the *compressed* text before it, and
   the segment keeps its most surprising tokens at the ratio that meets the budget.

The compressed text then stands in the context block like corpus text (cut at the budget).
"""

import math
import re

import torch
from transformers import DynamicCache

from cartridges.kv_prefix import kv_prefix_of_tokens
from cartridges.layout import context_token_ids
from cartridges.models import LoadedModel
from cartridges.stages.evaluation.contexts import Context

COARSE_FACTOR = 2  # LLMLingua's controller keeps k x the target before token-level pruning
SEGMENT_TOKENS = 128
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def self_information(loaded: LoadedModel, ids: list[int], max_tokens: int = 2048) -> list[float]:
    """-log p of every token after the first (of the first `max_tokens`), given the tokens before it."""
    piece = torch.tensor([ids[:max_tokens]], device=loaded.model.device)
    with torch.no_grad():
        logprobs = loaded.model(input_ids=piece).logits[0, :-1].float().log_softmax(-1)
    return (-logprobs.gather(1, piece[0, 1:, None])[:, 0]).tolist()


def coarse_sentences(loaded: LoadedModel, text: str, target_tokens: int) -> str:
    """The highest-perplexity sentences, in corpus order, up to `target_tokens` tokens."""
    sentences = [s for s in SENTENCE_END.split(text) if s.strip()]
    tokenizer = loaded.tokenizer
    lengths = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in sentences]
    if sum(lengths) <= target_tokens:
        return text
    perplexity = []
    for sentence in sentences:
        ids = context_token_ids(tokenizer, sentence)
        info = self_information(loaded, ids)
        perplexity.append(sum(info) / max(1, len(info)))
    chosen, used = set(), 0
    for index in sorted(range(len(sentences)), key=lambda i: -perplexity[i]):
        if used + lengths[index] > target_tokens and chosen:
            continue
        chosen.add(index)
        used += lengths[index]
    return " ".join(sentences[i] for i in sorted(chosen))


def kept_token_ids(loaded: LoadedModel, ids: list[int], budget: int, segment: int = SEGMENT_TOKENS) -> list[int]:
    """Iterative token-level compression of `ids` to `budget` ids: the first id (the block's BOS, or its
    first token: the attention sink) is kept; each segment keeps its tokens of highest self-information
    given the ids kept before it."""
    if len(ids) <= budget:
        return ids
    model, device = loaded.model, loaded.model.device
    ratio = (budget - 1) / (len(ids) - 1)
    kept = ids[:1]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        next_logits = model(input_ids=torch.tensor([kept], device=device), past_key_values=cache).logits[0, -1]
        for start in range(1, len(ids), segment):
            piece = ids[start : start + segment]
            logits = model(input_ids=torch.tensor([piece], device=device), past_key_values=cache).logits[0]
            logprobs = torch.cat([next_logits[None], logits[:-1]]).float().log_softmax(-1)
            info = -logprobs.gather(1, torch.tensor(piece, device=device)[:, None])[:, 0]
            keep = min(len(piece), math.ceil(len(piece) * ratio), budget - len(kept))
            cache.crop(-len(piece))  # forget the segment: what follows is conditioned on the kept ids only
            if keep > 0:
                new = [piece[i] for i in sorted(info.topk(keep).indices.tolist())]
                next_logits = model(input_ids=torch.tensor([new], device=device), past_key_values=cache).logits[0, -1]
                kept += new
    return kept


def compressed_text(loaded: LoadedModel, text: str, budget: int) -> str:
    ids = context_token_ids(loaded.tokenizer, text)
    if len(ids) <= budget:
        return text
    coarse = coarse_sentences(loaded, text, COARSE_FACTOR * budget)
    kept = kept_token_ids(loaded, context_token_ids(loaded.tokenizer, coarse), budget)
    return loaded.tokenizer.decode(kept, skip_special_tokens=True)


def compressed_context(loaded: LoadedModel, text: str, budget: int) -> Context:
    """The context block of the compressed corpus: at most `budget` KV tokens."""
    ids = context_token_ids(loaded.tokenizer, compressed_text(loaded, text, budget), budget)
    return Context(kv_prefix_of_tokens(loaded.model, ids))
