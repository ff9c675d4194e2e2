"""Generation and teacher scoring behind one small interface, and the HF engine (`vllm_engine` has
vLLM's; `engine_choice` picks one).

Both engines take and return token ids, so prompts are built once (with the chat template) and
both write the same data. Scores are raw log-probabilities (no temperature), top-k per position.
"""

from dataclasses import dataclass
from itertools import islice
from typing import Literal, Protocol

import torch

from cartridges.kv_layout import kv_shape
from cartridges.kv_prefix import kv_prefix_of_tokens
from cartridges.models import default_device
from cartridges.runtime import prefix_cache
from cartridges.serving.batching import pad_batch
from cartridges.serving.packed_attention import packed_logits, use_packed_attention

EngineName = Literal["auto", "vllm", "hf"]
SMALL_MACHINE_CORES = 4


@dataclass(frozen=True)
class SamplingConfig:
    """How an engine writes a user message or an answer, the same for vLLM and HF: at most `max_tokens`,
    sampled at `temperature` within the `top_p` nucleus, ending at the first of `stop_token_ids`."""

    max_tokens: int
    temperature: float
    top_p: float
    stop_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class TokenScores:
    """Teacher log-probabilities over a given answer, one entry per answer token."""

    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]
    token_logprobs: list[float]


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]  # ends with the stop token when the model stopped
    scores: TokenScores | None  # teacher top-k over the generated tokens, when asked for


class Engine(Protocol):
    name: str

    def generate(
        self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int], top_k: int | None = None
    ) -> list[Completion]:
        """Sample a completion per prompt; with `top_k`, also the raw top-k log-probabilities at each step."""
        ...

    def score(self, prompts: list[list[int]], answers: list[list[int]], top_k: int) -> list[TokenScores]:
        """Top-k log-probabilities of the next token at every answer position, given prompt + answer so far."""
        ...

    def close(self) -> None:
        """Release the engine's processes and memory; the engine is unusable afterwards."""
        ...


def _batches(items: list, size: int):
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _common_length(sequences: list[list[int]]) -> int:
    """How many leading tokens all sequences share."""
    length = 0
    for column in zip(*sequences):
        if any(token != column[0] for token in column):
            break
        length += 1
    return length


def _sharing_batches(prompts: list[list[int]], size: int) -> list[list[int]]:
    """Indices of `prompts` in batches of up to `size`: prompts sharing at least half their tokens
    (sorted, so they are neighbours) go together; the rest are batched among themselves."""
    groups: list[list[int]] = []
    for index in sorted(range(len(prompts)), key=prompts.__getitem__):
        first = prompts[groups[-1][0]] if groups else None
        if first is not None and 2 * _common_length([first, prompts[index]]) >= min(len(first), len(prompts[index])):
            groups[-1].append(index)
        else:
            groups.append([index])
    alone = [group[0] for group in groups if len(group) == 1]
    return [batch for group in groups if len(group) > 1 for batch in _batches(group, size)] + list(
        _batches(alone, size)
    )


def _cut_after_stop(tokens: list[int], stop_ids: tuple[int, ...]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: index + 1]
    return tokens


def _scores_from_logprobs(logprobs: torch.Tensor, tokens: list[int], top_k: int) -> TokenScores:
    """`logprobs` [len(tokens), vocab]: row j is the distribution that token j was drawn from."""
    top = logprobs.topk(top_k, dim=-1)
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logprobs.device).unsqueeze(-1)).squeeze(-1)
    return TokenScores(top.indices.tolist(), top.values.tolist(), chosen.tolist())


