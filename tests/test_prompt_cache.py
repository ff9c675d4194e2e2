"""The prompt cache finds the longest known start of a prompt, for the same cartridge and positions only."""

import torch

from cartridges.serving.prompt_cache import PromptCache


def kv(ids):
    """Keys and values that record which token each column belongs to."""
    column = torch.tensor(ids, dtype=torch.float32).view(1, 1, -1, 1)
    return [column.clone()], [column.clone() + 0.5]


def test_the_longest_common_start_with_the_same_cartridge_and_first_position_is_reused():
    cache = PromptCache(entries=8)
    legal, tax = torch.zeros(3, 4), torch.zeros(3, 4)
    cache.store(legal, 3, [1, 2, 3, 4, 5], *kv([1, 2, 3, 4, 5]))
    cache.store(legal, 3, [1, 2, 9], *kv([1, 2, 9]))
    cache.store(tax, 3, [1, 2, 3, 4, 5, 6], *kv([1, 2, 3, 4, 5, 6]))
    reuse = cache.reuse(legal, 3, [1, 2, 3, 4, 7, 8])
    assert reuse.tokens == 4 and reuse.keys[0].flatten().tolist() == [1, 2, 3, 4]
    assert reuse.values[0].flatten().tolist() == [1.5, 2.5, 3.5, 4.5]
    assert cache.reuse(legal, 3, [1, 2, 3, 4, 5]).tokens == 4  # never the whole prompt: its last logits are needed
    assert cache.reuse(legal, 0, [1, 2, 3]) is None  # other positions
    assert cache.reuse(torch.zeros(3, 4), 3, [1, 2, 3]) is None  # an equal tensor is not the same cartridge
    assert cache.reuse(None, 3, [1, 2, 3]) is None
    assert cache.reuse(legal, 3, [7, 1, 2]) is None


def test_the_plain_model_has_its_own_entries_and_old_ones_go_first():
    cache = PromptCache(entries=2)
    cache.store(None, 0, [1, 2, 3], *kv([1, 2, 3]))
    cache.store(None, 0, [4, 5, 6], *kv([4, 5, 6]))
    assert cache.reuse(None, 0, [1, 2, 7]).tokens == 2  # used: now the most recent
    cache.store(None, 0, [8, 9], *kv([8, 9]))
    assert cache.reuse(None, 0, [4, 5, 7]) is None  # the least recently used went
    assert cache.reuse(None, 0, [1, 2, 7]).tokens == 2
    assert PromptCache(entries=0).reuse(None, 0, [1, 2]) is None


def test_a_block_with_a_key_bias_is_another_block_than_its_prefix_alone():
    """A prompt's keys and values after a biased block differ from those after the same keys unbiased."""
    cache = PromptCache()
    prefix, bias = torch.zeros(2, 4), torch.zeros(1, 1, 2)
    cache.store(prefix, 2, [1, 2, 3], *kv([1, 2, 3]), key_bias=bias)
    assert cache.reuse(prefix, 2, [1, 2, 3]) is None
    assert cache.reuse(prefix, 2, [1, 2, 3], torch.zeros(1, 1, 2)) is None
    assert cache.reuse(prefix, 2, [1, 2, 3], bias).tokens == 2
    cache.store(prefix, 2, [1, 2, 3], *kv([1, 2, 3]))
    assert cache.reuse(prefix, 2, [1, 2, 3]).tokens == 2


def test_a_cartridge_that_is_gone_matches_nothing():
    cache = PromptCache()
    prefix = torch.zeros(2, 4)
    cache.store(prefix, 2, [1, 2, 3], *kv([1, 2, 3]))
    del prefix
    assert cache.reuse(torch.zeros(2, 4), 2, [1, 2, 3]) is None


def test_the_cache_keeps_within_its_bytes():
    cache = PromptCache(entries=100, max_bytes=2 * 2 * 3 * 4)  # two 3-token entries (keys and values, fp32)
    for first in range(3):
        cache.store(None, first, [1, 2, 3], *kv([1, 2, 3]))
    assert cache.held_bytes == 48
    assert cache.reuse(None, 0, [1, 2, 3]) is None and cache.reuse(None, 2, [1, 2, 3]).tokens == 2
    cache.store(None, 9, list(range(13)), *kv(list(range(13))))  # larger than the whole budget: not kept
    assert cache.reuse(None, 9, list(range(13))) is None and cache.held_bytes == 48
