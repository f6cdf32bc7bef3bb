"""Resumable checkpoints under `run_dir/checkpoints/step_<N>/`, written so a crash never leaves a broken latest.

A checkpoint is accelerate's full state (model, optimizer, RNG, ...) plus `trainer_state.json` (step and data
position). It is written to a hidden temporary directory and renamed into place only when complete;
`latest()` only ever returns complete checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

STATE_FILE = "trainer_state.json"

# Tied input/output embeddings are one tensor: accelerate saves it once and says so at every checkpoint.
logging.getLogger("accelerate.utils.other").addFilter(lambda record: "Removed shared tensor" not in record.getMessage())
_STEP_DIR = re.compile(r"^step_(\d+)$")


class Checkpoints:
    def __init__(self, run_dir: Path, accelerator, keep_last: int):
        self.root = Path(run_dir) / "checkpoints"
        self.accelerator = accelerator
        self.keep_last = keep_last

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def save(self, step: int, trainer_state: dict, keep: int | None = None) -> Path:
        """Save on every process (accelerate gathers what it needs), publish atomically on the main one."""
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp_step_{step}"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        if self.accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
            if final.exists():  # the same step saved again (e.g. at the end after a resume): swap it out
                old = self.root / f".old_step_{step}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            self._prune(keep or self.keep_last)
        self.accelerator.wait_for_everyone()
        return final

    def _prune(self, keep: int) -> None:
        for _, path in self.complete()[:-keep]:
            shutil.rmtree(path, ignore_errors=True)

    def load(self, path: Path) -> dict:
        self.accelerator.load_state(str(path))
        return json.loads((Path(path) / STATE_FILE).read_text())


def model_weights_file(checkpoint: Path) -> Path:
    """accelerate names the first model's weights model.safetensors (or pytorch_model.bin)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (checkpoint / name).is_file():
            return checkpoint / name
    raise FileNotFoundError(f"{checkpoint}: no model weights in this checkpoint")


def average_checkpoints(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the model weights in `paths` (Vaswani et al. average the last 5), in float32."""
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        file = model_weights_file(Path(path))
        weights = load_file(str(file)) if file.suffix == ".safetensors" else torch.load(file, map_location="cpu")
        for key, value in weights.items():
            total[key] = total.get(key, 0) + value.float()
    return {key: value / len(paths) for key, value in total.items()}
