"""`ape`: Adaptive Parallel Encoding (arXiv 2502.05431) of several texts as one context block.

Each text (a document of the corpus, or one corpus of several being composed) is prefilled on its
own after a shared prefix (the tokenizer's BOS, when it has one), all from the same position, so
encoding costs what the longest text costs and texts can be cached and combined freely; the blocks
are concatenated after the shared prefix's KV, and the chat takes the positions that follow the
longest text. APE's attention temperature T divides the attention logits of the parallel texts:
their keys are scaled by 1/T, which is exactly that. APE's scaling factor S would add log S to those
logits for every query, a per-key bias that a KV prefix cannot carry: S = 1 here.
"""

import torch

from cartridges.kv_layout import kv_shape
from cartridges.kv_prefix import kv_prefix_of_tokens
from cartridges.layout import context_token_ids
from cartridges.models import LoadedModel
from cartridges.stages.evaluation.contexts import Context
from cartridges.stages.ingest import DOCUMENT_SEPARATOR

APE_TEMPERATURE = 0.9  # within the range APE tunes over; 1.0 is plain parallel encoding


def parallel_context(loaded: LoadedModel, texts: list[str], temperature: float = APE_TEMPERATURE) -> Context:
    """The shared prefix's KV, then each text's KV encoded alone after it, keys scaled by 1/T."""
    tokenizer, model = loaded.tokenizer, loaded.model
    shared = context_token_ids(tokenizer, "")
    layers, heads, head_dim = kv_shape(model.config)
    blocks, longest = [], 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        kv = kv_prefix_of_tokens(model, shared + ids)[len(shared) :]
        kv = kv.view(len(ids), layers, 2, heads, head_dim).clone()
        kv[:, :, 0] /= temperature
        blocks.append(kv.reshape(len(ids), -1))
        longest = max(longest, len(ids))
    if shared:
        blocks.insert(0, kv_prefix_of_tokens(model, shared))
    prefix = torch.cat(blocks)
    return Context(prefix, start_position=len(shared) + longest)


def documents_of(text: str) -> list[str]:
    """The documents (paragraphs) of a corpus text, as ingest joins them."""
    return [part for part in text.split(DOCUMENT_SEPARATOR) if part.strip()]