class HFEngine:
    """Batched `generate` plus a scoring forward pass, on CPU or GPU."""

    name = "hf"

    def __init__(self, model_path: str, batch_size: int = 16, threads: int | None = None, pad_token_id: int = 0):
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self.device = default_device()
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        use_packed_attention(self.model)  # scoring packs its rows; other passes run transformers' sdpa
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self._prefix_ids: list[int] | None = None
        self._prefix: torch.Tensor | None = None
        self._decoder = None  # the packed decoder, made on the first generation without top-k

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = pad_batch(sequences, self.pad_token_id, side="left")
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int], top_k: int | None = None
    ) -> list[Completion]:
        """Prompts of one chunk are batched together and their common beginning runs once, as a KV
        prefix. Without `top_k` the batch runs on the packed decoder (`cartridges.serving.batch_decoder`): every
        row reads the one copy of the chunk's keys and values, which on a CPU is several times faster
        than HF `generate` over a copy per row; with `top_k`, HF `generate` records each step's logits."""
        completions: list[Completion | None] = [None] * len(prompts)
        for batch in _sharing_batches(prompts, self.batch_size):
            shared = min(_common_length([prompts[i] for i in batch]), min(len(prompts[i]) for i in batch) - 1)
            made = (
                self._generate_packed(prompts, batch, shared, sampling, seeds)
                if top_k is None
                else self._generate_hf(prompts, batch, shared, sampling, seeds, top_k)
            )
            for index, completion in zip(batch, made, strict=True):
                completions[index] = completion
        return completions

    def _generate_packed(self, prompts, batch, shared, sampling: SamplingConfig, seeds) -> list[Completion]:
        from cartridges.serving.batch_decoder import BatchDecoder
        from cartridges.serving.generation import Generation, Sampling

        if self._decoder is None:
            # Batch work: first come first served packs each step as earlier builds did, so samples stay
            # bit-identical to theirs (a step's packing moves float32's last bits); only latency needs `shortest`.
            self._decoder = BatchDecoder(
                self.model,
                kv_shape(self.model.config),
                max_batch=self.batch_size,
                thread=False,
                prefill_order="arrival",
            )
        prefix = self._shared_prefix(prompts[batch[0]][:shared]) if shared else None
        generations = [
            Generation(
                prefix,
                prompts[i][shared:],
                Sampling(sampling.max_tokens, sampling.temperature, sampling.top_p, seeds[i]),
                frozenset(sampling.stop_token_ids),
            )
            for i in batch
        ]
        self._decoder.run(generations)
        completions = []
        for generation in generations:
            tokens = list(generation.tokens(timeout=0))
            completions.append(
                Completion(tokens + ([generation.stop_token] if generation.stop_token is not None else []), None)
            )
        return completions

    def _generate_hf(self, prompts, batch, shared, sampling: SamplingConfig, seeds, top_k: int) -> list[Completion]:
        torch.manual_seed(seeds[batch[0]])  # HF samples per batch: the first seed fixes the whole batch
        ids, mask = self._left_pad([prompts[i][shared:] for i in batch])
        inputs = {}
        if shared:  # the rows' own tails are left-padded after the prefix; positions follow the attention mask
            head = torch.tensor([prompts[batch[0]][:shared]], device=self.device).expand(len(batch), -1)
            ids = torch.cat([head, ids], dim=1)
            mask = torch.cat([torch.ones_like(head, dtype=mask.dtype), mask], dim=1)
            inputs["past_key_values"] = prefix_cache(
                self._shared_prefix(prompts[batch[0]][:shared]), *kv_shape(self.model.config), batch_size=len(batch)
            )
        sample = (
            {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
            if sampling.temperature > 0
            else {"do_sample": False}
        )
        output = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=sampling.max_tokens,
            eos_token_id=list(sampling.stop_token_ids),
            pad_token_id=self.pad_token_id,
            top_k=None,
            return_dict_in_generate=True,
            output_logits=True,  # raw logits, before temperature and top-p
            **inputs,
            **sample,
        )
        completions = []
        for row, generated in enumerate(output.sequences[:, ids.shape[1] :].tolist()):
            tokens = _cut_after_stop(generated, sampling.stop_token_ids)
            logits = torch.stack([step[row] for step in output.logits[: len(tokens)]])
            completions.append(
                Completion(tokens, _scores_from_logprobs(torch.log_softmax(logits.float(), dim=-1), tokens, top_k))
            )
        return completions

    @torch.no_grad()
    def score(self, prompts: list[list[int]], answers: list[list[int]], top_k: int) -> list[TokenScores]:
        """Samples of one chunk share the prompt's beginning: they are batched together and that
        beginning runs once, as a KV prefix (kept for the next batch) that the batch's rows read in one
        packed pass (`packed_logits`: one copy of the prefix, no padding)."""
        results: list[TokenScores | None] = [None] * len(prompts)
        for batch in _sharing_batches(prompts, self.batch_size):
            shared = min(_common_length([prompts[i] for i in batch]), min(len(prompts[i]) for i in batch) - 1)
            prefix = self._shared_prefix(prompts[batch[0]][:shared]) if shared else None
            rows = [prompts[i][shared:] + answers[i] for i in batch]
            # each row's last len(answer) + 1 logits: answer token j is predicted one position before it
            logits = packed_logits(
                self.model, kv_shape(self.model.config), prefix, rows, [len(answers[i]) + 1 for i in batch]
            )
            for i, row_logits in zip(batch, logits, strict=True):
                logprobs = torch.log_softmax(row_logits[:-1].float(), dim=-1)
                results[i] = _scores_from_logprobs(logprobs, answers[i], top_k)
        return results

    def _shared_prefix(self, token_ids: list[int]) -> torch.Tensor:
        """The KV of `token_ids` (PEFT's flattened prefix layout). Only what the last one computed does
        not already cover runs: a chunk's message prompts and its scoring prompts begin the same.
        KV extended from a cached beginning differs from KV computed in one pass in float32's last bits
        (the matmuls have other shapes), so what an engine made before moves a sample's teacher
        log-probs by up to about 1e-6 (tokens and top-k ids stayed equal in every shard measured:
        tests/sample_helpers.py).
        Recomputing every prefix would buy bit-identical shards across engines and resumes at the cost
        of prefilling each chunk again for every prompt."""
        known = _common_length([self._prefix_ids, token_ids]) if self._prefix_ids else 0
        if known == len(token_ids):
            return self._prefix if known == self._prefix.shape[0] else self._prefix[:known]
        start = self._prefix[:known] if known else None
        self._prefix, self._prefix_ids = kv_prefix_of_tokens(self.model, token_ids, start), token_ids
        return self._prefix

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
        self.model = self._prefix = self._decoder = None
