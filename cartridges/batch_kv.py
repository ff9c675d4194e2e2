"""The running rows' keys and values: one left-padded buffer per layer, with room to grow in place.

transformers' `DynamicLayer` appends a decode step's keys and values with `torch.cat`, which copies the
whole batch KV on every layer of every step. Here each layer keeps a buffer with spare columns; a step
writes its column in place and attention reads a view of the filled part. The batch is rebuilt (one copy)
only when a row joins or leaves. Rows are left-padded to a common width, so every row's next token goes
to the same column; `mask` marks each row's real tokens.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer

ROOM = 64  # spare columns a buffer gets when it is (re)built or runs full


class BufferedLayer(DynamicLayer):
    """A `DynamicLayer` whose `update` writes into spare columns instead of concatenating."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.length = keys.shape[2]
        self._keys = _with_room(keys, self.length)
        self._values = _with_room(values, self.length)
        self._expose()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[2]
        if end > self._keys.shape[2]:
            self._keys, self._values = _with_room(self.keys, end), _with_room(self.values, end)
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def _expose(self) -> None:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]


def _with_room(tensor: torch.Tensor, filled: int) -> torch.Tensor:
    batch, heads, _, dim = tensor.shape
    buffer = tensor.new_empty(batch, heads, filled + ROOM, dim)
    buffer[:, :, : tensor.shape[2]] = tensor
    return buffer


class BatchKV:
    """Keys, values and attention mask of the rows in a batch, in row order."""

    def __init__(self):
        self.layers: list[BufferedLayer] = []
        self.mask = torch.zeros(0, 0, dtype=torch.long)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def cache(self) -> Cache:
        """The cache a forward pass appends its column to (in place)."""
        return Cache(layers=self.layers)

    def mask_with_next(self) -> torch.Tensor:
        """The mask for a step that appends one token to every row; pass it to `advance` after the step."""
        ones = torch.ones(self.rows, 1, dtype=self.mask.dtype, device=self.mask.device)
        return torch.cat([self.mask, ones], dim=1)

    def advance(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def add(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor) -> None:
        """Append rows ([rows, heads, T, dim] per layer, `mask` [rows, T]), left-padding whichever side is shorter."""
        if not self.rows:
            self.layers = [BufferedLayer(k, v) for k, v in zip(keys, values, strict=True)]
            self.mask = mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        joined_keys = [
            torch.cat([_left_pad(a.keys, width), _left_pad(b, width)]) for a, b in zip(self.layers, keys, strict=True)
        ]
        joined_values = [
            torch.cat([_left_pad(a.values, width), _left_pad(b, width)])
            for a, b in zip(self.layers, values, strict=True)
        ]
        self.layers = [BufferedLayer(k, v) for k, v in zip(joined_keys, joined_values, strict=True)]
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); columns padded in every remaining row go."""
        if not rows:
            self.layers, self.mask = [], torch.zeros(0, 0, dtype=torch.long)
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(dim=0) > 0).nonzero()[0])
        self.mask = mask[:, start:]
        self.layers = [
            BufferedLayer(
                layer.keys.index_select(0, index)[:, :, start:], layer.values.index_select(0, index)[:, :, start:]
            )
            for layer in self.layers
        ]


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before the sequence axis (dim 2 of a KV tensor, dim 1 of a mask) up to `width` columns."""
    axis = 2 if tensor.dim() == 4 else 1
    amount = width - tensor.shape[axis]
    if amount == 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = amount
    return torch.cat([torch.zeros(shape, dtype=tensor.dtype, device=tensor.device), tensor], dim=axis)


def prefix_rows(
    prefixes: list[torch.Tensor | None], kv_shape: tuple[int, int, int], device
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Per-layer (keys, values) [rows, heads, P, dim] of prefixes ([tokens, layers*2*heads*dim] each, or
    None) left-padded to the longest, and their mask [rows, P]; no layers when no row has a prefix."""
    layers, heads, dim = kv_shape
    width = max((prefix.shape[0] for prefix in prefixes if prefix is not None), default=0)
    mask = torch.zeros(len(prefixes), width, dtype=torch.long, device=device)
    if width == 0:
        return [], mask
    dtype = next(prefix.dtype for prefix in prefixes if prefix is not None)
    kv = torch.zeros(len(prefixes), 2 * layers, heads, width, dim, dtype=dtype, device=device)
    for row, prefix in enumerate(prefixes):
        if prefix is None or prefix.shape[0] == 0:
            continue
        tokens = prefix.shape[0]
        kv[row, :, :, width - tokens :] = prefix.view(tokens, 2 * layers, heads, dim).permute(1, 2, 0, 3)
        mask[row, width - tokens :] = 1
    return [(kv[:, 2 * layer].contiguous(), kv[:, 2 * layer + 1].contiguous()) for layer in range(layers)], mask
