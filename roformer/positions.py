"""Position schemes behind one registry: `rotary` (RoPE), `sinusoidal`, `learned`, `none`.

Every scheme has the same two entry points, so the encoder never branches on the scheme's name:
- `add_to(embeddings, position_ids)`: additive schemes add their table, the others return the input;
- `rope(position_ids, seq_len)`: rotary returns the cos/sin cache shared by all layers, the others the
  identity rotation `NO_ROPE`.

RoPE (Su et al. 2021, eq. 34): each pair of head dims is rotated by m * theta_i, theta_i = base^(-2i/d).
`interleaved` pairs (x[2i], x[2i+1]) as in the paper and transformers' RoFormer; `half` pairs
(x[i], x[i + d/2]) as in Llama / GPT-NeoX. Angles, cos and sin are float32 whatever the model dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import torch
from torch import nn

from roformer.errors import SequenceTooLongError

if TYPE_CHECKING:
    from roformer.config import ModelConfig

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# RoPE maths: pure functions
# --------------------------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """theta_i = base^(-2i/d) for i in [0, d/2). Returns (d/2,) float64 (cast where used)."""
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head dimension, got {head_dim}")
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def scaled_inv_freq(
    head_dim: int, base: float, scaling: str, factor: float, original_max_len: int, seq_len: int
) -> tuple[torch.Tensor, float]:
    """Frequencies under a context-extension scheme, and the attention scale YaRN applies to cos/sin.

    - `linear` (position interpolation, Chen et al. 2023): every position divided by `factor`;
    - `ntk` (NTK-aware, bloc97): base raised to base * factor^(d/(d-2));
    - `dynamic_ntk`: the NTK base chosen from the current length, unchanged up to `original_max_len`;
    - `yarn` (Peng et al. 2023): interpolate low frequencies, keep high ones, ramp between, and scale
      cos/sin by 0.1 ln(factor) + 1.
    """
    if scaling == "none" or factor == 1.0:
        return rope_inv_freq(head_dim, base), 1.0
    if scaling == "linear":
        return rope_inv_freq(head_dim, base) / factor, 1.0
    if scaling == "ntk":
        return rope_inv_freq(head_dim, base * factor ** (head_dim / (head_dim - 2))), 1.0
    if scaling == "dynamic_ntk":
        if seq_len <= original_max_len:
            return rope_inv_freq(head_dim, base), 1.0
        grown = (factor * seq_len / original_max_len) - (factor - 1)
        return rope_inv_freq(head_dim, base * grown ** (head_dim / (head_dim - 2))), 1.0
    if scaling == "yarn":
        beta_fast, beta_slow = 32.0, 1.0

        def dim_for_rotations(n: float) -> float:  # the pair index whose wavelength fits n turns in the context
            return (head_dim * math.log(original_max_len / (n * 2 * math.pi))) / (2 * math.log(base))

        low = max(math.floor(dim_for_rotations(beta_fast)), 0)
        high = min(math.ceil(dim_for_rotations(beta_slow)), head_dim - 1)
        extrapolated = rope_inv_freq(head_dim, base)
        interpolated = extrapolated / factor
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        keep = 1 - ramp  # 1: high frequency, kept as trained; 0: low frequency, interpolated
        return interpolated * (1 - keep) + extrapolated * keep, 0.1 * math.log(factor) + 1.0
    raise ValueError(f"unknown rope scaling {scaling!r}")


def rope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, pairing: str, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of m * theta_i laid out for `pairing`.

    position_ids: (T,) or (B, T). Returns two float32 tensors of shape (T, d) or (B, T, d).
    """
    # float64 angles where the device has it: m * theta_i loses digits in float32 at long lengths
    exact = torch.float64 if position_ids.device.type != "mps" else torch.float32
    angles = position_ids.to(exact).unsqueeze(-1) * inv_freq.to(position_ids.device, exact)  # (..., T, d/2)
    if pairing == "interleaved":
        angles = angles.repeat_interleave(2, dim=-1)  # theta_0, theta_0, theta_1, theta_1, ...
    else:
        angles = torch.cat((angles, angles), dim=-1)  # theta_0, ..., theta_{d/2-1}, theta_0, ...
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


