"""The fast kernels (roformer/kernels/), each against the eager reference `roformer.attention.eager_attention`:
forward and backward, with and without padding, with and without a position score bias; causal attention as
SDPA's is_causal; the KV cache against concatenation; and which kernel the selector picks (never a CPU-only one
off the CPU or under torch.compile)."""

import itertools

import pytest
import torch
from attention_masks import MASKS, B, T, padding
from torch.testing import assert_close

import roformer
import roformer.kernels
from roformer.attention import MultiHeadAttention, eager_attention
from roformer.kernels import (
    KVCache,
    chunked_attention,
    drop_mask,
    dropout_attention,
    sdpa_attention,
    select_kernel,
    single_query_attention,
)
from roformer.kernels.cpu_training import Dropout
from roformer.modeling import combine_masks, padding_mask
from roformer.positions import ALiBiPositions, T5RelativePositions, causal_mask

pytestmark = pytest.mark.usefixtures("single_thread")

H, D = 4, 8


def _t5_bias(causal: bool = False) -> torch.Tensor:
    scheme = T5RelativePositions(roformer.ModelConfig(hidden_size=H * D, num_heads=H, num_decoder_layers=1))
    torch.nn.init.normal_(scheme.relative_attention_bias.weight)
    torch.nn.init.normal_(scheme.decoder_relative_attention_bias.weight)
    return scheme.bias(torch.arange(T), torch.arange(T), causal).detach()


BIASES = {
    "no-bias": lambda: None,
    "alibi": lambda: ALiBiPositions(roformer.ModelConfig(hidden_size=H * D, num_heads=H)).bias(
        torch.arange(T), torch.arange(T), False
    ),
    "t5": lambda: _t5_bias().requires_grad_(),  # learned: its gradient must come back
    "per-row": lambda: torch.randn(B, H, T, T, requires_grad=True),
}


def _inputs(dtype=torch.float32):
    return [t.to(dtype).requires_grad_() for t in torch.randn(3, B, H, T, D).unbind(0)]


