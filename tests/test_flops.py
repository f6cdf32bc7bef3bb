"""The FLOP count behind train/mfu: the formula equals what torch's FlopCounterMode counts on the real model."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from roformer import RoFormerForMaskedLM
from roformer.flops import (
    device_peak_flops,
    encoder_layer_flops,
    mfu,
    mlm_training_flops_per_token,
)


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_the_encoder_and_head_count_equals_the_flops_torch_counts(tiny_config):
    """Eager attention: FlopCounterMode has no formula for torch's CPU flash-attention kernel, which sdpa uses."""
    cfg = tiny_config(attention_impl="eager", vocab_size=500, intermediate_size=96)
    model = RoFormerForMaskedLM(cfg).eval()
    B, T, N = 3, 16, 7
    ids = torch.randint(5, cfg.vocab_size, (B, T))
    with torch.no_grad():
        encoder = counted(lambda: model.roformer(ids))
        hidden = torch.randn(N, cfg.hidden_size)
        head = counted(lambda: model.head(hidden))
    assert encoder == B * T * cfg.num_layers * encoder_layer_flops(cfg, T)
    assert head == N * 2 * (cfg.hidden_size * cfg.embedding_dim + cfg.embedding_dim * cfg.vocab_size)


def test_training_flops_per_token_by_hand_and_mfu():
    from roformer.config import ModelConfig

    cfg = ModelConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256)
    d, f, T, V, p = 64, 256, 128, 1000, 0.15
    by_hand = 3 * (2 * (8 * d * d + 4 * d * f + 4 * T * d) + p * 2 * (d * d + d * V))
    assert mlm_training_flops_per_token(cfg, T, p) == pytest.approx(by_hand)
    # BERT-base at 512 tokens: ~0.59 GFLOP per token, so 1M tokens/s is ~59% of an H100 (989 TFLOP/s)
    bert = ModelConfig(vocab_size=30522, max_position_embeddings=512)
    per_token = mlm_training_flops_per_token(bert, 512, 0.15)
    assert 5.5e8 < per_token < 6.5e8
    assert mfu(per_token, 1e6, device_peak_flops("NVIDIA H100 80GB HBM3")) == pytest.approx(per_token * 1e6 / 989e12)
    assert device_peak_flops("NVIDIA H100 PCIe") == 756e12 and device_peak_flops("cpu") is None


def test_a_run_logs_mfu_from_its_token_rate(tmp_path):
    from pathlib import Path

    from roformer.config import load_config
    from roformer.tracking import read_metrics
    from roformer.trainer import train

    root = Path(__file__).resolve().parents[1]
    data = root.parent / "shared" / "data" / "text" / "wikitext2.valid.txt"
    overrides = ["data.corpus=files", f"data.train_files={data}", "data.max_documents=60", "data.max_seq_length=64",
                 "data.tokenizer_vocab_size=2000", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
                 "model.intermediate_size=64", "model.max_position_embeddings=64", "train.max_steps=2",
                 "train.log_every=1", "train.log_with=none", "train.peak_tflops=0.001",
                 f"output_dir={tmp_path / 'r'}"]  # fmt: skip
    cfg = load_config(root / "configs" / "pretrain" / "tiny.yaml", overrides)
    train(cfg)
    rows = [r for r in read_metrics(tmp_path / "r") if "train/mfu" in r]
    assert len(rows) == 2
    per_token = mlm_training_flops_per_token(load_config(tmp_path / "r" / "config.yaml").model, 64, 0.15)
    for row in rows:
        assert row["train/mfu"] == pytest.approx(per_token * row["train/tokens_per_s"] / 1e9)
