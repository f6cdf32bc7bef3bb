"""`make demo`: a short real pretraining comparison of position schemes on the built-in corpus."""

from __future__ import annotations

from pathlib import Path

from roformer.compare import compare_runs
from roformer.config import load_config
from roformer.trainer import train

DEMO_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "pretrain" / "demo.yaml"


def run_demo(
    output_dir: str,
    recipe: str | None = None,
    schemes=("rotary", "sinusoidal", "learned"),
    overrides: list[str] | None = None,
) -> str:
    """Train one model per scheme with the same data, seed and budget; print and return the comparison."""
    output_dir = Path(output_dir)
    run_dirs = []
    for scheme in schemes:
        run_dir = output_dir / scheme
        shared = [f"data.tokenizer={run_dirs[0] / 'tokenizer'}"] if run_dirs else []  # one vocabulary for all
        cfg = load_config(
            recipe or DEMO_RECIPE,
            [f"model.position={scheme}", f"output_dir={run_dir}", "train.resume_from=latest", *shared]
            + (overrides or []),
        )
        print(f"\n== {scheme}: training into {run_dir}")
        train(cfg)
        run_dirs.append(run_dir)
    table = compare_runs(run_dirs, output_dir / "compare.png")
    print("\n" + table + f"\n\nplot: {output_dir / 'compare.png'}")
    return table
