"""The model's own KV cache of some tokens, in the layout of a cartridge's prefix.

Loaded as a prefix it reproduces the logits of the model with those tokens in context: the `init`
cartridge, the start of distillation, the `icl`/`truncated`/`rag` baselines and the HF engine's
shared chunk all come from here.
"""

import torch
from peft.tuners.cartridge.utils import prompt_embeddings_from_past_key_values


@torch.no_grad()
def kv_prefix_of_tokens(model, token_ids: list[int]) -> torch.Tensor:
    """No-grad prefill of the base model; its cache in PEFT's flattened prefix layout [P, L*2*H*D]."""
    input_ids = torch.tensor([token_ids], device=model.device)
    out = model(input_ids=input_ids, use_cache=True)
    return prompt_embeddings_from_past_key_values(out.past_key_values, num_virtual_tokens=len(token_ids))


def prefix_layers(
    prefix: torch.Tensor, kv_shape: tuple[int, int, int]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A prefix [tokens, layers*2*heads*dim] as per-layer keys and values [1, heads, tokens, dim] (views)."""
    layers, heads, dim = kv_shape
    tokens = prefix.shape[0]
    per_layer = prefix.view(tokens, 2 * layers, heads, dim).permute(1, 2, 0, 3).unsqueeze(1)
    return [per_layer[2 * layer] for layer in range(layers)], [per_layer[2 * layer + 1] for layer in range(layers)]
