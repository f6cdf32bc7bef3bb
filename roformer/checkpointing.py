"""Resumable checkpoints under `run_dir/checkpoints/step_<N>/`, written so a crash never leaves a broken latest.

A checkpoint is accelerate's full state (model, optimizer, each rank's RNG, ...), the run's resolved
`config.yaml` (a resume is checked against it), `manifest.json` (every file and its size, each rank's included)
and `trainer_state.json` (step and data position), written last. Every rank writes into a hidden temporary
directory; the main process renames it into place only after all of them are done. `complete()` and `latest()`
only return checkpoints whose files all match the manifest; a resume that finds the newest one unreadable anyway
falls back to the previous one with a warning (`load_newest`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.yaml"
"""The run's resolved config when the checkpoint was written: a resume is checked against it."""
RANK_WAIT_S = 120.0
"""How long the main process waits for another rank's files to appear (a shared filesystem may lag)."""

# Tied input/output embeddings are one tensor: accelerate saves it once and says so at every checkpoint.
logging.getLogger("accelerate.utils.other").addFilter(lambda record: "Removed shared tensor" not in record.getMessage())
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(Exception):
    """A checkpoint directory is incomplete or cannot be read."""


def verify(path: Path) -> str | None:
    """Why the checkpoint at `path` is not complete, or None when it is: a readable trainer_state.json, and every
    file of the manifest (each rank's included) present with the size it was written with."""
    try:
        json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        return f"no {STATE_FILE}"
    except (OSError, ValueError):
        return f"{STATE_FILE} is unreadable"
    if not (path / MANIFEST_FILE).is_file():
        return None  # written before manifests existed: trainer_state.json, written last, is all there is
    try:
        files = json.loads((path / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return f"{MANIFEST_FILE} is unreadable"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


class Checkpoints:
    def __init__(self, run_dir: Path, accelerator, keep_last: int):
        self.root = Path(run_dir) / "checkpoints"
        self.accelerator = accelerator
        self.keep_last = keep_last

    def candidates(self) -> list[tuple[int, Path]]:
        """(step, path) of every step_N directory, complete or not, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        return [(step, path) for step, path in self.candidates() if verify(path) is None]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def save(self, step: int, trainer_state: dict, config_yaml: str | None = None, keep: int | None = None) -> Path:
        """Save on every process, then publish on the main one once every rank's files are written.

        Each rank writes its part (its RNG state, and the model and optimizer on the main process) into a hidden
        temporary directory; after a barrier the main process waits until every rank's files are visible, records
        their sizes in the manifest, writes trainer_state.json last and renames the directory into place.
        """
        acc = self.accelerator
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp_step_{step}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()  # every rank's save_state has returned before the directory is published
        if acc.is_main_process:
            self._wait_for_ranks(tmp, acc.num_processes)
            if config_yaml is not None:
                (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            manifest = {"num_processes": acc.num_processes, "files": files}
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))  # last: marks it complete
            if final.exists():  # the same step saved again (e.g. at the end after a resume): swap it out
                old = self.root / f".old_step_{step}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            self._prune(keep or self.keep_last)
        acc.wait_for_everyone()
        return final

    @staticmethod
    def _wait_for_ranks(tmp: Path, num_processes: int) -> None:
        """accelerate writes random_states_<rank>.pkl on every rank: on a shared filesystem another node's file
        can show up here a little after its rank returned."""
        missing = [tmp / f"random_states_{rank}.pkl" for rank in range(num_processes)]
        deadline = time.monotonic() + RANK_WAIT_S
        while missing := [f for f in missing if not f.is_file()]:
            if time.monotonic() > deadline:
                raise CheckpointError(f"{tmp}: {missing[0].name} never appeared; the checkpoint is not published")
            time.sleep(0.1)

    def _prune(self, keep: int) -> None:
        for step, path in self.complete()[:-keep]:
            gone = self.root / f".pruned_step_{step}"
            os.replace(path, gone)  # out of sight first: a kill during the deletion leaves no half checkpoint
            shutil.rmtree(gone, ignore_errors=True)
        for pattern in (".tmp_step_*", ".old_step_*", ".pruned_step_*"):  # left by a process killed while saving
            for path in self.root.glob(pattern):
                shutil.rmtree(path, ignore_errors=True)

    def load(self, path: Path) -> dict:
        """Restore the accelerate state saved at `path` and return its trainer state; CheckpointError if the
        checkpoint is incomplete or unreadable."""
        path = Path(path)
        reason = verify(path)
        if reason is not None:
            raise CheckpointError(f"{path}: {reason}")
        try:
            # accelerate swallows an unreadable RNG state and goes on with fresh randomness (an inexact resume
            # reported as exact): read every rank's first, on every rank, so that all of them fall back alike
            for rng_file in sorted(path.glob("random_states_*.pkl")):
                torch.load(rng_file, weights_only=False)
            self.accelerator.load_state(str(path))
        except Exception as err:  # a corrupted file: safetensors, torch.load and pickle raise many kinds
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{path}: cannot be loaded ({first})") from err
        return json.loads((path / STATE_FILE).read_text())

    def load_newest(self) -> tuple[Path, dict] | None:
        """Load the newest checkpoint that loads; a broken newer one is skipped with a warning."""
        for _, path in reversed(self.candidates()):
            try:
                return path, self.load(path)
            except CheckpointError as err:
                if self.accelerator.is_main_process:
                    print(f"warning: skipping a broken checkpoint: {err}; trying the previous one", file=sys.stderr)
        return None


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


# --------------------------------------------------------------------------------------------------
# A resume continues the same run: its configuration is checked against the checkpoint's
# --------------------------------------------------------------------------------------------------

MAY_CHANGE_ON_RESUME = {
    "output_dir",
    "overwrite",
    "init_from",  # the weights come from the checkpoint; the architecture is checked through model.*
    "model.attention_impl",  # the same numbers by another kernel
    "train.max_steps",  # may grow: checked against the checkpoint's step
    "train.num_epochs",
    "train.resume_from",
    "train.eval_every",
    "train.max_eval_batches",
    "train.log_every",
    "train.save_every",
    "train.keep_last",
    "train.best_metric",
    "train.best_mode",
    "train.average_checkpoints",
    "train.log_with",
    "train.project",
    "train.num_workers",
    "data.max_eval_samples",  # evaluation only
    "data.beam_size",
    "data.length_penalty",
    "data.max_len_a",
    "data.max_len_b",
}
"""Keys a resumed run may set differently from its checkpoint: how long, how often and where it reports.
Everything else shapes the model or the data and must match, or the resumed run is not the run it continues."""


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recorded_config(checkpoint: Path) -> dict | None:
    """The resolved config a checkpoint was written with (older checkpoints: its run's config.yaml)."""
    import yaml

    for file in (checkpoint / CONFIG_FILE, checkpoint.parent.parent / CONFIG_FILE):
        if file.is_file():
            try:
                return yaml.safe_load(file.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError:
                continue
    return None


def config_changes(recorded: dict, new: dict, checkpoint: Path, step: int) -> dict[str, tuple]:
    """{key: (old, new)} of the allowed changes; a change of any other key is refused with a UserError naming it."""
    from roformer.errors import UserError

    old_flat, new_flat = flatten(recorded), flatten(new)
    changes = {}
    for key, value in new_flat.items():
        if key not in old_flat or old_flat[key] == value:
            continue  # a key the checkpoint's code version did not have, or unchanged
        if key not in MAY_CHANGE_ON_RESUME:
            raise UserError(
                f"train.resume_from: {key}={value!r} but {checkpoint} was trained with {key}={old_flat[key]!r}; "
                "a resumed run keeps its model and data settings (only schedule and reporting keys such as "
                "train.max_steps may change); start a new output_dir to train something else"
            )
        changes[key] = (old_flat[key], value)
    max_steps = new_flat.get("train.max_steps")
    if isinstance(max_steps, int) and max_steps < step:
        raise UserError(
            f"train.max_steps={max_steps} is below the step of {checkpoint} ({step}); a resumed run can only "
            "continue (train.max_steps >= the checkpoint's step)"
        )
    return changes
