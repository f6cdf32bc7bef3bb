"""Length extrapolation on two tiny real runs (rotary and learned), trained for a few steps."""

import pytest

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


def test_a_missing_run_is_one_line_and_exit_status_2(tmp_path, capsys):
    run = tmp_path / "runs" / "rotary_seed1"
    assert main(["extrapolate", str(run)]) == 2
    expected = f"error: {run}: no final/ model here (expected a finished pretraining run directory)"
    assert capsys.readouterr().err.strip() == expected
