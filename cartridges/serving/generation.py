"""One request to the batch decoder, as its caller sees it: what to generate (`Sampling`) and the tokens
as they come (`Generation`), read from any thread or an asyncio event loop."""

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import torch

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
    key_bias: torch.Tensor | None = None  # [layers, kv heads, P]: added to every score of the prefix's keys
    finish_reason: str | None = None  # "stop" (a stop token), "length" (max_tokens) or "cancelled"
    stop_token: int | None = None  # the stop token that ended it (not among `tokens()`)
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
