"""RoPE invariants (paper sec. 3.2-3.4), context-extension scalings, and the additive tables."""

import math
import re
import typing
from pathlib import Path

import pytest
import torch
from floats import assert_float32_close, float32_atol, model_terms
from torch.testing import assert_close

import roformer
from roformer.config import load_config
from roformer.errors import ConfigError
from roformer.positions import (
    ALiBiPositions,
    Rope,
    RotaryPositions,
    alibi_slopes,
    apply_rope,
    rope_cos_sin,
    rope_inv_freq,
    rotate_pairs,
    scaled_inv_freq,
    sinusoidal_table,
    t5_bucket,
)

pytestmark = pytest.mark.usefixtures("single_thread")

PAIRINGS = ["interleaved", "half"]


def _rotated(x: torch.Tensor, positions: torch.Tensor, pairing: str, base: float = 10000.0) -> torch.Tensor:
    cos, sin = rope_cos_sin(positions, rope_inv_freq(x.shape[-1], base), pairing)
    return apply_rope(x, cos, sin, pairing)


def _half_order(head_dim: int) -> torch.Tensor:
    """Interleaved pair (2i, 2i+1) is half pair (i, i + d/2): the evens, then the odds."""
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


# --------------------------------------------------------------------------------------------------
# RoPE maths
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("base", [10000.0, 100.0])
def test_scores_depend_only_on_relative_position(pairing, base):
    """q and k the same vectors at every position: the score matrix q_m . k_n must be Toeplitz in (m, n)."""
    d, length = 16, 40
    q = torch.randn(d).expand(1, 1, length, d)
    k = torch.randn(d).expand(1, 1, length, d)
    positions = torch.arange(length)
    scores = (_rotated(q, positions, pairing, base) @ _rotated(k, positions, pairing, base).transpose(-2, -1))[0, 0]
    # d products summed, each of rotated entries (two products and a rounded cos/sin each): |q||k| bounds them
    atol = float32_atol(q[0, 0, 0].norm() * k[0, 0, 0].norm(), d + 4)
    for shift in (1, 5, 23):  # (m, n) against (m + s, n + s)
        assert_close(scores[shift:, shift:], scores[: length - shift, : length - shift], atol=atol, rtol=0)
    assert scores[0].std() > 0.1  # not vacuous: the score does vary with m - n


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_scores_at_far_positions_match_near_ones(pairing):
    """Random q, k; score at (m, n) equals the score at (m + s, n + s) for shifts up to 10^4."""
    d = 32
    q, k = torch.randn(2, 1, 1, 1, d).unbind(0)
    for m, n, s in [(3, 0, 1000), (0, 9, 777), (50, 50, 10000), (1, 200, 4096)]:
        score = (_rotated(q, torch.tensor([m]), pairing) * _rotated(k, torch.tensor([n]), pairing)).sum()
        shifted = (_rotated(q, torch.tensor([m + s]), pairing) * _rotated(k, torch.tensor([n + s]), pairing)).sum()
        assert_close(score, shifted, atol=float32_atol(q.norm() * k.norm(), d + 4), rtol=0)


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_rotation_preserves_norms(pairing):
    x = torch.randn(2, 3, 50, 16)
    rotated = _rotated(x, torch.arange(50) * 37, pairing)
    assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(rotated[..., 1:, :], x[..., 1:, :])  # it did rotate


def test_position_zero_is_identity():
    x = torch.randn(2, 3, 1, 16)
    for pairing in PAIRINGS:
        assert_close(_rotated(x, torch.tensor([0]), pairing), x)


