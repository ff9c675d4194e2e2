"""The KV layout of a cartridge, at the bottom of the package (it imports nothing of ours): PEFT's
CARTRIDGE prefix is `[num_tokens, num_layers * 2 * num_kv_heads * head_dim]`, keys then values per
layer, with the first token frozen as the attention sink."""

from peft import CartridgeConfig
from peft.utils.other import _prepare_prompt_learning_config

NUM_FROZEN_TOKENS = 1  # the first prefix token stays as initialised: the attention sink (arXiv 2506.06266)


def cartridge_peft_config(model_config, num_tokens: int, num_frozen_tokens: int = NUM_FROZEN_TOKENS) -> CartridgeConfig:
    """PEFT's config for a prefix of `num_tokens`, with the KV shape filled in from the model config."""
    config = CartridgeConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_tokens,
        num_frozen_tokens=num_frozen_tokens,
        base_model_name_or_path=getattr(model_config, "_name_or_path", None) or None,
    )
    return _prepare_prompt_learning_config(config, model_config)


def kv_shape(model_config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) as PEFT lays out the prefix."""
    config = _prepare_prompt_learning_config(CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=1), model_config)
    return config.num_layers, config.num_attention_heads, config.token_dim // config.num_attention_heads
