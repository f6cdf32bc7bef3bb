"""Every position scheme and attention variant through every head: shapes, losses, gradients, saving."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from floats import assert_float32_close, model_terms
from torch.testing import assert_close

import roformer

pytestmark = pytest.mark.usefixtures("single_thread")

V, B, T = 97, 3, 10

VARIANTS = {name: dict(position=name) for name in roformer.POSITION_SCHEMES} | {
    "rotary-half": dict(rotary_pairing="half"),
    "rotary-value": dict(rotary_value=True),
    "rotary-eager": dict(attention_impl="eager"),
    "rotary-linear": dict(attention="linear"),
    "rotary-linear-favor": dict(attention="linear", linear_feature_map="favor"),
    "rotary-yarn": dict(rope_scaling="yarn", rope_scaling_factor=4.0, max_position_embeddings=8),
    "sinusoidal-embproj": dict(position="sinusoidal", embedding_size=24),
}
HEADS = ["mlm", "classification", "regression", "seq2seq"]


def _padding() -> torch.Tensor:
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, 6:] = 0
    return attention_mask


def _mlm_labels(input_ids: torch.Tensor) -> torch.Tensor:
    masked = torch.rand(input_ids.shape) < 0.3
    masked[0, 0] = True
    return torch.where(masked, torch.randint(0, V, input_ids.shape), -100)


def _build(head: str, cfg: roformer.ModelConfig):
    """The model for `head`, and a forward call with labels that returns a ModelOutput with a loss."""
    input_ids = torch.randint(1, V, (B, T))
    token_type_ids = (torch.arange(T) >= 5).long().expand(B, T)
    if head == "mlm":
        model = roformer.RoFormerForMaskedLM(cfg)
        labels = _mlm_labels(input_ids)
        return model, lambda: model(input_ids, _padding(), token_type_ids, labels=labels)
    if head in ("classification", "regression"):
        num_labels = 2 if head == "classification" else 1
        model = roformer.RoFormerForSequenceClassification(cfg, num_labels=num_labels)
        labels = torch.tensor([0, 1, 1]) if num_labels == 2 else torch.randn(B)
        return model, lambda: model(input_ids, _padding(), token_type_ids, labels=labels)
    model = roformer.RoFormerForSeq2SeqLM(dataclasses.replace(cfg, num_decoder_layers=2, embedding_size=None))
    target = torch.randint(1, V, (B, 6))
    labels = target.roll(-1, dims=1).masked_fill(torch.arange(6) >= 5, -100)
    return model, lambda: model(input_ids, _padding(), decoder_input_ids=target, labels=labels, label_smoothing=0.1)


def _word_embeddings(model) -> torch.nn.Embedding:
    base = model if isinstance(model, roformer.RoFormerForSeq2SeqLM) else model.roformer
    return base.embeddings.word_embeddings


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_backward(tiny_config, variant, head):
    model, call = _build(head, tiny_config(**VARIANTS[variant]))
    model.train()
    out = call()
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    word_grad = _word_embeddings(model).weight.grad
    assert word_grad is not None and word_grad.abs().sum() > 0  # the loss reaches the embeddings
    layer_grads = [g for name, g in grads.items() if "layers.0.attn.query" in name]
    assert layer_grads and all(g is not None and g.abs().sum() > 0 for g in layer_grads)
    if VARIANTS[variant].get("position") == "learned":
        assert grads[next(n for n in grads if "position_embeddings" in n)].abs().sum() > 0


@pytest.mark.parametrize("variant", ["rotary", "learned", "alibi", "t5_relative", "none"])
def test_mlm_loss_on_masked_positions_equals_full_cross_entropy(tiny_config, variant):
    model = roformer.RoFormerForMaskedLM(tiny_config(**VARIANTS[variant])).eval()
    input_ids = torch.randint(1, V, (B, T))
    labels = _mlm_labels(input_ids)
    with torch.no_grad():
        full = model(input_ids, _padding()).logits
        labelled = model(input_ids, _padding(), labels=labels)
    assert full.shape == (B, T, V)
    expected = F.cross_entropy(full.view(-1, V), labels.view(-1), ignore_index=-100)
    terms = model_terms(model.config, T) + model.config.hidden_size + V  # the encoder, the head, the softmax
    assert_float32_close(labelled.loss, expected, terms)
    assert labelled.logits.shape == ((labels != -100).sum(), V)  # logits at the masked positions only
    assert_float32_close(labelled.logits, full[labels != -100], terms)


class NoReadBack(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on every op that reads a tensor's values back to the host (a GPU sync): `.item()` / `int()` of a
    tensor, and `nonzero` (boolean-mask indexing)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero):
            raise AssertionError(f"{func} reads values back from the device")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", ["rotary", "alibi", "t5_relative"])
def test_mlm_training_path_reads_nothing_back_and_equals_the_reference(tiny_config, variant):
    """With `masked_width` (the loader's host-known bound) the step does no read-back and gives the loss and
    gradients of the plain path; a bound above the longest row's count only adds padding rows."""
    model = roformer.RoFormerForMaskedLM(tiny_config(position=variant)).eval()
    input_ids = torch.randint(1, V, (B, T))
    labels = _mlm_labels(input_ids)
    reference = model(input_ids, labels=labels).loss
    reference_grads = torch.autograd.grad(reference, list(model.parameters()), allow_unused=True)
    width = int((labels != -100).sum(1).max())
    for bound in (width, width + 3):
        with NoReadBack():
            out = model(input_ids, labels=labels, masked_width=bound)
            grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
        assert out.logits is None
        assert_close(out.loss, reference)
        for got, want in zip(grads, reference_grads, strict=True):
            assert (got is None) == (want is None)
            if got is not None:
                assert_close(got, want)
    with pytest.raises(AssertionError, match="reads values back"), NoReadBack():
        model(input_ids, labels=labels)  # the check can fail: without the bound the width is read back


@pytest.mark.parametrize("variant", ["rotary", "half", "sinusoidal", "alibi", "t5_relative"])
def test_mlm_last_layer_at_masked_positions_only_keeps_the_gradients(tiny_config, variant):
    """With labels the last layer runs for the masked positions only: the same loss and gradients as the full
    forward, also with per-sequence position ids (the RoPE angles are gathered per row)."""
    cfg = tiny_config(**({"rotary_pairing": "half"} if variant == "half" else {"position": variant}))
    model = roformer.RoFormerForMaskedLM(cfg).eval()
    input_ids = torch.randint(1, V, (B, T))
    labels = _mlm_labels(input_ids)
    position_ids = torch.arange(T).expand(B, T) + torch.tensor([[0], [3], [1]])
    fast = model(input_ids, _padding(), labels=labels, position_ids=position_ids).loss
    fast_grads = torch.autograd.grad(fast, list(model.parameters()), allow_unused=True)
    logits = model(input_ids, _padding(), position_ids=position_ids).logits
    full = F.cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100)
    full_grads = torch.autograd.grad(full, list(model.parameters()), allow_unused=True)
    assert_close(fast, full)
    for a, e in zip(fast_grads, full_grads):
        assert (a is None) == (e is None) or (a is None and e.abs().max() < 1e-9)
        if a is not None:
            assert_close(a, e)


