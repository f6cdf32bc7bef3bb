"""CPU training: cheap dropout masks, a dropout module, and softmax attention with dropout in one function
(whole, or in chunks of queries recomputed in backward).

torch has no fused CPU kernel that applies attention dropout, so `scaled_dot_product_attention(dropout_p>0)`
falls back to composite maths: a "safe" softmax (three extra passes over the (B, nh, T_q, T_k) weights), a
Bernoulli draw per weight (a tenth of a BERT-base training step on CPU), a float mask multiply, and autograd
keeps the weights, the mask and the dropped weights for backward. Here the softmax is a plain one (every query
row has a real key), backward is written out with the same three saved tensors, and the mask comes from 16-bit
random integers (four per 64-bit draw), several times cheaper than Bernoulli floats. `Dropout` uses the same
masks for activations.

The drop probability is therefore quantised to 1/65536 (0.1 becomes 0.100006), the way fused GPU kernels
quantise it to 8 bits; outputs are scaled by 1/(1 - that probability), so expectations stay exact.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_LEVELS = 1 << 16


def drop_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A boolean mask, True (dropped) with probability p' = round(p * 65536) / 65536; returns it and p'.

    Each full-range 64-bit draw is cut into four 16-bit ones: a quarter of the generator calls."""
    count = math.prod(shape)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    draws = words.view(torch.int16)[:count].view(shape)
    threshold = round(p * _LEVELS)
    return draws < threshold - _LEVELS // 2, threshold / _LEVELS


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        drop, p_used = drop_mask(x.shape, p, x.device)
        ctx.save_for_backward(drop)
        ctx.keep_scale = 1.0 / (1.0 - p_used)
        return x.masked_fill(drop, 0.0).mul_(ctx.keep_scale)

    @staticmethod
    def backward(ctx, grad):
        (drop,) = ctx.saved_tensors
        return grad.masked_fill(drop, 0.0).mul_(ctx.keep_scale), None


class Dropout(nn.Dropout):
    """nn.Dropout, drawing its mask from 16-bit integers when training on CPU (torch's own kernel elsewhere, and
    inside a `torch.compile` graph, which fuses torch's dropout into its neighbours)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ours = x.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if self.training and self.p > 0 and ours:
            return _Dropout.apply(x, self.p)
        return super().forward(x)


class _DropoutAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, bias, p):
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = torch.matmul(q * scale, k.transpose(-2, -1))  # (B, nh, T_q, T_k)
        if bias is not None:
            scores.add_(bias.to(scores.dtype))
        if mask is not None:
            scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        del scores
        drop, p_used = drop_mask(probs.shape, p, probs.device)
        dropped = probs.masked_fill(drop, 0.0)
        ctx.scale, ctx.keep_scale = scale, 1.0 / (1.0 - p_used)
        ctx.bias_shape, ctx.bias_dtype = (bias.shape, bias.dtype) if bias is not None else (None, None)
        ctx.save_for_backward(q, k, v, probs, dropped, drop)  # keeping `dropped` beats redrawing it in backward
        return torch.matmul(dropped, v).mul_(ctx.keep_scale)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs, dropped, drop = ctx.saved_tensors
        grad_out = grad_out * ctx.keep_scale
        grad_v = torch.matmul(dropped.transpose(-2, -1), grad_out)
        grad_probs = torch.matmul(grad_out, v.transpose(-2, -1)).masked_fill_(drop, 0.0)
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        del grad_probs
        grad_bias = None
        if ctx.needs_input_grad[4]:  # a learned bias (T5's): summed over the rows it was broadcast to
            grad_bias = grad_scores.sum_to_size(ctx.bias_shape).to(ctx.bias_dtype)
        grad_q = torch.matmul(grad_scores, k).mul_(ctx.scale)
        grad_k = torch.matmul(grad_scores.transpose(-2, -1), q).mul_(ctx.scale)
        return grad_q, grad_k, grad_v, None, grad_bias, None


def dropout_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    dropout_p: float,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias, masked) with dropout, times v. Shapes as SDPA; `mask` is boolean, True =
    attend; `bias` float, broadcasting to the scores.

    Every query row must be allowed at least one key (true of padding masks, whose [CLS] is always real).
    """
    return _DropoutAttention.apply(q, k, v, mask, bias, dropout_p)


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    dropout_p: float,
    chunk_size: int,
) -> torch.Tensor:
    """`dropout_attention` over chunks of queries, each recomputed in backward instead of storing its weights.

    torch has no fused CPU kernel that applies attention dropout, and its fallback keeps every layer's
    (B, nh, T_q, T_k) weights and dropout mask for backward: 1.2 GB per layer at 8 heads x 4096 tokens. Here one
    chunk's (chunk_size, T_k) weights exist at a time, for the price of computing attention twice. The checkpoint
    replays the RNG state, so backward sees the dropout mask that forward drew.
    """

    def rows_of(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
        return t if t is None or t.shape[-2] == 1 else t[..., rows, :]

    outputs = []
    for start in range(0, q.shape[-2], chunk_size):
        rows = slice(start, start + chunk_size)
        args = (q[..., rows, :], k, v, rows_of(mask, rows), rows_of(bias, rows), dropout_p)
        outputs.append(checkpoint(dropout_attention, *args, use_reentrant=False))
    return torch.cat(outputs, dim=-2)
