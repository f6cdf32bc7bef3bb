"""Comparison table and plot from run directories (metrics.jsonl + config.yaml written by hand)."""

import json

import pytest
import yaml

from roformer.cli import main
from roformer.compare import compare_runs


def make_run(root, name, scheme, losses, attention="softmax"):
    run = root / name
    run.mkdir(parents=True)
    model = {"position": scheme, "attention": attention, "linear_feature_map": "elu"}
    (run / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    rows = []
    for step, loss in losses:
        rows.append({"step": step, "train/loss": loss + 0.5, "train/tokens": step * 100, "train/tokens_per_s": 1000.0})
        rows.append({"step": step, "eval/loss": loss, "eval/mlm_accuracy": 1 / loss})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_table_plot_and_fixed_step_means(tmp_path):
    runs = [
        make_run(tmp_path, "rotary_seed1", "rotary", [(100, 4.0), (200, 3.0)]),
        make_run(tmp_path, "rotary_seed2", "rotary", [(100, 5.0), (200, 4.0)]),
        make_run(tmp_path, "learned_seed1", "learned", [(100, 6.0), (200, 5.0)]),
    ]
    table = compare_runs(runs, tmp_path / "curves.png", at_steps=[200])
    assert "| rotary_seed1 | rotary | 200 | 1000 | 3 |" in table
    assert "| rotary | 2 | 3.5000 (3.0000-4.0000) |" in table  # mean and range over the two seeds
    assert "| learned | 1 | 5.0000 |" in table
    assert (tmp_path / "curves.png").stat().st_size > 20_000


def test_linear_attention_runs_are_grouped_apart_from_softmax(tmp_path):
    runs = [
        make_run(tmp_path / "softmax", "rotary_seed1", "rotary", [(100, 4.0)]),
        make_run(tmp_path / "linear", "rotary_seed1", "rotary", [(100, 5.0)], attention="linear"),
    ]
    table = compare_runs(runs, at_steps=[100])
    assert "| rotary | 1 | 4.0000 |" in table
    assert "| rotary, linear-elu attention | 1 | 5.0000 |" in table


def test_translation_runs_get_their_bleu_and_mlm_runs_no_empty_bleu_columns(tmp_path):
    mlm = make_run(tmp_path / "mlm", "rotary_seed1", "rotary", [(100, 4.0)])
    assert "bleu" not in compare_runs([mlm], at_steps=[100])
    translation = make_run(tmp_path / "mt", "rotary", "rotary", [(100, 4.0)])
    with (translation / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 100, "eval/bleu": 21.5}) + "\n")
    assert "eval/bleu @100" in compare_runs([translation], tmp_path / "mt.png", at_steps=[100])
    assert "21.5000" in compare_runs([translation], at_steps=[100])


def test_a_directory_without_metrics_is_a_one_line_error(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    assert "no metrics.jsonl here" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["compare", "--help"]])
def test_compare_script_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0 and "--at-steps" in capsys.readouterr().out