def test_classification_and_regression_losses(tiny_config):
    input_ids = torch.randint(1, V, (B, T))
    cls = roformer.RoFormerForSequenceClassification(tiny_config(), num_labels=3).eval()
    labels = torch.tensor([2, 0, 1])
    out = cls(input_ids, labels=labels)
    assert out.logits.shape == (B, 3)
    assert_close(out.loss, F.cross_entropy(out.logits, labels))
    reg = roformer.RoFormerForSequenceClassification(tiny_config(), num_labels=1).eval()
    targets = torch.randn(B)
    out = reg(input_ids, labels=targets)
    assert out.logits.shape == (B, 1)
    assert_close(out.loss, F.mse_loss(out.logits[:, 0], targets))


def test_classification_reads_the_first_token_only(tiny_config):
    model = roformer.RoFormerForSequenceClassification(tiny_config(), num_labels=2).eval()
    input_ids = torch.randint(1, V, (B, T))
    seen = {}
    model.classifier.register_forward_hook(lambda mod, args, out: seen.update(hidden=args[0], out=out))
    with torch.no_grad():
        logits = model(input_ids).logits
        changed = seen["hidden"].clone()
        changed[:, 1:] = 0  # everything but [CLS] zeroed: same logits
        assert_close(model.classifier(changed), logits)


def test_padding_does_not_change_real_tokens(tiny_config):
    """A padded row gives the same hidden states at its real tokens as the row alone, unpadded."""
    for position in roformer.POSITION_SCHEMES:
        model = roformer.RoFormerModel(tiny_config(position=position)).eval()
        ids = torch.randint(1, V, (1, 6))
        padded = torch.cat((ids, torch.zeros(1, 4, dtype=torch.long)), dim=1)
        mask = (padded != 0).long()
        with torch.no_grad():
            alone = model(ids).last_hidden_state
            assert_float32_close(model(padded, mask).last_hidden_state[:, :6], alone, model_terms(model.config, 10))


def test_position_schemes_make_the_encoder_order_aware(tiny_config):
    """Permuting the input permutes the output exactly without positions, and not with any scheme."""
    ids = torch.randint(1, V, (1, T))
    perm = torch.randperm(T)
    for position in roformer.POSITION_SCHEMES:
        model = roformer.RoFormerModel(tiny_config(position=position)).eval()
        with torch.no_grad():
            for p in model.parameters():  # the init's tiny q.k makes attention nearly uniform, hiding positions
                p.add_(torch.randn_like(p) * 0.3)
            a, b = model(ids).last_hidden_state[:, perm], model(ids[:, perm]).last_hidden_state
        if position == "none":
            assert_float32_close(a, b, model_terms(model.config, T))
        else:
            assert not torch.allclose(a, b, atol=1e-3), position


