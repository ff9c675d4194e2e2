"""Keys and values of recent prompts, per cartridge, so that a prompt is prefilled only from where it
differs from one seen before.

Most of a chat prompt is the same for every request: the chat template's system turn and the opening
of the user turn. On this 2-core box a request's prefill costs about as much as a decode step of 16 rows
(BENCHMARKS.md, "The server under load"), so prefilling the shared head once per cartridge and only
the question after it is what lets batching pay. A prompt's keys and values depend only on the
tokens before it (causal attention), its cartridge and its positions, so an entry is matched on all
three: the same prefix tensor (the cartridge store hands out one per loaded cartridge) and key bias
(none for a cartridge; a closed-form block's, stages/evaluation/methods/matched.py), the same first
position, and the longest common run of leading token ids.
"""

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class _Entry:
    prefix: weakref.ref | None  # None: the plain model
    key_bias: weakref.ref | None  # None: no bias on the prefix's keys
    first_position: int
    ids: tuple[int, ...]
    keys: list[torch.Tensor]  # per layer [1, kv heads, len(ids), head dim]
    values: list[torch.Tensor]
    bytes: int


@dataclass
class Reuse:
    tokens: int  # leading prompt tokens whose keys and values are known
    keys: list[torch.Tensor]  # per layer [1, kv heads, tokens, head dim]
    values: list[torch.Tensor]


class PromptCache:
    """Recent prompts' keys and values, at most `entries` of them and `max_bytes` together (least recently
    used go first; a prompt larger than `max_bytes` is not kept)."""

    def __init__(self, entries: int = 64, max_bytes: int = 512 << 20):
        self.entries = entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0
        self.held_bytes = 0

    def reuse(
        self, prefix: torch.Tensor | None, first_position: int, ids: list[int], key_bias: torch.Tensor | None = None
    ) -> Reuse | None:
        """The longest known start of `ids` (never all of it: the last token's logits are needed)."""
        best, best_key, best_tokens = None, None, 0
        for key, entry in self._entries.items():
            same_block = _same(entry.prefix, prefix) and _same(entry.key_bias, key_bias)
            if not same_block or entry.first_position != first_position:
                continue
            tokens = _common_start(entry.ids, ids, limit=len(ids) - 1)
            if tokens > best_tokens:
                best, best_key, best_tokens = entry, key, tokens
        if best is None:
            return None
        self._entries.move_to_end(best_key)
        return Reuse(
            best_tokens, [k[:, :, :best_tokens] for k in best.keys], [v[:, :, :best_tokens] for v in best.values]
        )

    def store(
        self,
        prefix: torch.Tensor | None,
        first_position: int,
        ids: list[int],
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        key_bias: torch.Tensor | None = None,
    ) -> None:
        size = sum(t.numel() * t.element_size() for t in keys + values)
        if self.entries <= 0 or size > self.max_bytes:
            return
        block = (_reference(prefix), _reference(key_bias))
        self._entries[self._next] = _Entry(*block, first_position, tuple(ids), keys, values, size)
        self._next += 1
        self.held_bytes += size
        while len(self._entries) > self.entries or self.held_bytes > self.max_bytes:
            _, gone = self._entries.popitem(last=False)
            self.held_bytes -= gone.bytes


def _reference(tensor: torch.Tensor | None) -> weakref.ref | None:
    return None if tensor is None else weakref.ref(tensor)


def _same(reference: weakref.ref | None, tensor: torch.Tensor | None) -> bool:
    if reference is None or tensor is None:
        return reference is None and tensor is None
    return reference() is tensor


def _common_start(known: tuple[int, ...], ids: list[int], limit: int) -> int:
    count = 0
    for a, b in zip(known, ids[:limit], strict=False):
        if a != b:
            break
        count += 1
    return count
