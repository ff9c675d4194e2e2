"""Run a model with one or more cartridges loaded as its KV cache.

The prefix enters HF models as a `DynamicCache`; the tokens after it get positions starting at
the prefix length and an attention mask that covers prefix and input, exactly as if the prefix
tokens had been in context. Several cartridges compose by concatenation along the sequence.
"""

import threading
from collections.abc import Iterator, Sequence

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from cartridges.artifact.folder import Cartridge, check_compatible, to_model_dtype
from cartridges.errors import CartridgeError
from cartridges.kv_prefix import prefix_cache
from cartridges.layout import DEFAULT_SYSTEM_PROMPT, chat_token_ids
from cartridges.models import LoadedModel


def check_same_model(cartridges: Sequence[Cartridge]) -> None:
    """Composition needs one model: same fingerprint and KV shape for every cartridge."""
    if not cartridges:
        raise CartridgeError("no cartridge given: pass at least one reference")
    shapes = {(c.manifest.num_layers, c.manifest.num_kv_heads, c.manifest.head_dim) for c in cartridges}
    if len(shapes) != 1 or len({c.manifest.model_fingerprint for c in cartridges}) != 1:
        names = ", ".join(
            f"{c.manifest.name} ({c.manifest.model_id}, {c.manifest.model_fingerprint[:12]})" for c in cartridges
        )
        raise CartridgeError(f"cannot compose cartridges built for different models: {names}")


def concat_prefixes(cartridges: Sequence[Cartridge]) -> torch.Tensor:
    """Compose cartridges: their flattened KV prefixes, concatenated in the given order."""
    check_same_model(cartridges)
    return torch.cat([c.prompt_embeddings for c in cartridges], dim=0)


