"""`roformer launch`: accelerate launch with its config file and the command checked first (issue 15).

The refusals run in process (the checks end before anything is started); one two-process run and one
interrupted run go through the real launcher, as a user would start them.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_robustness import RECIPE, TINY, one_error_line

from roformer.cli import main
from roformer.launch import check_config_file, preflight

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
MULTI_GPU_YAML = ROOT / "configs" / "accelerate" / "multi_gpu.yaml"
PRETRAIN = ["pretrain", "--config", str(RECIPE)]


@pytest.mark.parametrize(
    "text, expected",
    [
        (None, "no such file"),
        ("distributed_type: MULTI_GPU\nnum_processes: [2\n", "not valid YAML (line 3: expected ',' or ']'"),
        ("distributed_type: BANANA\n", "distributed_type='BANANA' is not allowed; expected one of NO, MULTI_CPU"),
        ("distributed_type: NO\n", "distributed_type=False is not allowed; expected one of NO, MULTI_CPU, "),
        ("- distributed_type\n", "expected a mapping of accelerate settings (key: value), not list"),
        ("distributed_type: MULTI_GPU\nmixed_precision: fp12\n", "mixed_precision='fp12' is not allowed"),
        ("distributed_type: MULTI_GPU\nnum_processes: eight\n", "num_processes='eight' is not allowed"),
        ("distributed_type: MULTI_GPU\nnum_gpus: 2\n", "had unknown keys (['num_gpus'])"),  # accelerate's own loader
        ("num_processes: 2\n", "A `distributed_type` must be specified in the config file."),
    ],
    ids=["missing", "yaml-syntax", "bad-distributed-type", "bare-NO", "not-a-mapping", "bad-precision",
         "bad-number", "unknown-key", "no-distributed-type"],
)  # fmt: skip
def test_a_bad_accelerate_config_is_one_line_before_any_launch(tmp_path, capsys, text, expected):
    config = tmp_path / "accelerate.yaml"
    if text is not None:
        config.write_text(text)
    assert main(["launch", "--config_file", str(config), *PRETRAIN]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: --config_file {config}: ") and expected in line, line


def test_a_missing_config_file_through_the_command_is_exit_2_without_traceback(tmp_path):
    """`accelerate launch --config_file missing.yaml` printed a traceback (and, through a pipe, exited 0)."""
    done = subprocess.run(
        [sys.executable, "-m", "roformer.cli", "launch", "--config_file", "missing.yaml", *PRETRAIN],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stderr) == (2, "error: --config_file missing.yaml: no such file\n")


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_each_shipped_accelerate_config_loads(path):
    assert check_config_file(path)["distributed_type"] in {"MULTI_GPU", "DEEPSPEED"}


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["pretrian"], "roformer launch: 'pretrian' is not a roformer command; expected one of ['pretrain', "),
        (["--num_processes"], "roformer launch: argument --num_processes/--num-processes: expected one argument"),
        (["--num_processes", "2"], "name a roformer command after the launcher's options"),
        (["--num_processes", "0", *PRETRAIN], "roformer launch: --num_processes=0: must be at least 1"),
        (["--machine_rank", "-1", *PRETRAIN], "roformer launch: --machine_rank=-1: must be at least 0"),
        (["-m", *PRETRAIN], "--module and --no_python are not allowed"),
        ([*PRETRAIN, "model.positon=rotary"], "model.positon"),  # the recipe and overrides: once, not per process
        (["finetune", "--config", str(RECIPE)], "task='mlm', but this command trains task='glue'"),
        (["extrapolate", "run", "--factors", "0"], "--factors=0: must be at least 1"),
    ],
)
def test_the_command_and_its_arguments_are_checked_before_any_launch(capsys, argv, expected):
    assert main(["launch", "--cpu", *argv]) == 2
    assert expected in one_error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_a_gpu_config_without_a_gpu_is_refused_unless_on_cpu(monkeypatch, capsys):
    """Without a GPU the processes of a MULTI_GPU launch each acted as a lone main process."""
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert main(["launch", "--config_file", str(MULTI_GPU_YAML), *PRETRAIN]) == 2
    assert "distributed_type=MULTI_GPU needs CUDA GPUs and none is visible here; set ACCELERATE_USE_CPU=true" in (
        one_error_line(capsys)
    )
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    command = preflight(["--config_file", str(MULTI_GPU_YAML), "--num_processes", "2", *PRETRAIN, "train.max_steps=1"])
    assert command[1:] == [
        "-m", "accelerate.commands.launch", "--config_file", str(MULTI_GPU_YAML), "--num_processes", "2",
        "--module", "roformer.cli", *PRETRAIN, "train.max_steps=1",
    ]  # fmt: skip


def test_a_good_config_launches_two_processes(tmp_path):
    run_dir = tmp_path / "run"
    launcher = [sys.executable, "-m", "roformer.cli", "launch", "--config_file", str(MULTI_GPU_YAML)]
    launcher += ["--num_processes", "2", "--main_process_port", "29571"]
    args = [*PRETRAIN, *TINY, "train.per_device_batch_size=4", "train.max_steps=2", f"output_dir={run_dir}"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: ") == 1  # printed by the main process only
    assert json.loads((run_dir / "eval_results.json").read_text())["step"] == 2
    assert (run_dir / "checkpoints" / "step_2" / "random_states_1.pkl").is_file()  # the second rank took part


def test_sigterm_to_the_launcher_reaches_the_run_which_saves_before_the_launcher_exits(tmp_path):
    """accelerate's one-process launcher dies on SIGTERM without passing it on; the launcher signals the run too
    and returns only when it has finished, with its status."""
    run_dir = tmp_path / "run"
    args = [*PRETRAIN, *TINY, "train.max_steps=100000", "train.eval_every=100000", f"output_dir={run_dir}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "roformer.cli", "launch", "--cpu", "--num_processes", "1", *args],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]  # the run's own status: stopped cleanly with a checkpoint
    assert "checkpoint saved; continue with train.resume_from=latest" in out
    assert len(list((run_dir / "checkpoints").iterdir())) == 1
    assert not (run_dir / ".lock").exists()  # the run has finished, not just accelerate
