"""What a task plugs into the shared trainer: data, model, per-step batch preparation, evaluation, artifacts.

The lifecycle every task shares lives here: loading `init_from` (whose architecture becomes `cfg.model`, so
config.yaml records the model actually trained), resolving the tokenizer (given, from a resumed run, from
`init_from`, or trained), starting the model from the initial weights, and saving the run's artifacts.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from roformer.config import ModelConfig, RunConfig, _check_lengths_fit
from roformer.errors import ConfigError, DataError
from roformer.modeling import PreTrainedModel

FINE_TUNING_FIELDS = ("hidden_dropout", "attention_dropout", "attention_impl")
"""Model settings a run starting from init_from decides (recipe or command line); every other model field comes
from the checkpoint, and a command-line override of one that differs from the checkpoint is refused."""


def resolve_checkpoint(init_from: str) -> Path:
    """init_from names a model directory (config.json), or a run directory whose final/ is one."""
    path = Path(init_from)
    if (path / "config.json").is_file():
        return path
    if (path / "final" / "config.json").is_file():
        return path / "final"
    raise DataError(
        f"init_from={init_from}: no config.json there (expected a run's final/ or a transformers checkpoint)"
    )


def architecture_from_checkpoint(
    checkpoint: ModelConfig, requested: ModelConfig, command_line: dict, init_from: str
) -> ModelConfig:
    """The checkpoint's architecture with the run's FINE_TUNING_FIELDS. A `model.*` override on the command line
    that cannot apply to the checkpoint's weights (a size, the position scheme) stops with a ConfigError: the
    recipe's model section is a default for training from scratch, the command line is what the user asked."""
    overrides = command_line.get("model")
    for key in overrides if isinstance(overrides, dict) else ():
        if key in FINE_TUNING_FIELDS or not hasattr(checkpoint, key):
            continue
        wanted, has = getattr(requested, key), getattr(checkpoint, key)
        if wanted != has:
            raise ConfigError(
                f"model.{key}={wanted!r} cannot apply with init_from={init_from}: its weights have {key}={has!r} "
                f"(only model.{', model.'.join(FINE_TUNING_FIELDS)} can change when starting from a checkpoint)"
            )
    return dataclasses.replace(checkpoint, **{name: getattr(requested, name) for name in FINE_TUNING_FIELDS})