def test_output_shapes(tiny_config):
    cfg = tiny_config(embedding_size=24)
    input_ids = torch.randint(1, V, (B, T))
    out = roformer.RoFormerModel(cfg)(input_ids, output_hidden_states=True, output_attentions=True)
    assert out.last_hidden_state.shape == (B, T, 32)
    assert len(out.hidden_states) == cfg.num_layers + 1
    assert all(h.shape == (B, T, 32) for h in out.hidden_states)
    assert len(out.attentions) == cfg.num_layers and out.attentions[0].shape == (B, 4, T, T)
    assert out.logits is None and out.loss is None
    assert roformer.RoFormerForMaskedLM(cfg)(input_ids).logits.shape == (B, T, V)
    seq2seq = roformer.RoFormerForSeq2SeqLM(dataclasses.replace(cfg, embedding_size=None, num_decoder_layers=1))
    memory = seq2seq.encode(input_ids)
    assert memory.shape == (B, T, 32)
    assert seq2seq.decode(torch.randint(1, V, (B, 4)), memory).shape == (B, 4, V)


def test_output_embeddings_are_tied(tiny_config):
    mlm = roformer.RoFormerForMaskedLM(tiny_config(embedding_size=24))
    assert mlm.head.decoder.weight is mlm.roformer.embeddings.word_embeddings.weight
    seq2seq = roformer.RoFormerForSeq2SeqLM(tiny_config(num_decoder_layers=1))
    assert seq2seq.lm_head.weight is seq2seq.embeddings.word_embeddings.weight
    optimizer = torch.optim.AdamW(mlm.parameters(), lr=0.1)
    labels = _mlm_labels(torch.zeros(B, T, dtype=torch.long))
    mlm(torch.randint(1, V, (B, T)), labels=labels).loss.backward()
    optimizer.step()
    assert torch.equal(mlm.head.decoder.weight, mlm.roformer.embeddings.word_embeddings.weight)
    untied = roformer.RoFormerForMaskedLM(tiny_config(tie_word_embeddings=False))
    assert untied.head.decoder.weight is not untied.roformer.embeddings.word_embeddings.weight


def test_seq2seq_refuses_a_narrower_embedding(tiny_config):
    with pytest.raises(roformer.ConfigError, match="embedding_size"):
        roformer.RoFormerForSeq2SeqLM(tiny_config(num_decoder_layers=1, embedding_size=24))


def test_padding_token_embedding_starts_at_zero(tiny_config):
    model = roformer.RoFormerModel(tiny_config(pad_token_id=0))
    assert torch.equal(model.embeddings.word_embeddings.weight[0], torch.zeros(32))


def test_dropout_only_in_training(tiny_config):
    model = roformer.RoFormerForMaskedLM(tiny_config(hidden_dropout=0.3, attention_dropout=0.3))
    ids = torch.randint(1, V, (B, T))
    model.train()
    assert not torch.allclose(model(ids).logits, model(ids).logits)
    model.eval()
    with torch.no_grad():
        assert_close(model(ids).logits, model(ids).logits, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------

SAVED = {
    "RoFormerModel": lambda cfg: roformer.RoFormerModel(cfg),
    "RoFormerForMaskedLM": lambda cfg: roformer.RoFormerForMaskedLM(cfg),
    "RoFormerForSequenceClassification": lambda cfg: roformer.RoFormerForSequenceClassification(cfg, num_labels=3),
    "RoFormerForSequenceClassification-regression": lambda cfg: roformer.RoFormerForSequenceClassification(
        cfg, num_labels=1
    ),
    "RoFormerForSeq2SeqLM": lambda cfg: roformer.RoFormerForSeq2SeqLM(
        dataclasses.replace(cfg, num_decoder_layers=1, embedding_size=None)
    ),
}


def _outputs(model, input_ids):
    with torch.no_grad():
        if isinstance(model, roformer.RoFormerForSeq2SeqLM):
            return model(input_ids, decoder_input_ids=input_ids[:, :4]).logits
        out = model(input_ids, _padding())
        return out.logits if out.logits is not None else out.last_hidden_state


@pytest.mark.parametrize("name", list(SAVED))
@pytest.mark.parametrize("position", ["rotary", "learned"])
def test_save_and_load_round_trip(tmp_path, tiny_config, name, position):
    model = SAVED[name](tiny_config(position=position, rotary_pairing="half", embedding_size=24)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # away from the init, so a missed tensor shows
    model.save_pretrained(tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    input_ids = torch.randint(1, V, (B, T))
    for loaded in (type(model).from_pretrained(tmp_path), roformer.load_pretrained(tmp_path)):
        assert type(loaded) is type(model)
        assert loaded.config == model.config
        assert getattr(loaded, "num_labels", None) == getattr(model, "num_labels", None)
        assert_close(_outputs(loaded.eval(), input_ids), _outputs(model, input_ids), atol=0, rtol=0)
    if hasattr(loaded, "head"):
        assert loaded.head.decoder.weight is loaded.roformer.embeddings.word_embeddings.weight


def test_from_pretrained_refuses_another_class(tmp_path, tiny_config):
    roformer.RoFormerForMaskedLM(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="RoFormerForMaskedLM"):
        roformer.RoFormerForSequenceClassification.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        roformer.load_pretrained(tmp_path / "nowhere")