def prefix_logits(
    model,
    prefix: torch.Tensor | None,
    shape: tuple[int, int, int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    start_position: int | None = None,
) -> torch.Tensor:
    """Logits of right-padded `input_ids` [batch, T] placed after a KV prefix (None: no prefix).

    The inputs take positions from `start_position` on (default: the prefix length); a compressed
    prefix passes the length of the text it was compressed from.
    """
    batch, length = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if prefix is None or prefix.shape[0] == 0:
        return model(input_ids=input_ids, attention_mask=mask).logits
    num_tokens = prefix.shape[0]
    prefix = prefix.to(input_ids.device)
    first = num_tokens if start_position is None else start_position
    positions = torch.arange(first, first + length, device=input_ids.device).expand(batch, -1)
    full_mask = torch.cat([torch.ones(batch, num_tokens, dtype=mask.dtype, device=mask.device), mask], dim=1)
    cache = prefix_cache(prefix, *shape, batch_size=batch)
    return model(
        input_ids=input_ids, attention_mask=full_mask, position_ids=positions, past_key_values=cache, use_cache=True
    ).logits


class CartridgeRuntime:
    """A model plus loaded cartridges: logits, generation and streaming chat turns."""

    def __init__(
        self, loaded: LoadedModel, cartridges: Sequence[Cartridge], system_prompt: str = DEFAULT_SYSTEM_PROMPT
    ):
        for cartridge in cartridges:
            check_compatible(cartridge, loaded)
        self.loaded = loaded
        self.cartridges = list(cartridges)
        self.system_prompt = system_prompt
        labels = ", ".join(c.manifest.label for c in self.cartridges)
        self.prefix = to_model_dtype(concat_prefixes(self.cartridges), loaded, labels)
        if self.num_tokens >= self.window:
            raise CartridgeError(
                f"the cartridges hold {self.num_tokens} tokens, but {loaded.model_id} reads at most {self.window} positions: "
                "use fewer or shorter cartridges"
            )
        first = self.cartridges[0].manifest
        self._shape = (first.num_layers, first.num_kv_heads, first.head_dim)

    @property
    def num_tokens(self) -> int:
        return self.prefix.shape[0]

    @property
    def kv_bytes(self) -> int:
        return self.prefix.numel() * self.prefix.element_size()

    def cache(self, batch_size: int = 1) -> DynamicCache:
        return prefix_cache(self.prefix, *self._shape, batch_size=batch_size)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits for right-padded `input_ids` [batch, T] placed after the prefix."""
        return prefix_logits(self.loaded.model, self.prefix, self._shape, input_ids, attention_mask)

    @property
    def window(self) -> int:
        """Positions the model can attend over: cartridge, chat and answer together."""
        return self.loaded.model.config.max_position_embeddings

    def _generate_kwargs(self, messages: list[dict[str, str]], max_new_tokens: int, temperature: float) -> dict:
        ids = torch.tensor(
            [chat_token_ids(self.loaded.tokenizer, messages, self.system_prompt)], device=self.loaded.model.device
        )
        room = self.window - self.num_tokens - ids.shape[1]
        if room < 1:
            raise CartridgeError(
                f"the chat is {ids.shape[1]} tokens; with the cartridge's {self.num_tokens} that is {self.num_tokens + ids.shape[1]}, "
                f"past the model's window of {self.window}: shorten the question (in chat, /reset starts over)"
            )
        # generate() feeds only the tokens past the cache length; placeholders stand for the prefix.
        placeholder = torch.full(
            (1, self.num_tokens), pad_token_id(self.loaded.tokenizer), dtype=ids.dtype, device=ids.device
        )
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": 0.95} if temperature > 0 else {"do_sample": False}
        )
        return {
            "input_ids": torch.cat([placeholder, ids], dim=1),
            "attention_mask": torch.ones(1, self.num_tokens + ids.shape[1], dtype=torch.long, device=ids.device),
            "past_key_values": self.cache(1),
            "max_new_tokens": min(max_new_tokens, room),  # an answer ends at the window's last position
            "pad_token_id": pad_token_id(self.loaded.tokenizer),
            **sampling,
        }

    @torch.no_grad()
    def generate(self, messages: list[dict[str, str]], max_new_tokens: int = 256, temperature: float = 0.0) -> str:
        kwargs = self._generate_kwargs(messages, max_new_tokens, temperature)
        output = self.loaded.model.generate(**kwargs)
        new_tokens = output[0, kwargs["input_ids"].shape[1] :]
        return self.loaded.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

    def stream(
        self, messages: list[dict[str, str]], max_new_tokens: int = 256, temperature: float = 0.0
    ) -> Iterator[str]:
        """Yield the answer's text as it is generated.

        Generation runs in a worker thread. Closing the iterator early (Ctrl-C, a consumer that
        stops) stops generation at the next token and waits for the worker, so no thread is left
        running into interpreter shutdown; an error in the worker is raised here, not lost.
        """
        streamer = TextIteratorStreamer(self.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        kwargs = self._generate_kwargs(messages, max_new_tokens, temperature) | {
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([_StopWhenSet(stop)]),
        }
        failures: list[BaseException] = []

        def work() -> None:
            try:
                with torch.no_grad():
                    self.loaded.model.generate(**kwargs)
            except BaseException as exc:  # reported by the consumer below
                failures.append(exc)
                streamer.end()

        worker = threading.Thread(target=work, name="cartridges-generate-worker", daemon=True)
        worker.start()
        try:
            yield from streamer
        finally:
            stop.set()
            worker.join()
        if failures:
            raise CartridgeError(f"generation failed: {type(failures[0]).__name__}: {failures[0]}")


class _StopWhenSet(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, else its end-of-sequence token (a real pad id 0 is kept)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def stop_token_ids(loaded: LoadedModel) -> frozenset[int]:
    """The tokens that end an answer: the generation config's end-of-sequence ids and the tokenizer's,
    as HF `generate` stops at them."""
    config = loaded.model.generation_config
    ends = config.eos_token_id if config is not None else None
    ends = ends if isinstance(ends, list) else [ends]
    return frozenset(t for t in [*ends, loaded.tokenizer.eos_token_id] if t is not None)
