"""Fast attention kernels, each equal to the reference `roformer.attention.eager_attention` (tests pin each one),
and the one selector that picks among them.

Every kernel takes the same arguments: q (B, nh, T_q, hs); k, v (B, nh, T_k, hs); a boolean `mask` (True where
a query may attend) and a float score `bias` (the position scheme's, added to q k^T / sqrt(hs)), each None or
broadcasting to (B, nh, T_q, T_k); and the attention-dropout probability. They return the (B, nh, T_q, hs)
output only: a caller that wants the weights gets the reference.

- `sdpa_attention`: torch's fused kernels, the bias and mask merged into one float mask;
- `dropout_attention` / `chunked_attention`: CPU training with attention dropout (`cpu_training`);
- `single_query_attention`: one new query per row while decoding, on CPU or with beams sharing a source
  (`decoding`, beside the time-major `KVCache` that it reads).

Beside them, `derived` keeps tensors built from parameters (the stacked q/k/v weight, a transposed output
matrix) between inference calls, and `cpu_training.Dropout` draws cheap dropout masks for activations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from roformer.kernels.cpu_training import Dropout, chunked_attention, drop_mask, dropout_attention
from roformer.kernels.decoding import KVCache, single_query_attention

QUERY_CHUNK = 512
"""Queries per chunk of `chunked_attention`, used when training on CPU with attention dropout past this length."""

Kernel = Callable[..., torch.Tensor]


def sdpa_attention(q, k, v, mask, bias, dropout_p: float) -> torch.Tensor:
    """torch's scaled_dot_product_attention; with a bias, one float mask holding the bias and the mask."""
    attn_mask = mask
    if bias is not None:
        attn_mask = bias.to(q.dtype)
        if mask is not None:
            attn_mask = torch.where(mask, attn_mask, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


def _chunked(q, k, v, mask, bias, dropout_p: float) -> torch.Tensor:
    return chunked_attention(q, k, v, mask, bias, dropout_p, QUERY_CHUNK)


def _single_query(q, k, v, mask, bias, dropout_p: float) -> torch.Tensor:
    return single_query_attention(q, k, v, mask, bias)  # no autograd, so no dropout: the caller is decoding


def select_kernel(q: torch.Tensor, k: torch.Tensor, dropout_p: float, impl: str, need_weights: bool) -> Kernel | None:
    """The kernel for this call, or None: the eager reference (asked for, or the weights are wanted)."""
    cpu = q.device.type == "cpu"
    decoding_step = q.shape[-2] == 1 and not need_weights and not torch.is_grad_enabled()
    if decoding_step and (cpu or q.shape[0] != k.shape[0]):  # CPU, or beams sharing a source
        return _single_query
    if impl == "eager" or need_weights:
        return None
    if dropout_p > 0 and cpu and torch.is_grad_enabled():  # torch has no fused CPU kernel here: ours is leaner
        return _chunked if q.shape[-2] > QUERY_CHUNK else dropout_attention
    return sdpa_attention


__all__ = [
    "QUERY_CHUNK",
    "Dropout",
    "KVCache",
    "chunked_attention",
    "drop_mask",
    "dropout_attention",
    "sdpa_attention",
    "select_kernel",
    "single_query_attention",
]
