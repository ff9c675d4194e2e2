"""One forward pass over the new tokens of many rows packed into one sequence: the next token of every
decoding row and chunks of joining rows' prompts, each row reading its cartridge's one shared copy of
keys and values and then its own tokens.

Why: on a CPU a forward pass costs a fixed ~80 ms for SmolLM2 before its first token (the weights
are read once per pass), so a request that joined by a prefill pass of its own stopped every other
row for a pass, and copying the cartridge's keys and values into every row's cache cost memory and
copies per request. Packed, the linear layers see one [1, tokens] sequence whatever mix of rows it
holds, and only attention knows about rows:
- decoding rows (one query each) attend together: one batched product over their own tokens (left
  aligned in `BatchKV`, masked by length) and, per cartridge, one product of all its rows' queries
  with its keys (rows stacked as queries of one matrix), softmax over both parts at once;
- a prompt chunk attends causally to its cartridge, its row's earlier tokens and itself.
The attention function is registered with transformers under `NAME`; a forward pass without a
`PackedStep` (any other use of the model) is transformers' own `sdpa`.
"""

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from cartridges.kv_prefix import prefix_layers
from cartridges.serving.batch_kv import BatchKV

NAME = "cartridges_packed"
STEP_ARGUMENT = "cartridges_step"  # the keyword a packed forward pass passes its `PackedStep` in
# A 4-D attention mask makes transformers skip building one (it would be for a single sequence); the
# packed step carries its own masks.
NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


@dataclass
class SharedPrefix:
    """A cartridge's keys and values per layer [kv heads, tokens, head dim], contiguous, held once for all
    the rows that use it."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    # Per layer [kv heads, tokens]: added to every query's score of each key (a closed-form block's
    # attention mass, stages/evaluation/methods/matched.py); None: no bias.
    bias: list[torch.Tensor] | None = None

    @classmethod
    def of(
        cls, prefix: torch.Tensor, kv_shape: tuple[int, int, int], key_bias: torch.Tensor | None = None
    ) -> "SharedPrefix":
        """`key_bias`: [layers, kv heads, tokens] or None."""
        keys, values = prefix_layers(prefix, kv_shape)
        bias = None if key_bias is None else [b.to(prefix.device, prefix.dtype).contiguous() for b in key_bias]
        return cls([k[0].contiguous() for k in keys], [v[0].contiguous() for v in values], bias)

    @property
    def tokens(self) -> int:
        return self.keys[0].shape[1]

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@dataclass
class Chunk:
    """`count` prompt tokens of the row in `slot`, from token `start` of the packed sequence, after the
    row's `before` own tokens."""

    slot: int
    start: int
    count: int
    before: int
    prefix: SharedPrefix | None


