"""The model's own KV cache of some tokens, in the layout of a cartridge's prefix.

Loaded as a prefix it reproduces the logits of the model with those tokens in context: the `init`
cartridge, the start of distillation, the `icl`/`truncated`/`rag` baselines and the HF engine's
shared chunk all come from here.
"""

import torch
from peft.tuners.cartridge.utils import prompt_embeddings_from_past_key_values
from transformers import DynamicCache

from cartridges.kv_layout import kv_shape


@torch.no_grad()
def kv_prefix_of_tokens(model, token_ids: list[int], known: torch.Tensor | None = None) -> torch.Tensor:
    """No-grad prefill of the base model; its cache in PEFT's flattened prefix layout [P, L*2*H*D].
    `known`: the KV of the first `known.shape[0]` of these tokens, computed before; only the rest runs
    (a causal model's KV of a beginning does not depend on what follows it)."""
    start = 0 if known is None else known.shape[0]
    input_ids = torch.tensor([token_ids[start:]], device=model.device)
    if start == 0:
        out = model(input_ids=input_ids, use_cache=True)
    else:
        positions = torch.arange(start, len(token_ids), device=model.device)[None]
        cache = prefix_cache(known.to(model.device), *kv_shape(model.config))
        out = model(input_ids=input_ids, position_ids=positions, past_key_values=cache, use_cache=True)
    return prompt_embeddings_from_past_key_values(out.past_key_values, num_virtual_tokens=len(token_ids))


def prefix_layers(
    prefix: torch.Tensor, kv_shape: tuple[int, int, int]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A prefix [tokens, layers*2*heads*dim] as per-layer keys and values [1, heads, tokens, dim] (views)."""
    layers, heads, dim = kv_shape
    tokens = prefix.shape[0]
    per_layer = prefix.view(tokens, 2 * layers, heads, dim).permute(1, 2, 0, 3).unsqueeze(1)
    return [per_layer[2 * layer] for layer in range(layers)], [per_layer[2 * layer + 1] for layer in range(layers)]


def prefix_cache(
    prompt_embeddings: torch.Tensor, num_layers: int, num_kv_heads: int, head_dim: int, batch_size: int = 1
) -> DynamicCache:
    """A fresh cache holding the prefix (forward passes append to the cache object they get)."""
    keys, values = prefix_layers(prompt_embeddings, (num_layers, num_kv_heads, head_dim))
    layers = [
        (k.expand(batch_size, -1, -1, -1).contiguous(), v.expand(batch_size, -1, -1, -1).contiguous())
        for k, v in zip(keys, values, strict=True)
    ]
    return DynamicCache(ddp_cache_data=layers)
