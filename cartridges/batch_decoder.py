"""Continuous batching: many generations, each with its own cartridges (or none), in one decode loop.

Running requests form one batch whose KV is left-padded to a common length; an attention mask covers
each row's real tokens and each row has its own positions, so a row's prompt starts at its prefix's
length exactly as in training and in `cartridges ask` (greedy answers are the same tokens, tested).
Requests that wait are prefilled together in one pass (a prompt only from where the prompt cache
stops knowing it) and join between decode steps; a finished or cancelled request leaves at once. The decoder is one thread and knows nothing of HTTP or Ray.
"""

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from cartridges.batch_kv import BatchKV, stack_left_padded
from cartridges.kv_prefix import prefix_layers
from cartridges.masked_gqa import use_masked_gqa
from cartridges.prompt_cache import PromptCache

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
    position: int  # of the next token
    last_token: int
    produced: int
    generator: torch.Generator | None


class BatchDecoder:
    """Runs `submit`ted generations on one model with at most `max_batch` rows at a time.

    The model is switched to `masked_gqa` attention (the same numbers, without a per-step copy of the KV).
    """

    def __init__(
        self,
        model,
        kv_shape: tuple[int, int, int],
        max_batch: int = 16,
        prefill_tokens: int = 4096,
        prompt_cache_entries: int = 64,
    ):
        use_masked_gqa(model)
        self.model = model
        self.kv_shape = kv_shape  # (layers, kv heads, head dim)
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self._waiting: queue.Queue[Generation] = queue.Queue()
        self._held: Generation | None = None  # taken from the queue, but it did not fit in the last prefill
        self.prefill_passes = 0  # forward passes that prefilled a group of waiting generations
        self._prompts = PromptCache(prompt_cache_entries)
        self.prompt_tokens_reused = 0  # prompt tokens whose keys and values came from the prompt cache
        self._rows: list[_Row] = []
        self._kv = BatchKV()  # row i of the KV is self._rows[i]
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
                    self._rows, self._kv = [], BatchKV()
        for row in self._rows:
            self._finish(row, "cancelled")
        leftover = [self._held] + [self._waiting.get() for _ in range(self._waiting.qsize())]
        for waiting in leftover:
            if waiting is not None:
                waiting.finish_reason = "cancelled"
                waiting._put(FINISHED)

    def _admit(self, block: bool) -> None:
        """Prefill the waiting generations that fit, together, so that they cost one forward pass (at most
        `prefill_tokens` padded tokens a pass: one long prompt goes alone; the next waits for the next pass)."""
        group, widest = [], 0
        while len(self._rows) + len(group) < self.max_batch:
            generation = self._held or self._next_waiting(block)
            self._held = None
            if generation is None:
                break
            block = False
            if generation._cancelled.is_set():
                generation.finish_reason = "cancelled"
                generation._put(FINISHED)
                continue
            width = len(generation.prompt_ids) + (0 if generation.prefix is None else generation.prefix.shape[0])
            if group and (len(group) + 1) * max(widest, width) > self.prefill_tokens:
                self._held = generation
                break
            group.append(generation)
            widest = max(widest, width)
        if not group:
            return
        try:
            self._prefill(group)
        except BaseException as exc:
            for generation in group:
                generation.error, generation.finish_reason = exc, "error"
                generation._put(FINISHED)
        self._drop_finished()  # one that ended on its first token leaves before any decode step

    @torch.no_grad()
    def _prefill(self, group: list[Generation]) -> None:
        """One forward pass over the group's prompts, each after its own prefix and the start of its prompt
        that the prompt cache knows (left-padded: the known parts to a common width, then the rest of the
        prompts to a common width, so every row's last prompt token is the last column)."""
        device = self.model.device
        starts, rests, firsts, reuses = [], [], [], []
        for generation in group:
            prefix_tokens = 0 if generation.prefix is None else generation.prefix.shape[0]
            first = prefix_tokens if generation.first_position is None else generation.first_position
            keys, values = prefix_layers(generation.prefix, self.kv_shape) if prefix_tokens else ([], [])
            reuse = self._prompts.reuse(generation.prefix, first, generation.prompt_ids)
            if reuse is not None:
                keys = [torch.cat(pair, dim=2) for pair in zip(keys, reuse.keys, strict=False)] or reuse.keys
                values = [torch.cat(pair, dim=2) for pair in zip(values, reuse.values, strict=False)] or reuse.values
            starts.append((keys, values))
            reuses.append(reuse)
            self.prompt_tokens_reused += 0 if reuse is None else reuse.tokens
            firsts.append(first)
            rests.append(generation.prompt_ids[0 if reuse is None else reuse.tokens :])
        width = max(len(rest) for rest in rests)
        ids = torch.zeros(len(group), width, dtype=torch.long, device=device)
        rest_mask = torch.zeros(len(group), width, dtype=torch.long, device=device)
        positions = torch.zeros(len(group), width, dtype=torch.long, device=device)
        for index, (rest, first, reuse) in enumerate(zip(rests, firsts, reuses, strict=True)):
            skip = 0 if reuse is None else reuse.tokens
            ids[index, width - len(rest) :] = torch.tensor(rest, device=device)
            rest_mask[index, width - len(rest) :] = 1
            positions[index, width - len(rest) :] = torch.arange(first + skip, first + skip + len(rest), device=device)
        known, known_mask = stack_left_padded(starts, device)
        cache = DynamicCache(ddp_cache_data=known) if known else DynamicCache()
        mask = torch.cat([known_mask, rest_mask], dim=1)
        self.prefill_passes += 1
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        for index, generation in enumerate(group):
            self._remember_prompt(generation, firsts[index], reuses[index], keys, values, index, len(rests[index]))
        self._kv.add(keys, values, mask)
        rows = [
            _Row(generation, first + len(generation.prompt_ids), 0, 0, _generator(generation.sampling, device))
            for generation, first in zip(group, firsts, strict=True)
        ]
        self._rows.extend(rows)
        for index, row in enumerate(rows):
            self._emit(row, self._sample(logits[index], row))

    def _remember_prompt(self, generation, first, reuse, keys, values, row, computed) -> None:
        """Keep this prompt's keys and values (the known start, then the `computed` last columns of `row`)."""

        def prompt_part(layers, known):
            computed_part = [layer[row : row + 1, :, -computed:] for layer in layers]
            if not known:
                return [part.clone() for part in computed_part]
            return [torch.cat(pair, dim=2) for pair in zip(known, computed_part, strict=True)]

        self._prompts.store(
            generation.prefix,
            first,
            generation.prompt_ids,
            prompt_part(keys, None if reuse is None else reuse.keys),
            prompt_part(values, None if reuse is None else reuse.values),
        )

    def _next_waiting(self, block: bool) -> Generation | None:
        try:
            return self._waiting.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return None

    @torch.no_grad()
    def _decode_step(self) -> None:
        device = self.model.device
        ids = torch.tensor([[row.last_token] for row in self._rows], device=device)
        positions = torch.tensor([[row.position] for row in self._rows], device=device)
        cache, mask = self._kv.step()
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        ).logits[:, -1]
        self._kv.advance()
        for index, row in enumerate(self._rows):
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
        leaving = []
        for index, row in enumerate(self._rows):
            if row.generation._cancelled.is_set():
                row.generation.finish_reason = row.generation.finish_reason or "cancelled"
            if row.generation.finish_reason is not None:
                leaving.append(index)
        if not leaving:
            return
        finished = [self._rows[i] for i in leaving]
        self._rows = [self._rows[i] for i in self._kv.drop(leaving)]
        for row in finished:  # after the batch lets them go: a reader that sees the end sees them gone
            self._finish(row, row.generation.finish_reason)


def _generator(sampling: Sampling, device) -> torch.Generator | None:
    if sampling.temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
    return generator
