"""`matched` fitted layer by layer (the schedule of Attention Matching, arXiv 2602.16284): each layer's
block is fitted to the queries the model makes when its earlier layers read the *block*, not the corpus.

Why: the plain `matched` block fits every layer to the repeat pass's queries, computed with every layer
reading the whole corpus. In use, layer l's queries come from hidden states that layers 0..l-1 computed
over the block, so later layers are fitted to queries they will not see. Here the repeat pass runs once,
all its windows together and layer by layer: at each layer the windows' queries score and probe the whole
corpus's keys exactly as the repeat pass does (`RepeatObserver`: reconstruction scores, evenly spaced
probes with their output and log mass over the corpus), the layer's keys are chosen from them (by score,
as `select`, or by matching pursuit) and its values fitted (`fitted_values`), and the windows go on to
the next layer having read that layer's block, as a chat reads the cartridge.

One window of the model (the corpus, the repeat request and a chunk); the repeat pass's probes; no
biases (a cartridge cannot carry them). About the plain repeat pass's cost, plus one attention over P keys
per window and layer; the whole-corpus pass's own output (`RepeatObserver.attend` returns it) is computed and
not used, one wasted [m, T] x [T, D] product per window and layer.
"""

from dataclasses import dataclass

import torch

from cartridges.kv_layout import kv_shape
from cartridges.kv_prefix import kv_prefix_of_tokens
from cartridges.layout import chat_token_ids, context_token_ids
from cartridges.models import LoadedModel
from cartridges.rotary import moved_by
from cartridges.stages.evaluation.contexts import SINK_TOKENS
from cartridges.stages.evaluation.methods.matched import MAX_QUERIES, fitted_values, omp_keys
from cartridges.stages.evaluation.methods.repeat_pass import (
    CHUNK_TOKENS,
    OBSERVER_ARGUMENT,
    REPEAT_REQUEST,
    RepeatObserver,
    evenly_wanted,
    observed,
    one_window_kv,
)

KEY_CHOICES = ("attention", "omp")


@dataclass
class LayerwiseFitter:
    """The observer of one batched repeat pass that fits the block as the pass goes: `corpus` [T, layers,
    2, kv_heads, D] the corpus KV (keys at their positions), each window's own token count `lengths` and the
    reconstruction queries to probe `captures` (bool per window, after the repeat request's `first_query`
    tokens); `block` [P, layers, 2, kv_heads, D] is filled one layer at a time (keys read at 0..P-1)."""

    model: torch.nn.Module
    corpus: torch.Tensor
    lengths: list[int]
    captures: list[torch.Tensor]
    first_query: int
    key_choice: str
    sink: int
    block: torch.Tensor

    def __post_init__(self):
        tokens, layers, _, kv_heads, _ = self.corpus.shape
        self.whole = RepeatObserver(tokens, kv_heads, layers, first_query=self.first_query)

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float):
        """query [B, heads, n, D] and the windows' own key, value [B, kv_heads, n, D] (no cache) -> each
        window's output [B, n, heads, D] over this layer's fitted block and its own earlier tokens."""
        corpus_keys, corpus_values = (self.corpus[:, layer, i].transpose(0, 1)[None] for i in (0, 1))
        for b, n in enumerate(self.lengths):  # the whole corpus: scores and probes, as the repeat pass
            self.whole.capture = self.captures[b]
            own = slice(0, n)
            self.whole.attend(
                layer,
                query[b : b + 1, :, own],
                torch.cat([corpus_keys, key[b : b + 1, :, own]], dim=2),
                torch.cat([corpus_values, value[b : b + 1, :, own]], dim=2),
                scale,
            )
        queries, outputs, log_mass = (torch.cat(parts, dim=1) for parts in zip(*self.whole.captured[layer]))
        self.whole.captured[layer] = []
        self.fit(layer, queries, outputs, log_mass, self.whole.scores[layer])
        return self.read_block(layer, query, key, value, scale)

    def fit(self, layer: int, queries, outputs, log_mass, scores) -> None:
        """This layer's block: per KV head, P corpus keys (moved to 0..P-1) and their values fitted to the
        probes' attention output over the corpus (`queries` [heads, m, D] read at T + r)."""
        tokens, budget, head_dim = self.corpus.shape[0], self.block.shape[0], self.corpus.shape[-1]
        kv_heads = self.corpus.shape[3]
        group = queries.shape[0] // kv_heads
        at_block = moved_by(self.model, queries[None], torch.full((1, queries.shape[1]), budget - tokens))[0]
        for h in range(kv_heads):
            heads = slice(h * group, (h + 1) * group)
            keys = self.corpus[:, layer, 0, h]  # [T, D]
            if self.key_choice == "omp":
                q = queries[heads].reshape(-1, head_dim).double()
                relative = torch.exp(q @ keys.double().T * head_dim**-0.5 - log_mass[heads].reshape(-1, 1))
                keep = omp_keys(relative, budget).to(keys.device)
            else:
                score = scores[h].float().clone()
                score[: self.sink] = float("inf")
                keep = score.topk(budget).indices.sort().values
            shift = (torch.arange(budget, device=keep.device) - keep)[None]
            kept_keys = moved_by(self.model, keys[keep][None, None], shift)[0, 0]
            self.block[:, layer, 0, h] = kept_keys.to(self.block.dtype)
            self.block[:, layer, 1, h] = fitted_values(
                at_block[heads].reshape(-1, head_dim),
                kept_keys,
                self.corpus[keep, layer, 1, h],
                outputs[heads].reshape(-1, head_dim),
            )

    def read_block(self, layer: int, query, key, value, scale) -> torch.Tensor:
        """Each window's attention over this layer's block (its keys read P positions before the window, as
        a chat reads the cartridge) and its own earlier tokens."""
        tokens, budget = self.corpus.shape[0], self.block.shape[0]
        block_keys, block_values = (self.block[:, layer, i].transpose(0, 1)[None] for i in (0, 1))
        block_keys = moved_by(self.model, block_keys, torch.full((1, budget), tokens - budget))
        reader = RepeatObserver(budget, self.corpus.shape[3], self.corpus.shape[1])
        output = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
        for b, n in enumerate(self.lengths):
            own = slice(0, n)
            output[b, own] = reader.attend(
                layer,
                query[b : b + 1, :, own],
                torch.cat([block_keys.to(key.dtype), key[b : b + 1, :, own]], dim=2),
                torch.cat([block_values.to(value.dtype), value[b : b + 1, :, own]], dim=2),
                scale,
            )[0]
        return output


