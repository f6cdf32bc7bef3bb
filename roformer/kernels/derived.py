"""Tensors derived from parameters (a stacked or transposed weight), kept between inference calls.

Decoding runs the same layers once per generated token; rebuilding a stacked q/k/v weight or a transposed output
matrix at every step costs more than some of the products themselves. `derived` keeps the result until one of
its sources changes: moved to another device, reloaded, or updated in place by an optimizer (each bumps the
tensor's version counter or storage). With autograd on it always rebuilds, so gradients reach the sources, and
forgets what it kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def derived(owner: nn.Module, name: str, sources: tuple[torch.Tensor, ...], build: Callable[[], object]):
    """build(), from `sources`, cached on `owner` under `name` while autograd is off and the sources are unchanged."""
    if torch.is_grad_enabled():
        forget(owner, name)
        return build()
    stamp = tuple((t.data_ptr(), t._version) for t in sources)
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != stamp:
        cached = (stamp, build())
        object.__setattr__(owner, name, cached)  # a plain attribute: never a parameter, buffer or state_dict entry
    return cached[1]


def forget(owner: nn.Module, name: str) -> None:
    """Drop what `derived` kept under `name`: training makes it stale, so free its memory."""
    owner.__dict__.pop(name, None)