@dataclass
class PackedStep:
    """What one packed forward pass computes: the packed sequence is the decoding rows' tokens (slot
    `decode_slots[i]`'s next token is token i, written at its row's last column after this step), then
    the chunks in order. `prefixes[slot]` is each row's cartridge (None: the plain model); `lengths` each
    row's own tokens after this step."""

    kv: BatchKV
    decode_slots: list[int]
    chunks: list[Chunk]
    prefixes: list[SharedPrefix | None]
    lengths: list[int]
    _groups: list[tuple[SharedPrefix, torch.Tensor | None]] = field(init=False, repr=False)

    def __post_init__(self):
        device = self.kv.device
        self._slots = torch.tensor(self.decode_slots, dtype=torch.long, device=device)
        self._columns = torch.tensor([self.lengths[slot] - 1 for slot in self.decode_slots], device=device)
        self._every_row_decodes = self.decode_slots == list(range(self.kv.rows))
        self._width = max(self.lengths[slot] for slot in self.decode_slots) if self.decode_slots else 0
        lengths = torch.tensor(self.lengths, device=device)
        real = torch.arange(self._width, device=device)[None, :] < lengths[:, None]
        minimum = torch.finfo(self.kv.dtype).min  # finite: a row with no real column gives no NaN
        self._bias = torch.zeros(real.shape, dtype=self.kv.dtype, device=device).masked_fill(~real, minimum)
        self._bias = self._bias[:, None, None, :]
        by_prefix: dict[int, tuple[SharedPrefix, list[int]]] = {}
        for slot in self.decode_slots:
            prefix = self.prefixes[slot]
            if prefix is not None:
                by_prefix.setdefault(id(prefix), (prefix, []))[1].append(slot)
        # slots None: every row of the batch (most often one cartridge for all), read without gathering
        self._groups = [
            (p, None if s == list(range(self.kv.rows)) else torch.tensor(s, dtype=torch.long, device=device))
            for p, s in by_prefix.values()
        ]
        self._prefix_width = max((p.tokens for p, _ in self._groups), default=0)
        self._chunk_masks = [
            torch.arange(self._chunk_keys(chunk), device=device)[None, :]
            <= (_tokens(chunk.prefix) + chunk.before + torch.arange(chunk.count, device=device))[:, None]
            for chunk in self.chunks
        ]

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float):
        """query [1, heads, tokens, dim], key and value [1, kv heads, tokens, dim] of the packed tokens ->
        the attention output [1, tokens, heads, dim]. Stores the tokens' keys and values in `kv`."""
        decoding = len(self.decode_slots)
        keys, values = key[0], value[0]
        if decoding:
            self.kv.write_columns(
                layer,
                self._slots,
                self._columns,
                keys[:, :decoding].transpose(0, 1),
                values[:, :decoding].transpose(0, 1),
            )
        for chunk in self.chunks:
            span = slice(chunk.start, chunk.start + chunk.count)
            self.kv.write(layer, chunk.slot, chunk.before, keys[:, span], values[:, span])
        outputs = [self._decode(layer, query[0, :, :decoding], scale)] if decoding else []
        for chunk, mask in zip(self.chunks, self._chunk_masks, strict=True):
            outputs.append(self._chunk(layer, chunk, mask, query[:, :, chunk.start : chunk.start + chunk.count], scale))
        return torch.cat(outputs, dim=1).transpose(0, 1).unsqueeze(0).contiguous()

    def _decode(self, layer: int, query: torch.Tensor, scale: float) -> torch.Tensor:
        """query [heads, decoding rows, dim] -> [heads, decoding rows, dim]."""
        heads, decoding, dim = query.shape
        kv_heads = self.kv.kv_shape[1]
        groups = heads // kv_heads
        query = query.transpose(0, 1).reshape(decoding, kv_heads, groups, dim)
        if not self._every_row_decodes:  # rows mid-prompt get a zero query whose output is dropped
            every = query.new_zeros(self.kv.rows, kv_heads, groups, dim)
            every[self._slots] = query
            query = every
        rows = query.shape[0]
        own_keys = self.kv.keys[layer][:rows, :, : self._width]
        own_values = self.kv.values[layer][:rows, :, : self._width]
        scores = torch.matmul(query, own_keys.transpose(-1, -2)).mul_(scale).add_(self._bias)
        if self._groups:
            scores = torch.cat([self._prefix_scores(layer, query, scale), scores], dim=-1)
        probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        output = torch.matmul(probabilities[..., self._prefix_width :], own_values)
        for prefix, slots in self._groups:
            count, tokens = query.shape[0] if slots is None else len(slots), prefix.tokens
            chosen = probabilities if slots is None else probabilities[slots]
            weights = chosen[:, :, :, :tokens].permute(1, 0, 2, 3).reshape(kv_heads, count * groups, tokens)
            part = torch.matmul(weights, prefix.values[layer]).view(kv_heads, count, groups, dim).permute(1, 0, 2, 3)
            if slots is None:
                output += part
            else:
                output.index_add_(0, slots, part)
        if not self._every_row_decodes:
            output = output[self._slots]
        return output.reshape(decoding, heads, dim).transpose(0, 1)

    def _prefix_scores(self, layer: int, query: torch.Tensor, scale: float) -> torch.Tensor:
        """Scores of every row's query against its cartridge's keys [rows, kv heads, groups, widest
        cartridge], one product per cartridge; past a row's cartridge, the minimum."""
        rows, kv_heads, groups, dim = query.shape
        scores = query.new_full((rows, kv_heads, groups, self._prefix_width), torch.finfo(query.dtype).min)
        for prefix, slots in self._groups:
            count, tokens = query.shape[0] if slots is None else len(slots), prefix.tokens
            chosen = query if slots is None else query[slots]
            stacked = chosen.permute(1, 0, 2, 3).reshape(kv_heads, count * groups, dim)
            part = torch.matmul(stacked, prefix.keys[layer].transpose(-1, -2)).mul_(scale)
            if prefix.bias is not None:
                part += prefix.bias[layer][:, None, :]
            part = part.view(kv_heads, count, groups, tokens).permute(1, 0, 2, 3)
            if slots is None and tokens == self._prefix_width:  # one cartridge for the whole batch
                return part
            scores[slice(None) if slots is None else slots, :, :, :tokens] = part
        return scores

    def _chunk(self, layer: int, chunk: Chunk, mask: torch.Tensor, query: torch.Tensor, scale: float):
        """query [1, heads, count, dim] -> [heads, count, dim]: causal over the cartridge, the row's earlier
        tokens and the chunk."""
        own = chunk.before + chunk.count
        keys = self.kv.keys[layer][chunk.slot : chunk.slot + 1, :, :own]
        values = self.kv.values[layer][chunk.slot : chunk.slot + 1, :, :own]
        if chunk.prefix is not None:
            keys = torch.cat([chunk.prefix.keys[layer][None], keys], dim=2)
            values = torch.cat([chunk.prefix.values[layer][None], values], dim=2)
            if chunk.prefix.bias is not None:
                mask = _biased_mask(mask, chunk.prefix.bias[layer], query.shape[1], query.dtype)
        output = torch.nn.functional.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )
        return output[0]

    @staticmethod
    def _chunk_keys(chunk: Chunk) -> int:
        return _tokens(chunk.prefix) + chunk.before + chunk.count


