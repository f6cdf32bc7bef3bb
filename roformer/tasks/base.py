"""What a task plugs into the shared trainer: data, model, per-step batch preparation, evaluation, artifacts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from roformer.config import RunConfig
from roformer.modeling import PreTrainedModel


class Task(ABC):
    """One experiment. The trainer calls, in order: `setup`, `build_model`, the training data (`train_dataset`,
    `train_collator`, `epoch_batches`) and `eval_dataloader`, then per micro-batch `loss`, and at the end
    `save_artifacts` and `final_evaluation`."""

    batch_unit = "sequences"
    """What train.global_batch_size counts for this task: sequences, or tokens (translation)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

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

    @abstractmethod
    def save_artifacts(self, path: Path) -> None:
        """Save what `final/` needs besides the weights (the tokenizer)."""

    def final_evaluation(self, model, dataloader, accelerator, run_dir: Path) -> dict[str, Any]:
        """The complete evaluation written to eval_results.json (tasks may add test predictions)."""
        return {f"eval/{k}": v for k, v in self.evaluate(model, dataloader, accelerator).items()}
