"""Position schemes behind one registry: `rotary` (RoPE), `sinusoidal`, `learned`, `alibi`, `t5_relative`, `none`.

A scheme owns its facts, so nothing outside this module asks a scheme's name: how long a sequence it can take
(`max_length`), whether word embeddings are scaled by default, which RoPE scalings it accepts, which
transformers family it converts to (or why not), and what it requires of the rest of the config (`validate`).

At run time every scheme has the same entry points, so the models never branch on the scheme either:
- `add_to(embeddings, position_ids)`: additive schemes add their table, the others return the input;
- `context(position_ids, key_positions, causal)`: what attention does with positions in one forward pass, a
  `PositionContext` with two hooks: `rotate` q and k (RoPE; the identity otherwise) and an additive `bias` on
  the attention scores (ALiBi, T5's relative buckets; None otherwise).

RoPE (Su et al. 2021, eq. 34): each pair of head dims is rotated by m * theta_i, theta_i = base^(-2i/d).
`interleaved` pairs (x[2i], x[2i+1]) as in the paper and transformers' RoFormer; `half` pairs
(x[i], x[i + d/2]) as in Llama / GPT-NeoX. Angles, cos and sin are float32 whatever the model dtype; on a GPU
and in compiled graphs q and k are rotated in their own dtype (bf16 under autocast), the tables cast to it once
per forward pass (`Rope` says when and why).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

import torch
from torch import nn

from roformer.errors import ConfigError, SequenceTooLongError

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
    """The paper's efficient form x * cos + rotate(x) * sin, in x's dtype (cos and sin are cast to it).

    x: (B, nh, T, d); cos, sin: (T, d) or (B, T, d).
    """
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, d) broadcasts over heads
    return x * cos.to(x.dtype) + rotate_pairs(x, pairing) * sin.to(x.dtype)


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


def causal_mask(query_len: int, key_len: int, device: torch.device) -> torch.Tensor:
    """(1, 1, T_q, T_k) bool: query i (at position key_len - query_len + i) sees keys up to itself."""
    offset = key_len - query_len
    return torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril(offset)[None, None]


def with_causal(mask: torch.Tensor | None, query_len: int, key_len: int, device: torch.device) -> torch.Tensor:
    """`mask` (None or broadcasting to (B, nh, T_q, T_k)) and the causal mask together."""
    causal = causal_mask(query_len, key_len, device)
    return causal if mask is None else mask & causal


# --------------------------------------------------------------------------------------------------
# The cache handed to every attention layer
# --------------------------------------------------------------------------------------------------


@dataclass
class Rope:
    """cos/sin (float32) for the positions of one forward pass, built once and shared by every layer.

    Inside a torch.compile graph, and for bf16/fp16 q and k on a GPU, q and k turn in their own dtype by the real
    form, with cos and sin cast once per forward pass: no per-layer float32 copy of q and k, and elementwise maths
    the compiler fuses (the complex view breaks its graph at every layer). In bf16 each output is then a two-term
    sum of bf16 products: measured 0.23% mean / 0.64% max relative off the float32 rotation (rounding float32's
    result to bf16: 0.14% / 0.33%); tests/test_positions.py bounds it. Eager float32 anywhere, and any dtype in
    eager CPU work, take the float32 complex product (one kernel each way, interleaved pairs): in bf16 on the
    CPU, 8 ms against 19 ms for the real form (BERT-base q, 8 x 512, forward and backward).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    pairing: str
    rotation: torch.Tensor | None = None
    """Interleaved pairs only: the angles as complex numbers, built on first use and shared by every q and k."""
    cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """cos and sin cast to each other dtype asked for, once per forward pass: (T, d) or (B, 1, T, d)."""

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and (x.dtype == torch.float32 or x.device.type == "cpu"):
            return self._rotate_in_float32(x)
        if x.dtype not in self.cast:
            cos, sin = (self.cos, self.sin) if self.cos.dim() == 2 else (self.cos[:, None], self.sin[:, None])
            self.cast[x.dtype] = cos.to(x.dtype), sin.to(x.dtype)
        cos, sin = self.cast[x.dtype]
        return x * cos + rotate_pairs(x, self.pairing) * sin

    def _rotate_in_float32(self, x: torch.Tensor) -> torch.Tensor:
        if self.pairing != "interleaved":
            return apply_rope(x.float(), self.cos, self.sin, self.pairing).to(x.dtype)
        if self.rotation is None:
            self.rotation = complex_rotation(self.cos, self.sin)
        return rotate_as_complex(x, self.rotation)

    def select(self, index: torch.Tensor | range) -> Rope:
        """The angles of the positions in `index`: (B, M) for each sequence, giving (B, M, d) cos and sin; or (T,)
        (or a range) of a table of positions, giving (T, d)."""
        # a compiled graph rotates by the real form: no complex tensor in it (inductor cannot generate code for one)
        carry_rotation = self.rotation is not None and not torch.compiler.is_compiling()
        if isinstance(index, range):  # consecutive rows of the table: views, no gather
            rows = slice(index.start, index.stop)
            rotation = self.rotation[rows] if carry_rotation else None
            return Rope(self.cos[rows], self.sin[rows], self.pairing, rotation)
        if self.cos.dim() == 2:
            rotation = None
            if carry_rotation:  # built already: index it instead of building it again
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


