"""Fast attention kernels, each equal to the reference `roformer.attention.eager_attention` (tests pin each one),
and the one selector that picks among them.

Every kernel the selector returns takes the same arguments: q (B, nh, T_q, hs); k, v (B, nh, T_k, hs); a boolean
`mask` (True where a query may attend) and a float score `bias` (the position scheme's, added to q k^T / sqrt(hs)),
each None or broadcasting to (B, nh, T_q, T_k); the attention-dropout probability; and `causal`, True when each
query also sees only the keys up to its own position (the decoder's self-attention). They return the
(B, nh, T_q, hs) output only: a caller that wants the weights gets the reference.

- `sdpa_attention`: torch's fused kernels; causal attention with nothing else to mask passes `is_causal` and no
  mask (flash attention takes that, not a mask tensor), otherwise the bias and masks merge into one mask;
- `dropout_attention` / `chunked_attention`: CPU training with attention dropout (`cpu_training`);
- `single_query_attention`: one new query per row while decoding, on CPU or with beams sharing a source
  (`decoding`, beside the time-major `KVCache` that it reads).

The CPU-only kernels (the dropout ones, and `cpu_training.Dropout`'s autograd function) stay off CUDA and off
`torch.compile`'s graphs, where torch's fused kernels are the fast path; the decoding kernel runs without autograd
only, never in a training graph.

Beside them, `derived` keeps tensors built from parameters (the stacked q/k/v weight, a transposed output
matrix) between inference calls, and `cpu_training.Dropout` draws cheap dropout masks for activations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from roformer.kernels.cpu_training import Dropout, chunked_attention, drop_mask, dropout_attention
from roformer.kernels.decoding import KVCache, single_query_attention
from roformer.positions import with_causal

QUERY_CHUNK = 512
"""Queries per chunk of `chunked_attention`, used when training on CPU with attention dropout past this length."""

Kernel = Callable[..., torch.Tensor]


def sdpa_attention(q, k, v, mask, bias, dropout_p: float, causal: bool = False) -> torch.Tensor:
    """torch's scaled_dot_product_attention: `is_causal` when causality is the only mask, else one merged mask."""
    if causal and mask is None and bias is None and q.shape[-2] == k.shape[-2]:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    attn_mask = with_causal(mask, q.shape[-2], k.shape[-2], q.device) if causal else mask
    if bias is not None:
        bias = bias.to(q.dtype)
        attn_mask = bias if attn_mask is None else torch.where(attn_mask, bias, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


def _dropout(q, k, v, mask, bias, dropout_p: float, causal: bool = False) -> torch.Tensor:
    mask = with_causal(mask, q.shape[-2], k.shape[-2], q.device) if causal else mask
    if q.shape[-2] > QUERY_CHUNK:
        return chunked_attention(q, k, v, mask, bias, dropout_p, QUERY_CHUNK)
    return dropout_attention(q, k, v, mask, bias, dropout_p)


def _single_query(q, k, v, mask, bias, dropout_p: float, causal: bool = False) -> torch.Tensor:
    # no autograd, so no dropout: the caller is decoding; one query, the newest, sees every key: nothing causal
    return single_query_attention(q, k, v, mask, bias)


def select_kernel(q: torch.Tensor, k: torch.Tensor, dropout_p: float, impl: str, need_weights: bool) -> Kernel | None:
    """The kernel for this call, or None: the eager reference (asked for, or the weights are wanted)."""
    cpu = q.device.type == "cpu" and not torch.compiler.is_compiling()  # a compiled graph gets torch's kernels
    decoding_step = q.shape[-2] == 1 and not need_weights and not torch.is_grad_enabled()
    if decoding_step and (cpu or q.shape[0] != k.shape[0]):  # CPU, or beams sharing a source (SDPA cannot)
        return _single_query
    if impl == "eager" or need_weights:
        return None
    if dropout_p > 0 and cpu and torch.is_grad_enabled():  # torch has no fused CPU kernel here: ours is leaner
        return _dropout
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