def _biased_mask(mask: torch.Tensor, bias: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask [queries, keys] as an additive one [1, heads, queries, keys] with each query head's
    KV head's `bias` [kv heads, tokens] on the first `tokens` keys (the cartridge's)."""
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    additive = additive.expand(heads, -1, -1).clone()
    additive[:, :, : bias.shape[1]] += bias.repeat_interleave(heads // bias.shape[0], dim=0)[:, None, :]
    return additive[None]


def _tokens(prefix: SharedPrefix | None) -> int:
    return 0 if prefix is None else prefix.tokens


UNSUPPORTED = ("sliding_window", "softcap", "s_aux")


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    step = kwargs.pop(STEP_ARGUMENT, None)
    if step is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    unsupported = [name for name in UNSUPPORTED if kwargs.get(name) is not None]
    if unsupported:
        raise NotImplementedError(
            f"the server's batch decoder does not implement {', '.join(unsupported)} attention "
            f"({type(module).__name__}); serve a model with plain causal attention"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return step.attend(module.layer_idx, query, key, value, scale), None


AttentionInterface.register(NAME, packed_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_packed_attention(model) -> None:
    """Switch a model to `packed_attention` (transformers' `sdpa` when a forward pass is not packed)."""
    model.set_attn_implementation(NAME)


@torch.no_grad()
def packed_logits(
    model,
    kv_shape: tuple[int, int, int],
    prefix: torch.Tensor | None,
    rows: list[list[int]],
    keep: list[int],
    start_position: int | None = None,
    key_bias: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """One packed forward pass of several rows after one shared prefix (PEFT's flat layout, or None):
    each row is read from position `start_position` on (default: the prefix's length), attends to the
    prefix's one copy and causally to itself, and gives the logits of its last `keep[i]` tokens. Unlike
    a padded batch over a prefix copied per row, no padding is computed and the prefix is not copied
    (teacher scoring in synthesis, gold-answer scoring in evaluation). `key_bias` [layers, kv heads, P]:
    added to every score of the prefix's keys. The model must use `packed_attention`."""
    if prefix is not None and prefix.shape[0] == 0:
        prefix = None
    shared = None if prefix is None else SharedPrefix.of(prefix.to(model.device, model.dtype), kv_shape, key_bias)
    first = _tokens(shared) if start_position is None else start_position
    kv = BatchKV(kv_shape, model.dtype, model.device)
    for _ in rows:
        kv.add()
    kv.make_room(max(len(row) for row in rows))
    chunks, ids, positions, kept = [], [], [], []
    for slot, row in enumerate(rows):
        chunks.append(Chunk(slot, len(ids), len(row), 0, shared))
        ids.extend(row)
        positions.extend(range(first, first + len(row)))
        kept.extend(range(len(ids) - keep[slot], len(ids)))
    step = PackedStep(kv, [], chunks, [shared] * len(rows), [len(row) for row in rows])
    return list(packed_forward(model, step, ids, positions, kept).split(keep))


def packed_forward(model, step: PackedStep, ids: list[int], positions: list[int], keep: list[int]) -> torch.Tensor:
    """The model's forward pass over a packed sequence: logits [len(keep), vocab] of the tokens at `keep`."""
    device = model.device
    return model(
        input_ids=torch.tensor([ids], device=device),
        position_ids=torch.tensor([positions], device=device),
        attention_mask=NO_MASK.to(device),
        use_cache=False,
        logits_to_keep=torch.tensor(keep, dtype=torch.long, device=device),
        **{STEP_ARGUMENT: step},
    ).logits[0]
