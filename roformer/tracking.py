"""Where metrics go: `metrics.jsonl` in the run directory (always) and accelerate's trackers (wandb by default)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def tracker_name(log_with: str) -> str | None:
    """accelerate's `log_with`; wandb runs offline unless the user configured it (an API key or WANDB_MODE)."""
    if log_with == "none":
        return None
    if log_with == "wandb" and "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
    return log_with


class MetricsLog:
    """Appends one JSON object per line: {"step": N, "train/loss": ..., ...}."""

    def __init__(self, run_dir: Path, accelerator, resumed_step: int | None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        if accelerator.is_main_process:
            kept = []
            if resumed_step is not None and self.path.is_file():  # drop what was logged after the checkpoint
                kept = [
                    line
                    for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resumed_step
                ]
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, metrics: dict, step: int) -> None:
        metrics = {k: (v if isinstance(v, (int, str)) else float(v)) for k, v in metrics.items()}
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.accelerator.log(metrics, step=step)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
