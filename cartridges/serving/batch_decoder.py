"""Continuous batching: many generations (`cartridges.serving.generation`: what a caller submits and reads),
each with its own cartridges (or none), in one decode loop.

Every step is one packed forward pass (`cartridges.serving.packed_attention`) over the next token of each
decoding row and chunks of the prompts of rows that joined (at most `prefill_tokens` prompt tokens a
step), so a request joins without stopping the others for a pass of its own. Rows on one cartridge
read its one copy of keys and values; each row keeps only its own tokens (`cartridges.serving.batch_kv`) and
has its own positions, so a row's prompt starts at its prefix's length exactly as in training and in
`cartridges ask` (greedy answers are the same tokens, tested). A prompt is computed only from where
the prompt cache stops knowing it; a finished or cancelled request leaves at once. The decoder is one
thread and knows nothing of HTTP or Ray.
"""

import queue
import threading
import time
from dataclasses import dataclass

import torch

from cartridges.serving.batch_kv import BatchKV
from cartridges.serving.generation import FINISHED, Generation, Sampling
from cartridges.serving.packed_attention import Chunk, PackedStep, SharedPrefix, packed_forward, use_packed_attention
from cartridges.serving.prompt_cache import PromptCache


@dataclass
class _Row:
    generation: Generation
    first: int  # position of the row's first own token (its prompt's first)
    pending: list[int]  # prompt tokens not computed yet
    prefix: SharedPrefix | None
    generator: torch.Generator | None
    last_token: int = 0
    produced: int = 0


