"""Numeric parity with transformers' RoFormer* and Bert* models, both directions, on padded batches."""

import re

import pytest
import torch
import transformers
from floats import assert_float32_close, network_terms

import roformer
from roformer.errors import InteropError

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = dict(
    vocab_size=99,
    num_hidden_layers=2,
    max_position_embeddings=64,
    hidden_dropout_prob=0.2,  # eval mode must switch these off on both sides
    attention_probs_dropout_prob=0.2,
)

HF_CONFIGS = {
    # embedding_size != hidden_size: embeddings projected up; MLM head projects back down to 24
    "roformer-embproj": lambda: transformers.RoFormerConfig(
        **COMMON, hidden_size=32, num_attention_heads=4, intermediate_size=37, embedding_size=24
    ),
    "roformer-rotary_value": lambda: transformers.RoFormerConfig(
        **COMMON, hidden_size=48, num_attention_heads=3, intermediate_size=64, rotary_value=True, hidden_act="gelu_new"
    ),
    "bert-small": lambda: transformers.BertConfig(
        **COMMON, hidden_size=32, num_attention_heads=4, intermediate_size=37
    ),
    "bert-relu": lambda: transformers.BertConfig(
        **COMMON, hidden_size=48, num_attention_heads=6, intermediate_size=64, hidden_act="relu", type_vocab_size=3
    ),
}
HEADS = ["Model", "ForMaskedLM", "ForSequenceClassification-2", "ForSequenceClassification-1"]
CASES = [(name, head) for name in HF_CONFIGS for head in HEADS]


def _randomize(model: torch.nn.Module) -> None:
    """Replace the init (std 0.02, zero biases, unit LayerNorms) by weights large enough that a wrongly mapped
    tensor changes the outputs by far more than the tolerance."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:  # RoFormer's fixed sinusoidal table
                continue
            if "LayerNorm.weight" in name:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.2)


def _hf_model(config_name: str, head: str):
    cfg = HF_CONFIGS[config_name]()
    head, _, num_labels = head.partition("-")
    if num_labels:
        cfg.num_labels = int(num_labels)
    family = "RoFormer" if config_name.startswith("roformer") else "Bert"
    model = getattr(transformers, family + head)(cfg)
    _randomize(model)
    return model.eval()


def _batch(model, head: str, batch_size: int = 3, length: int = 11):
    """A right-padded batch with two segments, and the labels the head takes."""
    cfg = model.config
    input_ids = torch.randint(1, cfg.vocab_size, (batch_size, length))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    attention_mask[2, 3:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, cfg.pad_token_id)
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 5:] = cfg.type_vocab_size - 1
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    if head == "ForMaskedLM":
        masked = (torch.rand(input_ids.shape) < 0.3) & attention_mask.bool()
        masked[0, 1] = True
        batch["labels"] = torch.where(masked, torch.randint(0, cfg.vocab_size, input_ids.shape), -100)
    elif head == "ForSequenceClassification-2":
        batch["labels"] = torch.tensor([0, 1, 1])
    elif head == "ForSequenceClassification-1":
        batch["labels"] = torch.randn(batch_size)
    return batch


def _assert_same_outputs(reference, model, batch: dict) -> None:
    """Hidden states of every layer, then logits (all positions, from a call without labels), then the loss."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hf = (reference if isinstance(reference, transformers.PreTrainedModel) else model).config
    length = batch["input_ids"].shape[1]
    terms = network_terms(hf.num_hidden_layers, hf.hidden_size, hf.intermediate_size, length)
    terms += hf.hidden_size + hf.vocab_size  # the head and the loss's softmax
    with torch.no_grad():
        expected = reference(**inputs, output_hidden_states=True)
        actual = model(**inputs, output_hidden_states=True)
        assert len(actual.hidden_states) == len(expected.hidden_states)
        for i, (a, e) in enumerate(zip(actual.hidden_states, expected.hidden_states)):
            assert_float32_close(a, e, terms, msg=lambda m, i=i: f"hidden state {i}: {m}")
        if getattr(expected, "logits", None) is None:
            assert_float32_close(actual.last_hidden_state, expected.last_hidden_state, terms)
            return
        assert_float32_close(actual.logits, expected.logits, terms)
        if "labels" in batch:
            expected_loss = reference(**batch).loss
            actual_loss = model(**batch).loss
            assert expected_loss is not None and actual_loss is not None
            assert_float32_close(actual_loss, expected_loss, terms)