def assert_same_values_and_grads(actual, expected, inputs, **tolerances):
    """Equal outputs, and equal gradients of the inputs for one random upstream gradient."""
    assert_close(actual, expected, **tolerances)
    grad = torch.randn_like(expected)
    for a, e in zip(torch.autograd.grad(actual, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        assert_close(a, e, **tolerances)


def _grad_inputs(q, k, v, bias):
    return (q, k, v) + ((bias,) if bias is not None and bias.requires_grad else ())


KERNELS = {
    "sdpa": lambda q, k, v, mask, bias: sdpa_attention(q, k, v, mask, bias, 0.0),
    "dropout_attention": lambda q, k, v, mask, bias: dropout_attention(q, k, v, mask, bias, 0.0),
    "chunked": lambda q, k, v, mask, bias: chunked_attention(q, k, v, mask, bias, 0.0, chunk_size=4),  # 4 ∤ T
}


@pytest.mark.parametrize("bias_name", list(BIASES))
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernel_equals_eager_reference(kernel, mask_name, bias_name):
    q, k, v = _inputs()
    mask, bias = MASKS[mask_name](), BIASES[bias_name]()
    expected, _ = eager_attention(q, k, v, mask, 0.0, bias)
    actual = KERNELS[kernel](q, k, v, mask, bias)
    assert_same_values_and_grads(actual, expected, _grad_inputs(q, k, v, bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias_name", list(BIASES))
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_dropout_attention_is_the_reference_with_the_drawn_mask(mask_name, bias_name):
    """Forward and the hand-written backward against autograd through the same maths and the same drop mask."""
    q, k, v = _inputs(torch.float64)
    mask, bias = MASKS[mask_name](), BIASES[bias_name]()
    torch.manual_seed(3)
    actual = dropout_attention(q, k, v, mask, bias, 0.2)
    torch.manual_seed(3)
    drop, p = drop_mask((B, H, T, T), 0.2, q.device)
    scores = q @ k.transpose(-2, -1) / D**0.5
    if bias is not None:
        scores = scores + bias.double()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    expected = (torch.softmax(scores, dim=-1).masked_fill(drop, 0.0) / (1 - p)) @ v
    assert_same_values_and_grads(actual, expected, _grad_inputs(q, k, v, bias))


def test_chunked_attention_backward_replays_the_dropout_mask():
    """Recomputed in backward, each chunk must draw the dropout mask it drew in forward."""
    q, k, v = _inputs()
    mask, bias = MASKS["padding"](), BIASES["t5"]()
    torch.manual_seed(5)
    actual = chunked_attention(q, k, v, mask, bias, 0.5, chunk_size=4)
    grads = torch.autograd.grad(actual, (q, k, v, bias), torch.ones_like(actual))
    torch.manual_seed(5)  # the same chunks without recomputation
    chunks = [dropout_attention(q[..., s : s + 4, :], k, v, mask, bias[..., s : s + 4, :], 0.5) for s in range(0, T, 4)]
    expected = torch.cat(chunks, dim=-2)
    assert_close(actual, expected)
    for a, e in zip(grads, torch.autograd.grad(expected, (q, k, v, bias), torch.ones_like(expected))):
        assert_close(a, e)


@pytest.mark.parametrize("bias_name", ["no-bias", "alibi", "t5"])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("padded", [False, True])
def test_single_query_attention_equals_eager_on_repeated_keys(groups, padded, bias_name):
    """One query per row (the last position); each row of keys serves `groups` consecutive query rows (the beams
    of one sentence), with the bias of that last query against every key."""
    q = torch.randn(B * groups, H, 1, D)
    k, v = torch.randn(2, B, H, T, D).unbind(0)
    mask = padding_mask(padding()) if padded else None
    bias = BIASES[bias_name]()
    bias = None if bias is None else bias.detach()[..., -1:, :]  # (1, nh, 1, T)
    expected, _ = eager_attention(
        q,
        k.repeat_interleave(groups, 0),
        v.repeat_interleave(groups, 0),
        None if mask is None else mask.repeat_interleave(groups, 0),
        0.0,
        bias,
    )
    assert_close(single_query_attention(q, k, v, mask, bias), expected, atol=1e-6, rtol=1e-5)


def test_drop_mask_rate_and_unbiased_output():
    torch.manual_seed(0)
    drop, p = drop_mask((1000, 1000), 0.1, torch.device("cpu"))
    assert abs(p - 0.1) < 1e-5  # quantised to 1/65536
    assert abs(drop.float().mean().item() - p) < 2e-3  # 1e6 draws: the standard error is 3e-4
    lanes = drop.view(-1, 4).float().mean(dim=0)  # each 16-bit quarter of a 64-bit draw, sign bit included
    assert (lanes - p).abs().max() < 4e-3, lanes
    v = torch.randn(1, 1, 64, 16)
    q, k = torch.zeros(1, 1, 2000, 16), torch.zeros(1, 1, 64, 16)  # uniform weights 1/64 over the keys
    out = dropout_attention(q, k, v, None, None, 0.1)
    assert_close(out.mean(dim=2), v.mean(dim=2), atol=0.02, rtol=0)  # the 1/(1-p) scaling keeps the mean


def test_cpu_training_dropout_module():
    """kernels.Dropout: the same expectation as nn.Dropout, its mask reused by backward, identity in eval."""
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


# --------------------------------------------------------------------------------------------------
# KV cache
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


# --------------------------------------------------------------------------------------------------
# The selector
# --------------------------------------------------------------------------------------------------


def test_selector_picks_each_kernel_where_it_applies():
    q, k = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    step = torch.randn(B * 4, H, 1, D)  # one query per hypothesis, 4 beams per source row
    assert select_kernel(q, k, 0.0, "sdpa", need_weights=False) is sdpa_attention
    assert select_kernel(q, k, 0.0, "eager", need_weights=False) is None  # the reference
    assert select_kernel(q, k, 0.0, "sdpa", need_weights=True) is None  # only the reference gives the weights
    assert select_kernel(q, k, 0.1, "sdpa", need_weights=False) is roformer.kernels._dropout  # CPU training
    with torch.no_grad():
        assert select_kernel(q, k, 0.1, "sdpa", need_weights=False) is sdpa_attention  # nothing to save for backward
        assert select_kernel(step, k, 0.0, "sdpa", need_weights=False) is roformer.kernels._single_query
        assert select_kernel(step, k, 0.0, "eager", need_weights=False) is roformer.kernels._single_query
    assert select_kernel(step, k, 0.0, "sdpa", need_weights=False) is sdpa_attention  # training never decodes


def test_long_cpu_training_with_dropout_attends_in_chunks(tiny_config, monkeypatch):
    calls = []
    monkeypatch.setattr(roformer.kernels, "QUERY_CHUNK", 4)
    monkeypatch.setattr(roformer.kernels, "chunked_attention", lambda *a: calls.append(a) or chunked_attention(*a))
    model = roformer.RoFormerForMaskedLM(tiny_config(attention_dropout=0.1))
    ids = torch.randint(1, 97, (B, T))
    model(ids, padding()).logits.sum().backward()
    assert len(calls) == 2 and calls[0][-1] == 4  # every layer, in chunks of 4
    model.eval()
    model(ids)  # no dropout: the fused kernel
    with torch.no_grad():
        model.train()(ids)  # no backward to come: nothing to save
    assert len(calls) == 2


def test_training_on_cpu_uses_the_lean_dropout_attention(tiny_config, monkeypatch):
    calls = []
    monkeypatch.setattr(roformer.kernels, "dropout_attention", lambda *a: calls.append(a) or a[0])
    attn = MultiHeadAttention(tiny_config(attention_dropout=0.1)).train()
    attn(torch.randn(B, T, 32))
    assert len(calls) == 1
    with torch.no_grad():
        attn(torch.randn(B, T, 32))  # inference: SDPA
    attn.eval()(torch.randn(B, T, 32))
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------------
# Causal attention: SDPA's is_causal, without a mask tensor
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["sdpa", "dropout"])
@pytest.mark.parametrize("mask_name", ["none", "padding"])
def test_causal_kernels_equal_the_reference_with_the_causal_mask(kernel, mask_name):
    q, k, v = _inputs()
    mask = MASKS[mask_name]()
    expected, _ = eager_attention(q, k, v, combine_masks(mask, causal_mask(T, T, q.device)), 0.0)
    chosen = sdpa_attention if kernel == "sdpa" else roformer.kernels._dropout
    assert_same_values_and_grads(chosen(q, k, v, mask, None, 0.0, True), expected, (q, k, v), atol=1e-5, rtol=1e-5)


def test_causal_attention_alone_asks_sdpa_for_is_causal_and_passes_no_mask(monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **kw: calls.append(kw) or sdpa(*a, **kw)
    )
    q, k, v = _inputs()
    sdpa_attention(q, k, v, None, None, 0.0, causal=True)
    assert calls[-1].get("is_causal") is True and calls[-1].get("attn_mask") is None  # flash attention's form
    sdpa_attention(q, k, v, padding_mask(padding()), None, 0.0, causal=True)  # padding too: one merged mask
    assert not calls[-1].get("is_causal") and calls[-1]["attn_mask"].shape == (B, 1, T, T)
    sdpa_attention(q[..., -3:, :], k, v, None, None, 0.0, causal=True)  # queries after cached keys: not top-left
    assert not calls[-1].get("is_causal") and calls[-1]["attn_mask"].shape == (1, 1, 3, T)


def _seq2seq_batch(padded: bool):
    """A source batch (left-aligned, padded at the end) and right-padded targets whose pad labels are -100."""
    ids, targets = torch.randint(4, 97, (B, 11)), torch.randint(4, 97, (B, 7))
    attention_mask, labels = torch.ones_like(ids), targets.clone()
    if padded:
        attention_mask[1, 7:], attention_mask[2, 3:] = 0, 0
        ids[attention_mask == 0] = 0
        labels[1, 4:], labels[2, 2:] = -100, -100
        targets[labels == -100] = 0  # pad tokens as decoder inputs past the end
    return ids, attention_mask, targets, labels


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("position", ["rotary", "sinusoidal", "learned", "none", "alibi", "t5_relative"])
def test_the_decoder_equals_its_explicit_mask_reference(tiny_config, position, padded, monkeypatch):
    """The decoder's self-attention runs as SDPA `is_causal` where nothing else masks it (the score-bias schemes
    merge the causal mask with their bias): the same loss, logits and gradients as the eager reference with the
    causal mask written out (float32, CPU)."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **kw: calls.append(kw) or sdpa(*a, **kw)
    )
    cfg = tiny_config(
        position=position, num_decoder_layers=2, type_vocab_size=0, hidden_dropout=0.0, attention_dropout=0.0
    )
    fast = roformer.RoFormerForSeq2SeqLM(cfg).train()
    reference = roformer.RoFormerForSeq2SeqLM(tiny_config(**{**vars(cfg), "attention_impl": "eager"})).train()
    reference.load_state_dict(fast.state_dict())
    ids, attention_mask, targets, labels = _seq2seq_batch(padded)
    outs = [m(ids, attention_mask, targets, labels) for m in (fast, reference)]
    assert_close(outs[0].logits, outs[1].logits, atol=1e-5, rtol=1e-5)
    assert_close(outs[0].loss, outs[1].loss, atol=1e-6, rtol=1e-6)
    for a, e in zip(torch.autograd.grad(outs[0].loss, list(fast.parameters()), allow_unused=True),
                    torch.autograd.grad(outs[1].loss, list(reference.parameters()), allow_unused=True)):  # fmt: skip
        assert (a is None) == (e is None)
        if a is not None:
            assert_close(a, e, atol=1e-5, rtol=1e-4)
    is_causal = [kw.get("is_causal", False) for kw in calls]
    assert is_causal.count(True) == (0 if position in ("alibi", "t5_relative") else 2)  # each decoder layer once


@pytest.mark.parametrize("kind", ["sdpa", "eager", "linear", "alibi", "t5_relative"])
def test_the_decoder_never_sees_later_target_tokens(tiny_config, kind):
    """Causality travels as a flag of the decoder's position context, not a mask tensor: every attention path
    (SDPA's is_causal, the eager reference, linear attention's causal form, a score bias merged with the causal
    mask: alibi, t5_relative) honours it."""
    settings = {"sdpa": {}, "eager": {"attention_impl": "eager"}, "linear": {"attention": "linear"}}
    extra = settings.get(kind, {"position": kind})
    model = roformer.RoFormerForSeq2SeqLM(tiny_config(num_decoder_layers=2, type_vocab_size=0, **extra)).eval()
    ids, targets = torch.randint(4, 97, (B, 8)), torch.randint(4, 97, (B, 7))
    changed = targets.clone()
    changed[:, 4:] = torch.randint(4, 97, (B, 3))
    with torch.no_grad():
        before, after = model(ids, None, targets).logits, model(ids, None, changed).logits
    assert_close(before[:, :4], after[:, :4])  # positions 0-3 never saw 4-6
    assert not torch.allclose(before[:, 4:], after[:, 4:])


def test_right_padded_targets_need_no_key_padding_in_the_decoder():
    """Why the decoder drops the target padding mask: with pads only at the end, a real query's causal window holds
    real keys only, so adding key padding changes nothing at the real positions (pad rows carry no loss)."""
    q, k, v = _inputs()
    real = torch.ones(B, T, dtype=torch.long)
    real[1, 5:], real[2, 1:] = 0, 0
    causal = causal_mask(T, T, q.device)
    with_padding, _ = eager_attention(q, k, v, combine_masks(causal, padding_mask(real)), 0.0)
    causal_only = sdpa_attention(q, k, v, None, None, 0.0, causal=True)
    rows = real.bool()[:, None, :, None].expand_as(causal_only)
    assert_close(causal_only[rows], with_padding[rows], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# The CPU-only kernels stay off CUDA and off torch.compile
# --------------------------------------------------------------------------------------------------


def test_the_cpu_only_kernels_are_never_chosen_off_the_cpu():
    """`meta` stands in for a CUDA device: the selector reads only the device type, which is not "cpu"."""
    meta = torch.device("meta")
    q, k = torch.empty(B, H, T, D, device=meta), torch.empty(B, H, T, D, device=meta)
    assert select_kernel(q, k, 0.1, "sdpa", need_weights=False) is sdpa_attention  # training with dropout
    with torch.no_grad():
        step = torch.empty(B, H, 1, D, device=meta)
        assert select_kernel(step, k, 0.0, "sdpa", need_weights=False) is sdpa_attention  # a decoding step
        beams = torch.empty(B * 4, H, 1, D, device=meta)
        # beams sharing one source row: SDPA cannot broadcast B rows of keys to B * 4 queries, the eager reference
        # neither; the grouped kernel is two bmms, device-neutral, run without autograd only
        assert select_kernel(beams, k, 0.0, "sdpa", need_weights=False) is roformer.kernels._single_query
    x = torch.empty(B, T, 32, device=meta)
    assert Dropout(0.1).train()(x).device == meta  # torch's dropout: ours would draw its mask on the device too


def test_the_cpu_only_kernels_stand_aside_while_torch_compile_traces(monkeypatch):
    q, k = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    calls = []
    monkeypatch.setattr(roformer.kernels.cpu_training._Dropout, "apply", lambda *a: calls.append(a) or a[0])
    Dropout(0.1).train()(q)
    assert select_kernel(q, k, 0.1, "sdpa", need_weights=False) is roformer.kernels._dropout and len(calls) == 1
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert select_kernel(q, k, 0.1, "sdpa", need_weights=False) is sdpa_attention
    with torch.no_grad():
        step = torch.randn(B, H, 1, D)
        assert select_kernel(step, k, 0.0, "sdpa", need_weights=False) is sdpa_attention
    Dropout(0.1).train()(q)
    assert len(calls) == 1  # torch's own dropout, which the compiler fuses


@pytest.mark.parametrize("position", ["rotary", "alibi"])
def test_compiled_forwards_trace_as_one_graph(tiny_config, position):
    """torch.compile sees each model's training and evaluation forward whole: no CPU-only kernel, no complex-number
    RoPE view, no read of the mask on the host breaks its graph (the RoPE view did, once per layer); nor does the
    masked-row MLM head given the loader's host bound on masked tokens (without it, its width is read back)."""
    import torch._dynamo

    small = dict(position=position, attention_dropout=0.1, hidden_dropout=0.1)
    ids, labels = torch.randint(5, 97, (B, T)), torch.randint(0, 2, (B,))
    mlm_labels = torch.where(torch.rand(B, T) < 0.3, ids, -100)
    width = int((mlm_labels != -100).sum(1).max())
    cases = [
        (roformer.RoFormerForMaskedLM(tiny_config(**small)), (ids,)),
        (roformer.RoFormerForMaskedLM(tiny_config(**small)), (ids, None, None, mlm_labels, width)),
        (roformer.RoFormerForSequenceClassification(tiny_config(**small)), (ids, torch.ones_like(ids), None, labels)),
        (roformer.RoFormerForSeq2SeqLM(tiny_config(num_decoder_layers=2, type_vocab_size=0, **small)),
         (ids, torch.ones_like(ids), ids[:, :5], ids[:, :5])),
    ]  # fmt: skip
    for (model, args), training in itertools.product(cases, (True, False)):  # training steps, and evaluation
        try:
            with torch.set_grad_enabled(training):
                explained = torch._dynamo.explain(model.train(training))(*args)
        finally:
            torch._dynamo.reset()
        assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]
