"""Multi-head attention, the reference: projections, the position scheme's hooks, one `attend`.

    out = softmax(q k^T / sqrt(hs) + bias, masked) v

with q and k rotated by the position context (RoPE) and `bias` its score bias (ALiBi, T5), if any. Masks are
boolean, True where a query may attend, shaped to broadcast to (B, nh, T_q, T_k); a causal context (the
decoder's self-attention) also hides every key after a query's own position. `eager_attention` is the
maths written out; the fast kernels (SDPA, CPU training with dropout, decoding) live in `roformer.kernels`,
each tested equal to it, and `kernels.select_kernel` picks one per call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from roformer.config import ModelConfig
from roformer.kernels import KVCache, select_kernel
from roformer.kernels.derived import derived
from roformer.positions import NO_POSITIONS, PositionContext, with_causal


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    dropout_p: float,
    bias: torch.Tensor | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(hs) + bias, masked) v written out. q: (B, nh, T_q, hs); k, v: (B, nh, T_k, hs).
    `causal`: query i (at key position T_k - T_q + i) also sees only the keys up to its own.
    Returns the output and the weights."""
    if causal:
        mask = with_causal(mask, q.shape[-2], k.shape[-2], q.device)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, nh, T_q, T_k)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)
    return F.dropout(weights, p=dropout_p) @ v, weights


class MultiHeadAttention(nn.Module):
    """Softmax attention. With `cross=True` keys and values come from `context` and positions play no part."""

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

    def _project(self, x, context, cache, positions: PositionContext):
        """Queries, keys and values as (B, nh, T, hs), rotated where the scheme rotates them; keys and values are
        None when a static cache already holds the source's."""
        if self.cross:  # positions live in each stream's self-attention, not across streams
            q = self._heads(self.query(x))
            if cache is not None and cache.static and cache.key is not None:
                return q, None, None  # the source's keys, computed at the first decoding step
            return q, self._heads(self.key(context)), self._heads(self.value(context))
        heads = self._heads(F.linear(x, *self._fused_qkv()))  # (B, 3 nh, T, hs): one product for q, k and v
        nh = self.num_heads
        rotated = positions.rotate(heads[:, : (3 if self.rotary_value else 2) * nh])  # one rotation for all
        return rotated[:, :nh], rotated[:, nh : 2 * nh], (rotated if self.rotary_value else heads)[:, 2 * nh :]

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        positions: PositionContext = NO_POSITIONS,
        context: torch.Tensor | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, H); context: (B, S, H) for cross-attention. Returns (B, T, H) and, if asked, the weights.
        With a cache, x holds the new tokens only and `positions` their context against every cached key."""
        q, k, v = self._project(x, context, cache, positions)
        if k is None:
            k, v = cache.key, cache.value
        elif cache is not None:
            k, v = cache.append(k, v)
        out, weights = self.attend(q, k, v, mask, positions.bias, need_weights, positions.causal)
        return self.merge(out), weights

    def forward_rows(
        self, x: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None, positions: PositionContext
    ) -> torch.Tensor:
        """Self-attention output at the rows `index` (B, M) of x only, each attending to all of x: (B, M, H)."""
        rows = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        at_rows = positions.select(index)
        q = at_rows.rotate(self._heads(self.query(rows)))
        k, v = self._heads(self.key(x)), self._heads(self.value(x))
        out, _ = self.attend(
            q, positions.rotate(k), positions.rotate(v) if self.rotary_value else v, mask, at_rows.bias
        )
        return self.merge(out)

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        """(B, nh, T, hs) -> the output projection of the concatenated heads, (B, T, H)."""
        return self.out(out.transpose(1, 2).flatten(2))

    def attend(self, q, k, v, mask, bias=None, need_weights=False, causal=False):
        """softmax(q k^T / sqrt(hs) + bias, masked[, causally]) v, by the fast kernel for the call where one applies."""
        dropout_p = self.dropout if self.training else 0.0
        causal = causal and q.shape[-2] > 1  # a single (newest) query sees every key
        kernel = select_kernel(q, k, dropout_p, self.impl, need_weights)
        if kernel is None:
            return eager_attention(q, k, v, mask, dropout_p, bias, causal)
        return kernel(q, k, v, mask, bias, dropout_p, causal), None