def _paper_form(x, cos, sin, pairing):
    """x * cos + rotate(x) * sin, elementwise (paper eq. 34), as the reference for apply_rope's fast paths."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x.float() * cos + rotate_pairs(x.float(), pairing) * sin).to(x.dtype)


LAYOUTS = {
    "contiguous": lambda: torch.randn(2, 4, 10, 16),
    "heads-view": lambda: torch.randn(2, 10, 64).unflatten(-1, (4, 16)).transpose(1, 2),  # as attention makes q, k
    "odd-offset": lambda: torch.randn(2 * 4 * 10 * 16 + 1)[1:].view(2, 4, 10, 16),
    "strided": lambda: torch.randn(2, 4, 10, 32)[..., ::2],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("batched", [False, True], ids=["cos(T,d)", "cos(B,T,d)"])
def test_apply_rope_matches_the_paper_form_and_its_gradient(layout, pairing, batched):
    x = LAYOUTS[layout]().requires_grad_()
    positions = torch.randint(0, 1000, (2, 10)) if batched else torch.arange(10) * 7
    cos, sin = rope_cos_sin(positions, rope_inv_freq(16), pairing)
    out, expected = apply_rope(x, cos, sin, pairing), _paper_form(x, cos, sin, pairing)
    assert out.shape == x.shape
    assert_close(out, expected)
    grad = torch.randn_like(out)
    assert_close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])


def test_rotate_pairs_turns_each_pair_by_90_degrees():
    x = torch.arange(1.0, 9.0)
    assert rotate_pairs(x, "interleaved").tolist() == [-2, 1, -4, 3, -6, 5, -8, 7]
    assert rotate_pairs(x, "half").tolist() == [-5, -6, -7, -8, 1, 2, 3, 4]


def test_interleaved_equals_half_after_permuting_head_dims():
    d = 16
    order = _half_order(d)
    x = torch.randn(2, 3, 20, d)
    positions = torch.arange(20) * 3
    interleaved = _rotated(x, positions, "interleaved")
    half = _rotated(x[..., order], positions, "half")
    assert_close(interleaved[..., order], half)


def test_interleaved_and_half_models_agree_once_qk_weights_are_permuted(tiny_config):
    """The same maths up to a permutation of head dims: permuting each head's q/k projection rows makes a
    half-pairing model reproduce an interleaved one exactly (and they differ without the permutation)."""
    cfg = tiny_config()
    interleaved = roformer.RoFormerModel(cfg).eval()
    half = roformer.RoFormerModel(tiny_config(rotary_pairing="half")).eval()
    state = interleaved.state_dict()
    half.load_state_dict(state)
    ids = torch.randint(1, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        expected = interleaved(ids).last_hidden_state
        assert not torch.allclose(half(ids).last_hidden_state, expected, atol=1e-4)
        rows = torch.cat([h * cfg.head_dim + _half_order(cfg.head_dim) for h in range(cfg.num_heads)])
        for name, tensor in state.items():
            if ".attn.query." in name or ".attn.key." in name:
                state[name] = tensor[rows]
        half.load_state_dict(state)
        assert_float32_close(half(ids).last_hidden_state, expected, model_terms(cfg, 12))


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_score_is_the_complex_form_of_eq_16(pairing):
    """q_m . k_n = Re[sum_i h_i e^{i (m - n) theta_i}] with h_i = q_[i] conj(k_[i]) (paper eq. 16 and 35)."""
    d, m, n = 16, 17, 5
    order = _half_order(d) if pairing == "interleaved" else torch.arange(d)
    q, k = torch.randn(2, 1, 1, 1, d, dtype=torch.float64).unbind(0)
    score = (_rotated(q, torch.tensor([m]), pairing) * _rotated(k, torch.tensor([n]), pairing)).sum()
    qh, kh = q.flatten()[order], k.flatten()[order]  # real parts in the first half, imaginary in the second
    qc, kc = torch.complex(qh[: d // 2], qh[d // 2 :]), torch.complex(kh[: d // 2], kh[d // 2 :])
    expected = (qc * kc.conj() * torch.exp(1j * (m - n) * rope_inv_freq(d))).sum().real
    assert_close(score, expected)


def _relative_upper_bound(distances: torch.Tensor, d: int = 128, base: float = 10000.0) -> torch.Tensor:
    """(1 / (d/2)) * sum_{j=1}^{d/2} |S_j|, S_j = sum_{k<j} e^{i r theta_k} (paper sec. 3.4.3, Figure 2)."""
    theta = rope_inv_freq(d, base)
    partial_sums = torch.exp(1j * distances.double()[:, None] * theta[None]).cumsum(-1)  # S_1 .. S_{d/2}
    return partial_sums.abs().mean(-1)


def test_long_term_decay_of_the_upper_bound():
    """Figure 2: the bound decays as the relative distance grows (d = 128, base 10000)."""
    bound = _relative_upper_bound(torch.arange(0, 260))
    assert_close(bound[0].item(), (128 / 2 + 1) / 2)  # at distance 0 every |S_j| = j
    window_means = [bound[start : start + 11].mean() for start in (0, 50, 100, 150, 200)]
    assert all(a > b for a, b in zip(window_means, window_means[1:])), window_means
    assert window_means[0] > 2 * window_means[-1]


def test_upper_bound_holds_for_random_scores():
    """Abel summation: |q_m . k_n| <= max_i |h_{i+1} - h_i| * sum_j |S_j|, for every m - n."""
    d = 128
    order = _half_order(d)
    q, k = torch.randn(2, 1, 1, 1, d, dtype=torch.float64).unbind(0)
    qh, kh = q.flatten()[order], k.flatten()[order]
    h = torch.complex(qh[: d // 2], qh[d // 2 :]) * torch.complex(kh[: d // 2], kh[d // 2 :]).conj()
    steps = (torch.cat((h, h.new_zeros(1))).diff()).abs().max()  # h_{d/2} = 0
    distances = torch.arange(0, 300, 7)
    scores = (_rotated(q, distances, "interleaved") * _rotated(k, torch.tensor([0]), "interleaved")).sum(-1)
    assert (scores.flatten().abs() <= steps * _relative_upper_bound(distances) * (d / 2) + 1e-9).all()


def test_cos_sin_use_float64_angles():
    """m * theta_i must not be rounded to float32 before cos/sin: at m ~ 1e5 that would be off by ~1e-2."""
    inv_freq = rope_inv_freq(64)
    m = 100_003
    cos, sin = rope_cos_sin(torch.tensor([m]), inv_freq, "half")
    expected_cos = torch.tensor([math.cos(m * t) for t in inv_freq.tolist()] * 2, dtype=torch.float32)
    expected_sin = torch.tensor([math.sin(m * t) for t in inv_freq.tolist()] * 2, dtype=torch.float32)
    assert_close(cos[0], expected_cos, atol=1e-6, rtol=0)
    assert_close(sin[0], expected_sin, atol=1e-6, rtol=0)


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_cos_sin_layout(pairing):
    d = 8
    cos, _ = rope_cos_sin(torch.tensor([1]), rope_inv_freq(d), pairing)
    theta = [10000 ** (-2 * i / d) for i in range(d // 2)]
    per_dim = [t for t in theta for _ in (0, 1)] if pairing == "interleaved" else theta + theta
    assert_close(cos[0], torch.tensor([math.cos(t) for t in per_dim]))


def test_cos_sin_float32_and_apply_rope_keeps_dtype_and_shape_in_bfloat16(tiny_config):
    model = roformer.RoFormerModel(tiny_config()).to(torch.bfloat16)
    positions = torch.arange(10)
    rope = model.embeddings.positions.rope(positions)
    assert isinstance(rope, Rope)
    assert rope.cos.dtype == rope.sin.dtype == torch.float32
    assert rope.cos.shape == (10, 8)
    x = torch.randn(2, 4, 10, 8, dtype=torch.bfloat16)
    rotated = rope.rotate(x)
    assert rotated.dtype == torch.bfloat16 and rotated.shape == x.shape
    batched = model.embeddings.positions.rope(positions.expand(2, 10))  # per-row positions: (B, T, d)
    assert batched.cos.shape == (2, 10, 8) and batched.cos.dtype == torch.float32
    assert_close(batched.rotate(x), rotated)
    out = model(torch.randint(1, 97, (2, 10))).last_hidden_state
    assert out.dtype == torch.bfloat16 and out.shape == (2, 10, 32)


@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("batched", [False, True], ids=["cos(T,d)", "cos(B,T,d)"])
def test_bf16_rope_turns_in_bf16_within_a_stated_tolerance_of_float32(tiny_config, pairing, batched, monkeypatch):
    """On a GPU (or compiled), q and k in bf16 (autocast's output) are rotated in bf16, not upcast to float32 in
    every layer. Each output is x_a cos + x_b sin from bf16 operands: within a few bf16 steps (2^-8 relative) of
    the float32 rotation of the same bf16 input, at positions up to 4096, and its gradient likewise (measured:
    0.23% mean, 0.64% max relative). Reached on the CPU as a compiled graph reaches it."""
    upcasts = []
    monkeypatch.setattr(torch.Tensor, "float", lambda t: upcasts.append(t.dtype) or t.to(torch.float32))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    rotary = RotaryPositions(tiny_config(rotary_pairing=pairing, hidden_size=256, num_heads=4))  # head size 64
    positions = torch.randint(0, 4096, (2, 50)) if batched else torch.arange(4046, 4096)
    rope = rotary.rope(positions)
    x = torch.randn(2, 4, 50, 64).to(torch.bfloat16).requires_grad_()
    low = rope.rotate(x)
    assert low.dtype == torch.bfloat16 and torch.bfloat16 not in upcasts  # no float32 copy of q or k
    x32 = x.detach().float().requires_grad_()
    reference = rotary.rope(positions).rotate(x32)  # the float32 path
    for ours, exact in [(low, reference), *zip(torch.autograd.grad(low, x, grad := torch.randn_like(low)),
                                               torch.autograd.grad(reference, x32, grad.float()))]:  # fmt: skip
        error = (ours.float() - exact).abs()
        assert error.max() < 2**-6 * exact.abs().max() and error.mean() < 2**-8 * exact.abs().mean()


def test_bf16_rope_casts_its_tables_once_per_forward_pass(tiny_config, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as on a GPU
    rope = RotaryPositions(tiny_config()).rope(torch.arange(10))
    x = torch.randn(2, 4, 10, 8, dtype=torch.bfloat16)
    first = rope.rotate(x)
    cos = rope.cast[torch.bfloat16][0]
    assert_close(rope.rotate(x), first) and rope.cast[torch.bfloat16][0] is cos  # the layers share one cast
    assert cos.dtype == torch.bfloat16 and rope.cos.dtype == torch.float32  # the table itself stays float32


def test_float32_and_eager_cpu_rope_keep_the_complex_product(tiny_config, monkeypatch):
    """float32 anywhere, and bf16 in eager CPU work, turn interleaved pairs as float32 complex numbers: one kernel
    each way (on the CPU faster than bf16's elementwise maths)."""
    calls = []
    monkeypatch.setattr(roformer.positions, "rotate_as_complex", lambda *a: calls.append(a) or a[0])
    rope = RotaryPositions(tiny_config()).rope(torch.arange(10))
    rope.rotate(torch.randn(2, 4, 10, 8))
    rope.rotate(torch.randn(2, 4, 10, 8, dtype=torch.bfloat16))
    assert len(calls) == 2 and not rope.cast


# --------------------------------------------------------------------------------------------------
# Context extension
# --------------------------------------------------------------------------------------------------


def _rotary(tiny_config, scaling: str, factor: float, max_len: int = 64, **kw) -> RotaryPositions:
    return RotaryPositions(
        tiny_config(rope_scaling=scaling, rope_scaling_factor=factor, max_position_embeddings=max_len, **kw)
    )


@pytest.mark.parametrize("factor", [2.0, 4.0])
def test_linear_scaling_at_f_times_m_equals_unscaled_at_m(tiny_config, factor):
    scaled, plain = _rotary(tiny_config, "linear", factor), _rotary(tiny_config, "none", 1.0)
    positions = torch.arange(0, 40)
    a, b = scaled.rope(positions * int(factor)), plain.rope(positions)
    assert_close(a.cos, b.cos)
    assert_close(a.sin, b.sin)


@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("scaling", ["none", "yarn"])
def test_kept_angle_table_equals_computing_the_angles(tiny_config, pairing, scaling):
    """The scheme keeps a growing table of angles; every lookup, one position at a time as in decoding, a longer
    range that grows the table, or per-row ids, equals the angles computed for those positions."""
    rotary = RotaryPositions(tiny_config(rotary_pairing=pairing, rope_scaling=scaling, rope_scaling_factor=2.0))
    inv_freq, scale = scaled_inv_freq(rotary.head_dim, 10000.0, scaling, 2.0, rotary.original_max_len, 0)
    x = torch.randn(2, 4, 1, rotary.head_dim)
    for positions in [torch.arange(3), torch.tensor([3]), torch.tensor([4]), torch.arange(20), torch.tensor([[5, 1]])]:
        cos, sin = rope_cos_sin(positions, inv_freq, pairing, scale)
        rope = rotary.rope(positions)
        assert torch.equal(rope.cos, cos) and torch.equal(rope.sin, sin)
        rows = x.expand(-1, -1, positions.shape[-1], -1)
        assert_close(rope.rotate(rows), apply_rope(rows, cos, sin, pairing))


def test_scaling_factor_one_changes_nothing(tiny_config):
    positions = torch.arange(200)
    plain = _rotary(tiny_config, "none", 1.0).rope(positions)
    for scaling in ("linear", "ntk", "dynamic_ntk", "yarn"):
        rope = _rotary(tiny_config, scaling, 1.0).rope(positions)
        assert_close(rope.cos, plain.cos)
        assert_close(rope.sin, plain.sin)


@pytest.mark.parametrize("head_dim", [16, 64])
def test_ntk_keeps_the_highest_frequency_and_interpolates_the_lowest(head_dim):
    factor = 8.0
    plain, _ = scaled_inv_freq(head_dim, 10000.0, "none", 1.0, 512, 512)
    ntk, scale = scaled_inv_freq(head_dim, 10000.0, "ntk", factor, 512, 512)
    assert scale == 1.0
    assert ntk[0] == plain[0] == 1.0  # theta_0 = base^0, whatever the base
    assert_close(ntk[-1], plain[-1] / factor)  # base * f^(d/(d-2)) makes the lowest frequency exactly 1/f slower
    assert (ntk[1:] < plain[1:]).all() and (ntk[1:] > plain[1:] / factor - 1e-12).all()


def test_dynamic_ntk_unchanged_up_to_the_trained_length(tiny_config):
    rotary = _rotary(tiny_config, "dynamic_ntk", 4.0, max_len=64)
    plain = _rotary(tiny_config, "none", 1.0, max_len=64)
    within = torch.arange(64)
    assert_close(rotary.rope(within).cos, plain.rope(within).cos, atol=0, rtol=0)
    longer = torch.arange(256)
    cos_long, cos_plain = rotary.rope(longer).cos, plain.rope(longer).cos
    assert not torch.allclose(cos_long, cos_plain)
    assert_close(cos_long[:, :2], cos_plain[:, :2])  # interleaved dims 0, 1: theta_0 = 1 is never scaled
    inv_freq, scale = scaled_inv_freq(8, 10000.0, "dynamic_ntk", 4.0, 64, 256)
    grown = 4.0 * 256 / 64 - 3.0
    assert scale == 1.0
    assert_close(inv_freq[-1], rope_inv_freq(8)[-1] / grown)


def test_yarn_keeps_high_frequencies_interpolates_low_ones_and_scales_cos_sin():
    head_dim, factor, max_len = 64, 4.0, 512
    plain = rope_inv_freq(head_dim)
    yarn, scale = scaled_inv_freq(head_dim, 10000.0, "yarn", factor, max_len, max_len)
    assert scale == pytest.approx(0.1 * math.log(factor) + 1)
    # pairs that turn more than 32 times over the trained length are kept, fewer than once are interpolated
    turns = max_len * plain / (2 * math.pi)
    assert torch.equal(yarn[turns > 32], plain[turns > 32])
    assert_close(yarn[turns < 1], plain[turns < 1] / factor)
    assert (yarn <= plain).all() and (yarn >= plain / factor - 1e-15).all()
    assert (turns > 32).any() and (turns < 1).any()
    cos, sin = rope_cos_sin(torch.arange(3), yarn, "half", scale)
    assert_close(cos[0], torch.full((head_dim,), scale))
    assert_close(cos**2 + sin**2, torch.full_like(cos, scale**2))


# --------------------------------------------------------------------------------------------------
# Additive schemes
# --------------------------------------------------------------------------------------------------


def test_sinusoidal_table_matches_vaswani():
    table = sinusoidal_table(50, 16)
    assert table.shape == (50, 16) and table.dtype == torch.float32
    for m, i in [(0, 0), (1, 0), (7, 3), (49, 7), (33, 5)]:
        angle = m / 10000 ** (2 * i / 16)
        assert table[m, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert table[m, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_scheme_adds_the_table(tiny_config):
    scheme = roformer.POSITION_SCHEMES["sinusoidal"](tiny_config(embedding_size=24))
    x = torch.zeros(2, 30, 24)
    positions = torch.arange(30)
    assert_close(scheme.add_to(x, positions), sinusoidal_table(30, 24).expand(2, -1, -1))


def test_learned_positions_refuse_sequences_longer_than_the_table(tiny_config):
    model = roformer.RoFormerForMaskedLM(tiny_config(position="learned", max_position_embeddings=16))
    assert model(torch.randint(1, 97, (1, 16))).logits.shape == (1, 16, 97)
    with pytest.raises(roformer.SequenceTooLongError, match="max_position_embeddings=16"):
        model(torch.randint(1, 97, (1, 17)))
    with pytest.raises(roformer.SequenceTooLongError, match="rotary, sinusoidal, alibi, t5_relative, none"):
        model(torch.randint(1, 97, (1, 17)))


@pytest.mark.parametrize("position", ["rotary", "sinusoidal", "alibi", "t5_relative", "none"])
def test_other_schemes_have_no_maximum_length(tiny_config, position):
    model = roformer.RoFormerForMaskedLM(tiny_config(position=position, max_position_embeddings=16))
    assert model(torch.randint(1, 97, (1, 40))).logits.shape == (1, 40, 97)


def test_every_scheme_is_registered():
    assert set(roformer.POSITION_SCHEMES) == {"rotary", "sinusoidal", "learned", "alibi", "t5_relative", "none"}
    assert typing.get_args(typing.get_type_hints(roformer.ModelConfig)["position"]) == tuple(roformer.POSITION_SCHEMES)
    assert all(cls.name == name for name, cls in roformer.POSITION_SCHEMES.items())


# --------------------------------------------------------------------------------------------------
# A scheme owns its facts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", list(roformer.POSITION_SCHEMES))
def test_scheme_facts_reach_the_config(tiny_config, position):
    scheme = roformer.POSITION_SCHEMES[position]
    cfg = tiny_config(position=position)
    assert cfg.scale_embeddings == (position == "sinusoidal") == scheme.scales_embeddings
    assert scheme.max_length(cfg) == (64 if position == "learned" else None)
    assert ("yarn" in scheme.rope_scalings) == (position == "rotary")
    assert scheme.transformers_family == {"rotary": "roformer", "learned": "bert"}.get(position)
    assert scheme.score_bias == (position in ("alibi", "t5_relative"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(position="alibi", attention="linear"), "model.position='alibi' adds a bias to the attention scores"),
        (dict(position="t5_relative", attention="linear"), "attention=softmax"),
        (dict(position="learned", rope_scaling="yarn"), "model.rope_scaling='yarn' does not apply"),
        (dict(position="alibi", rope_scaling="linear"), "allowed: none"),
        (dict(position="t5_relative", relative_attention_num_buckets=7), "must be even and at least 4"),
        (dict(position="t5_relative", relative_attention_max_distance=16), "must exceed half"),
        (dict(position="rotary", hidden_size=36, num_heads=4), "even head size"),
    ],
)
def test_schemes_validate_the_config(tiny_config, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny_config(**overrides)


def test_the_config_names_the_registered_schemes():
    with pytest.raises(ConfigError, match="expected 'rotary' | 'sinusoidal' | 'learned' | 'alibi' | 't5_relative'"):
        load_config(None, ["model.position=xpos"])
    with pytest.raises(ConfigError, match=r"data.max_seq_length=128 is longer than model.position='learned' allows"):
        load_config(None, ["model.position=learned", "model.max_position_embeddings=64"])
    assert load_config(None, ["model.position=alibi", "model.max_position_embeddings=64"]).model.position == "alibi"


SCHEME_NAMES = "|".join(n for n in roformer.POSITION_SCHEMES if n != "none")  # "none" is also a scaling, a tracker
BRANCHING = [
    re.compile(r"\b\w*(position|scheme)\w*\s*(==|!=|\bin\b|\bnot in\b)\s*[\"'(\[{]"),  # position == "rotary"
    re.compile(rf"(==|!=)\s*[\"']({SCHEME_NAMES})[\"']|[\"']({SCHEME_NAMES})[\"']\s*(==|!=)"),  # x == "alibi"
    re.compile(rf"\bin\s*[(\[{{]\s*[\"']({SCHEME_NAMES})[\"']"),  # x in ("rotary", ...)
    re.compile(rf"[{{,]\s*[\"']({SCHEME_NAMES})[\"']\s*:"),  # {"rotary": ...}: a table keyed by a scheme's name
]


def _branches(line: str) -> bool:
    code = line.split("#")[0]
    return any(pattern.search(code) for pattern in BRANCHING)


def test_the_branching_patterns_catch_a_branch():
    branches = [
        'if cfg.position == "rotary":',
        "if model.position != 'learned':",
        'for s in scalings if scheme == "rotary" else ("none",):',
        'if name in ("alibi", "x"):',
        'FAMILY = {"rotary": "roformer", "learned": "bert"}',
        'ok = "learned" == kind',
    ]
    fine = ['if scaling == "none":', 'position: PositionName = "rotary"', 'x = 1  # position == "rotary"']
    assert [line for line in branches if not _branches(line)] == []
    assert [line for line in fine if _branches(line)] == []


def test_no_module_outside_positions_branches_on_a_scheme_name():
    """A scheme's facts live in its class: nothing else compares `position` (or a scheme) to a name."""
    package = Path(roformer.__file__).parent
    found = [
        f"{path.relative_to(package.parent)}:{number}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "positions.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _branches(line)
    ]
    assert not found, "\n".join(found)


# --------------------------------------------------------------------------------------------------
# Score-bias schemes: ALiBi and T5 relative buckets
# --------------------------------------------------------------------------------------------------


def test_alibi_slopes_are_the_papers():
    """Press et al.: 2^(-8/n * h) for h = 1..n heads; otherwise the power of two below, then every other slope of
    twice it (their reference code's rule)."""
    assert alibi_slopes(8).tolist() == [2.0**-h for h in range(1, 9)]  # 1/2, 1/4, ..., 1/256
    assert alibi_slopes(16).tolist() == pytest.approx([2.0 ** (-h / 2) for h in range(1, 17)])
    assert alibi_slopes(12).tolist() == pytest.approx(
        [2.0**-h for h in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]
    )
    assert alibi_slopes(6).tolist() == pytest.approx([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3])
    assert alibi_slopes(1).tolist() == [2.0**-8]


def test_alibi_bias_is_minus_slope_times_distance(tiny_config):
    scheme = ALiBiPositions(tiny_config(position="alibi"))  # 4 heads: slopes 1/4, 1/16, 1/64, 1/256
    positions = torch.arange(6)
    bias = scheme.bias(positions, positions, causal=False)
    assert bias.shape == (1, 4, 6, 6)
    for h, slope in enumerate([2**-2, 2**-4, 2**-6, 2**-8]):
        for i, j in [(0, 0), (0, 5), (5, 0), (2, 4), (4, 2)]:
            assert bias[0, h, i, j].item() == pytest.approx(-slope * abs(i - j))  # symmetric (MosaicBERT)
    # a decoding step: query at position 5 against keys 0..5; causal and symmetric agree on the keys it sees
    step = scheme.bias(positions[5:], positions, causal=True)
    assert_close(step, bias[:, :, 5:])
    # per-row positions give per-row biases
    assert scheme.bias(positions.expand(3, 6), positions.expand(3, 6), False).shape == (3, 4, 6, 6)


def _t5_bucket_reference(offset: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """T5's bucketing written out for one offset (key - query), as in Mesh TensorFlow's `_relative_position_bucket`."""
    bucket = 0
    n = -offset  # mesh-tf's convention: n = query - key
    if bidirectional:
        num_buckets //= 2
        if n < 0:
            bucket += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return bucket + min(large, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (8, 20), (4, 3)])
def test_t5_buckets_equal_a_plain_reimplementation(bidirectional, num_buckets, max_distance):
    offsets = torch.arange(-300, 301)
    buckets = t5_bucket(offsets, bidirectional, num_buckets, max_distance)
    expected = [_t5_bucket_reference(o, bidirectional, num_buckets, max_distance) for o in offsets.tolist()]
    assert buckets.tolist() == expected
    assert int(buckets.max()) == num_buckets - 1 and int(buckets.min()) == 0


def test_t5_bias_is_one_table_per_stack_shared_by_its_layers(tiny_config):
    mlm = roformer.RoFormerForMaskedLM(tiny_config(position="t5_relative"))
    tables = [name for name, _ in mlm.named_parameters() if "relative_attention_bias" in name]
    assert tables == ["roformer.embeddings.positions.relative_attention_bias.weight"]  # the encoder's only
    seq2seq = roformer.RoFormerForSeq2SeqLM(tiny_config(position="t5_relative", num_decoder_layers=2))
    tables = [name for name, _ in seq2seq.named_parameters() if "relative_attention_bias" in name]
    assert len(tables) == 2  # T5: the encoder's (bidirectional) and the decoder's (causal)
    scheme = seq2seq.embeddings.positions
    positions = torch.arange(5)
    encoder_bias = scheme.bias(positions, positions, causal=False)
    buckets = t5_bucket(positions[None, :] - positions[:, None], True, 32, 128)
    assert_close(encoder_bias[0], scheme.relative_attention_bias.weight[buckets].permute(2, 0, 1))
    decoder_bias = scheme.bias(positions, positions, causal=True)
    buckets = t5_bucket(positions[None, :] - positions[:, None], False, 32, 128)
    assert_close(decoder_bias[0], scheme.decoder_relative_attention_bias.weight[buckets].permute(2, 0, 1))


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["sdpa", "cpu-dropout-kernel"])
def test_t5_bias_learns_through_every_layer(tiny_config, dropout):
    """The table's gradient is the sum over layers: the same with the fast kernel as with the eager reference."""
    grads = {}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        model = roformer.RoFormerForMaskedLM(
            tiny_config(position="t5_relative", attention_impl=impl, attention_dropout=dropout, hidden_dropout=0.0)
        )
        ids = torch.randint(5, 97, (2, 12))
        labels = torch.where(torch.rand(2, 12) < 0.3, ids, -100)
        labels[:, 0] = ids[:, 0]
        torch.manual_seed(1)
        model(ids, labels=labels).loss.backward()
        grads[impl] = model.roformer.embeddings.positions.relative_attention_bias.weight.grad
    assert grads["sdpa"].abs().sum() > 0
    if dropout == 0.0:  # with dropout, the kernels draw their masks differently
        assert_close(grads["sdpa"], grads["eager"], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("position", ["alibi", "t5_relative"])
def test_score_bias_schemes_make_the_encoder_order_aware_without_embeddings(tiny_config, position):
    model = roformer.RoFormerModel(tiny_config(position=position)).eval()
    ids = torch.randint(5, 97, (1, 10))
    with torch.no_grad():
        plain = model(ids).last_hidden_state
        swapped = model(ids[:, [1, 0, *range(2, 10)]]).last_hidden_state
    assert not torch.allclose(plain[0, 5], swapped[0, 5], atol=1e-5)  # a token far from the swap still sees it


@pytest.mark.parametrize("position", ["alibi", "t5_relative"])
@pytest.mark.parametrize(("queries", "keys"), [((0, 9), (0, 9)), ((6, 9), (0, 9)), ((3, 4), (0, 4)), ((0, 1), (0, 1))])
def test_diagonal_layout_of_the_bias_equals_every_pair_computed(tiny_config, position, queries, keys):
    """Consecutive positions take the per-offset path (values laid out along diagonals); per-row positions compute
    every pair. Both must agree, values and gradients, for the encoder and the causal decoder."""
    scheme = roformer.POSITION_SCHEMES[position](tiny_config(position=position, num_decoder_layers=1))
    for p in scheme.parameters():
        torch.nn.init.normal_(p)
    q, k = torch.arange(*queries), torch.arange(*keys)
    for causal in (False, True):
        fast = scheme.bias(q, k, causal)
        every_pair = scheme.bias(q[None], k[None], causal)  # (1, T) rows: the general path
        assert fast.shape == every_pair.shape == (1, 4, len(q), len(k))
        assert_close(fast, every_pair, atol=0, rtol=0)
        grad = torch.randn_like(fast)
        params = list(scheme.parameters())
        if params:
            a = torch.autograd.grad(fast, params, grad, allow_unused=True)
            b = torch.autograd.grad(every_pair, params, grad, allow_unused=True)
            for x, y in zip(a, b):
                assert (x is None) == (y is None)
                if x is not None:
                    assert_close(x, y)
    scattered = torch.tensor([0, 2, 3, 7])  # not consecutive: every pair
    offset_5 = scheme.bias(torch.tensor([0]), torch.arange(6), False)[0, :, 0, 5]
    assert_close(scheme.bias(scattered, scattered, False)[0, :, 1, 3], offset_5)  # 7 - 2
