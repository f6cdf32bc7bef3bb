"""No tensor made on the CPU meets a device tensor, and no value is read back to the host, inside a training step:
the models run forward and backward with their weights and inputs on the `meta` device, where a CPU tensor made
inside (positions, masks, tables, biases) or a read-back (`.item()`, `int(t.max())`, `bool(t.all())`) fails
loudly. (Data-dependent steps, such as the masked-row MLM head, evaluation and beam search, cannot run on `meta`;
the GPU check covers those.)

Fixed, and pinned here: every forward used to read positions and masks back to the host (a GPU sync per
forward): `int(position_ids.max())` for the rotary and sinusoidal tables and the learned length check, the
consecutive-positions test of the relative biases (ALiBi, T5), `bool(attention_mask.all())` in `padding_mask`.
The model now makes its positions as Python ranges, known on the host.
"""

import pytest
import torch
import torch.nn.functional as F

from roformer import (
    POSITION_SCHEMES,
    ModelConfig,
    RoFormerForMaskedLM,
    RoFormerForSeq2SeqLM,
    RoFormerForSequenceClassification,
)

META = torch.device("meta")


def config(position: str, **extra) -> ModelConfig:
    return ModelConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                       max_position_embeddings=64, position=position, **extra)  # fmt: skip


@pytest.mark.parametrize("position", list(POSITION_SCHEMES))
@pytest.mark.parametrize("padded", [False, True])
def test_an_encoder_training_step_makes_no_cpu_tensor(position, padded):
    with META:
        mlm = RoFormerForMaskedLM(config(position)).train()
        classifier = RoFormerForSequenceClassification(config(position), num_labels=3).train()
    ids = torch.randint(5, 101, (2, 16), device=META)
    mask = torch.ones(2, 16, dtype=torch.long, device=META) if padded else None
    logits = mlm(ids, attention_mask=mask).logits
    F.cross_entropy(logits.flatten(0, 1), torch.randint(0, 101, (32,), device=META), ignore_index=-100).backward()
    out = classifier(ids, attention_mask=mask, labels=torch.randint(0, 3, (2,), device=META))
    out.loss.backward()
    assert out.logits.device == META


@pytest.mark.parametrize("position", list(POSITION_SCHEMES))
def test_a_translation_training_step_makes_no_cpu_tensor(position):
    with META:
        model = RoFormerForSeq2SeqLM(config(position, num_decoder_layers=2, type_vocab_size=0)).train()
    ids = torch.randint(4, 101, (2, 12), device=META)
    decoder_ids = torch.randint(4, 101, (2, 9), device=META)
    out = model(ids, torch.ones_like(ids), decoder_input_ids=decoder_ids, labels=decoder_ids, label_smoothing=0.1)
    out.loss.backward()
    assert out.loss.device == META
