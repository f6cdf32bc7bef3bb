"""Interruptions and bad input (issue 15): nothing a user made is destroyed, nothing wrong is reported as success.

Short real MLM runs over ../shared/data/text, in process where possible; subprocesses where a signal, a hang or
two processes are the point.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tiny_recipe import DATA, RECIPE, ROOT, TINY_PRETRAIN

from roformer.checkpointing import verify
from roformer.cli import main
from roformer.config import load_config
from roformer.errors import UserError
from roformer.rundir import LOCK_FILE, RunLock
from roformer.tracking import read_metrics
from roformer.trainer import Trainer, train

MULTI_GPU_YAML = ROOT / "configs" / "accelerate" / "multi_gpu.yaml"
TINY = [*TINY_PRETRAIN, "train.eval_every=100", "train.max_eval_batches=2", "train.keep_last=3"]


def tiny(run_dir, *extra):
    return load_config(RECIPE, [*TINY, f"output_dir={run_dir}", *extra])


def pretrain(run_dir, *extra) -> int:
    return main(["pretrain", "--config", str(RECIPE), *TINY, f"output_dir={run_dir}", *extra])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def interrupted_run(run_dir, at_step: int, *extra) -> None:
    """A run stopped after `at_step` steps as SIGTERM would stop it (checkpoint saved)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_stop_requested", lambda self, stop: self.state.step == at_step)
        assert train(tiny(run_dir, *extra))["status"] == "interrupted"


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """Stopped at step 4 of 8 with checkpoints at steps 2 and 4; tests copy it before changing it."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    interrupted_run(run_dir, 4, "train.max_steps=8", "train.save_every=2")
    return run_dir


def copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)
    return to


def launch_two(script: Path, args: list[str], port: int, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    # the shipped DDP config, on CPU: ACCELERATE_USE_CPU makes it gloo
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(MULTI_GPU_YAML)]
    launcher += ["--num_processes", "2", "--main_process_port", str(port), str(script)]
    return subprocess.run([*launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------------
# Harmful case 1: a GLUE run trained from scratch could not be resumed (tests/test_glue.py has the run itself);
# a rerun of glue-sweep resumes its interrupted runs the same way
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (DATA / "glue").is_dir(), reason="../shared/data/glue is not here")
def test_a_rerun_glue_sweep_resumes_its_interrupted_run_from_scratch(tmp_path):
    from roformer.glue_sweep import sweep

    overrides = [
        "init_from=null",  # from scratch: the tokenizer is trained on the task (500 words, not BERT's 30,522)
        f"data.data_dir={DATA / 'glue'}",
        "data.tokenizer_vocab_size=500",
        "data.max_train_samples=64",
        "data.max_seq_length=64",
        *[f"model.{key}" for key in ("hidden_size=32", "num_layers=1", "num_heads=2", "intermediate_size=64")],
        "model.max_position_embeddings=64",
        *["train.num_epochs=null", "train.max_steps=4", "train.per_device_batch_size=8", "train.eval_every=1000"],
        *["train.save_every=1000", "train.mixed_precision=no", "train.log_with=none"],
    ]
    args = (["wnli"], [3e-5], [7], tmp_path, ROOT / "configs" / "glue", overrides)
    run = tmp_path / "wnli" / "lr3e-05_seed7"
    with pytest.MonkeyPatch.context() as patch:  # stopped after step 2, as SIGTERM would stop it
        patch.setattr(Trainer, "_stop_requested", lambda self, stop: self.state.step == 2)
        sweep(*args)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_2"]
    assert not (run / "eval_results.json").exists()
    assert sweep(*args)["wnli"].best()[0] == 3e-5  # the same command again: resumed and finished
    assert json.loads((run / "eval_results.json").read_text())["step"] == 4


# --------------------------------------------------------------------------------------------------
# Harmful case 2: an epoch without a batch spun forever and ignored SIGTERM
# --------------------------------------------------------------------------------------------------


def test_too_little_data_for_one_batch_is_an_error_not_a_hang(tmp_path):
    words = ["the", "of", "and", "a", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at"]
    # 15 documents of ~30 tokens: 6 blocks of 64 to train on (one document in five held out), fewer than a batch of 8
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(30)) for i in range(15)]
    corpus = tmp_path / "fifteen.txt"
    corpus.write_text("\n\n".join(docs) + "\n")
    args = [*TINY, f"data.train_files={corpus}", "data.tokenizer_vocab_size=200", f"output_dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "roformer.cli", "pretrain", "--config", str(RECIPE), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:  # today's main: spins at 100% CPU; SIGTERM is caught and ignored
        proc.send_signal(signal.SIGTERM)
        time.sleep(3)
        stopped = proc.poll() is not None
        proc.kill()
        proc.communicate()
        pytest.fail(f"the run hung instead of refusing (stopped by SIGTERM: {stopped})")
    assert proc.returncode == 2, err
    assert "the training data gives no batch: fewer than 1 micro-batch(es) of 8 sequences per epoch" in err
    assert not (tmp_path / "run").exists()  # nothing left behind


SLOW_SETUP = """
import sys, time
from pathlib import Path
from roformer.tasks.mlm import MLMTask
from roformer.cli import main

