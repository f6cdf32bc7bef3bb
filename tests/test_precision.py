"""The GPU-path switches, checked on the CPU: bf16 autocast, torch.compile, precision resolution."""

from pathlib import Path

import pytest

from roformer.config import load_config
from roformer.tracking import read_metrics
from roformer.trainer import resolve_precision, train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "text" / "wikitext2.valid.txt"
TINY = ["data.corpus=files", f"data.train_files={DATA}", "data.max_documents=60", "data.max_seq_length=64",
        "data.tokenizer_vocab_size=2000", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
        "model.intermediate_size=64", "model.max_position_embeddings=64", "model.hidden_dropout=0",
        "model.attention_dropout=0", "train.max_steps=4", "train.log_every=1", "train.log_with=none",
        "train.global_batch_size=8", "train.save_every=2"]  # fmt: skip


def losses(run_dir):
    return [r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r]


def run(tmp_path, name, *extra):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # the precision is fixed once per process state; these runs share a process
    cfg = load_config(ROOT / "configs" / "pretrain" / "tiny.yaml", [*TINY, f"output_dir={tmp_path / name}", *extra])
    train(cfg)
    return tmp_path / name


def test_auto_precision_is_none_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: tests/test_gpu.py checks that auto resolves to bf16")
    assert resolve_precision("auto") == "no"
    assert resolve_precision("bf16") == "bf16" and resolve_precision("no") == "no"


def test_bf16_autocast_trains_within_a_stated_tolerance_of_fp32(tmp_path):
    """bf16 keeps 8 bits of mantissa: logits and losses move by ~0.4% relative (2^-8); measured here < 1%."""
    fp32, bf16 = run(tmp_path, "fp32", "train.mixed_precision=no"), run(tmp_path, "bf16", "train.mixed_precision=bf16")
    assert load_config(bf16 / "config.yaml").train.mixed_precision == "bf16"
    for a, b in zip(losses(fp32), losses(bf16), strict=True):
        assert b == pytest.approx(a, rel=2e-2)


@pytest.mark.slow
def test_compiled_and_eager_training_give_the_same_losses_and_weights_that_reload(tmp_path):
    """torch.compile (inductor on the CPU) reorders float sums: equal to float32 rounding over a few steps."""
    eager, compiled = run(tmp_path, "eager"), run(tmp_path, "compiled", "train.compile=true")
    for a, b in zip(losses(eager), losses(compiled), strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    from roformer import RoFormerForMaskedLM

    reloaded = RoFormerForMaskedLM.from_pretrained(compiled / "final")  # saved without the compile wrapper's names
    assert not any(k.startswith("_orig_mod") for k in reloaded.state_dict())
    resumed = run(tmp_path, "compiled", "train.compile=true", "train.max_steps=6", "train.resume_from=latest")
    assert len(losses(resumed)) == 6
