"""The repeat pass that `select` and `matched` read: the model, after a segment's KV, asked to repeat the
segment and fed it again in chunks (KVzip, arXiv 2505.23416). One pass gives, per layer and KV head,
each cached position's reconstruction score (the most attention any reconstruction query of the
head's group pays it) and, for the queries `matched` fits to, their rotated query vectors with the
segment's attention output and log attention mass over the segment's keys.

Why an attention function of its own: eager attention with `output_attentions` kept every layer's
[heads, chunk, segment] weights of a pass alive (about 20 ms a corpus token on the 2-core box, with a
second pass for the queries); here each layer's weights are computed once, read, and dropped, and the
pass's own output comes from the same weights. It is registered with transformers under `NAME`; a
forward pass without an observer is transformers' own `sdpa`.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from cartridges.errors import CartridgeError
from cartridges.kv_layout import kv_shape
from cartridges.kv_prefix import kv_prefix_of_tokens, prefix_cache
from cartridges.layout import chat_token_ids, context_token_ids
from cartridges.models import LoadedModel
from cartridges.rotary import moved_by

NAME = "cartridges_observed"
OBSERVER_ARGUMENT = "cartridges_observer"
REPEAT_REQUEST = "Repeat the previous context exactly."
CHUNK_TOKENS = 256  # reconstruction tokens per forward pass (each layer holds [heads, chunk, segment] weights)


@dataclass(frozen=True)
class Probes:
    """Reference queries of one or more segments, for fitting a block to the segments' attention:
    `queries` [layers, query_heads, m, D], each read `after` [m] positions after the end of its segment and
    rotated as if its segment had no tokens (read after a block of P tokens: moved by P), `outputs` [layers, query_heads, m, D] (float64)
    each one's attention output over its segment's keys alone and `log_mass` [layers, query_heads, m]
    (float64) the log of its summed exp(q.k/sqrt(d)) over them."""

    queries: torch.Tensor
    after: torch.Tensor
    outputs: torch.Tensor
    log_mass: torch.Tensor

    @staticmethod
    def joined(parts: list["Probes"]) -> "Probes":
        return Probes(*(torch.cat([getattr(p, name) for p in parts], dim=dim) for name, dim in PROBE_AXES))


PROBE_AXES = (("queries", 2), ("after", 0), ("outputs", 2), ("log_mass", 2))


@dataclass
class RepeatObserver:
    """Collects what one repeat pass shows. Per forward pass: `first_query` tokens of the repeat request
    come first (not reconstruction queries), and `capture` marks which of the rest to keep as probes."""

    segment_tokens: int
    kv_heads: int
    layers: int
    first_query: int = 0
    capture: torch.Tensor | None = None  # bool [reconstruction queries of this forward pass]
    scores: list[torch.Tensor | None] = field(default_factory=list)  # per layer [kv_heads, segment]
    captured: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = field(default_factory=list)

    def __post_init__(self):
        self.scores = [None] * self.layers
        self.captured = [[] for _ in range(self.layers)]

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float):
        """query [1, heads, n, D] of this pass's n tokens, key and value [1, kv heads, segment + n, D] ->
        the attention output [1, n, heads, D] (causal over the pass's own tokens)."""
        heads, n, dim = query.shape[1:]
        total, group = key.shape[2], heads // self.kv_heads
        segment = total - n
        keys, values = key[0], value[0]  # [kv_heads, total, D]
        grouped = query[0].reshape(self.kv_heads, group * n, dim)
        logits = torch.matmul(grouped, keys.transpose(-1, -2)).mul_(scale).view(self.kv_heads, group, n, total)
        later = torch.ones(n, n, dtype=torch.bool, device=key.device).triu(1)  # the pass's own later tokens
        logits[..., segment:].masked_fill_(later, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        paid = weights[:, :, self.first_query :, :segment].amax(dim=2).amax(dim=1)  # [kv_heads, segment]
        best = self.scores[layer]
        self.scores[layer] = paid if best is None else torch.maximum(best, paid)
        if self.capture is not None and self.capture.any():
            self._capture(layer, query[0], logits, weights, values[:, :segment])
        output = torch.matmul(weights.view(self.kv_heads, group * n, total), values).view(heads, n, dim)
        return output.transpose(0, 1)[None].to(query.dtype)

    def _capture(self, layer: int, query, logits, weights, corpus_values):
        """The captured queries, their attention output over the segment alone and their log mass there,
        from the pass's own logits and weights (the segment's share of each query's attention)."""
        rows = self.first_query + self.capture.nonzero()[:, 0].to(logits.device)
        segment = corpus_values.shape[1]
        paid = weights[:, :, rows, :segment]  # [kv_heads, group, m, segment]
        share = paid.sum(dim=-1, keepdim=True)
        outputs = torch.matmul(paid / share, corpus_values[:, None])  # [kv_heads, group, m, D]
        log_mass = torch.logsumexp(logits[:, :, rows], dim=-1) + share[..., 0].log()
        heads = query.shape[0]
        self.captured[layer].append(
            (query[:, rows], outputs.reshape(heads, len(rows), -1).double(), log_mass.reshape(heads, -1).double())
        )


def observed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    observer = kwargs.pop(OBSERVER_ARGUMENT, None)
    if observer is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return observer.attend(module.layer_idx, query, key, value, scale), None


AttentionInterface.register(NAME, observed_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


@dataclass(frozen=True)
class RepeatPass:
    scores: torch.Tensor  # [segment, layers, kv_heads]
    probes: Probes | None


def segment_capacity(loaded: LoadedModel) -> int:
    """The most tokens of a segment (its BOS included) that its repeat pass fits in the model's window:
    the segment, the repeat request and one chunk of the segment again."""
    request = chat_token_ids(loaded.tokenizer, [{"role": "user", "content": REPEAT_REQUEST}])
    return loaded.model.config.max_position_embeddings - len(request) - CHUNK_TOKENS


def whole_corpus_pass(
    loaded: LoadedModel, ids: list[int], method: str, probes: int = 0, instead: str = ""
) -> tuple[torch.Tensor, RepeatPass]:
    """The KV of the corpus `ids` (its BOS included) and its repeat pass, for a method that reads the
    corpus as one segment; a longer corpus is refused with one line naming `method` (and what to use `instead`)."""
    kv = one_window_kv(loaded, ids, method, instead)
    head = context_token_ids(loaded.tokenizer, "")
    return kv, repeat_pass(loaded, kv, ids[len(head) :], probes)


def one_window_kv(loaded: LoadedModel, ids: list[int], method: str, instead: str = "") -> torch.Tensor:
    """The KV of the corpus `ids` (its BOS included) read as one segment, refused before any work with one
    line naming `method` (and what to use `instead`) when it does not fit one window with its repeat pass."""
    if len(ids) > segment_capacity(loaded):
        hint = f": use '{instead}' for a longer corpus" if instead else ""
        raise CartridgeError(
            f"'{method}' reads a corpus within one window of the model ({len(ids)} tokens is more){hint}"
        )
    return kv_prefix_of_tokens(loaded.model, ids)


@torch.no_grad()
def repeat_pass(loaded: LoadedModel, kv: torch.Tensor, body: list[int], probes: int = 0) -> RepeatPass:
    """The repeat pass over `body` (the text of the segment KV `kv`, without a BOS), keeping `probes`
    evenly spaced reconstruction queries (all query heads) as probes."""
    layers, kv_heads, _ = kv_shape(loaded.model.config)
    request = chat_token_ids(loaded.tokenizer, [{"role": "user", "content": REPEAT_REQUEST}])
    wanted = evenly_wanted(len(body), probes)
    observer = RepeatObserver(kv.shape[0], kv_heads, layers, first_query=len(request))
    starts = range(0, len(body), CHUNK_TOKENS)
    observe(
        loaded, kv, [(request + body[s : s + CHUNK_TOKENS], wanted[s : s + CHUNK_TOKENS]) for s in starts], observer
    )
    scores = torch.stack(observer.scores).permute(2, 0, 1)  # [segment, layers, kv_heads]
    if not probes:
        return RepeatPass(scores, None)
    read_at = torch.cat([len(request) + wanted[s : s + CHUNK_TOKENS].nonzero()[:, 0] for s in starts])
    return RepeatPass(scores, captured_probes(loaded, observer, read_at))


def evenly_wanted(count: int, probes: int) -> torch.Tensor:
    """bool [count]: `probes` of `count` queries, evenly spaced (none for 0, all when there are fewer)."""
    wanted = torch.zeros(count, dtype=torch.bool)
    if probes and count:
        wanted[torch.linspace(0, count - 1, min(probes, count)).round().long()] = True
    return wanted


def observe(loaded: LoadedModel, kv: torch.Tensor, windows: list[tuple[list[int], torch.Tensor]], observer) -> None:
    """Each window's tokens fed after the segment KV `kv` (from the segment's end, alone with it) with the
    observer's attention; each window's bool mask says which of its queries (after the observer's
    `first_query`) the observer captures."""
    model = loaded.model
    layers, kv_heads, head_dim = kv_shape(model.config)
    segment = kv.shape[0]
    with observed(model):
        for tokens, capture in windows:
            observer.capture = capture
            position = torch.arange(segment, segment + len(tokens), device=model.device)[None]
            model(
                input_ids=torch.tensor([tokens], device=model.device),
                position_ids=position,
                past_key_values=prefix_cache(kv.to(model.device), layers, kv_heads, head_dim),
                use_cache=True,
                **{OBSERVER_ARGUMENT: observer},
            )


@contextmanager
def observed(model):
    """The model's attention is `observed_attention` inside (an observer passed as OBSERVER_ARGUMENT sees
    every layer; without one it is sdpa), its own again after."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def captured_probes(loaded: LoadedModel, observer: RepeatObserver, read_at: torch.Tensor) -> Probes:
    """The observer's captured queries as probes, each read `read_at` positions after its segment's end,
    rotated as if the segment had no tokens."""
    per_layer = [[torch.cat(parts, dim=1) for parts in zip(*captured)] for captured in observer.captured]
    queries, outputs, log_mass = (torch.stack(kind) for kind in zip(*per_layer))
    shift = torch.full((1, queries.shape[2]), -observer.segment_tokens, device=queries.device)
    return Probes(moved_by(loaded.model, queries, shift), read_at, outputs, log_mass)
