"""Length extrapolation on two tiny real runs (rotary and learned), trained for a few steps."""

import pytest
from conftest import ROOT, SHARED_DATA

from roformer.cli import main
from roformer.extrapolation import evaluate_lengths, format_rows


@pytest.fixture(scope="module")
def runs(tiny_pretrained_runs):
    return tiny_pretrained_runs


def test_rows_cover_every_length_and_scaling_and_learned_stops_at_its_table(runs):
    rows = evaluate_lengths(runs, factors=(1, 2), scalings=("none", "linear", "yarn"), max_tokens=1024)
    rotary = [r for r in rows if r["scheme"] == "rotary"]
    assert {(r["factor"], r["scaling"]) for r in rotary} == {(1, "none"), (2, "none"), (2, "linear"), (2, "yarn")}
    assert all(r["loss"] > 0 and 0 <= r["accuracy"] <= 1 for r in rotary)
    learned = {r["factor"]: r for r in rows if r["scheme"] == "learned"}
    assert learned[1]["loss"] > 0
    assert learned[2]["loss"] is None and "beyond the learned table (32 rows)" in learned[2]["note"]
    table = format_rows(rows)
    assert "64 tokens" in table and "n/a: beyond the learned table" in table


def test_scaled_copy_keeps_the_weights_and_changes_the_rotation(runs):
    import torch

    from roformer.extrapolation import _with_scaling
    from roformer.modeling import RoFormerForMaskedLM

    base = RoFormerForMaskedLM.from_pretrained(runs[0] / "final")
    scaled = _with_scaling(base, "linear", 2)
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), scaled.state_dict().values()))
    positions = torch.arange(64)
    rope, scaled_rope = (
        base.roformer.embeddings.positions.rope(positions),
        scaled.roformer.embeddings.positions.rope(positions),
    )
    torch.testing.assert_close(scaled_rope.cos[2 * 7], rope.cos[7])  # position interpolation: 14 -> 7


def test_extrapolate_command_prints_the_table_and_writes_the_plot(runs, tmp_path, capsys):
    out = tmp_path / "extrapolation.png"
    assert (
        main(
            [
                "extrapolate",
                *map(str, runs),
                "--factors",
                "1",
                "2",
                "--scalings",
                "none",
                "ntk",
                "--max_tokens",
                "512",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "| rotary | rotary | ntk |" in capsys.readouterr().out
    assert out.stat().st_size > 10_000


def test_demo_compare_and_extrapolate_take_the_score_bias_schemes(tmp_path, capsys):
    """Smoke test: `roformer demo` trains alibi and t5_relative, `compare` tables them, `extrapolate` evaluates
    them at twice their length (no scaling applies to them, no table limits them)."""
    tiny = [
        "data.corpus=files",
        f"data.train_files={SHARED_DATA / 'text' / 'tiny_shakespeare.txt'}",
        "data.max_documents=600",
        "data.tokenizer_vocab_size=500",
        "data.max_seq_length=32",
        "model.hidden_size=32",
        "model.num_layers=1",
        "model.num_heads=2",
        "model.intermediate_size=64",
        "train.max_steps=2",
        "train.eval_every=2",
        "train.per_device_batch_size=8",
        "train.log_every=1",
        "train.log_with=none",
    ]
    recipe = str(ROOT / "configs" / "pretrain" / "tiny.yaml")
    demo = ["demo", *tiny, "--output_dir", str(tmp_path), "--config", recipe, "--schemes", "alibi", "t5_relative"]
    assert main(demo) == 0
    runs = [str(tmp_path / "alibi"), str(tmp_path / "t5_relative")]
    assert main(["compare", *runs, "--out", str(tmp_path / "curves.png")]) == 0
    assert main(["extrapolate", *runs, "--factors", "1", "2", "--max_tokens", "256"]) == 0
    table = capsys.readouterr().out
    assert "| alibi | alibi | none |" in table and "| t5_relative | t5_relative | none |" in table
    assert "n/a" not in table.split("| alibi | alibi | none |")[1]


def test_a_missing_run_is_one_line_and_exit_status_2(tmp_path, capsys):
    run = tmp_path / "runs" / "rotary_seed1"
    assert main(["extrapolate", str(run)]) == 2
    expected = f"error: {run}: no final/ model here (expected a finished pretraining run directory)"
    assert capsys.readouterr().err.strip() == expected
