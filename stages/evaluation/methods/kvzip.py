"""`kvzip`: KVzip's own query-agnostic eviction (arXiv 2505.23416) at a KV budget, the published baseline
beside `select`.

Both score each cached position, per layer and KV head, by the most attention any query reconstructing
the corpus pays it (`repeat_pass`). They differ in what is kept: `select` keeps the top B per layer and
KV head (a cartridge's shape, every head the same length) and moves the kept keys to 0..B-1; KVzip
ranks all positions of all heads together and keeps the top B x layers x KV heads, so a head the
reconstruction needs keeps more and another fewer, and the kept keys stay where they were (the chat
after the whole corpus's positions, as for the presses). Heads of unequal length are held as one
block as long as the longest head, each shorter head padded with keys whose bias is -inf
(`Context.key_bias`: never attended), so the block's rows over-count the KV it stands for; the
evaluation reads it as the kept entries alone. One window of the model: a longer corpus is refused.
"""

import torch

from cartridges.kv_layout import kv_shape
from cartridges.kv_prefix import kv_prefix_of_tokens
from cartridges.layout import context_token_ids
from cartridges.models import LoadedModel
from cartridges.stages.evaluation.contexts import SINK_TOKENS, Context, rows_per_head
from cartridges.stages.evaluation.methods.repeat_pass import whole_corpus_pass


def kept_entries(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """[T, layers, kv_heads] bool: the budget x layers x kv_heads highest scores over every head together
    (the sink always among them)."""
    ranked = scores.clone().float()
    ranked[:SINK_TOKENS] = float("inf")
    flat = ranked.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(min(budget * ranked[0].numel(), flat.numel())).indices] = True
    return keep.view(ranked.shape)


def kvzip_context(loaded: LoadedModel, text: str, budget: int) -> Context:
    model = loaded.model
    layers, kv_heads, head_dim = kv_shape(model.config)
    ids = context_token_ids(loaded.tokenizer, text)
    if len(ids) <= budget:
        return Context(kv_prefix_of_tokens(model, ids))
    kv, scanned = whole_corpus_pass(loaded, ids, "kvzip")
    keep = kept_entries(scanned.scores.cpu(), budget)
    counts = keep.sum(dim=0)  # [layers, kv_heads]
    width = int(counts.max())
    # kept positions first (in corpus order), then the rest: each head's first `counts` rows are its own
    order = torch.argsort((~keep).to(torch.int8) * len(ids) + torch.arange(len(ids))[:, None, None], dim=0)
    block = rows_per_head(kv, (layers, kv_heads, head_dim), order[:width])
    real = torch.arange(width)[:, None, None] < counts[None]
    bias = torch.zeros(width, layers, kv_heads).masked_fill(~real, float("-inf")).permute(1, 2, 0)
    return Context(block, start_position=len(ids), key_bias=bias.to(kv.device, kv.dtype).contiguous())
