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

from dataclasses import dataclass

import torch

from cartridges.errors import CartridgeError
from cartridges.kv_layout import kv_shape
from cartridges.kv_prefix import kv_prefix_of_tokens
from cartridges.layout import context_token_ids
from cartridges.models import LoadedModel
from cartridges.rotary import move_keys
from cartridges.stages.evaluation.contexts import SINK_TOKENS, top_rows
from cartridges.stages.evaluation.methods import repeat_pass as reconstruction
from cartridges.stages.evaluation.methods.repeat_pass import Probes, repeat_pass, segment_capacity


@dataclass(frozen=True)
class Selection:
    """Kept KV rows [P, layers*2*kv_heads*head_dim] with keys still at their corpus positions, those
    positions [P, layers, kv_heads] (within each segment), and the repeat pass's probes when asked for."""

    prefix: torch.Tensor
    positions: torch.Tensor
    probes: Probes | None = None


@dataclass(frozen=True)
class Candidates:
    """The best rows so far per layer and KV head, in corpus order: rows [n, flat], their reconstruction
    scores and positions within their segment [n, layers, kv_heads]."""

    rows: torch.Tensor
    scores: torch.Tensor
    positions: torch.Tensor

    def then(self, later: "Candidates") -> "Candidates":
        return Candidates(*(torch.cat([a, b]) for a, b in zip(self.fields(), later.fields(), strict=True)))

    def fields(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.rows, self.scores, self.positions

    def best(self, shape: tuple[int, int, int], budget: int) -> "Candidates":
        """The `budget` of highest score per layer and KV head (all of them while there are fewer)."""
        if self.rows.shape[0] <= budget:
            return self
        rows, keep = top_rows(self.rows, shape, self.scores, budget)
        return Candidates(rows, self.scores.gather(0, keep), self.positions.gather(0, keep))


def evenly_spaced(count: int, keep: int) -> list[int]:
    """`keep` of `count` indices, the first and the last among them, spread evenly."""
    if keep >= count:
        return list(range(count))
    if keep <= 1:
        return [0]
    return sorted({round(i * (count - 1) / (keep - 1)) for i in range(keep)})


def select_tokens(
    loaded: LoadedModel, text: str, budget: int, max_tokens: int | None = None, probes: int = 0
) -> Selection:
    """The `budget` corpus positions per layer and KV head with the highest reconstruction scores,
    over all segments (a segment with more of the high scores gives more of the block: the budget is
    shared by score, not in equal slices); with `probes`, about that many reference queries per query
    head, spread over the segments by their length. `max_tokens`: a longer corpus is read in evenly
    spaced segments holding about that many tokens (the cost is two passes over every token read).
    Only the best `budget` rows are held between segments."""
    tokenizer, shape = loaded.tokenizer, kv_shape(loaded.model.config)
    head = context_token_ids(tokenizer, "")  # the tokenizer's BOS, if any
    body = context_token_ids(tokenizer, text)[len(head) :]
    chunk = reconstruction.CHUNK_TOKENS
    segment = segment_capacity(loaded) - len(head)
    if segment < chunk:
        raise CartridgeError(f"init 'select' needs a model window above {2 * chunk} tokens; use first_tokens")
    starts = list(range(0, len(body), segment))
    if max_tokens is not None:
        starts = [starts[i] for i in evenly_spaced(len(starts), max(1, max_tokens // segment))]
    read = sum(len(body[start : start + segment]) for start in starts)
    if budget >= read + len(head) * len(starts):
        raise CartridgeError(f"the corpus has {read} tokens, not more than the {budget} to select")
    kept: Candidates | None = None
    parts = []
    for start in starts:
        ids = head + body[start : start + segment]
        kv = kv_prefix_of_tokens(loaded.model, ids)
        share = -(-probes * (len(ids) - len(head)) // read) if probes else 0
        scanned = repeat_pass(loaded, kv, ids[len(head) :], share)
        score = scanned.scores.float()
        score[: max(len(head), SINK_TOKENS)] = float("inf") if start == 0 else float("-inf")
        position = torch.arange(len(ids), device=kv.device)[:, None, None].expand(score.shape)
        here = Candidates(kv, score.to(kv.device), position)
        kept = (here if kept is None else kept.then(here)).best(shape, budget)
        if scanned.probes is not None:
            parts.append(scanned.probes)
    return Selection(kept.rows, kept.positions, Probes.joined(parts) if parts else None)


def selected_prefix(loaded: LoadedModel, text: str, num_tokens: int, max_tokens: int | None = None) -> torch.Tensor:
    """The `select` prefix of `num_tokens` tokens, read at positions 0..P-1 (the whole corpus if it is shorter)."""
    ids = context_token_ids(loaded.tokenizer, text)
    if len(ids) <= num_tokens:
        return kv_prefix_of_tokens(loaded.model, ids)
    selection = select_tokens(loaded, text, num_tokens, max_tokens)
    target = torch.arange(num_tokens, device=selection.positions.device)[:, None, None].expand_as(selection.positions)
    return move_keys(loaded.model, selection.prefix, selection.positions, target)
