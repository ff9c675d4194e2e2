"""Run a model with one or more cartridges loaded as its KV cache.

The prefix enters HF models as a `DynamicCache`; the tokens after it get positions starting at
the prefix length and an attention mask that covers prefix and input, exactly as if the prefix
tokens had been in context. Several cartridges compose by concatenation along the sequence.
"""

from collections.abc import Iterator, Sequence
from threading import Thread

import torch
from transformers import DynamicCache, TextIteratorStreamer

from cartridges.artifact import Cartridge, check_compatible
from cartridges.errors import CartridgeError
from cartridges.layout import DEFAULT_SYSTEM_PROMPT, chat_token_ids
from cartridges.models import LoadedModel


def check_same_model(cartridges: Sequence[Cartridge]) -> None:
    """Composition needs one model: same fingerprint and KV shape for every cartridge."""
    if not cartridges:
        raise CartridgeError("no cartridge given: pass at least one reference")
    shapes = {(c.manifest.num_layers, c.manifest.num_kv_heads, c.manifest.head_dim) for c in cartridges}
    if len(shapes) != 1 or len({c.manifest.model_fingerprint for c in cartridges}) != 1:
        names = ", ".join(f"{c.manifest.name} ({c.manifest.model_id}, {c.manifest.model_fingerprint[:12]})" for c in cartridges)
        raise CartridgeError(f"cannot compose cartridges built for different models: {names}")


def concat_prefixes(cartridges: Sequence[Cartridge]) -> torch.Tensor:
    """Compose cartridges: their flattened KV prefixes, concatenated in the given order."""
    check_same_model(cartridges)
    return torch.cat([c.prompt_embeddings for c in cartridges], dim=0)


def prefix_cache(prompt_embeddings: torch.Tensor, num_layers: int, num_kv_heads: int, head_dim: int, batch_size: int = 1) -> DynamicCache:
    """A fresh cache holding the prefix (forward passes append to the cache object they get)."""
    num_tokens = prompt_embeddings.shape[0]
    per_layer = prompt_embeddings.view(num_tokens, num_layers * 2, num_kv_heads, head_dim).permute(1, 2, 0, 3)
    layers = []
    for layer in range(num_layers):
        keys = per_layer[2 * layer].unsqueeze(0).expand(batch_size, -1, -1, -1).contiguous()
        values = per_layer[2 * layer + 1].unsqueeze(0).expand(batch_size, -1, -1, -1).contiguous()
        layers.append((keys, values))
    return DynamicCache(ddp_cache_data=layers)


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
    return model(input_ids=input_ids, attention_mask=full_mask, position_ids=positions, past_key_values=cache, use_cache=True).logits


class CartridgeRuntime:
    """A model plus loaded cartridges: logits, generation and streaming chat turns."""

    def __init__(self, loaded: LoadedModel, cartridges: Sequence[Cartridge], system_prompt: str = DEFAULT_SYSTEM_PROMPT):
        for cartridge in cartridges:
            check_compatible(cartridge, loaded)
        self.loaded = loaded
        self.cartridges = list(cartridges)
        self.system_prompt = system_prompt
        self.prefix = concat_prefixes(self.cartridges).to(loaded.model.device, loaded.model.dtype)
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

    def _generate_kwargs(self, messages: list[dict[str, str]], max_new_tokens: int, temperature: float) -> dict:
        ids = torch.tensor([chat_token_ids(self.loaded.tokenizer, messages, self.system_prompt)], device=self.loaded.model.device)
        # generate() feeds only the tokens past the cache length; placeholders stand for the prefix.
        placeholder = torch.full((1, self.num_tokens), self.loaded.tokenizer.pad_token_id or 0, dtype=ids.dtype, device=ids.device)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.95} if temperature > 0 else {"do_sample": False}
        return {
            "input_ids": torch.cat([placeholder, ids], dim=1),
            "attention_mask": torch.ones(1, self.num_tokens + ids.shape[1], dtype=torch.long, device=ids.device),
            "past_key_values": self.cache(1),
            "max_new_tokens": max_new_tokens,
            "pad_token_id": self.loaded.tokenizer.pad_token_id or self.loaded.tokenizer.eos_token_id,
            **sampling,
        }

    @torch.no_grad()
    def generate(self, messages: list[dict[str, str]], max_new_tokens: int = 256, temperature: float = 0.0) -> str:
        kwargs = self._generate_kwargs(messages, max_new_tokens, temperature)
        output = self.loaded.model.generate(**kwargs)
        new_tokens = output[0, kwargs["input_ids"].shape[1]:]
        return self.loaded.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

    def stream(self, messages: list[dict[str, str]], max_new_tokens: int = 256, temperature: float = 0.0) -> Iterator[str]:
        """Yield the answer's text as it is generated."""
        streamer = TextIteratorStreamer(self.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = self._generate_kwargs(messages, max_new_tokens, temperature) | {"streamer": streamer}
        worker = Thread(target=torch.no_grad()(self.loaded.model.generate), kwargs=kwargs, daemon=True)
        worker.start()
        yield from streamer
        worker.join()