real_setup = MLMTask.setup

def slow_setup(self, accelerator, run_dir):  # data loading that takes long
    real_setup(self, accelerator, run_dir)
    Path(sys.argv[1]).write_text("loading")
    while True:
        time.sleep(0.05)

MLMTask.setup = slow_setup
sys.exit(main(["pretrain", *sys.argv[2:]]))
"""


def test_sigterm_during_data_loading_stops_at_once_and_frees_the_run_directory(tmp_path):
    script, marker, run_dir = tmp_path / "slow.py", tmp_path / "marker", tmp_path / "run"
    script.write_text(SLOW_SETUP)
    args = ["--config", str(RECIPE), *TINY, f"output_dir={run_dir}", "train.max_steps=5"]
    proc = subprocess.Popen(
        [sys.executable, str(script), str(marker), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err[-2000:]
    assert b"stopped by SIGTERM" in err
    assert not run_dir.exists()  # a new run stopped before its first step leaves nothing (no stale lock either)


# --------------------------------------------------------------------------------------------------
# Harmful case 3: two processes, a checkpoint at every step
# --------------------------------------------------------------------------------------------------

RANK1_SAVES_LATE = """
import sys, time
from accelerate import Accelerator
from roformer.cli import main

real_save_state = Accelerator.save_state

def late_save_state(self, output_dir=None, **kwargs):
    if self.process_index == 1:
        time.sleep(0.5)  # a slow rank (or a slow shared filesystem): today's main renames before it writes
    return real_save_state(self, output_dir, **kwargs)

