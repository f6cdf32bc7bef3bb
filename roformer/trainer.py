"""The one training loop every task shares, on accelerate: optimizer, schedule, accumulation, clipping,
evaluation, logging, atomic checkpoints, exact resume, clean stop on SIGTERM/SIGINT, NaN guard.

A task (roformer.tasks.base.Task) supplies data, model, loss and metrics; nothing here is task-specific.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from roformer.batching import RankBatches, split_global_batch, split_global_tokens
from roformer.checkpointing import Checkpoints, average_checkpoints
from roformer.config import RunConfig, TrainConfig, save_config
from roformer.errors import DataError, UserError
from roformer.tasks import get_task_class
from roformer.tasks.base import Task
from roformer.tracking import MetricsLog, tracker_name


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainerState:
    """Where a run stands: saved with every checkpoint, enough to continue with the same data order."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    batches_in_epoch: int = 0
    """Global micro-batches of `epoch` already consumed (the same count on every process)."""
    num_processes: int = 1
    micro_batch_size: int = 0
    """The micro-batch geometry the position counts in (sequences per process, or its token budget)."""
    tokens_seen: int = 0
    """Real (non-padding) training tokens over all processes."""
    best_value: float | None = None
    status: str = "running"


def no_decay(name: str) -> bool:
    """Biases and LayerNorm weights take no weight decay (BERT's convention)."""
    return name.endswith(".bias") or ".norm" in name or "_norm" in name or name.startswith("norm")


def build_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not no_decay(n)], "weight_decay": tc.weight_decay},
        {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_epsilon)


def build_scheduler(optimizer, tc: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' schedule; with warmup_init_lr > 0 the warmup starts there instead of at 0 (fairseq)."""
    scheduler = get_scheduler(
        tc.lr_scheduler, optimizer, num_warmup_steps=tc.warmup_steps, num_training_steps=tc.max_steps
    )
    floor = tc.warmup_init_lr / tc.learning_rate
    if floor > 0:
        base = scheduler.lr_lambdas[0]

        def with_floor(step: int) -> float:
            return floor + (1 - floor) * base(step) if step < tc.warmup_steps else base(step)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, with_floor)
    return scheduler