class BatchDecoder:
    """Runs `submit`ted generations on one model with at most `max_batch` rows at a time, computing at
    most `prefill_tokens` prompt tokens a step (a longer prompt is prefilled over several steps while
    the other rows go on decoding). The model is switched to `packed_attention`.

    `threads`: the decoder's thread computes with this many torch threads and every other thread of
    the process with one. Two threads that both run multi-threaded torch work each keep an OpenMP team,
    and on a CPU the teams slow each other 3-10x per operation (BENCHMARKS.md, "The server under load,
    packed steps"); a server's other threads only parse requests and load cartridges. For it to pay,
    no other thread may have computed with several threads before (its team stays): `cartridges
    serve` drops to one thread before it loads the model. None leaves torch's settings alone.
    """

    def __init__(
        self,
        model,
        kv_shape: tuple[int, int, int],
        max_batch: int = 16,
        prefill_tokens: int = 512,
        prompt_cache_entries: int = 64,
        threads: int | None = None,
        thread: bool = True,
        prefill_order: str = "shortest",
    ):
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be at least 1, not {prefill_tokens}")
        if prefill_order not in ("shortest", "arrival"):
            raise ValueError(f"prefill_order must be 'shortest' or 'arrival', not {prefill_order!r}")
        self.prefill_order = prefill_order
        use_packed_attention(model)
        self.model = model
        self.kv_shape = kv_shape  # (layers, kv heads, head dim)
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self._waiting: queue.Queue[Generation] = queue.Queue()
        self.steps = 0  # forward passes
        self.step_seconds = 0.0  # time spent in them (and in sampling): the rest of the time it waited for work
        self.prefill_steps = 0  # forward passes that computed prompt tokens
        self.prompt_tokens_computed = 0
        self._prompts = PromptCache(prompt_cache_entries)
        self.prompt_tokens_reused = 0  # prompt tokens whose keys and values came from the prompt cache
        self._rows: list[_Row] = []
        self._kv = BatchKV(kv_shape, model.dtype, model.device)  # row i of the KV is self._rows[i]
        self._shared: dict[tuple[int, int], list] = {}  # ids of (prefix, key bias) -> [SharedPrefix, rows using it]
        self._stopping = threading.Event()
        self._threads_set = threading.Event()
        self._thread = None
        if not thread:  # batch work: `run` steps in the caller's thread
            return
        self._thread = threading.Thread(target=self._loop, args=(threads,), name="cartridges-decoder", daemon=True)
        self._thread.start()
        if threads is not None:
            self._threads_set.wait()
            torch.set_num_threads(1)  # this thread and the ones started from now on; the decoder keeps its own

    def submit(self, generation: Generation) -> Generation:
        if self._stopping.is_set():
            raise RuntimeError("the decoder is closed")
        self._waiting.put(generation)
        return generation

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._waiting.put(None)  # wakes the loop if it waits
            self._thread.join()

    def run(self, generations: list[Generation]) -> None:
        """Run `generations` to their end in the calling thread, on a decoder made with `thread=False`:
        batch work (synthesis) gets the packed steps and shared prefixes without a second thread, whose
        OpenMP team would slow every operation of the first on a small CPU. A failed step raises."""
        if self._thread is not None:
            raise RuntimeError("run() is for a decoder made with thread=False; submit() to a threaded one")
        for generation in generations:
            self.submit(generation)
        while self._rows or not self._waiting.empty():
            self._admit(block=False)
            if self._rows:
                started = time.perf_counter()
                self._step()
                self.step_seconds += time.perf_counter() - started

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def prefix_bytes(self) -> int:
        """Keys and values of the cartridges in use, each held once whatever the number of its rows."""
        return sum(shared.bytes for shared, _ in list(self._shared.values()))

    @property
    def held_bytes(self) -> int:
        """Keys and values the running rows hold: their own tokens, and each cartridge in use once."""
        return sum(list(self._kv.lengths)) * self._kv.bytes_per_token() + self.prefix_bytes

    def _loop(self, threads: int | None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
            self._threads_set.set()
        while not self._stopping.is_set():
            self._admit(block=not self._rows)
            if self._rows:
                started = time.perf_counter()
                try:
                    self._step()
                except BaseException as exc:  # a failed step fails the rows in it, not the server
                    for row in self._rows:
                        self._finish(row, "error", exc)
                    self._release(list(range(len(self._rows))))
                self.step_seconds += time.perf_counter() - started
        for row in self._rows:
            self._finish(row, "cancelled")
        for waiting in [self._waiting.get() for _ in range(self._waiting.qsize())]:
            if waiting is not None:
                waiting.finish_reason = "cancelled"
                waiting._put(FINISHED)

    def _admit(self, block: bool) -> None:
        """Waiting generations become rows while there are free slots; their prompts are computed by the
        next steps, from where the prompt cache stops knowing them."""
        while len(self._rows) < self.max_batch:
            generation = self._next_waiting(block)
            if generation is None:
                return
            block = False
            if generation._cancelled.is_set():
                generation.finish_reason = "cancelled"
                generation._put(FINISHED)
                continue
            try:
                self._join(generation)
            except BaseException as exc:
                generation.error, generation.finish_reason = exc, "error"
                generation._put(FINISHED)

    def _join(self, generation: Generation) -> None:
        if not generation.prompt_ids:
            raise ValueError("an empty prompt: a generation needs at least one prompt token")
        prefix_tokens = 0 if generation.prefix is None else generation.prefix.shape[0]
        first = prefix_tokens if generation.first_position is None else generation.first_position
        reuse = self._prompts.reuse(generation.prefix, first, generation.prompt_ids, generation.key_bias)
        known = 0 if reuse is None else reuse.tokens
        generator = _generator(generation.sampling, self.model.device)
        shared = self._share(generation.prefix, generation.key_bias)
        try:
            self._kv.add(None if reuse is None else reuse.keys, None if reuse is None else reuse.values)
        except BaseException:
            self._unshare(generation)
            raise
        self.prompt_tokens_reused += known
        self._rows.append(_Row(generation, first, list(generation.prompt_ids[known:]), shared, generator))

    def _share(self, prefix: torch.Tensor | None, key_bias: torch.Tensor | None = None) -> SharedPrefix | None:
        """The one `SharedPrefix` of this prefix tensor (and key bias) for all the rows that use it."""
        if prefix is None:
            return None
        entry = self._shared.get((id(prefix), id(key_bias)))
        if entry is None:
            entry = self._shared[(id(prefix), id(key_bias))] = [SharedPrefix.of(prefix, self.kv_shape, key_bias), 0]
        entry[1] += 1
        return entry[0]

    def _next_waiting(self, block: bool) -> Generation | None:
        try:
            return self._waiting.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return None

    @torch.no_grad()
    def _step(self) -> None:
        """One packed forward pass: every decoding row's next token, then prompt chunks within the budget."""
        lengths = list(self._kv.lengths)
        decode_slots = [slot for slot, row in enumerate(self._rows) if not row.pending]
        ids = [self._rows[slot].last_token for slot in decode_slots]
        positions = [self._rows[slot].first + lengths[slot] for slot in decode_slots]
        keep = list(range(len(decode_slots)))  # packed tokens whose logits are needed
        chunks, sampled, budget = [], list(decode_slots), self.prefill_tokens
        for slot in self._prefill_order():
            row = self._rows[slot]
            if budget == 0:
                break
            count = min(len(row.pending), budget)
            budget -= count
            chunks.append(Chunk(slot, len(ids), count, lengths[slot], row.prefix))
            ids.extend(row.pending[:count])
            positions.extend(range(row.first + lengths[slot], row.first + lengths[slot] + count))
            if count == len(row.pending):  # the prompt's last token: its logits give the first answer token
                keep.append(len(ids) - 1)
                sampled.append(slot)
        after = list(lengths)
        for slot in decode_slots:
            after[slot] += 1
        for chunk in chunks:
            after[chunk.slot] += chunk.count
        self._kv.make_room(max(after))
        step = PackedStep(self._kv, decode_slots, chunks, [r.prefix for r in self._rows], after)
        logits = packed_forward(self.model, step, ids, positions, keep)
        self._kv.lengths = after
        self.steps += 1
        if chunks:
            self.prefill_steps += 1
            self.prompt_tokens_computed += sum(chunk.count for chunk in chunks)
        for chunk in chunks:
            row = self._rows[chunk.slot]
            row.pending = row.pending[chunk.count :]
            if not row.pending:
                self._remember_prompt(chunk.slot)
        greedy = logits.argmax(dim=-1).tolist()  # one call for every row; rows that sample use their logits
        for index, slot in enumerate(sampled):
            row = self._rows[slot]
            if row.generation.finish_reason is None and not row.generation._cancelled.is_set():
                sampling = row.generation.sampling
                self._emit(row, greedy[index] if sampling.temperature <= 0 else self._sample(logits[index], row))
        self._drop_finished()

    def _prefill_order(self) -> list[int]:
        """The rows with prompt tokens left, in the order they take this step's prefill budget.

        Shortest remaining prompt first: a 20-token question that arrives while a 6k-token prompt is
        being prefilled gets its tokens into the next step instead of waiting for every chunk of the
        long one (which took 34 s on a 2-core CPU, first come first served). A long prompt still gets
        whatever budget the short ones leave, so it finishes; only a stream of new short prompts
        that fill the whole budget every step could hold it back. `arrival` is first come first served.
        """
        waiting = [slot for slot, row in enumerate(self._rows) if row.pending]
        if self.prefill_order == "shortest":
            waiting.sort(key=lambda slot: len(self._rows[slot].pending))
        return waiting

    def _remember_prompt(self, slot: int) -> None:
        """Keep the prompt's keys and values (the row's first own tokens) for prompts that start the same."""
        generation = self._rows[slot].generation
        tokens = len(generation.prompt_ids)
        self._prompts.store(
            generation.prefix,
            self._rows[slot].first,
            generation.prompt_ids,
            [layer[slot : slot + 1, :, :tokens].clone() for layer in self._kv.keys],
            [layer[slot : slot + 1, :, :tokens].clone() for layer in self._kv.values],
            generation.key_bias,
        )

    def _sample(self, logits: torch.Tensor, row: _Row) -> int:
        sampling = row.generation.sampling
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
            generation.finish_reason, generation.stop_token = "stop", token
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
        self._release(leaving)
        for row in finished:  # after the batch lets them go: a reader that sees the end sees them gone
            self._finish(row, row.generation.finish_reason)

    def _release(self, leaving: list[int]) -> None:
        """Take these rows out of the batch, and the shared prefixes no row uses any more."""
        for index in leaving:
            self._unshare(self._rows[index].generation)
        self._rows = [self._rows[i] for i in self._kv.drop(leaving)]

    def _unshare(self, generation: Generation) -> None:
        if generation.prefix is not None:
            key = (id(generation.prefix), id(generation.key_bias))
            entry = self._shared[key]
            entry[1] -= 1
            if entry[1] == 0:
                del self._shared[key]


def _generator(sampling: Sampling, device) -> torch.Generator | None:
    if sampling.temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
    return generator
