"""Context blocks for evaluation: what stands before the identical chat, per method, within a KV budget.

Every method is a KV prefix in PEFT's flattened layout `[tokens, layers * 2 * kv_heads * head_dim]`:
`none` (no prefix), `icl` (the KV of the whole corpus), `truncated` (its first B tokens, = an
`init` cartridge), `select` (the `select` init: the B tokens per layer and head that reconstructing
the corpus attends to most, moved to positions 0..B-1), `rag` (BM25-retrieved passages up to B tokens, per question), the presses
`knorm` and `streaming` (the whole corpus prefilled, then B tokens kept per layer and KV head), and
`cartridge` (a trained prefix, several composed by concatenation).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from cartridges.errors import CartridgeError
from cartridges.kv_prefix import kv_prefix_of_tokens
from cartridges.layout import context_token_ids
from cartridges.models import LoadedModel
from cartridges.qa import Question

SINK_TOKENS = 1  # presses always keep the first token: attention sinks carry much of the attention mass


@dataclass(frozen=True)
class Context:
    prefix: torch.Tensor | None
    start_position: int | None = None  # position of the first chat token; None: right after the prefix
    key_bias: torch.Tensor | None = None  # [layers, kv heads, P]: added to every score of the prefix's keys

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV per layer and KV head: a block padded with never-attended keys (bias -inf; heads
        of unequal length, `kvzip`) counts its attended entries alone, averaged over the heads."""
        if self.prefix is None:
            return 0
        if self.key_bias is None:
            return self.prefix.shape[0]
        layers, heads, _ = self.key_bias.shape
        return -(-int(torch.isfinite(self.key_bias).sum()) // (layers * heads))


class ContextSource(Protocol):
    def context(self, question: Question) -> Context:
        """The context block placed before this question's chat."""
        ...


@dataclass(frozen=True)
class FixedContext:
    """The same block before every question (none, icl, truncated, presses, cartridges)."""

    block: Context

    def context(self, question: Question) -> Context:
        return self.block


def corpus_kv(loaded: LoadedModel, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """KV of corpus text (or its first `max_tokens` tokens) as it stands in the context block."""
    return kv_prefix_of_tokens(loaded.model, context_token_ids(loaded.tokenizer, text, max_tokens))


def keep_top_scored(
    prefix: torch.Tensor, shape: tuple[int, int, int], budget: int, scores: Callable[[], torch.Tensor]
) -> Context:
    """Keep the `budget` corpus tokens of highest `scores()` ([tokens, layers, kv_heads]) per layer and KV
    head, always the attention sink, in corpus order; the chat keeps the positions it has after the
    whole corpus. A corpus within the budget is kept whole (the block is then the icl block)."""
    if budget <= SINK_TOKENS:
        raise CartridgeError(f"a press needs a budget above {SINK_TOKENS} token(s), got {budget}")
    tokens = prefix.shape[0]
    if tokens <= budget:
        return Context(prefix)
    ranked = scores().clone()
    ranked[:SINK_TOKENS] = float("inf")
    return Context(top_rows(prefix, shape, ranked, budget)[0], start_position=tokens)


def top_rows(
    prefix: torch.Tensor, shape: tuple[int, int, int], scores: torch.Tensor, budget: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `budget` rows of highest `scores` ([tokens, layers, kv_heads]) per layer and KV head, in
    prefix order: the kept prefix [budget, layers*2*kv_heads*head_dim] and the kept row indices
    [budget, layers, kv_heads]."""
    keep = scores.topk(budget, dim=0).indices.sort(dim=0).values.to(prefix.device)
    return rows_per_head(prefix, shape, keep), keep


def rows_per_head(prefix: torch.Tensor, shape: tuple[int, int, int], rows: torch.Tensor) -> torch.Tensor:
    """[n, layers*2*kv_heads*head_dim]: for each layer and KV head its own rows `rows` [n, layers, kv_heads]
    of the prefix (keys and values together)."""
    layers, heads, head_dim = shape
    index = rows.to(prefix.device)[:, :, None, :, None].expand(-1, -1, 2, -1, head_dim)
    return prefix.view(-1, layers, 2, heads, head_dim).gather(0, index).reshape(rows.shape[0], -1)
