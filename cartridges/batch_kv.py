"""The running rows' keys and values, in buffers that a decode step, a join and a leave barely copy.

transformers' `DynamicLayer` appends a step's keys and values with `torch.cat`, which copies the whole
batch KV on every layer of every step; rebuilding the batch when a row joins or leaves copies it again.
Here each layer has one buffer [row slots, kv heads, columns, head dim] with spare room:
- rows are left-padded to a common end column, so a step writes every row's new token to column `end`
  in place and attention reads the view `[:rows, :, start:end]`;
- a joining row is written into the next free slot, ending at `end` (only when it is longer than
  every row so far are the others shifted, one copy);
- a leaving row's slot is filled with the last row (one row copied), and columns that no remaining row
  uses are skipped by moving `start`, not copied.
Masked columns hold zeros or old finite values (never uninitialised memory: 0 x NaN is NaN).
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer

ROOM = 64  # spare columns added when the buffers are (re)allocated


class BatchKV:
    """Keys, values and attention mask of the rows in a batch; row i is slot i."""

    def __init__(self):
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._mask = torch.zeros(0, 0, dtype=torch.long)
        self.rows = 0
        self.start = 0  # first column any row uses
        self.end = 0  # one past the last filled column

    @property
    def mask(self) -> torch.Tensor:
        return self._mask[: self.rows, self.start : self.end]

    def layer_view(self, layer: int, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.end if end is None else end
        return self._keys[layer][: self.rows, :, self.start : end], self._values[layer][
            : self.rows, :, self.start : end
        ]

    def step(self) -> tuple[Cache, torch.Tensor]:
        """The cache and attention mask for a forward pass that appends one column to every row; call
        `advance` after it."""
        self._reserve(self.rows, self.end + 1)
        self._mask[: self.rows, self.end] = 1
        cache = Cache(layers=[_StepLayer(self, layer) for layer in range(len(self._keys))])
        return cache, self._mask[: self.rows, self.start : self.end + 1]

    def advance(self) -> None:
        self.end += 1

    def add(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor) -> None:
        """Append rows ([new rows, heads, T, dim] per layer, `mask` [new rows, T]) whose last column is real."""
        count, width = mask.shape
        self._allocate(len(keys), keys[0])
        if self.rows == 0:  # nothing to keep: the rows take columns [0, width)
            self.start, self.end = 0, width
            self._reserve(count, width)
        elif width > self.end:  # longer than every row so far: shift them right
            self._reserve(self.rows + count, width, shift=width - self.end)
        else:
            self._reserve(self.rows + count, self.end)
        slots = slice(self.rows, self.rows + count)
        first = self.end - width
        padded = ~mask.bool()[:, None, :, None]  # whatever a padded position computed stays out
        for layer, (new_keys, new_values) in enumerate(zip(keys, values, strict=True)):
            self._keys[layer][slots, :, : self.end] = 0
            self._values[layer][slots, :, : self.end] = 0
            self._keys[layer][slots, :, first : self.end] = new_keys.masked_fill(padded, 0)
            self._values[layer][slots, :, first : self.end] = new_values.masked_fill(padded, 0)
        self._mask[slots] = 0
        self._mask[slots, first : self.end] = mask
        self.rows += count
        self.start = min(self.start, first) if self.rows > count else first

    def drop(self, leaving: list[int]) -> list[int]:
        """Remove these rows; returns the old indices of the remaining rows in their new order (the last
        row moves into each freed slot)."""
        order = list(range(self.rows))
        for index in sorted(leaving, reverse=True):
            last = self.rows - 1
            if index != last:
                for buffers in (self._keys, self._values):
                    for buffer in buffers:
                        buffer[index, :, : self.end] = buffer[last, :, : self.end]
                self._mask[index] = self._mask[last]
                order[index] = order[last]
            order.pop()
            self.rows -= 1
        if self.rows == 0:  # the buffers go too: a long prompt's columns are not kept for the next short one
            self.__init__()
        else:
            used = self._mask[: self.rows, self.start : self.end].any(dim=0)
            self.start += int(used.nonzero()[0])
        return order

    def _reserve(self, rows: int, columns: int, shift: int = 0) -> None:
        """Room for `rows` slots and `columns` columns, moving the filled columns `shift` to the right."""
        if self._keys and rows <= self._keys[0].shape[0] and columns <= self._keys[0].shape[2] and not shift:
            return
        old_rows = self._keys[0].shape[0] if self._keys else 0
        old_columns = self._keys[0].shape[2] if self._keys else 0
        new_rows = max(rows, min(2 * old_rows, 256)) if rows > old_rows else old_rows
        new_columns = max(columns, self.end + shift) + ROOM if columns > old_columns or shift else old_columns
        self._keys = [self._moved(buffer, new_rows, new_columns, shift) for buffer in self._keys]
        self._values = [self._moved(buffer, new_rows, new_columns, shift) for buffer in self._values]
        self._mask = self._moved(self._mask, new_rows, new_columns, shift)
        self.start += shift
        self.end += shift

    def _moved(self, buffer: torch.Tensor, rows: int, columns: int, shift: int) -> torch.Tensor:
        axis = 2 if buffer.dim() == 4 else 1
        shape = list(buffer.shape)
        shape[0], shape[axis] = rows, columns
        moved = buffer.new_zeros(shape)
        if self.rows == 0:
            return moved
        filled = buffer.narrow(0, 0, self.rows).narrow(axis, 0, self.end)
        moved.narrow(0, 0, self.rows).narrow(axis, shift, self.end).copy_(filled)
        return moved

    def _allocate(self, count: int, like: torch.Tensor) -> None:
        """Empty buffers for `count` layers shaped like a [rows, heads, T, dim] tensor (on the first add)."""
        if self._keys:
            return
        _, heads, _, dim = like.shape
        self._keys = [like.new_zeros(0, heads, 0, dim) for _ in range(count)]
        self._values = [like.new_zeros(0, heads, 0, dim) for _ in range(count)]
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=like.device)


class _StepLayer(DynamicLayer):
    """One layer of one decode step: writes the step's column into the batch buffer, returns the views."""

    def __init__(self, kv: BatchKV, layer: int):
        super().__init__()
        self.kv, self.layer = kv, layer
        self.dtype, self.device, self.is_initialized = kv._keys[layer].dtype, kv._keys[layer].device, True
        self.keys, self.values = kv.layer_view(layer)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        kv, end = self.kv, self.kv.end
        kv._keys[self.layer][: kv.rows, :, end : end + 1] = key_states
        kv._values[self.layer][: kv.rows, :, end : end + 1] = value_states
        self.keys, self.values = kv.layer_view(self.layer, end + 1)
        return self.keys, self.values


def stack_left_padded(
    rows: list[tuple[list[torch.Tensor], list[torch.Tensor]]], device
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Rows of per-layer (keys, values) [1, heads, T_row, dim] (no layers: an empty row) left-padded to the
    longest: per-layer (keys, values) [rows, heads, T, dim] and the mask [rows, T]; no layers when every row
    is empty."""
    width = max((keys[0].shape[2] for keys, _ in rows if keys), default=0)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    if width == 0:
        return [], mask
    like = next(keys[0] for keys, _ in rows if keys)
    _, heads, _, dim = like.shape
    layers = []
    for layer in range(len(next(keys for keys, _ in rows if keys))):
        keys = like.new_zeros(len(rows), heads, width, dim)
        values = like.new_zeros(len(rows), heads, width, dim)
        for row, (row_keys, row_values) in enumerate(rows):
            if row_keys:
                tokens = row_keys[layer].shape[2]
                keys[row, :, width - tokens :] = row_keys[layer][0]
                values[row, :, width - tokens :] = row_values[layer][0]
        layers.append((keys, values))
    for row, (row_keys, _) in enumerate(rows):
        if row_keys:
            mask[row, width - row_keys[0].shape[2] :] = 1
    return layers, mask