def rotate_pairs(x: torch.Tensor, pairing: str) -> torch.Tensor:
    """The 90-degree turn of every pair: (a, b) -> (-b, a). x: (..., d)."""
    if pairing == "interleaved":
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairing: str) -> torch.Tensor:
    """The paper's efficient form x * cos + rotate(x) * sin, in float32, cast back to x's dtype.

    x: (B, nh, T, d); cos, sin: (T, d) or (B, T, d).
    """
    if pairing == "interleaved":
        return rotate_as_complex(x, complex_rotation(cos, sin))
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, d) broadcasts over heads
    x32 = x.float()
    return (x32 * cos + rotate_pairs(x32, pairing) * sin).to(x.dtype)


def complex_rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """e^{i m theta_j} for each interleaved pair: (T, d/2), or (B, 1, T, d/2) from per-row (B, T, d) angles."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcasts over heads
    return torch.complex(cos[..., 0::2], sin[..., 0::2])


def rotate_as_complex(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE as a complex product: adjacent pairs are complex numbers x[2j] + i x[2j+1]. One kernel
    forward and one backward instead of five (a tenth of a training step on CPU otherwise)."""
    x32 = x.float()
    if x32.stride(-1) != 1 or x32.storage_offset() % 2 or any(st % 2 for st in x32.stride()[:-1]):
        x32 = x32.clone(memory_format=torch.contiguous_format)  # a complex view needs whole pairs in memory
    pairs = torch.view_as_complex(x32.unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# The cache handed to every attention layer
# --------------------------------------------------------------------------------------------------


@dataclass
class Rope:
    """cos/sin for the positions of one forward pass, built once and shared by every layer."""

    cos: torch.Tensor
    sin: torch.Tensor
    pairing: str
    rotation: torch.Tensor | None = None
    """Interleaved pairs only: the angles as complex numbers, built on first use and shared by every q and k."""

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        if self.pairing != "interleaved":
            return apply_rope(x, self.cos, self.sin, self.pairing)
        if self.rotation is None:
            self.rotation = complex_rotation(self.cos, self.sin)
        return rotate_as_complex(x, self.rotation)

    def select(self, index: torch.Tensor) -> Rope:
        """The angles of the positions in `index`: (B, M) for each sequence, giving (B, M, d) cos and sin; or (T,)
        of a table of positions, giving (T, d)."""
        if self.cos.dim() == 2:
            rotation = None
            if self.rotation is not None:  # built already: index it instead of building it again
                rotation = self.rotation[index].unsqueeze(1) if index.dim() == 2 else self.rotation[index]
            return Rope(self.cos[index], self.sin[index], self.pairing, rotation)
        rows = index.unsqueeze(-1).expand(-1, -1, self.cos.shape[-1])
        return Rope(self.cos.gather(1, rows), self.sin.gather(1, rows), self.pairing)


class _NoRope:
    """Stands in when the scheme is not rotary (and for cross-attention): rotation is the identity."""

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def select(self, index: torch.Tensor) -> _NoRope:
        return self


NO_ROPE = _NoRope()


# --------------------------------------------------------------------------------------------------
# The schemes
# --------------------------------------------------------------------------------------------------


class GrowingTable(Generic[T]):
    """Rows 0..n-1 of a position table, kept between forward passes: decoding asks for one more position at every
    step, so a longer request rebuilds the table twice as long. `build(rows, device)` makes it."""

    def __init__(self, build: Callable[[int, torch.device], T]):
        self.build, self.rows, self.device, self.table = build, 0, None, None

    def get(self, needed: int, device: torch.device) -> T:
        if self.rows < needed:
            self.rows, self.table = max(needed, 2 * self.rows), None
        if self.table is None or self.device != device:
            self.table, self.device = self.build(self.rows, device), device
        return self.table


class PositionScheme(nn.Module):
    """Base: no additive table, no rotation. Every scheme is built from the model config."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()

    def add_to(self, embeddings: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return embeddings

    def rope(self, position_ids: torch.Tensor) -> Rope | _NoRope:
        return NO_ROPE


class NoPositions(PositionScheme):
    """No position information at all: the baseline of the comparison."""


class RotaryPositions(PositionScheme):
    """RoPE on q and k; nothing added to the embeddings; no maximum length."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.base = cfg.rope_base
        self.pairing = cfg.rotary_pairing
        self.scaling = cfg.rope_scaling
        self.factor = cfg.rope_scaling_factor
        self.original_max_len = cfg.max_position_embeddings
        self._table = GrowingTable(self._angle_table)  # not a buffer: never saved

    def rope(self, position_ids: torch.Tensor) -> Rope:
        seq_len = int(position_ids.max()) + 1 if position_ids.numel() else 0
        if self.scaling == "dynamic_ntk" or seq_len == 0:  # frequencies that follow the length: no fixed table
            return self._angles(position_ids, seq_len)
        return self._table.get(seq_len, position_ids.device).select(position_ids)

    def _angle_table(self, rows: int, device: torch.device) -> Rope:
        table = self._angles(torch.arange(rows, device=device), rows)
        if self.pairing == "interleaved":
            table.rotation = complex_rotation(table.cos, table.sin)  # built once, then indexed by every select
        return table

    def _angles(self, position_ids: torch.Tensor, seq_len: int) -> Rope:
        inv_freq, scale = scaled_inv_freq(
            self.head_dim, self.base, self.scaling, self.factor, self.original_max_len, seq_len
        )
        return Rope(*rope_cos_sin(position_ids, inv_freq, self.pairing, scale), self.pairing)


def sinusoidal_table(num_positions: int, dim: int) -> torch.Tensor:
    """Vaswani et al.: PE[m, 2i] = sin(m / 10000^(2i/dim)), PE[m, 2i+1] = cos(...). Returns (num_positions, dim)."""
    angles = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1) * rope_inv_freq(dim)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2).float()


