"""Linear attention with RoPE (paper sec. 3.3): the O(T) forms against the direct O(T^2) evaluation."""

import pytest
import torch
from floats import assert_float32_close
from torch.testing import assert_close

import roformer
from roformer.linear_attention import (
    LinearMultiHeadAttention,
    elu_feature_map,
    favor_feature_map,
    linear_attention,
    linear_attention_quadratic,
)
from roformer.modeling import causal_mask, padding_mask
from roformer.positions import NO_ROPE, PositionContext, Rope, RotaryPositions, rope_cos_sin, rope_inv_freq

pytestmark = pytest.mark.usefixtures("single_thread")

B, H, T, D = 2, 3, 13, 8


def _features(feature_map: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = torch.randn(3, B, H, T, D, dtype=torch.float64).unbind(0)
    if feature_map == "elu":
        return elu_feature_map(q), elu_feature_map(k), v
    projection = torch.randn(D, D, dtype=torch.float64)  # as many features as head dims, so RoPE can rotate them
    return favor_feature_map(q, projection, True), favor_feature_map(k, projection, False), v


def _rope(kind: str):
    if kind == "none":
        return NO_ROPE
    if kind == "module":  # the model's own scheme
        return RotaryPositions(roformer.ModelConfig(hidden_size=H * D, num_heads=H)).rope(torch.arange(T))
    cos, sin = rope_cos_sin(torch.arange(T), rope_inv_freq(D), kind)
    return Rope(cos.double(), sin.double(), kind)


def _key_mask(padded: bool):
    if not padded:
        return None
    mask = torch.ones(B, 1, T, 1, dtype=torch.float64)
    mask[1, :, 9:] = 0
    return mask


@pytest.mark.parametrize("feature_map", ["elu", "favor"])
@pytest.mark.parametrize("rope_kind", ["none", "interleaved", "half", "module"])
@pytest.mark.parametrize("padded", [False, True], ids=["", "padded"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_linear_equals_quadratic(feature_map, rope_kind, padded, causal):
    phi_q, phi_k, v = _features(feature_map)
    rope, key_mask = _rope(rope_kind), _key_mask(padded)
    expected = linear_attention_quadratic(phi_q, phi_k, v, rope, key_mask, causal)
    for chunk_size in (128, 5, 1):  # one chunk; a chunk size that does not divide T; token by token
        actual = linear_attention(phi_q, phi_k, v, rope, key_mask, causal, chunk_size=chunk_size)
        assert actual.shape == (B, H, T, D)
        assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_quadratic_reference_is_eq_19():
    """The reference itself, written out for one query: sum_n (R_m q)^T (R_n k_n) v_n / sum_n q^T k_n."""
    phi_q, phi_k, v = _features("elu")
    rope = _rope("interleaved")
    rq, rk = rope.rotate(phi_q), rope.rotate(phi_k)
    m = 6
    numerator = sum((rq[..., m, :] * rk[..., n, :]).sum(-1, keepdim=True) * v[..., n, :] for n in range(m + 1))
    normaliser = sum((phi_q[..., m, :] * phi_k[..., n, :]).sum(-1, keepdim=True) for n in range(m + 1))
    expected = numerator / normaliser
    assert_close(linear_attention_quadratic(phi_q, phi_k, v, rope, causal=True)[..., m, :], expected)


def test_padded_keys_have_no_influence():
    phi_q, phi_k, v = _features("elu")
    key_mask = _key_mask(True)
    changed_v, changed_k = v.clone(), phi_k.clone()
    changed_v[1, :, 9:] = 100.0
    changed_k[1, :, 9:] = 7.0
    a = linear_attention(phi_q, phi_k, v, _rope("half"), key_mask)
    b = linear_attention(phi_q, changed_k, changed_v, _rope("half"), key_mask)
    assert_close(a, b)


def test_causal_outputs_ignore_the_future():
    phi_q, phi_k, v = _features("elu")
    changed = v.clone()
    changed[..., 8:, :] += 1.0
    a = linear_attention(phi_q, phi_k, v, _rope("interleaved"), causal=True, chunk_size=5)
    b = linear_attention(phi_q, phi_k, changed, _rope("interleaved"), causal=True, chunk_size=5)
    assert_close(a[..., :8, :], b[..., :8, :])
    assert not torch.allclose(a[..., 8:, :], b[..., 8:, :])


def test_without_rope_rows_are_convex_combinations_of_values():
    """Unrotated, the numerator's weights are the normaliser's terms: each output lies within the values' range."""
    phi_q, phi_k, v = _features("favor")
    out = linear_attention(phi_q, phi_k, v)
    assert (out <= v.amax(-2, keepdim=True) + 1e-9).all() and (out >= v.amin(-2, keepdim=True) - 1e-9).all()


def test_feature_maps_are_positive():
    x = torch.randn(2, 3, 50, D) * 5
    assert (elu_feature_map(x) > 0).all()
    assert (favor_feature_map(x, torch.randn(16, D), True) > 0).all()
    assert (favor_feature_map(x, torch.randn(16, D), False) > 0).all()


def test_favor_approximates_softmax_kernel():
    """Performer's estimate exp(q.k / sqrt(d)) ~ phi(q).phi(k), up to the stabilising shifts that cancel in a ratio."""
    torch.manual_seed(1)
    d, m = 8, 20000
    q, k = torch.randn(1, 1, 4, d, dtype=torch.float64) * 0.5, torch.randn(1, 1, 6, d, dtype=torch.float64) * 0.5
    projection = torch.randn(m, d, dtype=torch.float64)
    phi_q, phi_k = favor_feature_map(q, projection, True), favor_feature_map(k, projection, False)
    estimate = phi_q @ phi_k.transpose(-2, -1)
    exact = torch.exp(q @ k.transpose(-2, -1) / d**0.5)
    # compare attention weights (row-normalised), where the per-row and global shifts cancel
    assert_close(estimate / estimate.sum(-1, keepdim=True), exact / exact.sum(-1, keepdim=True), atol=0.02, rtol=0.05)


@pytest.mark.parametrize("feature_map", ["elu", "favor"])
def test_module_matches_reference_with_padding(tiny_config, feature_map):
    attn = LinearMultiHeadAttention(tiny_config(attention="linear", linear_feature_map=feature_map)).eval()
    x = torch.randn(B, T, 32)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[0, 10:] = 0
    rope = RotaryPositions(tiny_config()).rope(torch.arange(T))
    out, weights = attn(x, padding_mask(attention_mask), PositionContext(rope))
    assert weights is None and out.shape == (B, T, 32)
    q, k, v = (attn._heads(proj(x)) for proj in (attn.query, attn.key, attn.value))
    key_mask = attention_mask[:, None, :, None].float()
    ref = linear_attention_quadratic(attn.phi(q, True), attn.phi(k, False), v, rope, key_mask)
    assert_float32_close(out, attn.out(ref.transpose(1, 2).flatten(2)), terms=2 * 32 + 2 * T)


def test_module_reads_a_causal_mask_as_causal(tiny_config):
    """The decoder hands its self-attention a causal mask; the linear form must apply it, not leak the future."""
    attn = LinearMultiHeadAttention(tiny_config(attention="linear")).eval()
    x = torch.randn(B, T, 32)
    rope = RotaryPositions(tiny_config()).rope(torch.arange(T))
    out, _ = attn(x, causal_mask(T, T, x.device), PositionContext(rope))
    q, k, v = (attn._heads(proj(x)) for proj in (attn.query, attn.key, attn.value))
    ref = linear_attention_quadratic(attn.phi(q, True), attn.phi(k, False), v, rope, causal=True)
    assert_float32_close(out, attn.out(ref.transpose(1, 2).flatten(2)), terms=2 * 32 + 2 * T)


def test_linear_attention_refuses_a_kv_cache(tiny_config):
    model = roformer.RoFormerForSeq2SeqLM(tiny_config(attention="linear", num_decoder_layers=1)).eval()
    memory = model.encode(torch.randint(1, 97, (1, 5)))
    with pytest.raises(NotImplementedError, match="KV cache"):
        model.decode(torch.randint(1, 97, (1, 1)), memory, caches=model.new_caches())


@pytest.mark.parametrize("position", ["alibi", "t5_relative"])
def test_linear_attention_refuses_score_bias_schemes(tiny_config, position):
    with pytest.raises(roformer.ConfigError, match=f"model.position='{position}' adds a bias to the attention scores"):
        tiny_config(attention="linear", position=position)