Accelerator.save_state = late_save_state
sys.exit(main(["pretrain", *sys.argv[1:]]))
"""


def test_two_process_checkpoints_hold_every_ranks_state(tmp_path):
    script, run_dir = tmp_path / "late.py", tmp_path / "run"
    script.write_text(RANK1_SAVES_LATE)
    args = ["--config", str(RECIPE), *TINY, f"output_dir={run_dir}", "train.per_device_batch_size=4"]
    args += ["train.max_steps=3", "train.save_every=1", "model.hidden_dropout=0", "model.attention_dropout=0"]
    done = launch_two(script, args, port=29541)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step_1", "step_2", "step_3"]  # no temporary directory left
    for path in checkpoints:
        assert (path / "random_states_0.pkl").is_file() and (path / "random_states_1.pkl").is_file(), path
        assert verify(path) is None
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["num_processes"] == 2 and "random_states_1.pkl" in manifest["files"]


def test_a_checkpoint_missing_a_ranks_file_is_not_complete(stopped_run, tmp_path):
    run_dir = copy_run(stopped_run, tmp_path / "run")
    step_4 = run_dir / "checkpoints" / "step_4"
    manifest = json.loads((step_4 / "manifest.json").read_text())
    manifest["files"]["random_states_1.pkl"] = 100  # as a 2-process checkpoint whose rank 1 never wrote
    (step_4 / "manifest.json").write_text(json.dumps(manifest))
    assert verify(step_4) == "random_states_1.pkl is missing"
    trainer = Trainer(tiny(run_dir, "train.resume_from=latest"))
    assert trainer.checkpoints.latest() == run_dir / "checkpoints" / "step_2"


# --------------------------------------------------------------------------------------------------
# Harmful case 4: the run directory is owned
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(tiny(run_dir, "train.max_steps=3", "train.save_every=100"))
    return run_dir


def test_a_finished_run_without_checkpoints_is_not_overwritten(finished_run, tmp_path, capsys):
    run_dir = copy_run(finished_run, tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoints")  # pruned by hand, as users do to save space
    before = {p.name: p.read_bytes() for p in (run_dir / "eval_results.json", run_dir / "metrics.jsonl")}
    assert pretrain(run_dir, "train.max_steps=3", "train.save_every=100") == 2
    assert "already holds a run (final, eval_results.json, metrics.jsonl" in one_error_line(capsys)
    assert pretrain(run_dir, "train.max_steps=3", "train.resume_from=latest") == 2
    assert "holds a finished run (final, eval_results.json) but no checkpoint to resume from" in one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in (run_dir / "eval_results.json", run_dir / "metrics.jsonl")} == before
    assert (run_dir / "final" / "model.safetensors").is_file()

    assert pretrain(run_dir, "train.max_steps=3", "train.resume_from=latest", "overwrite=true") == 2
    assert "overwrite=true and train.resume_from=latest contradict each other" in one_error_line(capsys)
    assert pretrain(run_dir, "train.max_steps=2", "train.save_every=100", "overwrite=true") == 0  # explicit
    assert json.loads((run_dir / "eval_results.json").read_text())["step"] == 2
    assert max(r["step"] for r in read_metrics(run_dir)) == 2


def test_a_live_lock_refuses_a_second_job_and_a_stale_one_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    host = socket.gethostname()
    (run_dir / LOCK_FILE).write_text(json.dumps({"host": host, "pid": os.getpid()}))  # a live process
    assert pretrain(run_dir, "train.max_steps=2") == 2
    assert f"in use by process {os.getpid()} on {host}" in one_error_line(capsys)
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # the other job's directory is untouched

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / LOCK_FILE).write_text(json.dumps({"host": host, "pid": dead.pid}))  # killed without cleaning up
    assert pretrain(run_dir, "train.max_steps=2", "train.save_every=100") == 0
    assert not (run_dir / LOCK_FILE).exists() and (run_dir / "final").is_dir()  # released at the end


def test_run_lock_is_exclusive_and_names_its_owner(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == {"host": socket.gethostname(), "pid": os.getpid()}
    with pytest.raises(UserError, match="in use by process"):
        RunLock(tmp_path).acquire()
    first.release()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(UserError, match="in use by process 1 on elsewhere .*delete the lock file"):
        RunLock(tmp_path).acquire()  # another host's process cannot be checked from here: refused


def test_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert pretrain(tmp_path / "file", "train.max_steps=2") == 2
    assert f"output_dir={tmp_path / 'file'}: is a file, not a directory" in one_error_line(capsys)
    assert (tmp_path / "file").read_text() == "x"


def deny_writes(monkeypatch, *places: Path) -> None:
    """`places` read-only as os.access sees them: root may write anywhere, so chmod cannot make the test."""
    real_access = os.access

    def access(path, mode, **kwargs):
        if mode & os.W_OK and Path(path).resolve() in {p.resolve() for p in places}:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_a_read_only_output_dir_is_one_line(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    deny_writes(monkeypatch, run_dir)
    assert pretrain(run_dir, "train.max_steps=2") == 2
    assert one_error_line(capsys) == f"error: output_dir={run_dir}: not writable"
    assert list(run_dir.iterdir()) == []  # not even a lock file


def test_an_output_dir_that_cannot_be_created_is_one_line(tmp_path, monkeypatch, capsys):
    run_dir, real_mkdir = tmp_path / "read_only" / "run", Path.mkdir

    def mkdir(self, *args, **kwargs):  # a read-only parent, as a non-root user meets it
        if self == run_dir:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert pretrain(run_dir, "train.max_steps=2") == 2
    assert one_error_line(capsys) == f"error: output_dir={run_dir}: cannot be created (Permission denied)"


# --------------------------------------------------------------------------------------------------
# Harmful case 5: a resume continues the same run
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, key",
    [
        ("model.position=sinusoidal", "model.position='sinusoidal'"),
        ("model.hidden_size=64", "model.hidden_size=64"),
        ("train.per_device_batch_size=4", "train.global_batch_size=4"),  # the global batch follows from it
        ("data.max_seq_length=32", "data.max_seq_length=32"),
        ("train.max_steps=3", "train.max_steps=3 is below the step"),
    ],
    ids=["scheme", "size", "batch", "block-length", "max_steps-below"],
)
def test_resume_refuses_a_changed_model_or_data_setting(stopped_run, tmp_path, capsys, change, key):
    run_dir = copy_run(stopped_run, tmp_path / "run")
    before = (run_dir / "config.yaml").read_text()
    assert pretrain(run_dir, "train.max_steps=8", "train.save_every=2", "train.resume_from=latest", change) == 2
    assert key in one_error_line(capsys)
    assert (run_dir / "config.yaml").read_text() == before


def test_resume_with_more_steps_continues_and_records_the_change(stopped_run, tmp_path):
    run_dir = copy_run(stopped_run, tmp_path / "run")
    train(tiny(run_dir, "train.max_steps=6", "train.save_every=2", "train.resume_from=latest", "train.log_every=2"))
    text = (run_dir / "config.yaml").read_text()
    history = [line for line in text.splitlines() if line.startswith("# resumed")]
    assert len(history) == 1 and "from step_4 at step 4" in history[0]
    assert "train.max_steps: 8 -> 6" in history[0] and "train.log_every: 1 -> 2" in history[0]
    assert load_config(run_dir / "config.yaml").train.max_steps == 6  # still a loadable config
    assert yaml.safe_load(text)["model"]["position"] == "rotary"


# --------------------------------------------------------------------------------------------------
# Weak cases: a broken latest checkpoint, train/tokens after a resume, the final row once
# --------------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _scramble(path: Path) -> None:
    path.write_bytes(b"\0" * path.stat().st_size)  # same size: only loading it finds out


@pytest.mark.parametrize(
    "damage",
    [
        lambda step: _truncate(step / "model.safetensors"),
        lambda step: _truncate(step / "optimizer.bin"),
        lambda step: _scramble(step / "model.safetensors"),
        lambda step: _scramble(step / "random_states_0.pkl"),  # accelerate ignored it: a silently inexact resume
        lambda step: (step / "trainer_state.json").write_text(""),
    ],
    ids=["truncated-weights", "truncated-optimizer", "corrupted-weights", "corrupted-rng", "empty-trainer-state"],
)
def test_a_broken_latest_checkpoint_falls_back_to_the_previous_one(stopped_run, tmp_path, capsys, damage):
    run_dir = copy_run(stopped_run, tmp_path / "run")
    damage(run_dir / "checkpoints" / "step_4")
    code = pretrain(run_dir, "train.max_steps=5", "train.save_every=2", "train.resume_from=latest")
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_2'} at step 2" in captured.out
    assert "warning: skipping a broken checkpoint" in captured.err and "step_4" in captured.err
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [1, 2, 3, 4, 5]


def test_train_tokens_and_the_final_row_are_exact_after_resumes(tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["train.max_steps=6", "train.save_every=100", "train.log_every=4", "train.eval_every=100"]
    train(tiny(straight, *common))
    vocab = f"data.tokenizer={straight / 'tokenizer'}"
    interrupted_run(resumed, 3, *common, vocab)  # between two logging steps
    train(tiny(resumed, *common, vocab, "train.resume_from=latest"))

    def tokens(run):
        return [(r["step"], r["train/tokens"]) for r in read_metrics(run) if "train/tokens" in r]

    assert tokens(resumed) == tokens(straight)
    metrics = read_metrics(resumed)
    assert train(tiny(resumed, *common, vocab, "train.resume_from=latest"))["eval/loss"] > 0  # done: nothing to do
    assert "already finished at step 6; nothing to do" in capsys.readouterr().out
    assert read_metrics(resumed) == metrics
    assert [r["step"] for r in metrics if "eval/loss" in r] == [6]  # the final evaluation row once


# --------------------------------------------------------------------------------------------------
# Harmful case 6 and weak cases: numeric arguments of the commands
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def bleu_files(tmp_path):
    (tmp_path / "src.en").write_text("a small dog\n")
    (tmp_path / "ref.de").write_text("ein kleiner Hund\n")
    return ["--src", str(tmp_path / "src.en"), "--ref", str(tmp_path / "ref.de"), "--checkpoint", str(tmp_path)]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--batch_size", "-3"], "--batch_size=-3: must be at least 1"),
        (["--batch_size", "0"], "--batch_size=0: must be at least 1"),
        (["--max_len_b", "-5"], "--max_len_b=-5: must be at least 0"),
        (["--beam", "0"], "--beam=0: must be at least 1"),
        (["--beam", "-1"], "--beam=-1: must be at least 1"),
        (["--max_len_a", "-1"], "--max_len_a=-1.0: must be a number at least 0"),
        (["--max_len_a", "nan"], "--max_len_a=nan"),
        (["--device", "nonsense"], "--device=nonsense: not a device name"),
    ],
)
def test_evaluate_bleu_refuses_bad_numbers_before_any_work(bleu_files, capsys, argv, expected):
    assert main(["evaluate-bleu", *bleu_files, *argv]) == 2
    assert expected in one_error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_evaluate_bleu_refuses_cuda_without_a_gpu(bleu_files, capsys):
    assert main(["evaluate-bleu", *bleu_files, "--device", "cuda"]) == 2
    assert "--device=cuda: no CUDA GPU is available here" in one_error_line(capsys)


def test_evaluate_bleu_checks_output_places_before_decoding(bleu_files, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    assert main(["evaluate-bleu", *bleu_files, "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path}: is a directory" in one_error_line(capsys)
    assert main(["evaluate-bleu", *bleu_files, "--json", str(tmp_path / "a_file" / "scores.json")]) == 2
    assert "is a file, not a directory" in one_error_line(capsys)


def test_plot_places_are_checked_before_the_work(tmp_path, capsys):
    """compare wrote `--out DIR` as DIR.png and said "plot: DIR"; a file in the path gave a traceback."""
    (tmp_path / "a_file").write_text("x")
    for argv in (["compare", "run"], ["extrapolate", "run"]):  # refused before the run is even read
        assert main([*argv, "--out", str(tmp_path)]) == 2
        assert one_error_line(capsys) == f"error: --out {tmp_path}: is a directory"
        assert main([*argv, "--out", str(tmp_path / "a_file" / "plot.png")]) == 2
        assert (
            one_error_line(capsys)
            == f"error: --out {tmp_path / 'a_file' / 'plot.png'}: {tmp_path / 'a_file'} is a file, not a directory"
        )


@pytest.mark.parametrize("flag", ["--out", "--json"])
def test_evaluate_bleu_refuses_a_read_only_place_before_decoding(bleu_files, tmp_path, monkeypatch, capsys, flag):
    import roformer.bleu

    def decode(*args, **kwargs):
        raise AssertionError("decoding started before the output place was checked")

    monkeypatch.setattr(roformer.bleu, "evaluate_bleu", decode)
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    (read_only / "old.txt").write_text("kept")
    deny_writes(monkeypatch, read_only, read_only / "old.txt")
    for path in (read_only / "new.txt", read_only / "old.txt", read_only / "sub" / "new.txt"):
        assert main(["evaluate-bleu", *bleu_files, "--device", "cpu", flag, str(path)]) == 2
        target = path if path.exists() else read_only
        assert one_error_line(capsys) == f"error: {flag} {path}: {target} is not writable"
    assert (read_only / "old.txt").read_text() == "kept"


def test_model_and_tokenizer_writers_check_their_output_directory_first(tmp_path, monkeypatch, capsys):
    """A file there gave a traceback after the work; an existing model there was silently replaced."""
    from roformer import ModelConfig, RoFormerForMaskedLM

    config = ModelConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    RoFormerForMaskedLM(config).save_pretrained(tmp_path / "model")
    RoFormerForMaskedLM(config).save_pretrained(tmp_path / "kept")
    (tmp_path / "a_file").write_text("x")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    deny_writes(monkeypatch, read_only)
    before = (tmp_path / "kept" / "model.safetensors").read_bytes()
    for out, expected in [
        (tmp_path / "a_file", "is a file, not a directory"),
        (
            tmp_path / "kept",
            "already holds a model or tokenizer (config.json, model.safetensors); choose a new directory",
        ),
        (read_only / "new", f"{read_only} is not writable"),
    ]:
        assert main(["convert", str(tmp_path / "model"), str(out)]) == 2
        assert one_error_line(capsys) == f"error: {out}: {expected}"
        assert main(["average-checkpoints", "RUN/checkpoints/step_1", "--out", str(out)]) == 2
        assert one_error_line(capsys) == f"error: --out {out}: {expected}"
        assert main(["train-tokenizer", "--config", str(RECIPE), "--out", str(out)]) == 2
        assert one_error_line(capsys) == f"error: --out {out}: {expected}"
    assert (tmp_path / "kept" / "model.safetensors").read_bytes() == before
    assert (tmp_path / "a_file").read_text() == "x"


def test_evaluate_bleu_refuses_a_max_len_beyond_a_learned_table(tmp_path, capsys):
    from roformer import ModelConfig, RoFormerForSeq2SeqLM
    from roformer.tasks.translation import train_joint_bpe

    tok = train_joint_bpe(["ein kleiner Hund", "a small dog"] * 20, vocab_size=60)
    config = ModelConfig(vocab_size=len(tok), hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                         num_decoder_layers=1, position="learned", max_position_embeddings=16)  # fmt: skip
    RoFormerForSeq2SeqLM(config).save_pretrained(tmp_path / "final")
    tok.save_pretrained(tmp_path / "final")
    (tmp_path / "src.en").write_text("a small dog\n")
    (tmp_path / "ref.de").write_text("ein kleiner Hund\n")
    argv = ["evaluate-bleu", "--checkpoint", str(tmp_path / "final"), "--src", str(tmp_path / "src.en")]
    argv += ["--ref", str(tmp_path / "ref.de"), "--device", "cpu"]
    assert main([*argv, "--max_len_b", "50"]) == 2
    assert "--max_len_b=50 allow translations of 50 tokens, but the model's learned position table has 16 rows" in (
        one_error_line(capsys)
    )
    assert main([*argv, "--max_len_b", "10"]) == 0


def test_training_refuses_a_decoding_length_beyond_a_learned_table(tmp_path, capsys):
    """Evaluation during training decoded past the table after all the training, blaming the input."""
    recipe = ROOT / "configs" / "wmt14" / "multi30k_small.yaml"
    argv = ["translate", "--config", str(recipe), "model.position=learned", "model.max_position_embeddings=40"]
    argv += ["data.max_source_length=40", "data.max_target_length=40", f"output_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    assert (
        "data.max_len_a=1.2 and data.max_len_b=10 allow translations of 56 tokens (sources of "
        "data.max_source_length=40), but model.position='learned' has 40 positions (at most 39 tokens after BOS)"
    ) in one_error_line(capsys)
    assert not (tmp_path / "run").exists()
    load_config(recipe, [*argv[3:5], "data.max_source_length=20", "data.max_target_length=20"])  # 33 fit in 40


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["extrapolate", "run", "--factors", "0"], "--factors=0: must be at least 1"),
        (["extrapolate", "run", "--max_tokens", "-1"], "--max_tokens=-1: must be at least 1"),
        (["glue-sweep", "--learning_rates", "0"], "--learning_rates=0.0: must be positive"),
        (["compare", "run", "--at-steps", "-1"], "--at-steps=-1: must be at least 0"),
        (["glue-sweep", "--seeds", "-1"], "--seeds=-1: must be at least 0"),
        (["demo", "--seeds", "1", "-2"], "--seeds=-2: must be at least 0"),
        (
            ["prepare", "--config", str(RECIPE), "--out", "unused", "--num_proc", "0"],
            "--num_proc=0: must be at least 1",
        ),
    ],
)
def test_numeric_arguments_of_other_commands(capsys, argv, expected):
    assert main(argv) == 2
    assert expected in one_error_line(capsys)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.num_workers=-1", "train.num_workers must be at least 0, got -1"),
        ("train.warmup_steps=-5", "train.warmup_steps must be at least 0, got -5"),
        ("train.max_grad_norm=-1", "train.max_grad_norm must be at least 0, got -1.0"),
    ],
)
def test_negative_train_numbers_are_refused(tmp_path, capsys, override, expected):
    assert pretrain(tmp_path / "run", override) == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "recipe, override, expected",
    [
        ("pretrain/tiny.yaml", "train.seed=-1", "train.seed must be at least 0, got -1"),
        ("pretrain/tiny.yaml", "model.num_heads=0", "model.num_heads must be at least 1, got 0"),  # was 1 % 0
        ("wmt14/multi30k_small.yaml", "data.max_len_b=-1", "data.max_len_a=1.2 and data.max_len_b=-1 must be"),
        ("wmt14/multi30k_small.yaml", "data.length_penalty=nan", "data.length_penalty must be a finite number"),
        ("wmt14/multi30k_small.yaml", "data.max_eval_samples=-1", "data.max_eval_samples must be at least 1"),
        ("glue/tiny_rte.yaml", "data.max_eval_samples=-1", "data.max_eval_samples must be at least 1 (or null)"),
        ("glue/tiny_rte.yaml", "data.max_train_samples=0", "data.max_train_samples must be at least 1 (or null)"),
    ],
)
def test_recipe_numbers_used_late_are_refused_at_load(tmp_path, capsys, recipe, override, expected):
    """Decoding settings are used after the training, and a negative sample count sliced off the last
    examples: refused before anything runs."""
    command = {"pretrain": "pretrain", "wmt14": "translate", "glue": "finetune"}[recipe.split("/")[0]]
    assert main([command, "--config", str(ROOT / "configs" / recipe), override, f"output_dir={tmp_path}/run"]) == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# Fault injection: killed again and again, at random moments and inside saves
# --------------------------------------------------------------------------------------------------

KILLED_AT = """
import os, random, signal, sys, threading, time
import roformer.checkpointing as checkpointing
from roformer.cli import main
from roformer.trainer import Trainer

