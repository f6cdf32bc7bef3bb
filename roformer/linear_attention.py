"""Linear attention with RoPE (paper sec. 3.3, eq. 19).

    out_m = sum_n (R_m phi(q_m))^T (R_n phi(k_n)) v_n  /  sum_n phi(q_m)^T phi(k_n)

RoPE rotates the features phi(q), phi(k) in the numerator; the normaliser stays unrotated so it remains
positive. Cost is O(T * hs^2) instead of O(T^2 * hs). The causal form runs chunk by chunk: exact, with
memory linear in T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from roformer.attention import MultiHeadAttention
from roformer.config import ModelConfig
from roformer.positions import NO_POSITIONS, NO_ROPE

EPS = 1e-6


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020): positive, cheap."""
    return F.elu(x) + 1


def favor_feature_map(x: torch.Tensor, projection: torch.Tensor, is_query: bool) -> torch.Tensor:
    """Performer's positive random features (Choromanski et al. 2021): exp(w^T x - |x|^2 / 2) / sqrt(m).

    x: (B, nh, T, hs); projection: (m, hs) with rows ~ N(0, I). The max is subtracted for stability (per row for
    queries, over all keys for keys), which the ratio in attention cancels.
    """
    x = x * x.shape[-1] ** -0.25
    logits = x @ projection.t() - (x**2).sum(-1, keepdim=True) / 2
    shift = logits.amax(-1, keepdim=True) if is_query else logits.amax((-1, -2), keepdim=True)
    return torch.exp(logits - shift.detach()) / math.sqrt(projection.shape[0]) + EPS


def linear_attention(phi_q, phi_k, v, rope=NO_ROPE, key_mask=None, causal=False, chunk_size=128):
    """phi_q, phi_k: (B, nh, T, hs) non-negative features; v: (B, nh, T, hs); key_mask: (B, 1, T, 1) or None.

    Returns (B, nh, T, hs).
    """
    if key_mask is not None:
        phi_k = phi_k * key_mask
    rot_q, rot_k = rope.rotate(phi_q), rope.rotate(phi_k)
    if not causal:
        numerator = rot_q @ (rot_k.transpose(-2, -1) @ v)  # (B, nh, T, hs) via (hs, hs)
        normaliser = phi_q @ phi_k.sum(-2).unsqueeze(-1)  # (B, nh, T, 1)
        return numerator / normaliser.clamp_min(EPS)
    outputs = []
    state = v.new_zeros(*v.shape[:-2], rot_k.shape[-1], v.shape[-1])  # sum of rot_k^T v over earlier chunks
    key_sum = phi_k.new_zeros(*phi_k.shape[:-2], 1, phi_k.shape[-1])  # sum of phi_k over earlier chunks
    for start in range(0, v.shape[-2], chunk_size):
        sl = slice(start, start + chunk_size)
        q_c, k_c, rq_c, rk_c, v_c = (
            phi_q[..., sl, :],
            phi_k[..., sl, :],
            rot_q[..., sl, :],
            rot_k[..., sl, :],
            v[..., sl, :],
        )
        within = torch.ones(q_c.shape[-2], q_c.shape[-2], dtype=torch.bool, device=v.device).tril()
        numerator = rq_c @ state + ((rq_c @ rk_c.transpose(-2, -1)) * within) @ v_c
        normaliser = (q_c * key_sum).sum(-1, keepdim=True) + ((q_c @ k_c.transpose(-2, -1)) * within).sum(
            -1, keepdim=True
        )
        outputs.append(numerator / normaliser.clamp_min(EPS))
        state = state + rk_c.transpose(-2, -1) @ v_c
        key_sum = key_sum + k_c.sum(-2, keepdim=True)
    return torch.cat(outputs, dim=-2)


def linear_attention_quadratic(phi_q, phi_k, v, rope=NO_ROPE, key_mask=None, causal=False):
    """The same formula evaluated directly with the T x T matrices: the reference for tests. O(T^2)."""
    if key_mask is not None:
        phi_k = phi_k * key_mask
    scores = rope.rotate(phi_q) @ rope.rotate(phi_k).transpose(-2, -1)  # (B, nh, T, T)
    normaliser = phi_q @ phi_k.transpose(-2, -1)
    if causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=v.device).tril()
        scores, normaliser = scores * keep, normaliser * keep
    return (scores @ v) / normaliser.sum(-1, keepdim=True).clamp_min(EPS)


class LinearMultiHeadAttention(MultiHeadAttention):
    """Self-attention with the paper's linear form; same projections (and weights) as softmax attention."""

    def __init__(self, cfg: ModelConfig, causal: bool = False):
        super().__init__(cfg)
        self.causal = causal
        self.feature_map = cfg.linear_feature_map
        if self.feature_map == "favor":
            self.register_buffer("projection", torch.randn(cfg.head_dim, cfg.head_dim))

    def phi(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        if self.feature_map == "favor":
            return favor_feature_map(x, self.projection, is_query)
        return elu_feature_map(x)

    def forward(self, x, mask=None, positions=NO_POSITIONS, context=None, cache=None, need_weights=False):
        if cache is not None or context is not None:
            raise NotImplementedError("linear attention is self-attention without a KV cache")
        if positions.bias is not None:  # ModelConfig refuses the combination; a score bias has no place here
            raise ValueError("linear attention forms no score matrix to add a position bias to")
        q, k, v = (self._heads(proj(x)) for proj in (self.query, self.key, self.value))
        # The linear form takes key padding and causality, not an arbitrary mask: a mask with one row per query
        # is a causal mask, and its last row (the query that sees every earlier key) is the padding.
        causal = self.causal or positions.causal or (mask is not None and mask.shape[-2] > 1)
        key_mask = None if mask is None else mask[..., -1:, :].transpose(-2, -1).to(v.dtype)  # (B, 1, T, 1)
        out = linear_attention(self.phi(q, True), self.phi(k, False), v, positions.rope, key_mask, causal)
        out = F.dropout(out, self.dropout if self.training else 0.0)
        return self.out(out.transpose(1, 2).flatten(2)), None


ATTENTION_KINDS = {"softmax": MultiHeadAttention, "linear": LinearMultiHeadAttention}
