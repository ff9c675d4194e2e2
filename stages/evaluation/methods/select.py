"""`select`: a cartridge-shaped prefix of the corpus's own KV, the P tokens per layer and KV head
that matter most for reconstructing the corpus, moved to the positions a cartridge is read at.

Query-agnostic selection after KVzip (arXiv 2505.23416): the corpus is prefilled, the model is
asked to repeat it and is fed the corpus again (in chunks, each placed right after the corpus KV);
a cached position's score, per layer and KV head, is the most attention any reconstruction query
of that head's group pays it. The top P positions (the attention sink always among them) are kept
in corpus order. Their keys carry the rotary positions they were computed at; a cartridge is read
at positions 0..P-1 with the chat after it, so each kept key is rotated by (new - old) position
(RoPE rotations compose, so this is exact up to float rounding) and the result loads and trains
like the `first_tokens` prefix. A corpus longer than the model's window is scored in segments,
each prefilled from position 0 (its first token is never kept: it acts as that segment's sink);
`distill.select_max_tokens` bounds how many corpus tokens are read (evenly spaced segments).
"""

import inspect
from dataclasses import dataclass

import torch

from cartridges.errors import CartridgeError
from cartridges.kv_layout import kv_shape
from cartridges.kv_prefix import kv_prefix_of_tokens
from cartridges.layout import chat_token_ids, context_token_ids
from cartridges.models import LoadedModel
from cartridges.stages.evaluation.contexts import SINK_TOKENS, top_rows
from cartridges.stages.evaluation.methods.snapkv import attention_to_prefix

REPEAT_REQUEST = "Repeat the previous context exactly."
CHUNK_TOKENS = 256  # reconstruction queries per forward pass (eager attention holds [heads, chunk, corpus] a layer)


@dataclass(frozen=True)
class Selection:
    """Kept KV rows [P, layers*2*kv_heads*head_dim] with keys still at their corpus positions, and
    those positions [P, layers, kv_heads] (within each segment)."""

    prefix: torch.Tensor
    positions: torch.Tensor


def reconstruction_scores(loaded: LoadedModel, prefix: torch.Tensor, body: list[int]) -> torch.Tensor:
    """[tokens, layers, kv_heads]: the most attention any query reconstructing `body` (the text of
    `prefix`, without a BOS) pays each cached position."""
    request = chat_token_ids(loaded.tokenizer, [{"role": "user", "content": REPEAT_REQUEST}])
    scores = None
    for start in range(0, len(body), CHUNK_TOKENS):
        window = request + body[start : start + CHUNK_TOKENS]
        paid = attention_to_prefix(loaded, prefix, window, reduce="max", first_query=len(request))
        scores = paid if scores is None else torch.maximum(scores, paid)
    return scores


def evenly_spaced(count: int, keep: int) -> list[int]:
    """`keep` of `count` indices, the first and the last among them, spread evenly."""
    if keep >= count:
        return list(range(count))
    if keep <= 1:
        return [0]
    return sorted({round(i * (count - 1) / (keep - 1)) for i in range(keep)})


def select_tokens(loaded: LoadedModel, text: str, budget: int, max_tokens: int | None = None) -> Selection:
    """The `budget` corpus positions per layer and KV head with the highest reconstruction scores.
    `max_tokens`: a longer corpus is read in evenly spaced segments holding about that many tokens
    (the cost is two passes over every token read)."""
    tokenizer, window = loaded.tokenizer, loaded.model.config.max_position_embeddings
    head = context_token_ids(tokenizer, "")  # the tokenizer's BOS, if any
    body = context_token_ids(tokenizer, text)[len(head) :]
    request = chat_token_ids(tokenizer, [{"role": "user", "content": REPEAT_REQUEST}])
    segment = window - len(request) - CHUNK_TOKENS - len(head)
    if segment < CHUNK_TOKENS:
        raise CartridgeError(f"init 'select' needs a model window above {2 * CHUNK_TOKENS} tokens; use first_tokens")
    starts = list(range(0, len(body), segment))
    if max_tokens is not None:
        starts = [starts[i] for i in evenly_spaced(len(starts), max(1, max_tokens // segment))]
    rows, scores, positions = [], [], []
    for start in starts:
        ids = head + body[start : start + segment]
        kv = kv_prefix_of_tokens(loaded.model, ids)
        score = reconstruction_scores(loaded, kv, ids[len(head) :]).float().cpu()
        score[: max(len(head), SINK_TOKENS)] = float("inf") if start == 0 else float("-inf")
        rows.append(kv)
        scores.append(score)
        positions.append(torch.arange(len(ids)))
    kv, score, position = torch.cat(rows), torch.cat(scores), torch.cat(positions)
    if budget >= kv.shape[0]:
        raise CartridgeError(f"the corpus has {kv.shape[0]} tokens, not more than the {budget} to select")
    kept, keep = top_rows(kv, kv_shape(loaded.model.config), score, budget)
    return Selection(kept, position.to(kv.device)[keep])


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


def selected_prefix(loaded: LoadedModel, text: str, num_tokens: int, max_tokens: int | None = None) -> torch.Tensor:
    """The `select` prefix of `num_tokens` tokens, read at positions 0..P-1 (the whole corpus if it is shorter)."""
    ids = context_token_ids(loaded.tokenizer, text)
    if len(ids) <= num_tokens:
        return kv_prefix_of_tokens(loaded.model, ids)
    selection = select_tokens(loaded, text, num_tokens, max_tokens)
    target = torch.arange(num_tokens, device=selection.positions.device)[:, None, None].expand_as(selection.positions)
    return move_keys(loaded.model, selection.prefix, selection.positions, target)
