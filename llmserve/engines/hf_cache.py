"""The transformers engine's KV cache: one slot per sequence, allocated once, written in place.

Per layer, keys and values are `[slots, kv_heads, columns, head_dim]` tensors: slot r holds
one sequence, its token at position p in column p. A forward pass names, before it runs,
which slot each of its input rows is (`Placement`) and where each new token goes; attention
then reads the first `length` columns of those slots, and the 4D mask (`attention_masks`)
lets each query see only columns up to its own position. A sequence that joins writes its
own slot; one that leaves frees it; nobody else's columns move.

Why not transformers' `StaticCache`: it writes every row at one shared position (a single
`cumulative_length`), so rows of different lengths would need left padding and re-alignment
whenever one joins; here every row writes at its own position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import llmserve.engines.hf_offline  # noqa: F401 - before transformers

# isort: split

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass(frozen=True)
class Placement:
    """Where a forward pass's `[batch, tokens]` input lives in the cache.

    `slots[b]` is the slot of input row b (None: rows 0..batch-1 are slots 0..batch-1, and
    attention reads the cache in place, with no gather). The token at `(at_row[i],
    at_token[i])` of the input is written to column `at_column[i]` of slot `at_slot[i]`;
    input tokens not listed (padding) are written nowhere. Attention reads columns
    `[0, length)`."""

    slots: torch.Tensor | None
    at_row: torch.Tensor
    at_token: torch.Tensor
    at_slot: torch.Tensor
    at_column: torch.Tensor
    length: int


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values for every slot. Allocated zeroed on the first write (its
    shapes come from the model's own key states): a masked column must not hold NaN, which
    attention's weighted sum would spread even at weight 0."""

    def __init__(self, slots: int, columns: int) -> None:
        super().__init__()
        self.slots = slots
        self.columns = columns

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _, heads, _, kdim = key_states.shape
        vdim = value_states.shape[-1]
        self.keys = key_states.new_zeros(self.slots, heads, self.columns, kdim)
        self.values = value_states.new_zeros(self.slots, heads, self.columns, vdim)
        self.is_initialized = True

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, where: Placement):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # advanced indices around a slice: the indexed element is [n, heads, dim] on both sides
        self.keys[where.at_slot, :, where.at_column] = key_states[where.at_row, :, where.at_token]
        self.values[where.at_slot, :, where.at_column] = value_states[where.at_row, :, where.at_token]
        keys = self.keys[:, :, : where.length]
        values = self.values[:, :, : where.length]
        if where.slots is None:
            rows = key_states.shape[0]
            return keys[:rows], values[:rows]
        return keys.index_select(0, where.slots), values.index_select(0, where.slots)

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("SlotCache writes through SlotCache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.columns, 0

    def get_seq_length(self) -> int:
        return 0  # positions are per slot: the engine always passes them

    def get_max_length(self) -> int:
        return self.columns


class SlotCache(Cache):
    """Every layer's `SlotLayer`; `place(...)` before each forward pass says where it writes."""

    def __init__(self, n_layers: int, slots: int, columns: int) -> None:
        super().__init__(layers=[SlotLayer(slots, columns) for _ in range(n_layers)])
        self.slots = slots
        self.columns = columns
        self._where: Placement | None = None

    def place(self, where: Placement) -> None:
        self._where = where

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self._where is None:
            raise RuntimeError("SlotCache.update before place()")
        return self.layers[layer_idx].write(key_states, value_states, self._where)

    def copy_prefix(self, source: int, targets: list[int], n: int) -> None:
        """Columns `[0, n)` of slot `source` into each of `targets` (n choices sharing one
        prompt: the prompt is read once)."""
        index = torch.tensor(targets, dtype=torch.long, device=self.layers[0].keys.device)
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys[index, :, :n] = layer.keys[source, :, :n]
                layer.values[index, :, :n] = layer.values[source, :, :n]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))


def attention_masks(positions: torch.Tensor, length: int, *, kinds: frozenset[str],
                    sliding_window: int | None, additive: torch.dtype | None):
    """The 4D mask `[batch, 1, tokens, length]` of a forward pass whose input token (b, t)
    sits at position `positions[b, t]`: it sees the columns up to its own position (all of
    them hold its own sequence's tokens), and no further back than `sliding_window` in
    sliding layers.

    `kinds`: the model's layer types; with sliding layers among full ones, a dict by layer
    type (the models that mix them take one). `additive`: a float dtype for attention
    implementations that add the mask to the scores (eager), else booleans (sdpa)."""
    columns = torch.arange(length, device=positions.device)
    q = positions[:, None, :, None]
    full = columns <= q
    masks = {"full_attention": full}
    if sliding_window is not None:
        masks["sliding_attention"] = full & (columns > q - sliding_window)
    if additive is not None:
        low = torch.finfo(additive).min
        masks = {k: torch.zeros((), dtype=additive, device=m.device).masked_fill(~m, low)
                 for k, m in masks.items()}
    if "sliding_attention" in kinds and "full_attention" in kinds:
        return masks
    return masks["sliding_attention" if "sliding_attention" in kinds else "full_attention"]
