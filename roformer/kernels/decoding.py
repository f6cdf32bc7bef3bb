"""Incremental decoding: the time-major keys/values cache and attention for one new query per row."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of one attention layer during incremental decoding, read as (B, nh, T_k, hs).

    Self-attention appends each step's keys; cross-attention fills it once from the source (`static`).

    Decoding allocates nothing per step here. Keys live in a time-major buffer (capacity, B, nh, hs) with room to
    grow: a step writes its slot instead of concatenating the whole cache into a new tensor. Reordering (beam
    search) copies the filled slots into a second buffer kept for the purpose, then swaps the two. Time-major
    makes the filled part one contiguous block, so both are single copies; attention reads the keys through a
    strided view, without copying them. (Fresh tensors of this size at every step and layer cost page faults.)
    """

    def __init__(self, static: bool = False):
        self.static = static
        self.length = 0
        self._filled: tuple[torch.Tensor, torch.Tensor] | None = None  # keys, values: (capacity, B, nh, hs)
        self._spare: tuple[torch.Tensor, torch.Tensor] | None = None  # where `reorder` copies to

    @property
    def key(self) -> torch.Tensor | None:
        return None if self._filled is None else self._filled[0][: self.length].permute(1, 2, 0, 3)

    @property
    def value(self) -> torch.Tensor | None:
        return None if self._filled is None else self._filled[1][: self.length].permute(1, 2, 0, 3)

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """key, value: (B, nh, T_new, hs). Returns all the keys and values so far."""
        end = self.length + key.shape[2]
        if self._filled is None or end > self._filled[0].shape[0]:
            self._grow(key, end)
        for buffer, new in zip(self._filled, (key, value)):
            buffer[self.length : end].copy_(new.permute(2, 0, 1, 3))
        self.length = end
        return self.key, self.value

    def _grow(self, like: torch.Tensor, needed: int) -> None:
        """Room for `needed` slots: exactly, for the source's keys; else twice the old capacity (32 at first)."""
        capacity = needed if self.static else max(needed, 2 * self._filled[0].shape[0] if self._filled else 32)
        batch, heads, _, size = like.shape
        grown = (like.new_empty(capacity, batch, heads, size), like.new_empty(capacity, batch, heads, size))
        if self._filled is not None:
            for old, new in zip(self._filled, grown):
                new[: self.length].copy_(old[: self.length])
        self._filled, self._spare = grown, None

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows in `index` (beam search picks which hypotheses live on)."""
        if self._filled is None:
            return
        capacity, _, heads, size = self._filled[0].shape
        rows = index.numel()
        if self._spare is None or self._spare[0].shape[1] != rows:
            self._spare = tuple(self._filled[0].new_empty(capacity, rows, heads, size) for _ in range(2))
        for old, new in zip(self._filled, self._spare):
            torch.index_select(old[: self.length], 1, index, out=new[: self.length])
        self._filled, self._spare = self._spare, self._filled  # a spare of another batch size is replaced next time


def single_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor | None = None
):
    """Attention of one new query per row (a decoding step) as two batched matrix products.

    q: (B * G, nh, 1, hs); k, v: (B, nh, T_k, hs); mask and bias broadcast to (B, nh, 1, T_k) (a decoding step's
    score bias is the same for every row: (1, nh, 1, T_k)). Each row of keys serves
    G consecutive query rows: the G beams of a sentence read one copy of its source (G is 1 in self-attention).
    Grouped, the beams become G queries of one product: a quarter of the tiny matrix products at beam 4, where
    SDPA's CPU kernel would spend more on setting up blocks than on a (1, T_k) row of scores per head. Written as
    3-d `bmm`s on views of the cache (`KVCache` lays keys out so that these are views, not copies).
    """
    rows, heads, keys, size = k.shape
    groups = q.shape[0] // rows
    q = q.reshape(rows, groups, heads, size).transpose(1, 2).reshape(rows * heads, groups, size)
    scores = torch.bmm(q * size**-0.5, k.reshape(rows * heads, keys, size).transpose(1, 2))  # (B nh, G, T_k)
    if bias is not None:
        scores.view(rows, heads, groups, keys).add_(bias.to(scores.dtype))
    if mask is not None:
        scores.view(rows, heads, groups, keys).masked_fill_(~mask, torch.finfo(scores.dtype).min)
    out = torch.bmm(scores.softmax(dim=-1), v.reshape(rows * heads, keys, size))  # (B nh, G, hs)
    return out.view(rows, heads, groups, size).transpose(1, 2).reshape(rows * groups, heads, 1, size)
