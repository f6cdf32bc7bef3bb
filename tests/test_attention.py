"""Multi-head attention: SDPA against eager, attention weights, decoding with the KV cache, cross-attention without
positions. The kernels themselves, one by one against the eager reference: tests/test_kernels.py."""

import pytest
import torch
from attention_masks import MASKS, B, T, padding
from floats import assert_float32_close, model_terms
from torch.testing import assert_close

import roformer
from roformer.attention import MultiHeadAttention, eager_attention
from roformer.modeling import causal_mask, padding_mask
from roformer.positions import NO_POSITIONS, PositionContext, Rope, rope_cos_sin, rope_inv_freq

pytestmark = pytest.mark.usefixtures("single_thread")


def assert_same_values_and_grads(actual, expected, inputs):
    """Equal outputs, and equal gradients of the inputs for one random upstream gradient."""
    assert_close(actual, expected)
    grad = torch.randn_like(expected)
    for a, e in zip(torch.autograd.grad(actual, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        assert_close(a, e)


def _rope(length: int, head_dim: int = 8, pairing: str = "interleaved", offset: int = 0) -> PositionContext:
    cos, sin = rope_cos_sin(torch.arange(offset, offset + length), rope_inv_freq(head_dim), pairing)
    return PositionContext(Rope(cos, sin, pairing))


def _pair(tiny_config, **overrides) -> tuple[MultiHeadAttention, MultiHeadAttention]:
    sdpa = MultiHeadAttention(tiny_config(attention_impl="sdpa", **overrides)).eval()
    eager = MultiHeadAttention(tiny_config(attention_impl="eager", **overrides)).eval()
    eager.load_state_dict(sdpa.state_dict())
    return sdpa, eager


def test_causal_mask_layout():
    assert causal_mask(3, 3, torch.device("cpu"))[0, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    # 2 new queries after 3 cached keys: query i sits at position 3 + i
    assert causal_mask(2, 5, torch.device("cpu"))[0, 0].int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_padding_mask_is_none_withoutpadding():
    assert padding_mask(None) is None
    assert padding_mask(torch.ones(2, 4, dtype=torch.long)) is None
    assert padding_mask(padding()).shape == (B, 1, 1, T)


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("rotary", [False, True], ids=["no-rope", "rope"])
@pytest.mark.parametrize("rotary_value", [False, True], ids=["", "rotary_value"])
def test_sdpa_matches_eager(tiny_config, mask_name, rotary, rotary_value):
    sdpa, eager = _pair(tiny_config, rotary_value=rotary_value)
    x = torch.randn(B, T, 32)
    mask = MASKS[mask_name]()
    rope = _rope(T) if rotary else NO_POSITIONS
    expected, _ = eager(x, mask, rope)
    actual, weights = sdpa(x, mask, rope)
    assert weights is None  # the fused kernel has no weights to give unless asked
    assert_float32_close(actual, expected, terms=2 * 32 + 2 * T)  # projections in and out, scores and values


@pytest.mark.parametrize("position", ["rotary", "learned"])
def test_sdpa_and_eager_models_agree_on_padded_batches(tiny_config, position):
    sdpa = roformer.RoFormerForMaskedLM(tiny_config(position=position)).eval()
    eager = roformer.RoFormerForMaskedLM(tiny_config(position=position, attention_impl="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(1, 97, (B, T))
    with torch.no_grad():
        expected = eager(ids, padding()).logits
        assert_float32_close(sdpa(ids, padding()).logits, expected, model_terms(sdpa.config, T) + 32)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attention_weights_sum_to_one_over_unmasked_keys(tiny_config, impl):
    model = roformer.RoFormerModel(tiny_config(attention_impl=impl)).eval()
    attention_mask = padding()
    ids = torch.randint(1, 97, (B, T))
    with torch.no_grad():
        out = model(ids, attention_mask, output_attentions=True)
        plain = model(ids, attention_mask).last_hidden_state
    assert_close(out.last_hidden_state, plain)  # asking for the weights does not change the result
    assert len(out.attentions) == 2
    keys_masked = (attention_mask == 0)[:, None, None, :].expand(B, 4, T, T)
    for weights in out.attentions:
        assert weights.shape == (B, 4, T, T)
        assert torch.equal(weights[keys_masked], torch.zeros_like(weights[keys_masked]))
        assert_close(weights.sum(-1), torch.ones(B, 4, T))
        assert (weights[~keys_masked] > 0).all()


def test_attention_weights_respect_the_causal_mask(tiny_config):
    attn = MultiHeadAttention(tiny_config()).eval()
    out, weights = attn(torch.randn(B, T, 32), MASKS["padding+causal"](), _rope(T), need_weights=True)
    assert out.shape == (B, T, 32)
    future = ~torch.ones(T, T, dtype=torch.bool).tril()
    assert (weights[..., future] == 0).all()
    assert (weights[2, :, :, 2:] == 0).all()  # row 2 has two real tokens
    assert_close(weights.sum(-1), torch.ones(B, 4, T))


def test_eager_attention_is_softmax_of_scaled_scores():
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    out, weights = eager_attention(q, k, v, None, 0.0)
    expected = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1)
    assert_close(weights, expected)
    assert_close(out, expected @ v)


# --------------------------------------------------------------------------------------------------
# KV cache and decoding
# --------------------------------------------------------------------------------------------------


def _seq2seq(tiny_config, **overrides) -> roformer.RoFormerForSeq2SeqLM:
    return roformer.RoFormerForSeq2SeqLM(tiny_config(num_decoder_layers=2, **overrides)).eval()


SCHEMES = [dict(position=p) for p in roformer.POSITION_SCHEMES] + [
    dict(position="rotary", rotary_pairing="half"),
    dict(position="rotary", rotary_value=True),
    dict(position="rotary", attention_impl="eager"),
]


@pytest.mark.parametrize("overrides", SCHEMES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_incremental_decoding_matches_teacher_forcing(tiny_config, overrides):
    model = _seq2seq(tiny_config, **overrides)
    source = torch.randint(1, 97, (B, 7))
    source_mask = torch.ones_like(source)
    source_mask[1, 4:] = 0
    target = torch.randint(1, 97, (B, 8))
    with torch.no_grad():
        memory = model.encode(source, source_mask)
        expected = model.decode(target, memory, source_mask)
        assert expected.shape == (B, 8, 97)
        assert_close(model(source, source_mask, decoder_input_ids=target).logits, expected)

        caches = model.new_caches()
        prompt = model.decode(target[:, :3], memory, source_mask, caches)  # a prefix at once, then one by one
        steps = [model.decode(target[:, t : t + 1], memory, source_mask, caches) for t in range(3, 8)]
    terms = 2 * model_terms(model.config, 8) + 32  # encoder, decoder (cross-attention within the length), head
    assert_float32_close(torch.cat([prompt, *steps], dim=1), expected, terms)
    assert all(c.self_attn.length == 8 for c in caches)
    assert all(c.cross_attn.length == 7 for c in caches)  # the source's keys, computed once


def test_beams_decode_against_one_copy_of_the_source(tiny_config):
    """With the cache, K hypotheses per sentence may share a sentence's memory and cross-attention keys: the
    logits equal decoding every hypothesis against its own copy."""
    model, beams = _seq2seq(tiny_config), 3
    source = torch.randint(1, 97, (B, 7))
    source_mask = torch.ones_like(source)
    source_mask[1, 4:] = 0
    target = torch.randint(1, 97, (B * beams, 5))
    target[:, 0] = 1  # every hypothesis starts from the same BOS
    with torch.no_grad():
        memory = model.encode(source, source_mask)
        expected = model.decode(target, memory.repeat_interleave(beams, 0), source_mask.repeat_interleave(beams, 0))
        caches = model.new_caches()
        first = model.decode(target[::beams, :1], memory, source_mask, caches)  # one BOS step per sentence
        for cache in caches:
            cache.self_attn.reorder(torch.arange(B).repeat_interleave(beams))
        steps = [model.decode(target[:, t : t + 1], memory, source_mask, caches) for t in range(1, 5)]
    terms = 2 * model_terms(model.config, 7) + 32  # encoder, decoder (cross-attention within the length), head
    assert_float32_close(first, expected[::beams, :1], terms)
    assert_float32_close(torch.cat(steps, dim=1), expected[:, 1:], terms)
    assert all(c.cross_attn.key.shape[0] == B for c in caches)


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_decoding_depends_on_earlier_tokens_only(tiny_config, attention):
    """Changing a later target token leaves the logits at earlier positions unchanged (causal decoder)."""
    model = _seq2seq(tiny_config, attention=attention)
    source, target = torch.randint(1, 97, (B, 7)), torch.randint(1, 97, (B, 8))
    changed = target.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 97
    with torch.no_grad():
        a, b = model(source, decoder_input_ids=target).logits, model(source, decoder_input_ids=changed).logits
    assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_source_padding_is_invisible_to_the_decoder(tiny_config):
    model = _seq2seq(tiny_config)
    source, target = torch.randint(1, 97, (1, 7)), torch.randint(1, 97, (1, 5))
    padded = torch.cat((source, torch.zeros(1, 3, dtype=torch.long)), dim=1)
    mask = torch.cat((torch.ones(1, 7, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)), dim=1)
    with torch.no_grad():
        assert_float32_close(
            model(padded, mask, decoder_input_ids=target).logits,
            model(source, decoder_input_ids=target).logits,
            terms=2 * model_terms(model.config, 10) + 32,
        )


# --------------------------------------------------------------------------------------------------
# Cross-attention has no positions
# --------------------------------------------------------------------------------------------------


def test_cross_attention_ignores_rope(tiny_config):
    cross = MultiHeadAttention(tiny_config(rotary_value=True), cross=True).eval()
    x, context = torch.randn(B, T, 32), torch.randn(B, 5, 32)
    plain, _ = cross(x, context=context)
    rotated, _ = cross(x, positions=_rope(T, offset=11), context=context)
    assert_close(rotated, plain, atol=0, rtol=0)
    # control: the same weights as self-attention do change with the rotation
    self_attn = MultiHeadAttention(tiny_config()).eval()
    self_attn.load_state_dict(cross.state_dict())
    assert not torch.allclose(self_attn(x, positions=_rope(T, offset=11))[0], self_attn(x)[0], atol=1e-4)


def test_seq2seq_cross_attention_sees_the_memory_unrotated(tiny_config):
    """In a rotary seq2seq model, cross-attention output equals softmax attention with unrotated q, k."""
    model = _seq2seq(tiny_config)
    layer = model.decoder.layers[0]
    seen = {}
    layer.cross_attn.register_forward_hook(
        lambda mod, args, kwargs, out: seen.update(args=args, kwargs=kwargs, out=out), with_kwargs=True
    )
    source, target = torch.randint(1, 97, (1, 6)), torch.randint(1, 97, (1, 4))
    with torch.no_grad():
        model(source, decoder_input_ids=target)
        x, context = seen["args"][0], seen["kwargs"]["context"]
        attn = layer.cross_attn
        q, k, v = attn._heads(attn.query(x)), attn._heads(attn.key(context)), attn._heads(attn.value(context))
        expected = attn.out(torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, -1).matmul(v).transpose(1, 2).flatten(2))
    assert_float32_close(seen["out"][0], expected, terms=2 * 32 + 2 * 6)  # projections, scores and values