@dataclass
class PositionContext:
    """What attention does with positions in one forward pass, built once and shared by every layer of a stack.

    Two hooks: `rotate` turns q and k (RoPE; the identity otherwise) and `bias`, when not None, is added to the
    scores q k^T / sqrt(d) before the softmax: (1 or B, nh, T_q, T_k), float32 (ALiBi, T5 relative buckets).
    `causal` (the decoder's self-attention): each query sees only the keys up to its own position. It travels as
    a flag, not a mask tensor, so that attention without other masking can ask SDPA for `is_causal`, which its
    flash kernels take.
    """

    rope: Rope | _NoRope = NO_ROPE
    bias: torch.Tensor | None = None
    causal: bool = False

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return self.rope.rotate(x)

    def select(self, index: torch.Tensor) -> PositionContext:
        """The context of the queries in `index` (B, M) only, against the same keys (their bias rows)."""
        if self.causal:  # the selected queries no longer line up with the last keys
            raise ValueError("the queries of a causal context cannot be selected")
        bias = self.bias
        if bias is not None and bias.shape[0] == 1:  # one bias for every sequence: (nh, B * M, T_k) rows of it
            # (index_select, not gather from an expanded view: its backward would zero a (B, nh, T, T) gradient)
            bias = bias[0].index_select(1, index.flatten()).unflatten(1, tuple(index.shape)).transpose(0, 1)
        elif bias is not None:
            bias = bias.gather(2, index[:, None, :, None].expand(-1, bias.shape[1], -1, bias.shape[-1]))
        return PositionContext(self.rope.select(index), bias)


NO_POSITIONS = PositionContext()
"""Cross-attention's context: positions live in each stream's self-attention, not across streams."""

Positions = torch.Tensor | range
"""Token positions: a tensor, (T,) or (B, T), or a `range` for the consecutive positions the model makes itself.
A range's extent is known on the host: a forward pass never waits on the GPU to learn how far its positions go."""


def positions_tensor(positions: Positions, device: torch.device) -> torch.Tensor:
    if isinstance(positions, range):
        return torch.arange(positions.start, positions.stop, device=device)
    return positions


