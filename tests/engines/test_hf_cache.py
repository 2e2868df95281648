"""The transformers engine's slot cache: writes land in place, in their own slot only, and
the masks let each token see its own sequence's columns up to its position."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the hf extra (torch, transformers) is not installed")
pytest.importorskip("transformers", reason="the hf extra (torch, transformers) is not installed")

from llmserve.engines.hf_cache import Placement, SlotCache, attention_masks  # noqa: E402


def _where(rows, tokens, slots, columns, length, gather=None) -> Placement:
    def t(v):
        return torch.tensor(v, dtype=torch.long)

    return Placement(None if gather is None else t(gather), t(rows), t(tokens), t(slots),
                     t(columns), length)


def _states(batch, tokens, fill):
    """[batch, 2 heads, tokens, 3]: token (b, t) holds fill + 10*b + t everywhere."""
    base = torch.arange(batch)[:, None] * 10 + torch.arange(tokens)[None, :] + fill
    return base[:, None, :, None].expand(batch, 2, tokens, 3).float()


def test_writes_stay_in_their_slot_and_nothing_moves():
    cache = SlotCache(n_layers=1, slots=4, columns=16)
    # a prompt of 5 tokens read into slot 2 (one input row, gathered)
    k = _states(1, 5, 100.0)
    cache.place(_where([0] * 5, range(5), [2] * 5, range(5), 5, gather=[2]))
    keys, _ = cache.update(k, k + 0.5, 0)
    assert keys.shape == (1, 2, 5, 3) and torch.equal(keys, k)
    layer = cache.layers[0]
    storage = layer.keys.data_ptr()
    assert layer.keys.shape == (4, 2, 16, 3)
    before = layer.keys.clone()
    # a decode step over slots 0..2: slot 2 writes column 5; slots 0 and 1 write nothing
    step = _states(3, 1, 500.0)
    cache.place(_where([2], [0], [2], [5], 6))
    keys, _ = cache.update(step, step, 0)
    assert keys.shape == (3, 2, 6, 3)  # read in place, no gather
    assert keys.data_ptr() == storage
    assert layer.keys.data_ptr() == storage
    changed = (layer.keys != before).any(dim=(1, 3))  # [slot, column]
    assert changed.nonzero().tolist() == [[2, 5]]
    assert torch.equal(layer.keys[2, :, 5], step[2, :, 0])


def test_padded_tokens_are_written_nowhere_and_prefixes_copy_to_other_slots():
    cache = SlotCache(n_layers=2, slots=3, columns=8)
    # two prompts side by side, left-padded: row 0 has 2 tokens, row 1 has 4
    k = _states(2, 4, 1.0)
    cache.place(_where([0, 0, 1, 1, 1, 1], [2, 3, 0, 1, 2, 3], [0, 0, 1, 1, 1, 1],
                       [0, 1, 0, 1, 2, 3], 4, gather=[0, 1]))
    for layer in range(2):
        cache.update(k, k, layer)
    keys = cache.layers[1].keys
    assert torch.equal(keys[0, :, :2], k[0, :, 2:])
    assert not keys[0, :, 2:].any()  # the pads' columns stay empty
    assert torch.equal(keys[1, :, :4], k[1])
    cache.copy_prefix(1, [2], 4)
    for layer in cache.layers:
        assert torch.equal(layer.keys[2], layer.keys[1]) and torch.equal(layer.values[2], layer.values[1])


def test_masks_see_up_to_the_own_position_and_slide():
    positions = torch.tensor([[3], [1]])
    full = attention_masks(positions, 5, kinds=frozenset({"full_attention"}),
                           sliding_window=None, additive=None)
    assert full.shape == (2, 1, 1, 5)
    assert full[:, 0, 0].tolist() == [[True] * 4 + [False], [True, True, False, False, False]]
    both = attention_masks(positions, 5, kinds=frozenset({"full_attention", "sliding_attention"}),
                           sliding_window=2, additive=None)
    assert both["full_attention"][0, 0, 0].tolist() == [True, True, True, True, False]
    assert both["sliding_attention"][0, 0, 0].tolist() == [False, False, True, True, False]
    only = attention_masks(positions, 5, kinds=frozenset({"sliding_attention"}),
                           sliding_window=2, additive=torch.float32)
    low = torch.finfo(torch.float32).min
    assert only[0, 0, 0].tolist() == [low, low, 0.0, 0.0, low]
