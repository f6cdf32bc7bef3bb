"""What a task plugs into the shared trainer: data, model, per-step batch preparation, evaluation, artifacts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from roformer.config import RunConfig
from roformer.modeling import PreTrainedModel


class Task(ABC):
    """One experiment. The trainer calls, in order: `setup`, `build_model`, the dataloaders, then per step
    `training_batch` and `loss`, and at the end `save_artifacts` and `final_evaluation`."""

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
    def train_dataloader(self) -> DataLoader:
        """Shuffled batches; the trainer seeds the order per epoch, so runs and resumes see the same data."""

    @abstractmethod
    def eval_dataloader(self) -> DataLoader: ...

    def training_batch(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """Per-step randomness that must not depend on the global RNG (e.g. MLM masking seeded by step)."""
        return batch

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> int:
        """How many terms `loss` averages over in this batch: its labels, less those set to -100 (padding, unmasked
        tokens). Several processes weight their means by it, so that a step is the mean over the global batch."""
        return int(batch["labels"].ne(-100).sum())

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