def rows_needed(positions: Positions) -> int:
    """Table rows the positions reach (the largest + 1); read from the device only for explicit position tensors."""
    if isinstance(positions, range):
        return max(positions.stop, 0)
    return int(positions.max()) + 1 if positions.numel() else 0


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
    """Base: no additive table, no rotation, no score bias, no length limit. Built from the model config.

    Class attributes and class methods are the scheme's facts, asked of the config before any model exists.
    """

    name: ClassVar[str]
    scales_embeddings: ClassVar[bool] = False
    """Default of `model.scale_embeddings`: multiply word embeddings by sqrt(dim)."""
    rope_scalings: ClassVar[tuple[str, ...]] = ("none",)
    """The `model.rope_scaling` values this scheme accepts."""
    transformers_family: ClassVar[str | None] = None
    """The transformers family it converts to and from ('roformer', 'bert'), or None."""
    score_bias: ClassVar[bool] = False
    """Whether it adds a bias to attention scores (then it needs softmax attention)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()

    @classmethod
    def max_length(cls, cfg: ModelConfig) -> int | None:
        """The longest sequence a model of `cfg` can take; None: unbounded."""
        return None

    @classmethod
    def validate(cls, cfg: ModelConfig) -> None:
        """Raise ConfigError for a setting of `cfg` this scheme cannot honour."""
        if cfg.rope_scaling not in cls.rope_scalings:
            raise ConfigError(
                f"model.rope_scaling={cfg.rope_scaling!r} does not apply to model.position={cls.name!r}; "
                f"allowed: {' | '.join(cls.rope_scalings)}"
            )
        if cls.score_bias and cfg.attention != "softmax":
            raise ConfigError(
                f"model.position={cls.name!r} adds a bias to the attention scores, which model.attention="
                f"{cfg.attention!r} never forms; use attention=softmax, or a rotary, additive or no-position scheme"
            )

    @classmethod
    def transformers_problems(cls, cfg: ModelConfig) -> list[str]:
        """Why a model of `cfg` has no transformers equivalent; empty when it converts."""
        if cls.transformers_family is not None:
            return []
        convertible = ", ".join(
            f"{n} -> {c.transformers_family}" for n, c in POSITION_SCHEMES.items() if c.transformers_family
        )
        return [f"position={cls.name!r} has no transformers equivalent ({convertible})"]

    def add_to(self, embeddings: torch.Tensor, position_ids: Positions) -> torch.Tensor:
        return embeddings

    def rope(self, position_ids: Positions, device: torch.device | None = None) -> Rope | _NoRope:
        return NO_ROPE

    def bias(self, query_positions: Positions, key_positions: Positions, causal: bool) -> torch.Tensor | None:
        """The score bias of queries at `query_positions` against keys at `key_positions`, each (T,) or (B, T):
        (1 or B, nh, T_q, T_k), or None."""
        return None

    def context(
        self,
        position_ids: Positions,
        key_positions: Positions | None = None,
        causal: bool = False,
        device: torch.device | None = None,
    ) -> PositionContext:
        """The context of one forward pass whose tokens sit at `position_ids`. `key_positions`: the keys', when
        they differ (a decoding step also attends to cached keys); `causal`: the decoder's self-attention;
        `device`: where the tensors go when the positions are ranges."""
        keys = position_ids if key_positions is None else key_positions
        return PositionContext(self.rope(position_ids, device), self.bias(position_ids, keys, causal), causal)


class NoPositions(PositionScheme):
    """No position information at all: the baseline of the comparison."""

    name = "none"


class RotaryPositions(PositionScheme):
    """RoPE on q and k; nothing added to the embeddings; no maximum length."""

    name = "rotary"
    rope_scalings = ("none", "linear", "ntk", "dynamic_ntk", "yarn")
    transformers_family = "roformer"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.base = cfg.rope_base
        self.pairing = cfg.rotary_pairing
        self.scaling = cfg.rope_scaling
        self.factor = cfg.rope_scaling_factor
        self.original_max_len = cfg.max_position_embeddings
        self._table = GrowingTable(self._angle_table)  # not a buffer: never saved

    @classmethod
    def validate(cls, cfg: ModelConfig) -> None:
        super().validate(cfg)
        if cfg.head_dim % 2:
            raise ConfigError("model.position=rotary needs an even head size (hidden_size / num_heads)")

    @classmethod
    def transformers_problems(cls, cfg: ModelConfig) -> list[str]:
        problems = []
        if cfg.rotary_pairing != "interleaved":
            problems.append("transformers' RoFormer uses rotary_pairing='interleaved', this model 'half'")
        if cfg.rope_scaling != "none":
            problems.append("transformers' RoFormer has no RoPE scaling")
        if cfg.rope_base != 10000.0:
            problems.append("transformers' RoFormer fixes rope_base at 10000")
        return problems

    def rope(self, position_ids: Positions, device: torch.device | None = None) -> Rope:
        device = position_ids.device if isinstance(position_ids, torch.Tensor) else device
        seq_len = rows_needed(position_ids)
        if self.scaling == "dynamic_ntk" or seq_len == 0:  # frequencies that follow the length: no fixed table
            return self._angles(positions_tensor(position_ids, device), seq_len)
        return self._table.get(seq_len, device).select(position_ids)

    def _angle_table(self, rows: int, device: torch.device) -> Rope:
        table = self._angles(torch.arange(rows, device=device), rows)
        if self.pairing == "interleaved" and not torch.compiler.is_compiling():
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
    """Vaswani's fixed additive table, computed for whatever length comes.

    Scales word embeddings by sqrt(dim) by default, as Vaswani et al. do: the table has unit amplitude, and
    unscaled std-0.02 word embeddings drown under it after the embedding LayerNorm (docs/results.md section 1)."""

    name = "sinusoidal"
    scales_embeddings = True

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.dim = cfg.embedding_dim
        self._table = GrowingTable(self._build_table)  # not a buffer: never saved

    def add_to(self, embeddings: torch.Tensor, position_ids: Positions) -> torch.Tensor:
        table = self._table.get(rows_needed(position_ids), embeddings.device)
        rows = slice(position_ids.start, position_ids.stop) if isinstance(position_ids, range) else position_ids
        return embeddings + table[rows].to(embeddings.dtype)

    def _build_table(self, rows: int, device: torch.device) -> torch.Tensor:
        return sinusoidal_table(rows, self.dim).to(device)


class LearnedPositions(PositionScheme):
    """BERT's trained table of `max_position_embeddings` rows; a longer input is a clear error."""

    name = "learned"
    transformers_family = "bert"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.max_positions = cfg.max_position_embeddings
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.embedding_dim)
        self.unbounded = [name for name, scheme in POSITION_SCHEMES.items() if scheme.max_length(cfg) is None]

    @classmethod
    def max_length(cls, cfg: ModelConfig) -> int | None:
        return cfg.max_position_embeddings

    def add_to(self, embeddings: torch.Tensor, position_ids: Positions) -> torch.Tensor:
        longest = rows_needed(position_ids)
        if longest > self.max_positions:
            raise SequenceTooLongError(
                f"sequence of {longest} positions is longer than the learned position table "
                f"(model.max_position_embeddings={self.max_positions}); use at most {self.max_positions} tokens "
                f"or a scheme without a length limit ({', '.join(self.unbounded)})"
            )
        return embeddings + self.position_embeddings(positions_tensor(position_ids, embeddings.device))