class Task(ABC):
    """One experiment. The trainer calls, in order: `setup`, `build_model`, the training data (`train_dataset`,
    `train_collator`, `epoch_batches`) and `eval_dataloader`, then per micro-batch `loss`, and at the end
    `save_artifacts` and `final_evaluation`."""

    batch_unit = "sequences"
    """What train.global_batch_size counts for this task: sequences, or tokens (translation)."""

    init_from_class: type | None = None
    """The model class `init_from` must hold (its weights are loaded whole into the task's model)."""
    tokenizer_files: tuple[str, ...] = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
    """Any of these makes a directory a tokenizer directory."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.tokenizer = None
        self.init_path: Path | None = None
        """The model directory of cfg.init_from, once `load_init_from` ran."""
        self.init_model: PreTrainedModel | None = None

    # ---- the shared lifecycle ------------------------------------------------------------------

    def load_init_from(self) -> None:
        """Load cfg.init_from (when set) and write its architecture into cfg.model, with the run's dropouts."""
        cfg = self.cfg
        if not cfg.init_from:
            return
        self.init_path = resolve_checkpoint(cfg.init_from)
        self.init_model = self.read_init_model(self.init_path)
        command_line = getattr(cfg, "command_line", {}) or {}
        cfg.model = architecture_from_checkpoint(self.init_model.config, cfg.model, command_line, cfg.init_from)
        _check_lengths_fit(cfg, f"init_from={cfg.init_from}")

    def read_init_model(self, path: Path) -> PreTrainedModel:
        """The model saved at `path`, checked to be of `init_from_class`."""
        from roformer.modeling import load_pretrained

        model = load_pretrained(path)
        if self.init_from_class is not None and not isinstance(model, self.init_from_class):
            raise DataError(
                f"init_from={self.cfg.init_from}: holds a {type(model).__name__}, not a {self.init_from_class.__name__}"
            )
        return model

    def initial_weights(self, model: PreTrainedModel) -> PreTrainedModel:
        """`model` (built from cfg.model) starting from init_from's weights when there are some."""
        if self.init_model is not None:
            model.load_state_dict(self.init_model.state_dict())
            self.init_model = None  # one copy of the weights is enough
        return model

    def has_tokenizer(self, path: Path) -> bool:
        return any((Path(path) / name).is_file() for name in self.tokenizer_files)

    def read_tokenizer(self, path: str | Path, key: str):
        """A saved tokenizer; `key` names where it came from in errors."""
        from roformer.tokenization import load_tokenizer

        if not Path(path).is_dir():
            raise DataError(f"{key}={path}: not a tokenizer directory")
        return load_tokenizer(path)

    def resolve_tokenizer(self, accelerator, run_dir: Path, train: Callable[[], Any]):
        """Which tokenizer the run uses, in this order: data.tokenizer; the run's own when resuming; init_from's
        (pretrained embeddings are only meaningful under their own token ids); else `train()` makes one.
        Sets cfg.model.vocab_size and pad_token_id (from the checkpoint's architecture with init_from)."""
        cfg = self.cfg
        resumed = [Path(run_dir) / "tokenizer"]
        if cfg.train.resume_from not in (None, "latest"):  # a checkpoint of another run directory
            resumed.append(Path(cfg.train.resume_from).resolve().parent.parent / "tokenizer")
        saved = next((path for path in resumed if self.has_tokenizer(path)), None) if cfg.train.resume_from else None
        if cfg.data.tokenizer:
            tokenizer = self.read_tokenizer(cfg.data.tokenizer, "data.tokenizer")
        elif saved is not None:
            tokenizer = self.read_tokenizer(saved, "train.resume_from")  # a resumed run keeps its vocabulary
        elif self.init_path is not None:
            if not self.has_tokenizer(self.init_path):
                raise DataError(f"init_from={self.init_path}: no tokenizer files there; name one with data.tokenizer")
            tokenizer = self.read_tokenizer(self.init_path, "init_from")
        else:
            with accelerator.main_process_first():
                tokenizer = train()
        if self.init_path is None:
            cfg.model.vocab_size = len(tokenizer)
            cfg.model.pad_token_id = tokenizer.pad_token_id
        elif len(tokenizer) > cfg.model.vocab_size:
            raise DataError(
                f"the tokenizer has {len(tokenizer)} tokens but init_from={cfg.init_from} embeds "
                f"{cfg.model.vocab_size}; use the checkpoint's own tokenizer (leave data.tokenizer empty)"
            )
        self.tokenizer = tokenizer
        return tokenizer

    @abstractmethod
    def setup(self, accelerator, run_dir: Path) -> None:
        """Read and check the data, make or load the tokenizer (kept in `run_dir`), build the datasets.

        Runs before anything else is written to `run_dir`, so bad input leaves no run behind.
        Sets `cfg.model.vocab_size` (and anything else the data decides) in the resolved config.
        """

    @abstractmethod
    def build_model(self) -> PreTrainedModel: ...

    @abstractmethod
    def train_dataset(self) -> Dataset:
        """Training examples, read by index (the keys `epoch_batches` yields)."""

    @abstractmethod
    def train_collator(self) -> Callable[[list], dict[str, torch.Tensor]]:
        """Examples -> a CPU batch; runs in DataLoader workers, so per-example randomness (MLM masking) lives here,
        seeded by the example's position in the data, never by the global RNG."""

    def epoch_batches(self, epoch: int, batch_size: int) -> Sequence[np.ndarray]:
        """The keys of every micro-batch of `epoch`, in order: by default the examples in a random order seeded
        by (seed, epoch), `batch_size` at a time, the last batch shorter (fine-tuning sees every example; several
        processes drop a tail of fewer batches than processes). Deterministic, so a resume seeks to any position
        without reading the batches before it."""
        n = len(self.train_dataset())
        order = np.random.default_rng([self.cfg.train.seed, epoch]).permutation(n)
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]

    @abstractmethod
    def eval_dataloader(self) -> DataLoader: ...

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> int:
        """How many terms `loss` averages over in this batch: its labels, less those set to -100 (padding, unmasked
        tokens). Several processes weight their means by it, so that a step is the mean over the global batch."""
        return int(batch["labels"].ne(-100).sum())

    def flops_per_token(self) -> float | None:
        """Model FLOPs per training token (roformer/flops.py), for train/mfu; None: not counted for this task."""
        return None

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Real (non-padding) tokens in a batch, for tokens/s."""
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        return batch["input_ids"].numel()

    @abstractmethod
    def evaluate(self, model, dataloader, accelerator, max_batches: int | None = None) -> dict[str, float]:
        """Metrics over `dataloader` (the prepared eval_dataloader), keyed without the `eval/` prefix,
        e.g. {'loss': 2.1, 'accuracy': 0.6}. Use `accelerator.gather_for_metrics` so several processes agree."""

    def save_artifacts(self, path: Path) -> None:
        """Save what a model directory needs besides the weights (the tokenizer): the trainer calls it for the
        run's tokenizer/ once the run is accepted, and for final/."""
        self.tokenizer.save_pretrained(path)

    def final_evaluation(self, model, dataloader, accelerator, run_dir: Path) -> dict[str, Any]:
        """The complete evaluation written to eval_results.json (tasks may add test predictions)."""
        return {f"eval/{k}": v for k, v in self.evaluate(model, dataloader, accelerator).items()}