@torch.no_grad()
def layerwise_prefix(loaded: LoadedModel, text: str, num_tokens: int, key_choice: str = "attention") -> torch.Tensor:
    """The `matched` block of `num_tokens` tokens fitted layer by layer (keys by reconstruction score or by
    matching pursuit, `key_choice`), read at positions 0..P-1; the corpus's own KV if it is not longer."""
    model = loaded.model
    layers, kv_heads, head_dim = kv_shape(model.config)
    ids = context_token_ids(loaded.tokenizer, text)
    if len(ids) <= num_tokens:
        return kv_prefix_of_tokens(model, ids)
    name = "matched-omp-layerwise" if key_choice == "omp" else "matched-layerwise"
    kv = one_window_kv(loaded, ids, name, instead="matched")
    head = context_token_ids(loaded.tokenizer, "")
    body = ids[len(head) :]
    request = chat_token_ids(loaded.tokenizer, [{"role": "user", "content": REPEAT_REQUEST}])
    wanted = evenly_wanted(len(body), MAX_QUERIES)
    starts = range(0, len(body), CHUNK_TOKENS)
    windows = [request + body[s : s + CHUNK_TOKENS] for s in starts]
    fitter = LayerwiseFitter(
        model,
        kv.view(len(ids), layers, 2, kv_heads, head_dim),
        [len(w) for w in windows],
        [wanted[s : s + CHUNK_TOKENS] for s in starts],
        first_query=len(request),
        key_choice=key_choice,
        sink=max(len(head), SINK_TOKENS),
        block=kv.new_zeros(num_tokens, layers, 2, kv_heads, head_dim),
    )
    widest = max(fitter.lengths)
    padded = [w + [w[-1]] * (widest - len(w)) for w in windows]  # after every real token: never read
    positions = torch.arange(len(ids), len(ids) + widest, device=model.device)[None].expand(len(windows), -1)
    with observed(model):
        model(
            input_ids=torch.tensor(padded, device=model.device),
            position_ids=positions,
            use_cache=False,
            **{OBSERVER_ARGUMENT: fitter},
        )
    return fitter.block.reshape(num_tokens, -1)
