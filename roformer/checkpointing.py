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


def write_averaged_model(checkpoints: list[str | Path], out: str | Path, like: str | Path | None = None) -> Path:
    """Average the model weights of `checkpoints` into `out`, a directory `from_pretrained` loads.

    `like` is a model directory of the same run (RUN/final or RUN/best) giving the architecture, config and the
    files beside the weights (the tokenizer); by default RUN/final of the first checkpoint (RUN/checkpoints/step_N).
    """
    from roformer.errors import UserError
    from roformer.modeling import load_pretrained

    if not checkpoints:
        raise UserError("give at least one checkpoint directory (RUN/checkpoints/step_N)")
    paths = [Path(p) for p in checkpoints]
    for path in paths:
        if not path.is_dir():
            raise UserError(f"{path}: not a checkpoint directory")
        try:
            model_weights_file(path)
        except FileNotFoundError as err:
            raise UserError(str(err)) from None
    like = Path(like) if like else paths[0].resolve().parent.parent / "final"
    if not (like / "config.json").is_file():
        raise UserError(f"{like}: no config.json here; name a model directory of the same run with --like")
    model = load_pretrained(like)
    averaged = average_checkpoints(paths)
    missing, unexpected = model.load_state_dict(averaged, strict=False)
    # accelerate saves tied weights (embeddings = output projection) once: a key is only missing if no alias was saved
    state = model.state_dict()
    saved = {state[k].data_ptr() for k in averaged if k in state}
    missing = [k for k in missing if state[k].data_ptr() not in saved]
    if unexpected or missing:
        raise UserError(
            f"{paths[0]}: weights do not fit the model in {like} (missing {missing}, unexpected {unexpected})"
        )
    out = Path(out)
    model.save_pretrained(out)
    for file in like.iterdir():  # tokenizer and anything else saved beside the weights
        if file.is_file() and file.name not in ("model.safetensors", "config.json"):
            shutil.copy(file, out / file.name)
    return out
