"""The batch KV buffers against per-row bookkeeping in plain lists of tensors."""

import random

import torch

from cartridges.serving.batch_kv import ROOM, BatchKV

SHAPE = (2, 2, 3)  # layers, kv heads, head dim


def check(kv: BatchKV, expected: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
    """Every row's first `length` columns are its own keys and values, in order, on every layer."""
    assert kv.rows == len(expected) and kv.lengths == [rows[0][0].shape[1] for rows in expected]
    for slot, layers in enumerate(expected):
        for layer, (keys, values) in enumerate(layers):
            length = keys.shape[1]
            assert torch.equal(kv.keys[layer][slot, :, :length], keys)
            assert torch.equal(kv.values[layer][slot, :, :length], values)
            assert torch.isfinite(kv.keys[layer][slot]).all()


def new_tokens(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(SHAPE[1], count, SHAPE[2]), torch.randn(SHAPE[1], count, SHAPE[2])) for _ in range(SHAPE[0])]


def append(kv: BatchKV, expected: list, slot: int, count: int) -> None:
    """`count` tokens written after the row's own last one, as a step does."""
    tokens = new_tokens(count)
    kv.make_room(kv.lengths[slot] + count)
    for layer, (keys, values) in enumerate(tokens):
        kv.write(layer, slot, kv.lengths[slot], keys, values)
        old_keys, old_values = expected[slot][layer]
        expected[slot][layer] = (torch.cat([old_keys, keys], dim=1), torch.cat([old_values, values], dim=1))
    kv.lengths[slot] += count


def decode(kv: BatchKV, expected: list) -> None:
    """One token for every row at its own column, in one indexed write per layer."""
    slots = torch.arange(kv.rows)
    columns = torch.tensor(kv.lengths)
    kv.make_room(max(kv.lengths) + 1)
    for layer, (keys, values) in enumerate(new_tokens(kv.rows)):
        kv.write_columns(layer, slots, columns, keys.transpose(0, 1), values.transpose(0, 1))
        for slot in range(kv.rows):
            old_keys, old_values = expected[slot][layer]
            expected[slot][layer] = (
                torch.cat([old_keys, keys[:, slot : slot + 1]], dim=1),
                torch.cat([old_values, values[:, slot : slot + 1]], dim=1),
            )
    kv.lengths = [length + 1 for length in kv.lengths]


def join(kv: BatchKV, expected: list, known: int) -> None:
    """A row that starts with `known` tokens (a prompt the prompt cache knew) or none."""
    tokens = new_tokens(known)
    if known:
        kv.add([keys[None] for keys, _ in tokens], [values[None] for _, values in tokens])
    else:
        kv.add()
    expected.append(tokens)


def test_rows_join_decode_take_chunks_and_leave_keeping_each_rows_own_tokens():
    torch.manual_seed(0)
    random.seed(0)
    kv, expected = BatchKV(SHAPE, torch.float32, "cpu"), []
    join(kv, expected, 4)
    join(kv, expected, 0)
    append(kv, expected, 1, 7)
    check(kv, expected)
    for _ in range(3):
        decode(kv, expected)
    join(kv, expected, 2)
    append(kv, expected, 2, 90)  # longer than the room: the buffers grow, the rows stay
    check(kv, expected)
    for _ in range(200):  # random joins, chunks, decodes and leaves
        action = random.choice(["join", "chunk", "decode", "leave"])
        if action == "join" and kv.rows < 9:
            join(kv, expected, random.choice([0, 3, 11]))
        elif action == "chunk" and kv.rows:
            append(kv, expected, random.randrange(kv.rows), random.randint(1, 20))
        elif action == "decode" and kv.rows:
            decode(kv, expected)
        elif action == "leave" and kv.rows:
            leaving = random.sample(range(kv.rows), random.randint(1, kv.rows))
            order = kv.drop(leaving)
            remaining = [row for index, row in enumerate(expected) if index not in leaving]
            assert sorted(order) == [index for index in range(len(expected)) if index not in leaving]
            expected[:] = [expected[index] for index in order]
            assert len(expected) == len(remaining)
        check(kv, expected)


def test_an_emptied_batch_lets_its_buffers_go():
    """Refilled 50 times with one short row after one long one: the buffers stay the size of the rows."""
    kv, expected = BatchKV(SHAPE, torch.float32, "cpu"), []
    join(kv, expected, 0)
    append(kv, expected, 0, 500)
    kv.drop([0])
    expected.clear()
    for _ in range(50):
        join(kv, expected, 5)
        decode(kv, expected)
        check(kv, expected)
        assert kv.columns <= 6 + ROOM
        kv.drop([0])
        expected.clear()
    assert kv.rows == 0 and kv.columns == 0
