"""The running rows' own keys and values (prompt and generated tokens; never their cartridge's), in
buffers that a step, a join and a leave barely copy.

Each layer has one buffer [row slots, kv heads, columns, head dim] with spare room. A row's tokens
start at column 0 of its slot and it has its own length, so a step writes each row's new tokens right
after its own last one, whether that is one decoded token or a chunk of a prompt, and no row is ever
shifted. A joining row takes the next free slot; a leaving row's slot is filled with the last row (one
row copied). Attention reads `[:rows, :, :columns]` with a mask of each row's length; columns past a
row's length hold zeros or old finite values (never uninitialised memory: 0 x NaN is NaN).

A cartridge's keys and values are not here: rows that share a cartridge read its one copy
(`cartridges.serving.packed_attention.SharedPrefix`).
"""

import torch

ROOM = 64  # spare columns added when the buffers grow


class BatchKV:
    """Keys and values of the rows in a batch, row i in slot i, and each row's length in tokens."""

    def __init__(self, kv_shape: tuple[int, int, int], dtype: torch.dtype, device):
        self.kv_shape, self.dtype, self.device = kv_shape, dtype, device
        layers, heads, dim = kv_shape
        self.keys = [torch.zeros(0, heads, 0, dim, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(0, heads, 0, dim, dtype=dtype, device=device) for _ in range(layers)]
        self.lengths: list[int] = []  # per row

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def columns(self) -> int:
        return self.keys[0].shape[2]

    def add(self, keys: list[torch.Tensor] | None = None, values: list[torch.Tensor] | None = None) -> int:
        """A new row in the next slot, holding these known tokens (per layer [1, kv heads, T, head dim]) or
        none yet. Returns the slot."""
        known = keys[0].shape[2] if keys else 0
        self._reserve(self.rows + 1, known)
        slot = self.rows
        for layer in range(len(self.keys) if known else 0):  # past `known`, a slot's old values stay (finite)
            self.keys[layer][slot, :, :known] = keys[layer][0]
            self.values[layer][slot, :, :known] = values[layer][0]
        self.lengths.append(known)
        return slot

    def make_room(self, columns: int) -> None:
        """At least `columns` columns in every slot (call before a step writes past the current end)."""
        self._reserve(self.rows, columns)

    def write(self, layer: int, slot: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keys and values [kv heads, T, head dim] of one row's tokens from column `start`."""
        count = keys.shape[1]
        self.keys[layer][slot, :, start : start + count] = keys
        self.values[layer][slot, :, start : start + count] = values

    def write_columns(
        self, layer: int, slots: torch.Tensor, columns: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """One token per row: keys and values [rows, kv heads, head dim] at each row's own column."""
        self.keys[layer][slots, :, columns] = keys
        self.values[layer][slots, :, columns] = values

    def drop(self, leaving: list[int]) -> list[int]:
        """Remove these rows; returns the old indices of the remaining rows in their new order (the last
        row moves into each freed slot)."""
        order = list(range(self.rows))
        for index in sorted(leaving, reverse=True):
            last = self.rows - 1
            if index != last:
                length = self.lengths[last]
                for buffers in (self.keys, self.values):
                    for buffer in buffers:
                        buffer[index, :, :length] = buffer[last, :, :length]
                self.lengths[index] = length
                order[index] = order[last]
            order.pop()
            self.lengths.pop()
        if self.rows == 0:  # the buffers go too: a long prompt's columns are not kept for the next short one
            self.__init__(self.kv_shape, self.dtype, self.device)
        return order

    def bytes_per_token(self) -> int:
        layers, heads, dim = self.kv_shape
        return 2 * layers * heads * dim * self.keys[0].element_size()

    def _reserve(self, rows: int, columns: int) -> None:
        if rows <= self.keys[0].shape[0] and columns <= self.columns:
            return
        old_rows, old_columns = self.keys[0].shape[0], self.columns
        new_rows = max(rows, min(2 * old_rows, 256)) if rows > old_rows else old_rows
        new_columns = columns + ROOM if columns > old_columns else old_columns
        self.keys = [self._moved(buffer, new_rows, new_columns) for buffer in self.keys]
        self.values = [self._moved(buffer, new_rows, new_columns) for buffer in self.values]

    def _moved(self, buffer: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        moved = buffer.new_zeros(rows, buffer.shape[1], columns, buffer.shape[3])
        used = max(self.lengths, default=0)
        if self.rows and used:
            moved[: self.rows, :, :used] = buffer[: self.rows, :, :used]
        return moved