class StopRequested:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (then it checkpoints and exits)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, cfg: RunConfig, task: Task | None = None):
        self.cfg = cfg
        self.tc = cfg.train
        self.task = task or get_task_class(cfg.task)(cfg)
        self.run_dir = Path(cfg.output_dir)
        self.accelerator = Accelerator(  # accumulation is ours: a step's micro-batches are weighted by their terms
            mixed_precision=self.tc.mixed_precision,
            log_with=tracker_name(self.tc.log_with),
            project_dir=str(self.run_dir),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
        self.checkpoints = Checkpoints(self.run_dir, self.accelerator, self.tc.keep_last)
        self.state = TrainerState()

    # ---------------------------------------------------------------------------------------------
    # Set-up
    # ---------------------------------------------------------------------------------------------

    def _resume_point(self) -> Path | None:
        resume = self.tc.resume_from
        if resume is None:
            if self.checkpoints.complete():
                raise UserError(
                    f"{self.run_dir}: output_dir already holds checkpoints; continue it with train.resume_from=latest "
                    "or choose a new output_dir"
                )
            return None
        if resume == "latest":
            return self.checkpoints.latest()  # None: nothing saved yet, start from the beginning
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise UserError(f"train.resume_from={resume}: not a complete checkpoint directory")
        return path

    def _resolve_batch(self) -> None:
        """train.global_batch_size -> this run's micro-batch and accumulation steps for its number of processes,
        recorded in config.yaml (and train.num_epochs -> train.max_steps)."""
        tc, processes = self.tc, self.accelerator.num_processes
        if self.task.batch_unit == "tokens":
            budget = self.cfg.data.max_tokens
            total = tc.global_batch_size or budget * tc.gradient_accumulation_steps
            self.micro_batch_size, tc.gradient_accumulation_steps = split_global_tokens(total, processes, budget)
        else:
            total = tc.global_batch_size or tc.per_device_batch_size * tc.gradient_accumulation_steps
            micro, tc.gradient_accumulation_steps = split_global_batch(total, processes, tc.per_device_batch_size)
            self.micro_batch_size = tc.per_device_batch_size = micro
        tc.global_batch_size = total
        if tc.num_epochs is not None:
            batches = len(self.task.epoch_batches(0, self.micro_batch_size)) // processes
            tc.max_steps = tc.num_epochs * max(1, batches // tc.gradient_accumulation_steps)

    def _write_run_header(self) -> None:
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
        self.accelerator.wait_for_everyone()

    # ---------------------------------------------------------------------------------------------
    # The loop
    # ---------------------------------------------------------------------------------------------

    def _epoch_loader(self, epoch: int, start: int) -> DataLoader:
        """This process's batches of `epoch` from global micro-batch `start` on, read and collated by workers."""
        acc = self.accelerator
        batches = self.task.epoch_batches(epoch, self.micro_batch_size)
        if len(batches) < acc.num_processes:
            raise DataError(
                f"the training data holds {len(batches)} micro-batch(es) of {self.micro_batch_size} "
                f"{self.task.batch_unit} per epoch, fewer than one per process ({acc.num_processes}): use more data "
                "or a smaller train.global_batch_size"
            )
        return DataLoader(
            self.task.train_dataset(),
            batch_sampler=RankBatches(batches, acc.process_index, acc.num_processes, start),
            collate_fn=self.task.train_collator(),
            num_workers=self.tc.num_workers,
            pin_memory=acc.device.type == "cuda",
            # its own generator: a new iterator (each epoch, each resume) must not draw from the global RNG (dropout)
            generator=torch.Generator().manual_seed(self.tc.seed),
        )

    def _micro_batches(self):
        """(CPU batch, loss terms) forever, epoch after epoch, starting where the state says: the position is
        sought directly (the epoch's order is recomputed, no batch before it is read)."""
        state = self.state
        while True:
            for batch in self._epoch_loader(state.epoch, state.batches_in_epoch):
                state.batches_in_epoch += 1
                yield batch
            state.epoch += 1
            state.batches_in_epoch = 0

    def _to_device(self, batch: dict) -> dict:
        device = self.accelerator.device
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train(self) -> dict:
        """Run to train.max_steps (or until stopped) and return the final evaluation."""
        set_seed(self.tc.seed)
        resume_dir = self._resume_point()
        self.task.setup(self.accelerator, self.run_dir)  # bad data fails here, before the run dir is written
        self._resolve_batch()
        self._write_run_header()

        model = self.task.build_model()
        optimizer = build_optimizer(model, self.tc)
        scheduler = build_scheduler(optimizer, self.tc)
        eval_dl = self.task.eval_dataloader()
        # Without a generator of its own, every new iterator draws a seed from the global RNG and shifts dropout.
        eval_dl.generator = torch.Generator().manual_seed(self.tc.seed)
        model, optimizer, eval_dl = self.accelerator.prepare(model, optimizer, eval_dl)
        self.accelerator.register_for_checkpointing(scheduler)
        self.model, self.optimizer, self.scheduler, self.eval_dl = model, optimizer, scheduler, eval_dl

        geometry = {"num_processes": self.accelerator.num_processes, "micro_batch_size": self.micro_batch_size}
        self.state = TrainerState(**geometry)
        if resume_dir is not None:
            self.state = TrainerState(**{**geometry, **self.checkpoints.load(resume_dir)})
            self.state.status = "running"
            self._check_geometry(resume_dir, geometry)
            self._print(f"resumed from {resume_dir} at step {self.state.step}")
        self.log = MetricsLog(self.run_dir, self.accelerator, self.state.step if resume_dir else None)
        if self.accelerator.log_with:
            self.accelerator.init_trackers(
                self.tc.project,
                config=_flat(self.cfg.to_dict()),
                init_kwargs={"wandb": {"dir": str(self.run_dir), "name": self.run_dir.name}},
            )

        with StopRequested() as stop:
            self._loop(stop)
        if self.state.status == "interrupted":
            self.accelerator.end_training()
            return {"status": "interrupted", "step": self.state.step}
        results = self._finish()
        self.accelerator.end_training()
        return results

    def _check_geometry(self, resume_dir: Path, geometry: dict) -> None:
        """The data position counts global micro-batches of the checkpoint's geometry; a resume must share it."""
        saved = {k: getattr(self.state, k) for k in geometry}
        if saved["micro_batch_size"] and saved != geometry:
            raise UserError(
                f"train.resume_from={resume_dir}: the checkpoint was trained with {saved['num_processes']} process(es) "
                f"of micro-batch {saved['micro_batch_size']}, this run has {geometry['num_processes']} of "
                f"{geometry['micro_batch_size']}; resume with the same number of processes"
            )
        self.state.num_processes, self.state.micro_batch_size = geometry["num_processes"], geometry["micro_batch_size"]

    def _loop(self, stop: StopRequested) -> None:
        acc, tc, model = self.accelerator, self.tc, self.model
        model.train()
        bar = tqdm(
            total=tc.max_steps,
            initial=self.state.step,
            desc="train",
            dynamic_ncols=True,
            disable=not acc.is_local_main_process,
        )
        # Sums over the logging window, kept on the device: read once per log, not once per micro-batch.
        window = torch.zeros(3, dtype=torch.float64, device=acc.device)  # loss x terms, terms, tokens
        window_start = time.perf_counter()
        batches = self._micro_batches()
        while self.state.step < tc.max_steps:
            step_batches = [next(batches) for _ in range(tc.gradient_accumulation_steps)]
            terms = [self.task.loss_terms(b) for b in step_batches]
            tokens = sum(self.task.count_tokens(b) for b in step_batches)
            total_terms = self._global_sum(sum(terms))
            for i, (batch, n_terms) in enumerate(zip(step_batches, terms)):
                last = i == len(step_batches) - 1
                with contextlib.nullcontext() if last else acc.no_sync(model):
                    loss = self.task.loss(model, self._to_device(batch))
                    # The mean over every term of the global batch, however it is split over processes and
                    # micro-batches: this micro-batch's mean weighted by its share of the terms (x processes,
                    # since DDP averages gradients over them). A process with more masked or target tokens counts
                    # for more, as in fairseq.
                    acc.backward(loss * (acc.num_processes * n_terms / max(total_terms, 1)))
                window[0] += loss.detach().double() * n_terms
            window[1] += sum(terms)
            window[2] += tokens
            if tc.max_grad_norm > 0:
                acc.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if not acc.optimizer_step_was_skipped:
                self.scheduler.step()
            self.state.step += 1
            bar.update(1)
            step = self.state.step

            if step % tc.log_every == 0 or step == tc.max_steps:
                elapsed = time.perf_counter() - window_start
                loss_sum, terms_sum, tokens_sum = acc.reduce(window, "sum").tolist()
                mean_loss = loss_sum / max(terms_sum, 1)  # per term over the window, all processes
                self._check_finite(mean_loss)
                self.state.tokens_seen += int(tokens_sum)
                self.log.log(
                    {
                        "train/loss": mean_loss,
                        "train/lr": self.scheduler.get_last_lr()[0],
                        "train/tokens_per_s": tokens_sum / max(elapsed, 1e-9),
                        "train/tokens": self.state.tokens_seen,
                        "train/epoch": self.state.epoch,
                    },
                    step,
                )
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                window.zero_()
                window_start = time.perf_counter()
            if step % tc.eval_every == 0 and step < tc.max_steps:
                self._evaluate(step, tc.max_eval_batches)
            if step % tc.save_every == 0 and step < tc.max_steps:
                self._check_finite_window(window)
                self._save()
            if self._stop_requested(stop):
                self._check_finite_window(window)
                self._save()
                self.state.status = "interrupted"
                self._print(f"stopped at step {step}; checkpoint saved; continue with train.resume_from=latest")
                break
        bar.close()

    def _global_sum(self, value: int) -> int:
        """`value` summed over processes (one collective per step; none in a single process)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return value
        return int(acc.reduce(torch.tensor(value, device=acc.device), "sum").item())

    def _check_finite_window(self, window: torch.Tensor) -> None:
        """Before a checkpoint: the loss since the last log must be finite, so no diverged weights are kept."""
        loss_sum, terms_sum, _ = self.accelerator.reduce(window.clone(), "sum").tolist()
        self._check_finite(loss_sum / max(terms_sum, 1))

    def _stop_requested(self, stop: StopRequested) -> bool:
        flag = torch.tensor(int(stop.requested), device=self.accelerator.device)
        return (
            bool(self.accelerator.reduce(flag, "max").item()) if self.accelerator.num_processes > 1 else stop.requested
        )

    def _check_finite(self, loss: float) -> None:
        bad = torch.tensor(int(not math.isfinite(loss)), device=self.accelerator.device)
        if self.accelerator.reduce(bad, "max").item():
            latest = self.checkpoints.latest()
            kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint had been saved yet"
            raise TrainingDiverged(
                f"loss became {loss} at step {self.state.step}; stopped without saving; {kept} "
                "(try a lower train.learning_rate, more warmup or train.max_grad_norm)"
            )

    def _evaluate(self, step: int, max_batches: int | None) -> dict:
        model = self.model
        model.eval()
        with torch.no_grad():
            metrics = {
                f"eval/{k}": v
                for k, v in self.task.evaluate(model, self.eval_dl, self.accelerator, max_batches).items()
            }
        model.train()
        self.log.log(metrics, step)
        self._keep_if_best(metrics, step)
        return metrics

    def _keep_if_best(self, metrics: dict, step: int) -> None:
        name = self.tc.best_metric
        if name is None:
            return
        if name not in metrics:
            raise UserError(f"train.best_metric={name} is not among the evaluation metrics: {', '.join(metrics)}")
        value, best = metrics[name], self.state.best_value
        better = best is None or (value > best if self.tc.best_mode == "max" else value < best)
        if better:
            self.state.best_value = value
            if self.accelerator.is_main_process:
                self.accelerator.unwrap_model(self.model).save_pretrained(self.run_dir / "best")
                (self.run_dir / "best" / "best.json").write_text(json.dumps({"step": step, name: value}))
            self.accelerator.wait_for_everyone()

    def _save(self) -> Path:
        return self.checkpoints.save(self.state.step, asdict(self.state))

    # ---------------------------------------------------------------------------------------------
    # The end
    # ---------------------------------------------------------------------------------------------

    def _finish(self) -> dict:
        acc, tc = self.accelerator, self.tc
        step = self.state.step
        self._evaluate(step, tc.max_eval_batches)
        self.state.status = "done"
        self._save()
        model = acc.unwrap_model(self.model)
        if tc.average_checkpoints > 1:
            paths = [p for _, p in self.checkpoints.complete()[-tc.average_checkpoints :]]
            model.load_state_dict(average_checkpoints(paths), strict=False)
            self._print(f"averaged the weights of {len(paths)} checkpoints: {', '.join(p.name for p in paths)}")
        elif tc.best_metric and (self.run_dir / "best").is_dir():
            best = type(model).from_pretrained(self.run_dir / "best")
            model.load_state_dict(best.state_dict())
        model.eval()
        with torch.no_grad():
            results = self.task.final_evaluation(self.model, self.eval_dl, acc, self.run_dir)
        if acc.is_main_process:
            model.save_pretrained(self.run_dir / "final")
            self.task.save_artifacts(self.run_dir / "final")
            (self.run_dir / "eval_results.json").write_text(json.dumps({"step": step, **results}, indent=2))
        acc.wait_for_everyone()
        return results

    def _print(self, message: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(message)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


def train(cfg: RunConfig) -> dict:
    """Run the task named by `cfg.task` to the end and return its final evaluation."""
    return Trainer(cfg).train()
