"""Moving cached keys (and queries) to other positions: rotary position embeddings compose, so a key
rotated for position p reads as the same token at position q after one more rotation by q - p (exact up
to float rounding). `select` and `matched` move the corpus tokens they keep to the positions 0..P-1 a
cartridge is read at, and `matched` moves its reference queries to where they read the block."""

import inspect

import torch

from cartridges.errors import CartridgeError
from cartridges.kv_layout import kv_shape


def rotary_embedding(model):
    """The model's rotary embedding module and its `apply_rotary_pos_emb`; a model without RoPE has
    no positions in its keys to move."""
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    attention = next((m for m in model.modules() if type(m).__name__.endswith("Attention")), None)
    apply = getattr(inspect.getmodule(type(attention)), "apply_rotary_pos_emb", None) if attention else None
    if rotary is None or apply is None:
        raise CartridgeError(
            f"init 'select' moves rotary key positions, and {type(model).__name__} has none: use first_tokens"
        )
    return rotary, apply


def moved_by(model, rotated: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Already rotated keys or queries [..., n, D] read `delta` [1, n] positions later (RoPE rotations compose)."""
    rotary, apply = rotary_embedding(model)
    cos, sin = rotary(rotated, delta)
    scale = getattr(rotary, "attention_scaling", 1.0)  # applied once already, when they were rotated
    moved, _ = apply(rotated, rotated, cos / scale, sin / scale)
    return moved


def move_keys(model, prefix: torch.Tensor, positions: torch.Tensor, to_positions: torch.Tensor) -> torch.Tensor:
    """The prefix with each key rotated from `positions` to `to_positions` ([P, layers, kv_heads])."""
    layers, heads, head_dim = kv_shape(model.config)
    tokens = prefix.shape[0]
    kv = prefix.view(tokens, layers, 2, heads, head_dim).clone()
    keys = kv[:, :, 0]  # [P, layers, heads, D]
    delta = (to_positions - positions).reshape(1, -1)
    moved = moved_by(model, keys.reshape(1, 1, -1, head_dim), delta)
    kv[:, :, 0] = moved.reshape(keys.shape).to(kv.dtype)
    return kv.reshape(tokens, -1)
