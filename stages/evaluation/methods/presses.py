"""`knorm` and `streaming`: the whole corpus prefilled, then B tokens kept per layer and KV head.

The presses follow kvpress's KnormPress (keep the keys of lowest L2 norm) and StreamingLLMPress
(keep the first token as attention sink plus the most recent ones). kvpress itself pins
transformers < 5.3, so they are written here on the cache tensors directly. As in kvpress, the chat
after a compressed prefix keeps the positions it would have after the whole corpus.
"""

from collections.abc import Callable

import torch

from cartridges.errors import CartridgeError
from cartridges.stages.evaluation.contexts import Context, keep_top_scored


def _knorm_scores(kv: torch.Tensor) -> torch.Tensor:
    return -kv[:, :, 0].float().norm(dim=-1)


def _streaming_scores(kv: torch.Tensor) -> torch.Tensor:
    tokens, layers, _, heads, _ = kv.shape
    return torch.arange(tokens, dtype=torch.float32, device=kv.device)[:, None, None].expand(tokens, layers, heads)


PRESSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"knorm": _knorm_scores, "streaming": _streaming_scores}


def compress(prefix: torch.Tensor, shape: tuple[int, int, int], budget: int, press: str) -> Context:
    """Keep `budget` tokens per layer and KV head by the press's score (higher is kept)."""
    if press not in PRESSES:
        raise CartridgeError(f"unknown press {press!r}; known: {', '.join(PRESSES)}")
    layers, heads, head_dim = shape
    return keep_top_scored(prefix, shape, budget, lambda: PRESSES[press](prefix.view(-1, layers, 2, heads, head_dim)))
