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


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """The precision is fixed once per process state: leave none behind (a later test's would be refused)."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state()


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


GPU_IMAGE_PATHS = """import runpy, sys
sys.modules["datasets"] = sys.modules["wandb"] = None  # as on the GPU image: importing either fails
import roformer.bleu, roformer.flops, roformer.generation, roformer.prepared, roformer.trainer  # noqa
import roformer.tasks.glue, roformer.tasks.mlm, roformer.tasks.translation  # noqa
for bench in ("bench_model.py", "bench_translate.py"):  # the device check's benchmarks, imported
    runpy.run_path(f"benchmarks/{bench}", run_name="imported")
from roformer.cli import main
for argv in sys.argv[1:]:
    assert main(argv.split("|")) == 0, argv
loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("datasets", "wandb") and sys.modules[name])
assert not loaded, loaded
"""


@pytest.mark.skipif(not (DATA.parents[1] / "multi30k" / "train.en").is_file(), reason="no ../shared/data/multi30k")
def test_the_gpu_check_paths_need_neither_datasets_nor_wandb(tmp_path):
    """The GPU image has neither `datasets` nor `wandb`: the modules and commands the device check uses (MLM from
    files, translation from local files, evaluate-bleu, the benchmarks) import neither. (GLUE: tests/test_glue.py.)"""
    import subprocess
    import sys

    multi30k = DATA.parents[1] / "multi30k"
    tiny_model = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
                  "train.max_steps=1", "train.log_with=none"]  # fmt: skip
    pretrain = ["pretrain", "--config", str(ROOT / "configs" / "pretrain" / "tiny.yaml"), *TINY[:5], *tiny_model,
                "train.max_steps=1", f"output_dir={tmp_path / 'mlm'}"]  # fmt: skip
    translate = ["translate", "--config", str(ROOT / "configs" / "wmt14" / "multi30k_small.yaml"), *tiny_model,
                 "model.num_decoder_layers=1", "data.max_train_samples=64", "data.max_eval_samples=4",
                 "data.bpe_vocab_size=300", "data.max_tokens=256", f"output_dir={tmp_path / 'mt'}",
                 f"data.train_prefix={multi30k / 'train'}", f"data.valid_prefix={multi30k / 'val'}",
                 f"data.test_prefix={multi30k / 'test_2016_flickr'}"]  # fmt: skip
    (tmp_path / "src.en").write_text("A man rides a bike.\nTwo dogs play.\n")
    (tmp_path / "ref.de").write_text("Ein Mann fährt Fahrrad.\nZwei Hunde spielen.\n")
    bleu = ["evaluate-bleu", "--checkpoint", str(tmp_path / "mt" / "final"), "--src", str(tmp_path / "src.en"),
            "--ref", str(tmp_path / "ref.de"), "--beam", "2", "--max_len_b", "8", "--device", "cpu"]  # fmt: skip
    command = [sys.executable, "-c", GPU_IMAGE_PATHS, *("|".join(argv) for argv in (pretrain, translate, bleu))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "mlm" / "final").is_dir() and (tmp_path / "mt" / "final").is_dir()