mode, value = sys.argv[1], float(sys.argv[2])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "after":  # a kill at a random moment of training: a step, an evaluation or a save
    loop = Trainer._loop
    def timed_loop(self, *args):
        threading.Timer(value, die).start()
        return loop(self, *args)
    Trainer._loop = timed_loop
elif mode in ("in_save", "in_publish"):  # inside the value-th save: files written, or half renamed into place
    calls = {"n": 0}
    target = checkpointing.Checkpoints._wait_for_ranks if mode == "in_save" else checkpointing.os.replace
    def killing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == int(value):
            die()
        return target(*args, **kwargs)
    if mode == "in_save":
        checkpointing.Checkpoints._wait_for_ranks = staticmethod(killing)
    else:
        checkpointing.os.replace = killing
sys.exit(main(["pretrain", *sys.argv[3:]]))
"""


def test_killed_at_random_moments_resumes_to_the_same_weights(tmp_path):
    """SIGKILL (no chance to clean up) many times, at random moments and inside saves; every restart resumes from
    a complete checkpoint, and the end is bit for bit the uninterrupted run's."""
    from safetensors.torch import load_file

    # long enough that no killed launch can finish before its kill, even on a fast idle machine (8 steps could)
    common = ["train.max_steps=30", "train.save_every=1", "train.log_every=1", "train.keep_last=2"]
    straight = tmp_path / "straight"
    train(tiny(straight, *common))
    vocab = f"data.tokenizer={straight / 'tokenizer'}"

    script, run_dir = tmp_path / "killed.py", tmp_path / "run"
    script.write_text(KILLED_AT)
    args = ["--config", str(RECIPE), *TINY, *common, vocab, f"output_dir={run_dir}", "train.resume_from=latest"]
    rng = random.Random(15)
    plan = [("in_save", 2), ("after", 0.05), ("in_publish", 1), ("after", 0.1), ("none", 0)]
    resumed_at = []
    for mode, value in plan:
        value = value + rng.uniform(0, 0.25) if mode == "after" else value
        done = subprocess.run(
            [sys.executable, str(script), mode, str(value), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode in (0, -signal.SIGKILL), done.stderr[-2000:]
        resumed_at += [line for line in done.stdout.splitlines() if line.startswith("resumed from")]
        for step_dir in (run_dir / "checkpoints").glob("step_*"):
            assert verify(step_dir) is None, step_dir  # published means complete
        if done.returncode == 0:
            break
    assert done.returncode == 0 and mode == "none", "the run did not finish"
    assert len(resumed_at) >= 3, resumed_at  # it really was cut short and resumed, several times

    ours, reference = (
        load_file(run_dir / "final" / "model.safetensors"),
        load_file(straight / "final" / "model.safetensors"),
    )
    assert ours.keys() == reference.keys()
    for name in ours:
        assert torch.equal(ours[name], reference[name]), name
    losses = [(r["step"], r["train/loss"]) for r in read_metrics(run_dir) if "train/loss" in r]
    assert losses == [(r["step"], r["train/loss"]) for r in read_metrics(straight) if "train/loss" in r]


# --------------------------------------------------------------------------------------------------
# The shipped accelerate configs
# --------------------------------------------------------------------------------------------------


def test_each_shipped_accelerate_config_is_supported():
    """multi_gpu.yaml runs in the two-process tests above; DeepSpeed takes our accumulation and clipping; FSDP
    was removed (final/ and averaging need full state dicts) and is refused if a user brings their own."""
    shipped = sorted(p.name for p in (ROOT / "configs" / "accelerate").glob("*.yaml"))
    assert shipped == ["deepspeed_zero2.yaml", "multi_gpu.yaml"]
    deepspeed = yaml.safe_load((ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml").read_text())
    assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(deepspeed["deepspeed_config"])
    assert "mixed_precision" not in deepspeed and "mixed_precision" not in yaml.safe_load(MULTI_GPU_YAML.read_text())


def test_deepspeed_gets_the_runs_accumulation_and_clipping(monkeypatch):
    from roformer.trainer import our_deepspeed_settings

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "8")  # as the launcher passes a YAML's value
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "1.0")
    our_deepspeed_settings(tiny("unused", "train.gradient_accumulation_steps=4", "train.max_grad_norm=0.5").train)
    assert os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "1"  # the trainer accumulates micro-batches itself
    assert os.environ["ACCELERATE_GRADIENT_CLIPPING"] == "0.5"


def test_launches_the_trainer_cannot_serve_are_refused(monkeypatch):
    from types import SimpleNamespace

    from roformer.trainer import check_distribution, check_one_process_group

    monkeypatch.setenv("WORLD_SIZE", "8")  # a GPU config on a machine without GPUs: 8 lone "main" processes
    with pytest.raises(UserError, match="8 processes were launched but accelerate sees 1 in the group"):
        check_one_process_group(SimpleNamespace(num_processes=1, distributed_type="DistributedType.NO"))
    tc = tiny("unused", "train.average_checkpoints=2").train
    with pytest.raises(UserError, match="FSDP is not supported"):
        check_distribution(SimpleNamespace(distributed_type="DistributedType.FSDP"), tc)
    with pytest.raises(UserError, match="train.average_checkpoints=2 cannot read DeepSpeed"):
        check_distribution(SimpleNamespace(distributed_type="DistributedType.DEEPSPEED"), tc)


def test_runs_of_different_precision_in_one_process(tmp_path):
    """accelerate keeps one precision per process: the second run raised a ValueError (a notebook, tests)."""
    for name, precision in (("bf16", "bf16"), ("fp32", "no")):
        train(tiny(tmp_path / name, f"train.mixed_precision={precision}", "train.max_steps=1", "data.max_documents=20"))
        assert load_config(tmp_path / name / "config.yaml").train.mixed_precision == precision
        assert (tmp_path / name / "final").is_dir()


def test_a_stop_is_honoured_in_every_phase():
    """In the training loop the first SIGTERM/SIGINT asks for a checkpoint at the next step boundary (after an
    evaluation in progress); outside it (data loading, the final evaluation) and for a second signal, it stops
    at once."""
    from roformer.trainer import Interrupted, StopRequested

    before = signal.getsignal(signal.SIGTERM)
    with StopRequested() as stop:
        with pytest.raises(Interrupted, match="stopped by SIGTERM"):
            signal.raise_signal(signal.SIGTERM)  # set-up: not armed
        stop.armed = True
        signal.raise_signal(signal.SIGINT)
        assert stop.requested  # the loop saves and exits at the next step
        with pytest.raises(Interrupted, match="stopped by SIGINT"):
            signal.raise_signal(signal.SIGINT)  # asked twice: now
    assert signal.getsignal(signal.SIGTERM) == before  # the previous handlers are back
