"""The batch KV buffers and the masked GQA attention against plain torch and transformers' own code."""

import torch
import transformers.integrations.sdpa_attention as sdpa_attention

from cartridges.artifact import kv_shape
from cartridges.batch_kv import ROOM, BatchKV, stack_left_padded
from cartridges.kv_prefix import prefix_layers
from cartridges.masked_gqa import NAME, use_masked_gqa
from cartridges.runtime import prefix_cache


def check(kv: BatchKV, expected: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Every row's masked-in keys and values are its own, in order; the view starts at a used column."""
    keys, values = kv.layer_view(0)
    mask = kv.mask.bool()
    assert kv.rows == len(expected) == mask.shape[0] and keys.shape[2] == mask.shape[1]
    for row, (row_keys, row_values) in enumerate(expected):
        assert torch.equal(keys[row][:, mask[row]], row_keys) and torch.equal(values[row][:, mask[row]], row_values)
        assert torch.isfinite(keys[row]).all() and torch.isfinite(values[row]).all()
    assert mask[:, 0].any()  # no column that every row pads


def step(kv: BatchKV, expected: list) -> None:
    """A decode step: one new column for every row, written through the cache transformers would use."""
    cache, mask = kv.step()
    assert mask.shape == (kv.rows, kv.end - kv.start + 1) and mask[:, -1].all()
    new_keys, new_values = torch.randn(kv.rows, 2, 1, 3), torch.randn(kv.rows, 2, 1, 3)
    got_keys, got_values = cache.layers[0].update(new_keys, new_values)
    assert got_keys.shape[2] == mask.shape[1]
    kv.advance()
    for row in range(kv.rows):
        keys, values = expected[row]
        expected[row] = (torch.cat([keys, new_keys[row]], dim=1), torch.cat([values, new_values[row]], dim=1))


def add(kv: BatchKV, expected: list, *lengths: int) -> None:
    width = max(lengths)
    keys, values = torch.randn(len(lengths), 2, width, 3), torch.randn(len(lengths), 2, width, 3)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
        keys[row, :, : width - length] = float("nan")  # what a padded position holds must not leak
        expected.append((keys[row, :, width - length :], values[row, :, width - length :]))
    kv.add([keys], [values], mask)


def test_rows_join_decode_and_leave_keeping_each_rows_own_keys_and_values():
    torch.manual_seed(0)
    kv, expected = BatchKV(), []
    add(kv, expected, 4)
    check(kv, expected)
    buffer = kv._keys[0].data_ptr()
    step(kv, expected)
    assert kv._keys[0].data_ptr() == buffer  # the step wrote in place
    add(kv, expected, 9, 2)  # longer than the batch: the first row moves right
    check(kv, expected)
    for _ in range(3):
        step(kv, expected)
    check(kv, expected)
    add(kv, expected, 3)  # shorter: it only fills its slot
    check(kv, expected)
    order = kv.drop([0, 2])
    assert order == [3, 1]  # the last row took the first freed slot
    expected = [expected[i] for i in order]
    check(kv, expected)
    for _ in range(ROOM + 5):  # past the spare room: the buffers grow
        step(kv, expected)
    check(kv, expected)
    assert kv.drop([0, 1]) == [] and kv.rows == 0
    add(kv, expected := [], 5)
    check(kv, expected)


def test_a_batch_that_empties_and_refills_does_not_grow():
    kv, expected = BatchKV(), []
    for _ in range(50):
        add(kv, expected, 10)
        step(kv, expected)
        check(kv, expected)
        assert kv._keys[0].shape[2] <= 11 + ROOM
        kv.drop([0])
        expected = []
    add(kv, expected, 10, 3)
    kv.drop([0])
    add(kv, expected := [expected[1]], 4)  # a batch of one short row takes a longer one
    check(kv, expected)
    assert kv._keys[0].shape[2] <= 4 + 2 * ROOM


def test_prefixes_are_stacked_left_padded_as_each_ones_own_cache_holds_it():
    shape = (3, 2, 4)  # layers, kv heads, head dim
    torch.manual_seed(0)
    prefixes = [torch.randn(5, 3 * 2 * 2 * 4), None, torch.randn(2, 3 * 2 * 2 * 4)]
    rows = [prefix_layers(prefix, shape) if prefix is not None else ([], []) for prefix in prefixes]
    layers, mask = stack_left_padded(rows, "cpu")
    assert mask.tolist() == [[1] * 5, [0] * 5, [0, 0, 0, 1, 1]]
    for row, prefix in enumerate(prefixes):
        if prefix is None:
            assert all(not keys[row].any() and not values[row].any() for keys, values in layers)
            continue
        alone = prefix_cache(prefix, *shape)
        for (keys, values), layer in zip(layers, alone.layers, strict=True):
            assert torch.equal(keys[row, :, 5 - prefix.shape[0] :], layer.keys[0])
            assert torch.equal(values[row, :, 5 - prefix.shape[0] :], layer.values[0])
    no_layers, no_mask = stack_left_padded([([], []), ([], [])], "cpu")
    assert no_layers == [] and no_mask.shape == (2, 0)


def test_masked_gqa_gives_transformers_numbers_without_repeating_keys_and_values(lively, monkeypatch):
    """A padded batch after a prefix: the same logits as transformers' sdpa, which repeats K/V per query head."""
    model = lively.model
    layers, heads, dim = kv_shape(model.config)
    torch.manual_seed(0)
    prefix = torch.randn(6, layers * 2 * heads * dim) * 0.5
    ids = torch.randint(4, 300, (3, 7))
    mask = torch.ones(3, 6 + 7, dtype=torch.long)
    mask[1, 6:9] = 0  # a left-padded prompt
    mask[2, :6] = 0  # a row without the prefix
    positions = torch.arange(6, 13).repeat(3, 1)
    repeats = []
    real_repeat = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda *a: repeats.append(1) or real_repeat(*a))

    def logits():
        cache = prefix_cache(prefix, layers, heads, dim, batch_size=3)
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits

    assert model.config._attn_implementation == "sdpa"
    expected = logits()
    assert repeats  # transformers' sdpa copies K/V when there is a mask
    repeats.clear()
    use_masked_gqa(model)
    assert model.config._attn_implementation == NAME
    got = logits()
    assert not repeats
    real = mask[:, 6:].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