class SinusoidalPositions(PositionScheme):
    """Vaswani's fixed additive table, computed for whatever length comes."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.dim = cfg.embedding_dim
        self._table = GrowingTable(self._build_table)  # not a buffer: never saved

    def add_to(self, embeddings: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        table = self._table.get(int(position_ids.max()) + 1, embeddings.device)
        return embeddings + table[position_ids].to(embeddings.dtype)

    def _build_table(self, rows: int, device: torch.device) -> torch.Tensor:
        return sinusoidal_table(rows, self.dim).to(device)


class LearnedPositions(PositionScheme):
    """BERT's trained table of `max_position_embeddings` rows; a longer input is a clear error."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.max_positions = cfg.max_position_embeddings
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.embedding_dim)

    def add_to(self, embeddings: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        longest = int(position_ids.max()) + 1
        if longest > self.max_positions:
            raise SequenceTooLongError(
                f"sequence of {longest} positions is longer than the learned position table "
                f"(model.max_position_embeddings={self.max_positions}); use at most {self.max_positions} tokens "
                "or a rotary/sinusoidal scheme"
            )
        return embeddings + self.position_embeddings(position_ids)


POSITION_SCHEMES: dict[str, type[PositionScheme]] = {
    "rotary": RotaryPositions,
    "sinusoidal": SinusoidalPositions,
    "learned": LearnedPositions,
    "none": NoPositions,
}


def build_position_scheme(cfg: ModelConfig) -> PositionScheme:
    return POSITION_SCHEMES[cfg.position](cfg)