def relative_bias(
    query_positions: Positions,
    key_positions: Positions,
    per_offset: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
) -> torch.Tensor:
    """A score bias that depends on key - query only: per_offset(offsets) maps offsets (...) to (..., nh) values.

    Positions (T,) or (B, T); returns (1 or B, nh, T_q, T_k). When both are runs of consecutive positions (every
    forward pass but one with explicit position ids), the bias is constant along diagonals: each of the
    T_q + T_k - 1 offsets is computed once and laid out as views, instead of T_q x T_k times (T5's buckets and
    their table's gradient cost a quarter of a CPU training step otherwise).
    """
    if _consecutive(query_positions) and _consecutive(key_positions):
        num_queries, num_keys = len(query_positions), len(key_positions)
        smallest = _first(key_positions) - (_first(query_positions) + num_queries - 1)  # last query vs first key
        offsets = torch.arange(smallest, smallest + num_queries + num_keys - 1, device=device)
        values = per_offset(offsets).t()  # (nh, T_q + T_k - 1)
        # windows[h, a, j] = values[h, a + j] is the offset of key j from query T_q - 1 - a: flip the queries
        return values.unfold(-1, num_keys, 1).flip(-2).unsqueeze(0)
    query_positions, key_positions = positions_tensor(query_positions, device), positions_tensor(key_positions, device)
    relative = key_positions.unsqueeze(-2) - query_positions.unsqueeze(-1)  # (T_q, T_k) or (B, T_q, T_k)
    bias = per_offset(relative).movedim(-1, -3)  # (..., nh, T_q, T_k)
    return bias.unsqueeze(0) if bias.dim() == 3 else bias


def _consecutive(positions: Positions) -> bool:
    if isinstance(positions, range):
        return positions.step == 1
    return positions.dim() == 1 and (len(positions) < 2 or bool((positions.diff() == 1).all()))


