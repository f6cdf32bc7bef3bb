"""Multi-head attention: self or cross, SDPA or eager, RoPE on q and k, keys/values cache for decoding.

Masks are boolean, True where a query may attend, shaped to broadcast to (B, nh, T_q, T_k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from roformer.config import ModelConfig
from roformer.derived import derived
from roformer.dropout import dropout_attention
from roformer.positions import NO_ROPE, Rope, _NoRope

QUERY_CHUNK = 512
"""Queries per chunk of `chunked_attention`, used when training on CPU with attention dropout past this length."""


@dataclass
class QuerySubset:
    """Some positions of each sequence, padded to the longest count: index (B, M) and which are real (B, M).

    A masked-LM loss needs the last layer's output at the masked positions only, so that layer's queries,
    feed-forward and norms can skip the other ~85% of the tokens (its keys and values still see them all).
    """

    index: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_mask(cls, selected: torch.Tensor) -> QuerySubset:
        """selected: (B, T) bool. Positions keep their order, so x[selected] == gather(x)[valid]."""
        counts = selected.sum(dim=1)
        width = int(counts.max()) if selected.numel() else 0
        index = torch.sort((~selected).to(torch.uint8), dim=1, stable=True).indices[:, :width]
        valid = torch.arange(width, device=selected.device) < counts.unsqueeze(1)
        return cls(index, valid)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, M, H): the selected rows, then unselected ones as padding (not `valid`)."""
        return x.gather(1, self.index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


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


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(hs) + mask) v written out. q: (B, nh, T_q, hs); k, v: (B, nh, T_k, hs)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, nh, T_q, T_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)
    return F.dropout(weights, p=dropout_p) @ v, weights


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
    """Attention of one new query per row (a decoding step) as two batched matrix products.

    q: (B * G, nh, 1, hs); k, v: (B, nh, T_k, hs); mask broadcasts to (B, nh, 1, T_k). Each row of keys serves
    G consecutive query rows: the G beams of a sentence read one copy of its source (G is 1 in self-attention).
    Grouped, the beams become G queries of one product: a quarter of the tiny matrix products at beam 4, where
    SDPA's CPU kernel would spend more on setting up blocks than on a (1, T_k) row of scores per head. Written as
    3-d `bmm`s on views of the cache (`KVCache` lays keys out so that these are views, not copies).
    """
    rows, heads, keys, size = k.shape
    groups = q.shape[0] // rows
    q = q.reshape(rows, groups, heads, size).transpose(1, 2).reshape(rows * heads, groups, size)
    scores = torch.bmm(q * size**-0.5, k.reshape(rows * heads, keys, size).transpose(1, 2))  # (B nh, G, T_k)
    if mask is not None:
        scores.view(rows, heads, groups, keys).masked_fill_(~mask, torch.finfo(scores.dtype).min)
    out = torch.bmm(scores.softmax(dim=-1), v.reshape(rows * heads, keys, size))  # (B nh, G, hs)
    return out.view(rows, heads, groups, size).transpose(1, 2).reshape(rows * groups, heads, 1, size)


def chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float, chunk_size: int
) -> torch.Tensor:
    """`dropout_attention` over chunks of queries, each recomputed in backward instead of storing its weights.

    torch has no fused CPU kernel that applies attention dropout, and its fallback keeps every layer's
    (B, nh, T_q, T_k) weights and dropout mask for backward: 1.2 GB per layer at 8 heads x 4096 tokens. Here one
    chunk's (chunk_size, T_k) weights exist at a time, for the price of computing attention twice. The checkpoint
    replays the RNG state, so backward sees the dropout mask that forward drew.
    """
    outputs = []
    for start in range(0, q.shape[-2], chunk_size):
        rows = slice(start, start + chunk_size)
        chunk_mask = mask if mask is None or mask.shape[-2] == 1 else mask[..., rows, :]
        outputs.append(checkpoint(dropout_attention, q[..., rows, :], k, v, chunk_mask, dropout_p, use_reentrant=False))
    return torch.cat(outputs, dim=-2)


class MultiHeadAttention(nn.Module):
    """Softmax attention. With `cross=True` keys and values come from `context` and are never rotated."""

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.cross = cross
        self.rotary_value = cfg.rotary_value
        self.impl = cfg.attention_impl
        self.dropout = cfg.attention_dropout
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def _fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The q, k and v weights and biases stacked, for one matrix product. Checkpoints keep the three separate
        (interop with transformers); decoding keeps the stack between steps instead of redoing it per token."""
        parts = (self.query.weight, self.key.weight, self.value.weight, self.query.bias, self.key.bias, self.value.bias)
        return derived(self, "_qkv", parts, lambda: (torch.cat(parts[:3]), torch.cat(parts[3:])))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)  # (B, heads, T, hs)

    def _project(self, x, context, queries: QuerySubset | None, cache, rope: Rope | _NoRope):
        """Queries, keys and values as (B, nh, T, hs), rotated where the scheme rotates them; keys and values are
        None when a static cache already holds the source's."""
        if self.cross:  # positions live in each stream's self-attention, not across streams: never rotated
            q = self._heads(self.query(x))
            if cache is not None and cache.static and cache.key is not None:
                return q, None, None  # the source's keys, computed at the first decoding step
            return q, self._heads(self.key(context)), self._heads(self.value(context))
        if queries is None:  # one matrix product for q, k and v, and one rotation for all that rotate
            heads = self._heads(F.linear(x, *self._fused_qkv()))  # (B, 3 nh, T, hs)
            nh = self.num_heads
            rotated = rope.rotate(heads[:, : (3 if self.rotary_value else 2) * nh])
            return rotated[:, :nh], rotated[:, nh : 2 * nh], (rotated if self.rotary_value else heads)[:, 2 * nh :]
        q = rope.select(queries.index).rotate(self._heads(self.query(queries.gather(x))))
        v = self._heads(self.value(x))
        return q, rope.rotate(self._heads(self.key(x))), rope.rotate(v) if self.rotary_value else v

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        rope: Rope | _NoRope = NO_ROPE,
        context: torch.Tensor | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
        queries: QuerySubset | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, H); context: (B, S, H) for cross-attention. Returns (B, T, H) and, if asked, the weights.
        With `queries`, only those rows of x attend (to all of x): returns (B, M, H)."""
        q, k, v = self._project(x, context, queries, cache, rope)
        if k is None:
            k, v = cache.key, cache.value
        elif cache is not None:
            k, v = cache.append(k, v)
        out, weights = self.attend(q, k, v, mask, need_weights)
        return self.out(out.transpose(1, 2).flatten(2)), weights

    def attend(self, q, k, v, mask, need_weights):
        dropout_p = self.dropout if self.training else 0.0
        decoding_step = q.shape[-2] == 1 and not need_weights and not torch.is_grad_enabled()
        if decoding_step and (q.device.type == "cpu" or q.shape[0] != k.shape[0]):  # CPU, or beams sharing a source
            return single_query_attention(q, k, v, mask), None
        if self.impl == "eager" or need_weights:
            return eager_attention(q, k, v, mask, dropout_p)
        if dropout_p > 0 and q.device.type == "cpu" and torch.is_grad_enabled():  # no fused kernel: ours is leaner
            if q.shape[-2] > QUERY_CHUNK:
                return chunked_attention(q, k, v, mask, dropout_p, QUERY_CHUNK), None
            return dropout_attention(q, k, v, mask, dropout_p), None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p), None
