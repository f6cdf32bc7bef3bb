"""The shared trainer on short real MLM runs over ../shared/data/text: learning, the run directory contract,
exact resume, SIGTERM, two-process DDP, the NaN guard and bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_recipe import RECIPE, ROOT, TINY_PRETRAIN

from roformer import RoFormerForMaskedLM
from roformer.cli import main
from roformer.config import load_config
from roformer.errors import UserError
from roformer.tasks.mlm import MLMTask, PackedBlocks
from roformer.tokenization import load_tokenizer
from roformer.tracking import read_metrics
from roformer.trainer import Trainer, train

TINY = [*TINY_PRETRAIN, "train.eval_every=5", "train.max_eval_batches=4"]


def tiny(run_dir, *extra):
    return load_config(RECIPE, [*TINY, f"output_dir={run_dir}", *extra])


def train_losses(run_dir):
    return [(r["step"], r["train/loss"]) for r in read_metrics(run_dir) if "train/loss" in r]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """12 uninterrupted steps: the reference the resume test compares with."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    train(tiny(run_dir, "train.max_steps=12", "train.save_every=100"))
    return run_dir


def test_short_run_learns_and_fills_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    results = train(tiny(run_dir, "train.max_steps=40", "train.learning_rate=2e-3", "train.save_every=20"))
    losses = [loss for _, loss in train_losses(run_dir)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    evals = [r["eval/loss"] for r in read_metrics(run_dir) if "eval/loss" in r]
    assert evals[-1] < evals[0]
    assert all(isinstance(r["step"], int) for r in read_metrics(run_dir))

    assert load_config(run_dir / "config.yaml").model.vocab_size == 2000  # the resolved config
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_20", "step_40"]
    saved = json.loads((run_dir / "eval_results.json").read_text())
    assert saved["step"] == 40 and saved["eval/loss"] == pytest.approx(results["eval/loss"])
    assert math.exp(saved["eval/loss"]) == pytest.approx(saved["eval/perplexity"])

    model = RoFormerForMaskedLM.from_pretrained(run_dir / "final").eval()
    tokenizer = load_tokenizer(run_dir / "final")
    batch = tokenizer(["the tower is [MASK] tall"], return_tensors="pt")
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"]).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))


def test_resume_reproduces_the_straight_run_exactly_without_replaying_data(tmp_path, straight_run, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = tiny(run_dir, "train.max_steps=12", "train.save_every=100")
    with monkeypatch.context() as patch:  # an interruption after step 7, as SIGTERM would cause
        patch.setattr(Trainer, "_stop_requested", lambda self, stop: self.state.step == 7)
        assert train(cfg) == {"status": "interrupted", "step": 7}
    assert (run_dir / "checkpoints" / "step_7" / "trainer_state.json").is_file()
    read, real_getitem = [], PackedBlocks.__getitem__

    def recording_getitem(self, key):
        if self.stream.directory.name == "train":
            read.append(key)
        return real_getitem(self, key)

    monkeypatch.setattr(PackedBlocks, "__getitem__", recording_getitem)
    trainer = Trainer(tiny(run_dir, "train.max_steps=12", "train.save_every=100", "train.resume_from=latest"))
    trainer.train()

    assert train_losses(run_dir) == train_losses(straight_run)  # bit-for-bit: data, masks, dropout, optimizer
    # the resumed run read the blocks of steps 8-12 and none before them: the position is sought, not replayed
    assert read == trainer.task.epoch_batches(0, 8)[7:12].ravel().tolist()
    ours, reference = (json.loads((d / "eval_results.json").read_text()) for d in (run_dir, straight_run))
    assert ours == reference


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, f"output_dir={run_dir}", "train.max_steps=100000", "train.save_every=100000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "roformer.cli", "pretrain", "--config", str(RECIPE), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("train/loss") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "continue with train.resume_from=latest" in out + err

    stopped_at = json.loads(next((run_dir / "checkpoints").glob("step_*/trainer_state.json")).read_text())["step"]
    assert stopped_at >= 3
    train(tiny(run_dir, f"train.max_steps={stopped_at + 2}", "train.resume_from=latest"))
    steps = [s for s, _ in train_losses(run_dir)]
    assert steps == list(range(1, stopped_at + 3))  # continued where it stopped, nothing logged twice


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """gloo DDP on CPU. Same examples and masks per global batch (masks are seeded per example), and each
    process's mean loss is weighted by its share of the masked tokens, so the two-process step is the mean over
    the global batch that one process takes: the losses agree to float rounding (measured: at most 1e-6 over six
    steps). Averaging the two processes' means instead, as DDP alone does, moved them by up to 2e-3."""
    no_dropout = ["model.hidden_dropout=0", "model.attention_dropout=0", "train.max_steps=6", "train.save_every=100"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(tiny(one, *no_dropout, "train.global_batch_size=8"))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        "29533",
        "scripts/pretrain.py",
    ]
    args = [*TINY, *no_dropout, f"output_dir={two}", "train.global_batch_size=8"]  # 4 per process, derived
    done = subprocess.run(
        [*launcher, "--config", str(RECIPE), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = train_losses(one), train_losses(two)
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert abs(x - y) < 2e-5
    tokens = [r["train/tokens"] for r in read_metrics(two) if "train/tokens" in r]
    assert tokens == [r["train/tokens"] for r in read_metrics(one) if "train/tokens" in r]  # both halves counted
    recorded = load_config(two / "config.yaml").train
    assert (recorded.global_batch_size, recorded.per_device_batch_size, recorded.gradient_accumulation_steps) == (
        8,
        4,
        1,
    )


def test_accumulation_takes_the_same_step_as_one_micro_batch(tmp_path):
    """A global batch of 8 as one micro-batch of 8 or as two of 4: micro-batches are weighted by their share of
    the masked tokens, so the step is the same mean (float rounding apart)."""
    no_dropout = ["model.hidden_dropout=0", "model.attention_dropout=0", "train.max_steps=4", "train.save_every=100"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(tiny(whole, *no_dropout, "train.global_batch_size=8"))
    train(tiny(split, *no_dropout, "train.global_batch_size=8", "train.per_device_batch_size=4"))
    assert load_config(split / "config.yaml").train.gradient_accumulation_steps == 2
    for (_, x), (_, y) in zip(train_losses(whole), train_losses(split), strict=True):
        assert abs(x - y) < 2e-5


def test_a_global_batch_that_cannot_be_split_is_refused(tmp_path, capsys):
    from roformer.batching import split_global_batch

    assert split_global_batch(64, 8, 64) == (8, 1)
    assert split_global_batch(64, 1, 16) == (16, 4)
    assert split_global_batch(64, 2, 24) == (16, 2)
    with pytest.raises(UserError, match="cannot be split evenly over 3 processes"):
        split_global_batch(64, 3, 64)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_loss = MLMTask.loss
    calls = {"n": 0}

    def loss_turning_nan(self, model, batch):
        calls["n"] += 1
        loss = real_loss(self, model, batch)
        return loss * float("nan") if calls["n"] >= 5 else loss

    monkeypatch.setattr(MLMTask, "loss", loss_turning_nan)
    run_dir = tmp_path / "run"
    code = main(
        [
            "pretrain",
            "--config",
            str(RECIPE),
            *TINY,
            f"output_dir={run_dir}",
            "train.max_steps=20",
            "train.save_every=2",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "loss became nan at step 5" in err and "step_4" in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_2", "step_4"]


LATIN1 = "café au lait".encode("latin-1")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make_input, expected",
    [
        (lambda d: [f"data.train_files={d / 'missing.txt'}"], "missing.txt: file not found"),
        (lambda d: [f"data.train_files={_write(d / 'empty.txt', b'  ')}"], "empty.txt: the source holds no text"),
        (lambda d: [f"data.train_files={_write(d / 'latin1.txt', LATIN1)}"], "latin1.txt: not UTF-8 at or after"),
        (lambda d: [f"data.train_files={(d / 'nothing').mkdir() or d / 'nothing'}"], "directory has no .txt, .txt.gz"),
        (lambda d: ["model.position=learned", "data.max_seq_length=128"], "data.max_seq_length=128 is longer"),
        (lambda d: ["train.max_stepz=3"], "unknown key 'train.max_stepz'"),
        (lambda d: ["model.position=xpos"], "model.position='xpos' is not allowed"),
    ],
    ids=["missing", "empty", "not-utf8", "empty-dir", "too-long-for-learned", "unknown-key", "bad-choice"],
)
def test_bad_input_exits_2_with_one_line_and_no_run(tmp_path, capsys, make_input, expected):
    run_dir = tmp_path / "run"
    code = main(["pretrain", "--config", str(RECIPE), *TINY, f"output_dir={run_dir}", *make_input(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, err
    assert not run_dir.exists()


def test_existing_run_is_not_overwritten_without_resume(straight_run, capsys):
    code = main(["pretrain", "--config", str(RECIPE), *TINY, f"output_dir={straight_run}"])
    assert code == 2
    assert "already holds a run (checkpoints" in capsys.readouterr().err