def _first(positions: Positions) -> int:
    return positions.start if isinstance(positions, range) else int(positions[0])


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Press et al. (2022): for n heads a power of two, the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8).
    Otherwise, as their code does: the slopes of the power of two just below n, then every other slope of twice
    that power for the rest. Returns (num_heads,) float64."""
    closest = 2 ** math.floor(math.log2(num_heads))

    def geometric(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    slopes = geometric(closest) + geometric(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float64)


class ALiBiPositions(PositionScheme):
    """ALiBi (Press et al. 2022): no embedding, a bias -m_h * distance on every head's attention scores.

    The decoder uses the paper's causal form, -m_h * (i - j) for keys j <= i. The bidirectional encoder uses the
    symmetric variant, -m_h * |i - j| for keys on either side, as MosaicBERT does: a query cannot tell a key
    before it from one after it at the same distance except through the content. No maximum length.
    """

    name = "alibi"
    score_bias = True

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.register_buffer("slopes", alibi_slopes(cfg.num_heads).float(), persistent=False)

    def bias(self, query_positions: torch.Tensor, key_positions: torch.Tensor, causal: bool) -> torch.Tensor:
        # |i - j| for both: under the causal mask, the keys a decoder query sees are j <= i, where they agree
        slopes = self.slopes
        return relative_bias(
            query_positions, key_positions, lambda offset: offset.abs().unsqueeze(-1) * -slopes, slopes.device
        )


def t5_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucket of each key - query offset (Raffel et al. 2020; transformers' `_relative_position_bucket`).

    Bidirectional: half the buckets for keys after the query, half for the others. Causal: every bucket for keys
    at or before the query (later keys share bucket 0, and the causal mask hides them). Within a direction, half
    the buckets are exact distances 0..max_exact-1, the rest logarithmically wider up to max_distance, beyond
    which all share the last bucket.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp_min(0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_ratio = torch.log(distance.float().clamp_min(1) / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp_max(num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class T5RelativePositions(PositionScheme):
    """T5's learned relative position bias: one scalar per head and bucket of key - query offsets, added to the
    scores of every layer of a stack (shared across layers, as in T5). The encoder's bias is bidirectional; an
    encoder-decoder has a second table for its decoder's causal self-attention, as T5 does. No maximum length:
    offsets past `relative_attention_max_distance` share the last bucket."""

    name = "t5_relative"
    score_bias = True

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.relative_attention_bias = nn.Embedding(self.num_buckets, cfg.num_heads)
        # only where there is a decoder: a parameter without gradient would upset distributed training
        self.decoder_relative_attention_bias = (
            nn.Embedding(self.num_buckets, cfg.num_heads) if cfg.num_decoder_layers else None
        )

    @classmethod
    def validate(cls, cfg: ModelConfig) -> None:
        super().validate(cfg)
        buckets, distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        if buckets < 4 or buckets % 2:
            raise ConfigError(
                f"model.relative_attention_num_buckets={buckets} must be even and at least 4 (half per direction, "
                "half of those exact)"
            )
        if distance <= buckets // 2:
            raise ConfigError(
                f"model.relative_attention_max_distance={distance} must exceed half of "
                f"model.relative_attention_num_buckets ({buckets // 2}), the exact distances"
            )

    def bias(self, query_positions: torch.Tensor, key_positions: torch.Tensor, causal: bool) -> torch.Tensor:
        table = self.decoder_relative_attention_bias if causal else self.relative_attention_bias
        if table is None:
            raise ValueError("this model has no decoder: no causal T5 relative bias table")
        return relative_bias(
            query_positions,
            key_positions,
            lambda offset: table(t5_bucket(offset, not causal, self.num_buckets, self.max_distance)).float(),
            table.weight.device,
        )


POSITION_SCHEMES: dict[str, type[PositionScheme]] = {
    scheme.name: scheme
    for scheme in (
        RotaryPositions,
        SinusoidalPositions,
        LearnedPositions,
        ALiBiPositions,
        T5RelativePositions,
        NoPositions,
    )
}


def scheme_class(name: str) -> type[PositionScheme]:
    """The scheme registered as `name`; a ConfigError naming the allowed ones otherwise."""
    if name not in POSITION_SCHEMES:
        raise ConfigError(f"model.position={name!r} is not allowed; expected {' | '.join(map(repr, POSITION_SCHEMES))}")
    return POSITION_SCHEMES[name]


def build_position_scheme(cfg: ModelConfig) -> PositionScheme:
    return scheme_class(cfg.position)(cfg)
