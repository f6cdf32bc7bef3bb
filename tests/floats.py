"""Tolerances float32 can promise, derived from the quantities compared instead of a fixed 1e-5.

Two computations of the same value that add its terms in different orders (another kernel, another batch shape,
a cache, another library) each land within (n - 1) * eps / 2 * sum|terms| of the exact sum of n terms (Higham,
Accuracy and Stability of Numerical Algorithms, sec. 4.2), so within (n - 1) * eps * sum|terms| of each other.
Through a network, n is the number of terms summed along the longest path of reductions and sum|terms| is
bounded by the largest magnitude that enters them."""

import torch
from torch.testing import assert_close

EPS = torch.finfo(torch.float32).eps  # 1.19e-7


def float32_atol(magnitude: float, terms: int) -> float:
    """How far two float32 evaluations of a sum of `terms` values of absolute sum `magnitude` may differ."""
    return max(terms - 1, 1) * EPS * float(magnitude)


def network_terms(layers: int, hidden: int, intermediate: int, length: int) -> int:
    """Terms summed along a forward pass through `layers` transformer layers on `length` tokens: per layer the
    q/k/v and output projections (hidden each), the attention scores (head_dim <= hidden), the weighted values
    (length) and the feed-forward (hidden, then intermediate)."""
    return layers * (3 * hidden + length + intermediate)


def model_terms(cfg, length: int) -> int:
    """network_terms for one of our ModelConfigs."""
    return network_terms(cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, length)


def assert_float32_close(actual: torch.Tensor, expected: torch.Tensor, terms: int, **kwargs) -> None:
    """actual == expected up to the float32 rounding of `terms`-term sums of values as large as expected's."""
    magnitude = expected.detach().abs().max() if expected.numel() else 0.0
    assert_close(actual, expected, atol=float32_atol(magnitude, terms), rtol=0, **kwargs)
