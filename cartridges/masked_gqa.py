"""Grouped-query attention with a padding mask, without copying the keys and values per query head.

transformers' `sdpa` attention repeats every layer's keys and values to the number of query heads
whenever an attention mask is given (`repeat_kv`), because CUDA's fused kernels cannot combine a mask
with GQA. On CPU, `scaled_dot_product_attention(..., enable_gqa=True)` takes the mask and gives the same
numbers without the copy. A cartridge always comes with a mask (the prefix is in the cache and batch rows
are padded), so the copy is paid on every layer of every step: 4.35 ms against 0.62 ms per layer call
for 16 rows of 300 positions (BENCHMARKS.md, "The server under load, after the decoder work"). `use_masked_gqa` switches a model to this
function; anywhere else (no mask, no GQA, not CPU) it is transformers' own `sdpa`.
"""

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "cartridges_masked_gqa"


def masked_gqa_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    plain = (
        attention_mask is None
        or key.device.type != "cpu"
        or getattr(module, "num_key_value_groups", 1) == 1
        or kwargs.get("position_bias") is not None
        or kwargs.get("output_attentions", False)
    )
    if plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, masked_gqa_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_masked_gqa(model) -> None:
    """Switch a model that runs transformers' `sdpa` attention to `masked_gqa_attention` (others are left alone)."""
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(NAME)
