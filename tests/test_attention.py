"""Multi-head attention: SDPA against eager, attention weights, the KV cache, unrotated cross-attention."""

import pytest
import torch
from floats import assert_float32_close, model_terms
from torch.testing import assert_close

import roformer
import roformer.attention
from roformer.attention import (
    KVCache,
    MultiHeadAttention,
    chunked_attention,
    eager_attention,
    single_query_attention,
)
from roformer.dropout import drop_mask, dropout_attention
from roformer.modeling import causal_mask, combine_masks, padding_mask
from roformer.positions import NO_ROPE, Rope, rope_cos_sin, rope_inv_freq

pytestmark = pytest.mark.usefixtures("single_thread")

B, T = 3, 9


def _padding() -> torch.Tensor:
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, 6:] = 0
    attention_mask[2, 2:] = 0
    return attention_mask


MASKS = {
    "none": lambda: None,
    "padding": lambda: padding_mask(_padding()),
    "causal": lambda: causal_mask(T, T, torch.device("cpu")),
    "padding+causal": lambda: combine_masks(padding_mask(_padding()), causal_mask(T, T, torch.device("cpu"))),
}


def assert_same_values_and_grads(actual, expected, inputs):
    """Equal outputs, and equal gradients of the inputs for one random upstream gradient."""
    assert_close(actual, expected)
    grad = torch.randn_like(expected)
    for a, e in zip(torch.autograd.grad(actual, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        assert_close(a, e)


def _rope(length: int, head_dim: int = 8, pairing: str = "interleaved", offset: int = 0) -> Rope:
    cos, sin = rope_cos_sin(torch.arange(offset, offset + length), rope_inv_freq(head_dim), pairing)
    return Rope(cos, sin, pairing)


def _pair(tiny_config, **overrides) -> tuple[MultiHeadAttention, MultiHeadAttention]:
    sdpa = MultiHeadAttention(tiny_config(attention_impl="sdpa", **overrides)).eval()
    eager = MultiHeadAttention(tiny_config(attention_impl="eager", **overrides)).eval()
    eager.load_state_dict(sdpa.state_dict())
    return sdpa, eager


def test_causal_mask_layout():
    assert causal_mask(3, 3, torch.device("cpu"))[0, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    # 2 new queries after 3 cached keys: query i sits at position 3 + i
    assert causal_mask(2, 5, torch.device("cpu"))[0, 0].int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_padding_mask_is_none_without_padding():
    assert padding_mask(None) is None
    assert padding_mask(torch.ones(2, 4, dtype=torch.long)) is None
    assert padding_mask(_padding()).shape == (B, 1, 1, T)


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("rotary", [False, True], ids=["no-rope", "rope"])
@pytest.mark.parametrize("rotary_value", [False, True], ids=["", "rotary_value"])
def test_sdpa_matches_eager(tiny_config, mask_name, rotary, rotary_value):
    sdpa, eager = _pair(tiny_config, rotary_value=rotary_value)
    x = torch.randn(B, T, 32)
    mask = MASKS[mask_name]()
    rope = _rope(T) if rotary else NO_ROPE
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
        expected = eager(ids, _padding()).logits
        assert_float32_close(sdpa(ids, _padding()).logits, expected, model_terms(sdpa.config, T) + 32)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attention_weights_sum_to_one_over_unmasked_keys(tiny_config, impl):
    model = roformer.RoFormerModel(tiny_config(attention_impl=impl)).eval()
    attention_mask = _padding()
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


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("padded", [False, True])
def test_single_query_attention_equals_sdpa_on_repeated_keys(groups, padded):
    """One query per row; each row of keys serves `groups` consecutive query rows (the beams of one sentence)."""
    q = torch.randn(B * groups, 4, 1, 8)
    k, v = torch.randn(2, B, 4, T, 8).unbind(0)
    mask = padding_mask(_padding()) if padded else None
    expected = torch.nn.functional.scaled_dot_product_attention(
        q,
        k.repeat_interleave(groups, 0),
        v.repeat_interleave(groups, 0),
        attn_mask=None if mask is None else mask.repeat_interleave(groups, 0),
    )
    assert_close(single_query_attention(q, k, v, mask), expected)


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_chunked_attention_equals_sdpa(mask_name):
    q, k, v = (t.requires_grad_() for t in torch.randn(3, B, 4, T, 8).unbind(0))
    mask = MASKS[mask_name]()
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    actual = chunked_attention(q, k, v, mask, 0.0, chunk_size=4)  # 4 does not divide T = 9
    assert_same_values_and_grads(actual, expected, (q, k, v))


def test_chunked_attention_backward_replays_the_dropout_mask():
    """Recomputed in backward, each chunk must draw the dropout mask it drew in forward."""
    q, k, v = (t.requires_grad_() for t in torch.randn(3, B, 4, T, 8).unbind(0))
    mask = MASKS["padding"]()
    torch.manual_seed(5)
    actual = chunked_attention(q, k, v, mask, 0.5, chunk_size=4)
    grads = torch.autograd.grad(actual, (q, k, v), torch.ones_like(actual))
    torch.manual_seed(5)  # the same chunks without recomputation
    expected = torch.cat([dropout_attention(q[..., s : s + 4, :], k, v, mask, 0.5) for s in range(0, T, 4)], dim=-2)
    assert_close(actual, expected)
    for a, e in zip(grads, torch.autograd.grad(expected, (q, k, v), torch.ones_like(expected))):
        assert_close(a, e)


def test_long_cpu_training_with_dropout_attends_in_chunks(tiny_config, monkeypatch):
    calls = []
    monkeypatch.setattr(roformer.attention, "QUERY_CHUNK", 4)
    monkeypatch.setattr(roformer.attention, "chunked_attention", lambda *a: calls.append(a) or chunked_attention(*a))
    model = roformer.RoFormerForMaskedLM(tiny_config(attention_dropout=0.1))
    ids = torch.randint(1, 97, (B, T))
    model(ids, _padding()).logits.sum().backward()
    assert len(calls) == 2 and calls[0][-1] == 4  # every layer, in chunks of 4
    model.eval()
    model(ids)  # no dropout: the fused kernel
    with torch.no_grad():
        model.train()(ids)  # no backward to come: nothing to save
    assert len(calls) == 2


# --------------------------------------------------------------------------------------------------
# KV cache and decoding
# --------------------------------------------------------------------------------------------------


def test_kv_cache_appends_and_reorders():
    cache = KVCache()
    assert cache.length == 0
    k1, v1 = torch.randn(2, 2, 3, 1, 4).unbind(0)
    k2, v2 = torch.randn(2, 2, 3, 2, 4).unbind(0)
    cache.append(k1, v1)
    key, value = cache.append(k2, v2)
    assert cache.length == 3
    assert_close(key, torch.cat((k1, k2), dim=2))
    assert_close(value, torch.cat((v1, v2), dim=2))
    cache.reorder(torch.tensor([1, 1]))
    assert_close(cache.key[0], key[1])
    assert_close(cache.value[1], value[1])


def test_kv_cache_grows_and_reorders_in_its_buffers_like_concatenation():
    """Past its first capacity, through reorders into the spare buffer and a batch that shrinks, the cache holds
    what concatenating and index-selecting tensors would."""
    cache, key, value = KVCache(), torch.empty(4, 2, 0, 3), torch.empty(4, 2, 0, 3)
    gen = torch.Generator().manual_seed(0)
    for step in range(40):
        new_key, new_value = torch.randn(2, key.shape[0], 2, 1, 3, generator=gen).unbind(0)
        key, value = torch.cat((key, new_key), dim=2), torch.cat((value, new_value), dim=2)
        cached_key, cached_value = cache.append(new_key, new_value)
        assert torch.equal(cached_key, key) and torch.equal(cached_value, value)
        rows = torch.randint(0, key.shape[0], (key.shape[0] - (step == 30),), generator=gen)  # one row fewer once
        key, value = key[rows], value[rows]
        cache.reorder(rows)
        assert torch.equal(cache.key, key) and torch.equal(cache.value, value)
    assert cache.length == 40


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
# Cross-attention is not rotated
# --------------------------------------------------------------------------------------------------


def test_cross_attention_ignores_rope(tiny_config):
    cross = MultiHeadAttention(tiny_config(rotary_value=True), cross=True).eval()
    x, context = torch.randn(B, T, 32), torch.randn(B, 5, 32)
    plain, _ = cross(x, context=context)
    rotated, _ = cross(x, rope=_rope(T, offset=11), context=context)
    assert_close(rotated, plain, atol=0, rtol=0)
    # control: the same weights as self-attention do change with the rotation
    self_attn = MultiHeadAttention(tiny_config()).eval()
    self_attn.load_state_dict(cross.state_dict())
    assert not torch.allclose(self_attn(x, rope=_rope(T, offset=11))[0], self_attn(x)[0], atol=1e-4)


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


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_dropout_attention_is_sdpa_with_the_drawn_mask(mask_name):
    """Forward and the hand-written backward against autograd through the same maths and the same drop mask."""
    q, k, v = (t.double().requires_grad_() for t in torch.randn(3, B, 4, T, 8).unbind(0))
    mask = MASKS[mask_name]()
    torch.manual_seed(3)
    actual = dropout_attention(q, k, v, mask, 0.2)
    torch.manual_seed(3)
    drop, p = drop_mask((B, 4, T, T), 0.2, q.device)
    scores = q @ k.transpose(-2, -1) / 8**0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    expected = (torch.softmax(scores, dim=-1).masked_fill(drop, 0.0) / (1 - p)) @ v
    assert_same_values_and_grads(actual, expected, (q, k, v))


def test_dropout_attention_without_dropout_is_sdpa():
    q, k, v = (t.requires_grad_() for t in torch.randn(3, B, 4, T, 8).unbind(0))
    mask = MASKS["padding"]()
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    actual = dropout_attention(q, k, v, mask, 0.0)
    assert_same_values_and_grads(actual, expected, (q, k, v))


def test_drop_mask_rate_and_unbiased_output():
    torch.manual_seed(0)
    drop, p = drop_mask((1000, 1000), 0.1, torch.device("cpu"))
    assert abs(p - 0.1) < 1e-5  # quantised to 1/65536
    assert abs(drop.float().mean().item() - p) < 2e-3  # 1e6 draws: the standard error is 3e-4
    lanes = drop.view(-1, 4).float().mean(dim=0)  # each 16-bit quarter of a 64-bit draw, sign bit included
    assert (lanes - p).abs().max() < 4e-3, lanes
    v = torch.randn(1, 1, 64, 16)
    q, k = torch.zeros(1, 1, 2000, 16), torch.zeros(1, 1, 64, 16)  # uniform weights 1/64 over the keys
    out = dropout_attention(q, k, v, None, 0.1)
    assert_close(out.mean(dim=2), v.mean(dim=2), atol=0.02, rtol=0)  # the 1/(1-p) scaling keeps the mean


def test_training_on_cpu_uses_the_lean_dropout_attention(tiny_config, monkeypatch):
    calls = []
    monkeypatch.setattr(roformer.attention, "dropout_attention", lambda *a: calls.append(a) or a[0])
    attn = MultiHeadAttention(tiny_config(attention_dropout=0.1)).train()
    attn(torch.randn(B, T, 32))
    assert len(calls) == 1
    with torch.no_grad():
        attn(torch.randn(B, T, 32))  # inference: SDPA
    attn.eval()(torch.randn(B, T, 32))
    assert len(calls) == 1


def test_cpu_training_dropout_module():
    """roformer.dropout.Dropout: the same expectation as nn.Dropout, its mask reused by backward, identity in eval."""
    from roformer.dropout import Dropout

    layer = Dropout(0.25).train()
    x = torch.ones(200, 500, requires_grad=True)
    torch.manual_seed(1)
    out = layer(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    assert_close(out[kept], torch.full_like(out[kept], 1 / 0.75), rtol=1e-4, atol=0)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad != 0, kept)
    assert torch.equal(layer.eval()(x), x)
