"""Continuous batching: many generations, each with its own cartridges (or none), in one decode loop.

Running requests form one batch whose KV is left-padded to a common length; an attention mask covers
each row's real tokens and each row has its own positions, so a row's prompt starts at its prefix's
length exactly as in training and in `cartridges ask` (greedy answers are the same tokens, tested).
A new request is prefilled alone and joins between decode steps; a finished or cancelled request
leaves at once. The decoder is one thread and knows nothing of HTTP or Ray.
"""

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from cartridges.runtime import prefix_cache

FINISHED = None  # the last item of a generation's token queue


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Generation:
    """One request: read `tokens()` as they come; `cancel()` makes it leave the batch at the next step."""

    prefix: torch.Tensor | None  # [P, L*2*H*D], already on the model's device and dtype
    prompt_ids: list[int]
    sampling: Sampling
    stop_ids: frozenset[int]
    first_position: int | None = None  # of the prompt's first token; None: right after the prefix. A
    # compressed prefix (a KV press) is read as the text it was compressed from, so it passes that length.
    finish_reason: str | None = None  # "stop" (a stop token), "length" (max_tokens) or "cancelled"
    error: BaseException | None = None
    _queue: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _wake: Callable[[], None] | None = field(default=None, repr=False)

    def tokens(self, timeout: float | None = None) -> Iterator[int]:
        while True:
            token = self._queue.get(timeout=timeout)
            if token is FINISHED:
                if self.error is not None:
                    raise self.error
                return
            yield token

    async def atokens(self) -> AsyncIterator[int]:
        """`tokens()` for an asyncio consumer: it waits on its event loop, holding no thread while it waits."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        self._wake = lambda: loop.call_soon_threadsafe(ready.set)
        while True:
            ready.clear()
            try:
                token = self._queue.get_nowait()
            except queue.Empty:
                await ready.wait()
                continue
            if token is FINISHED:
                if self.error is not None:
                    raise self.error
                return
            yield token

    def _put(self, item) -> None:  # on the decoder's thread
        self._queue.put(item)
        if self._wake is not None:
            try:
                self._wake()
            except RuntimeError:  # the consumer's event loop is closed: nobody is waiting
                pass

    def cancel(self) -> None:
        self._cancelled.set()


@dataclass
class _Row:
    generation: Generation
    length: int  # real tokens in the KV: prefix, prompt and the answer so far
    position: int  # of the next token
    last_token: int
    produced: int
    generator: torch.Generator | None


class BatchDecoder:
    """Runs `submit`ted generations on one model with at most `max_batch` rows at a time."""

    def __init__(self, model, kv_shape: tuple[int, int, int], max_batch: int = 16):
        self.model = model
        self.kv_shape = kv_shape  # (layers, kv heads, head dim)
        self.max_batch = max_batch
        self._waiting: queue.Queue[Generation] = queue.Queue()
        self._rows: list[_Row] = []
        self._keys: list[torch.Tensor] = []  # per layer [rows, kv heads, T, head dim], left-padded
        self._values: list[torch.Tensor] = []
        self._mask = torch.zeros(0, 0, dtype=torch.long)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cartridges-decoder", daemon=True)
        self._thread.start()

    def submit(self, generation: Generation) -> Generation:
        if self._stopping.is_set():
            raise RuntimeError("the decoder is closed")
        self._waiting.put(generation)
        return generation

    def close(self) -> None:
        self._stopping.set()
        self._waiting.put(None)  # wakes the loop if it waits
        self._thread.join()

    @property
    def running(self) -> int:
        return len(self._rows)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._admit(block=not self._rows)
            if self._rows:
                try:
                    self._decode_step()
                except BaseException as exc:  # a failed step fails the rows in it, not the server
                    for row in self._rows:
                        self._finish(row, "error", exc)
                    self._rows, self._keys, self._values = [], [], []
        for row in self._rows:
            self._finish(row, "cancelled")
        while not self._waiting.empty():
            waiting = self._waiting.get()
            if waiting is not None:
                waiting.finish_reason = "cancelled"
                waiting._put(FINISHED)

    def _admit(self, block: bool) -> None:
        while len(self._rows) < self.max_batch:
            try:
                generation = self._waiting.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            if generation is None:
                return
            block = False
            if generation._cancelled.is_set():
                generation.finish_reason = "cancelled"
                generation._put(FINISHED)
                continue
            try:
                self._prefill(generation)
            except BaseException as exc:
                generation.error, generation.finish_reason = exc, "error"
                generation._put(FINISHED)
            self._drop_finished()  # one that ended on its first token leaves before any decode step

    @torch.no_grad()
    def _prefill(self, generation: Generation) -> None:
        prefix = generation.prefix
        prefix_tokens = 0 if prefix is None else prefix.shape[0]
        ids = torch.tensor([generation.prompt_ids], device=self.model.device)
        total = prefix_tokens + ids.shape[1]
        first = prefix_tokens if generation.first_position is None else generation.first_position
        cache = prefix_cache(prefix, *self.kv_shape) if prefix_tokens else DynamicCache()
        logits = self.model(
            input_ids=ids,
            attention_mask=torch.ones(1, total, dtype=torch.long, device=ids.device),
            position_ids=torch.arange(first, first + ids.shape[1], device=ids.device).unsqueeze(0),
            past_key_values=cache,
            use_cache=True,
        ).logits[0, -1]
        sampling = generation.sampling
        generator = None
        if sampling.temperature > 0:
            generator = torch.Generator(device=logits.device)
            generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
        row = _Row(generation, total, first + ids.shape[1], 0, 0, generator)
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        self._join(row, keys, values)
        self._emit(row, self._sample(logits, row))

    def _join(self, row: _Row, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Add a prefilled row to the batch, left-padding whichever side is shorter."""
        if not self._rows:
            self._keys, self._values = keys, values
            self._mask = torch.ones(1, row.length, dtype=torch.long, device=keys[0].device)
            self._rows = [row]
            return
        width = self._mask.shape[1]
        if row.length < width:
            keys = [_left_pad(k, width - row.length) for k in keys]
            values = [_left_pad(v, width - row.length) for v in values]
        elif row.length > width:
            self._keys = [_left_pad(k, row.length - width) for k in self._keys]
            self._values = [_left_pad(v, row.length - width) for v in self._values]
            self._mask = _left_pad(self._mask, row.length - width)
        width = max(width, row.length)
        self._keys = [torch.cat([a, b]) for a, b in zip(self._keys, keys, strict=True)]
        self._values = [torch.cat([a, b]) for a, b in zip(self._values, values, strict=True)]
        mask = torch.zeros(1, width, dtype=torch.long, device=self._mask.device)
        mask[0, width - row.length :] = 1
        self._mask = torch.cat([self._mask, mask])
        self._rows.append(row)

    @torch.no_grad()
    def _decode_step(self) -> None:
        device = self._mask.device
        ids = torch.tensor([[row.last_token] for row in self._rows], device=device)
        positions = torch.tensor([[row.position] for row in self._rows], device=device)
        mask = torch.cat([self._mask, torch.ones(len(self._rows), 1, dtype=torch.long, device=device)], dim=1)
        cache = DynamicCache(ddp_cache_data=list(zip(self._keys, self._values, strict=True)))
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        ).logits[:, -1]
        self._keys = [layer.keys for layer in cache.layers]
        self._values = [layer.values for layer in cache.layers]
        self._mask = mask
        for index, row in enumerate(self._rows):
            row.length += 1
            row.position += 1
            if row.generation.finish_reason is None and not row.generation._cancelled.is_set():
                self._emit(row, self._sample(logits[index], row))
        self._drop_finished()

    def _sample(self, logits: torch.Tensor, row: _Row) -> int:
        sampling = row.generation.sampling
        if sampling.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _emit(self, row: _Row, token: int) -> None:
        generation = row.generation
        row.last_token, row.produced = token, row.produced + 1
        if token in generation.stop_ids:
            generation.finish_reason = "stop"
            return
        generation._put(token)
        if row.produced >= generation.sampling.max_tokens:
            generation.finish_reason = "length"

    def _finish(self, row: _Row, reason: str, error: BaseException | None = None) -> None:
        generation = row.generation
        generation.finish_reason = generation.finish_reason or reason
        generation.error = error
        generation._put(FINISHED)

    def _drop_finished(self) -> None:
        keep = []
        for index, row in enumerate(self._rows):
            if row.generation._cancelled.is_set():
                row.generation.finish_reason = row.generation.finish_reason or "cancelled"
            if row.generation.finish_reason is not None:
                self._finish(row, row.generation.finish_reason)
            else:
                keep.append(index)
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._keys, self._values = [], []
            self._mask = torch.zeros(0, 0, dtype=torch.long)
            return
        rows = torch.tensor(keep, device=self._mask.device)
        mask = self._mask.index_select(0, rows)
        start = int((mask.sum(dim=0) > 0).nonzero()[0])  # columns padded in every row that is left go
        self._mask = mask[:, start:]
        self._keys = [k.index_select(0, rows)[:, :, start:] for k in self._keys]
        self._values = [v.index_select(0, rows)[:, :, start:] for v in self._values]


def _left_pad(tensor: torch.Tensor, amount: int) -> torch.Tensor:
    """Zeros before the sequence axis (dim 2 of a KV tensor, dim 1 of a mask)."""
    axis = 2 if tensor.dim() == 4 else 1
    shape = list(tensor.shape)
    shape[axis] = amount
    return torch.cat([torch.zeros(shape, dtype=tensor.dtype, device=tensor.device), tensor], dim=axis)