@pytest.mark.parametrize(("config_name", "head"), CASES)
def test_from_transformers_matches(config_name, head):
    hf = _hf_model(config_name, head)
    ours = roformer.from_transformers(hf)
    assert not ours.training
    if head.startswith("ForSequenceClassification"):
        assert ours.num_labels == hf.config.num_labels
    _assert_same_outputs(hf, ours, _batch(hf, head))


@pytest.mark.parametrize(("config_name", "head"), CASES)
def test_to_transformers_round_trip(config_name, head):
    hf = _hf_model(config_name, head)
    back = roformer.to_transformers(roformer.from_transformers(hf))
    assert type(back) is type(hf)
    assert not back.training
    _assert_same_outputs(hf, back, _batch(hf, head))


@pytest.mark.parametrize("position", ["rotary", "learned"])
def test_to_transformers_from_ours(tiny_config, position):
    """Starting from our side: a model built here, exported, gives the same outputs in transformers."""
    cfg = tiny_config(position=position, classifier_activation="tanh" if position == "learned" else "gelu")
    ours = roformer.RoFormerForSequenceClassification(cfg, num_labels=3).eval()
    _randomize(ours)
    hf = roformer.to_transformers(ours)
    assert type(hf).__name__ == ("RoFormer" if position == "rotary" else "Bert") + "ForSequenceClassification"
    batch = _batch(hf, "ForSequenceClassification-2")
    batch["labels"] = torch.tensor([0, 2, 1])
    _assert_same_outputs(ours, hf, batch)


def test_randomized_weights_make_outputs_differ():
    """The parity tolerance means something: two differently seeded models are far apart."""
    a = _hf_model("roformer-embproj", "ForMaskedLM")
    b = _hf_model("roformer-embproj", "ForMaskedLM")
    batch = _batch(a, "Model")
    with torch.no_grad():
        assert (a(**batch).logits - b(**batch).logits).abs().max() > 1e-2  # parity tolerances here: about 1e-4


@pytest.mark.parametrize("config_name", ["roformer-embproj", "bert-small"])
def test_mismatched_shape_names_the_key(config_name):
    hf = _hf_model(config_name, "ForMaskedLM")
    hf.config.intermediate_size += 3  # the config no longer describes the weights
    family = "roformer" if config_name.startswith("roformer") else "bert"
    key = f"{family}.encoder.layer.0.intermediate.dense.weight"
    with pytest.raises(InteropError, match=re.escape(repr(key))):
        roformer.from_transformers(hf)


def test_missing_weight_names_the_key():
    hf = _hf_model("roformer-embproj", "Model")
    state = hf.state_dict()
    del state["encoder.layer.1.output.dense.bias"]
    hf.state_dict = lambda: state
    with pytest.raises(InteropError, match="encoder.layer.1.output.dense.bias"):
        roformer.from_transformers(hf)


def test_unsupported_transformers_class():
    cfg = transformers.RoFormerConfig(**COMMON, hidden_size=32, num_attention_heads=4, intermediate_size=37)
    cfg.is_decoder = True
    with pytest.raises(InteropError, match="RoFormerForCausalLM"):
        roformer.from_transformers(transformers.RoFormerForCausalLM(cfg))


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (dict(position="sinusoidal"), "position='sinusoidal'"),
        (dict(position="none"), "position='none'"),
        (
            dict(position="alibi"),
            "position='alibi' has no transformers equivalent (rotary -> roformer, learned -> bert)",
        ),
        (dict(position="t5_relative"), "position='t5_relative' has no transformers equivalent"),
        (dict(rotary_pairing="half"), "'half'"),
        (dict(rope_scaling="linear", rope_scaling_factor=2.0), "scaling"),
        (dict(attention="linear"), "softmax"),
        (dict(rope_base=500.0), "rope_base"),
    ],
)
def test_to_transformers_refuses_unrepresentable(tiny_config, overrides, reason):
    model = roformer.RoFormerForMaskedLM(tiny_config(**overrides))
    with pytest.raises(InteropError, match=re.escape(reason)):
        roformer.to_transformers(model)


def test_to_transformers_refuses_seq2seq(tiny_config):
    with pytest.raises(InteropError, match="RoFormerForSeq2SeqLM"):
        roformer.to_transformers(roformer.RoFormerForSeq2SeqLM(tiny_config(num_decoder_layers=1)))
