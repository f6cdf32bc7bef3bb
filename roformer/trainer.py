"""The one training loop every task shares, on accelerate: optimizer, schedule, accumulation, clipping,
evaluation, logging, atomic checkpoints, exact resume, clean stop on SIGTERM/SIGINT, NaN guard.

A task (roformer.tasks.base.Task) supplies data, model, loss and metrics; nothing here is task-specific.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from roformer.batching import RankBatches, split_global_batch, split_global_tokens
from roformer.checkpointing import (
    STATE_FILE,
    CheckpointError,
    Checkpoints,
    average_checkpoints,
    config_changes,
    recorded_config,
    verify,
)
from roformer.config import RunConfig, TrainConfig
from roformer.errors import DataError, UserError
from roformer.flops import device_peak_flops, mfu
from roformer.rundir import RunLock, check_run_dir
from roformer.tasks import get_task_class
from roformer.tasks.base import Task
from roformer.tracking import MetricsLog, tracker_name

PREPARATION_TIMEOUT_HOURS = 12


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


def build_optimizer(model: torch.nn.Module, tc: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW without decay on biases and norms; `fused` (CUDA): one kernel for every parameter's update."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not no_decay(n)], "weight_decay": tc.weight_decay},
        {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0},
    ]
    betas = (tc.adam_beta1, tc.adam_beta2)
    return torch.optim.AdamW(groups, lr=tc.learning_rate, betas=betas, eps=tc.adam_epsilon, fused=fused or None)


def resolve_precision(requested: str) -> str:
    """train.mixed_precision=auto -> bf16 where a GPU supports it, else no."""
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


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


class Interrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT outside the training loop (set-up, final evaluation), or a second one inside it."""


class StopRequested:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then it checkpoints and exits).

    Only while `armed` (inside the training loop, where the next step boundary is near); elsewhere, and for a
    second signal, it raises `Interrupted` at once, so no phase (reading data, evaluating) can ignore a stop.
    """

    def __init__(self):
        self.requested = False
        self.armed = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if not self.armed or self.requested:
            raise Interrupted(f"stopped by {signal.Signals(signum).name}")
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def our_deepspeed_settings(tc: TrainConfig) -> None:
    """Under DeepSpeed, accelerate takes gradient accumulation and clipping from the launcher's YAML and silently
    prefers them to ours: the run's config decides instead (the launcher passes the YAML's values as these
    variables, read when the Accelerator is created)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = "1"  # the trainer accumulates micro-batches itself
        os.environ["ACCELERATE_GRADIENT_CLIPPING"] = str(tc.max_grad_norm) if tc.max_grad_norm > 0 else "auto"


def check_one_process_group(accelerator) -> None:
    """A launcher that started N processes which do not form one group (e.g. a GPU config on a machine without
    GPUs) would have N processes each train alone as the main one, writing the same run directory."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and accelerator.num_processes != launched:
        raise UserError(
            f"{launched} processes were launched but accelerate sees {accelerator.num_processes} in the group "
            f"(distributed type {accelerator.distributed_type}); on CPU launch with ACCELERATE_USE_CPU=true and "
            "--multi_gpu, or use a config whose distributed type this machine supports"
        )


def check_distribution(accelerator, tc: TrainConfig) -> None:
    """What this trainer does not support is refused before any work, not found broken at the end."""
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if kind == "FSDP":
        raise UserError(
            "FSDP is not supported: final/, best/ and checkpoint averaging are written from full state dicts; "
            "use configs/accelerate/multi_gpu.yaml (DDP) or deepspeed_zero2.yaml"
        )
    if kind == "DEEPSPEED" and tc.average_checkpoints > 1:
        raise UserError(
            f"train.average_checkpoints={tc.average_checkpoints} cannot read DeepSpeed's checkpoint format; "
            "set it to 0 or launch with configs/accelerate/multi_gpu.yaml"
        )


class Trainer:
    def __init__(self, cfg: RunConfig, task: Task | None = None):
        self.cfg = cfg
        self.tc = cfg.train
        self.task = task or get_task_class(cfg.task)(cfg)
        self.run_dir = Path(cfg.output_dir)
        self.tc.mixed_precision = resolve_precision(self.tc.mixed_precision)  # config.yaml records the one used
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 products (outside autocast) on tensor cores
            torch.backends.cudnn.allow_tf32 = True
        our_deepspeed_settings(self.tc)
        # One process may train several runs (demo, a notebook): accelerate fixes the precision of its process-wide
        # state at the first run and raised a ValueError at a run with another; each run's own settings win.
        AcceleratorState._reset_state()
        self.accelerator = Accelerator(  # accumulation is ours: a step's micro-batches are weighted by their terms
            # The other ranks wait at a barrier while the main process prepares a raw corpus on first use: hours
            # for a 20 GB corpus, far beyond the default 30-minute collective timeout.
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=PREPARATION_TIMEOUT_HOURS))],
            mixed_precision=self.tc.mixed_precision,
            log_with=tracker_name(self.tc.log_with),
            project_dir=str(self.run_dir),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
        check_one_process_group(self.accelerator)
        check_distribution(self.accelerator, self.tc)
        self.checkpoints = Checkpoints(self.run_dir, self.accelerator, self.tc.keep_last)
        self.state = TrainerState()
        self.lock = RunLock(self.run_dir)
        self._pending_tokens = 0
        """Training tokens on this process not yet added to state.tokens_seen (added at logging and saving)."""

    # ---------------------------------------------------------------------------------------------
    # Set-up
    # ---------------------------------------------------------------------------------------------

    def _resume_candidate(self) -> Path | None:
        """The checkpoint a resume will start from (the newest complete one for `latest`), before loading it."""
        resume = self.tc.resume_from
        if resume is None:
            return None
        if self.cfg.overwrite:
            raise UserError(f"overwrite=true and train.resume_from={resume} contradict each other; choose one")
        if resume == "latest":
            return self.checkpoints.latest()  # None: nothing saved yet, start from the beginning
        path = Path(resume)
        reason = verify(path) if path.is_dir() else "not a directory"
        if reason is not None:
            raise UserError(f"train.resume_from={resume}: not a complete checkpoint directory ({reason})")
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
        batches = len(self.task.epoch_batches(0, self.micro_batch_size)) // processes
        if batches == 0:  # the loop would wait forever for its first step
            raise DataError(
                f"the training data gives no batch: fewer than {processes} micro-batch(es) of "
                f"{self.micro_batch_size} {self.task.batch_unit} per epoch; give more data or a smaller "
                "train.global_batch_size"
            )
        if tc.num_epochs is not None:
            tc.max_steps = tc.num_epochs * max(1, batches // tc.gradient_accumulation_steps)

    def _claim_run_dir(self, resuming: bool, has_checkpoint: bool) -> None:
        """Lock the run directory (main process) and refuse to overwrite another run; every rank learns the
        outcome, so that a refusal stops all of them with the main process's message."""
        acc, error = self.accelerator, None
        if acc.is_main_process:
            try:
                self.lock.acquire()
                check_run_dir(self.run_dir, resuming, has_checkpoint, self.cfg.overwrite)
            except UserError as err:
                self.lock.release()
                error = str(err)
        if acc.num_processes > 1:
            failed = acc.reduce(torch.tensor(int(error is not None), device=acc.device), "max").item()
            if failed and error is None:
                error = f"{self.run_dir}: the main process could not take the run directory (see its message)"
        if error is not None:
            raise UserError(error)

    def _check_resume(self, checkpoint: Path) -> str:
        """Refuse a resume whose model or data settings differ from the checkpoint's; the history line for
        config.yaml naming what changed (schedule and reporting keys)."""
        state = json.loads((checkpoint / STATE_FILE).read_text())
        recorded = recorded_config(checkpoint)
        changes = config_changes(recorded, self.cfg.to_dict(), checkpoint, state["step"]) if recorded else {}
        changes.pop("train.resume_from", None)
        changes.pop("output_dir", None)
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        what = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()) or "nothing changed"
        return f"# resumed from {checkpoint.name} at step {state['step']} ({when}): {what}"

    def _already_done(self, checkpoint: Path) -> dict | None:
        """The saved results of a run that finished at train.max_steps: resuming it again has nothing to do."""
        state = json.loads((checkpoint / STATE_FILE).read_text())
        results = self.run_dir / "eval_results.json"
        finished = state.get("status") == "done" and state["step"] >= self.tc.max_steps
        if finished and results.is_file() and (self.run_dir / "final").is_dir():
            return json.loads(results.read_text())
        return None

    def _write_run_header(self, history: str | None) -> None:
        """config.yaml: the resolved config, below the history of the resumes that changed it (YAML comments,
        so the file still loads as a config)."""
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path = self.run_dir / "config.yaml"
            lines = []
            if history is not None and path.is_file():
                lines = [line for line in path.read_text().splitlines() if line.startswith("# resumed from ")]
            lines += [history] if history else []
            path.write_text("".join(line + "\n" for line in lines) + self.cfg.to_yaml(), encoding="utf-8")
            self.task.save_artifacts(self.run_dir / "tokenizer")  # the vocabulary a resume will reuse
        self.accelerator.wait_for_everyone()

    # ---------------------------------------------------------------------------------------------
    # The loop
    # ---------------------------------------------------------------------------------------------

    def _epoch_loader(self, epoch: int, start: int) -> DataLoader:
        """This process's batches of `epoch` from global micro-batch `start` on, read and collated by workers."""
        acc = self.accelerator
        batches = self.task.epoch_batches(epoch, self.micro_batch_size)  # as many as _resolve_batch checked
        return DataLoader(
            self.task.train_dataset(),
            batch_sampler=RankBatches(batches, acc.process_index, acc.num_processes, start),
            collate_fn=self.task.train_collator(),
            num_workers=self.tc.num_workers,
            pin_memory=acc.device.type == "cuda",
            # Its own generator: a new iterator would otherwise draw a seed from the global RNG, and a resumed run
            # (which makes its iterator at another moment) would shift dropout against the straight run.
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
        candidate = self._resume_candidate()
        created = not self.run_dir.exists()
        with StopRequested() as stop:
            self._claim_run_dir(self.tc.resume_from is not None, candidate is not None)
            try:
                return self._train(candidate, stop)
            except BaseException:
                if created and not self.run_header_written and self.accelerator.is_main_process:
                    shutil.rmtree(self.run_dir, ignore_errors=True)  # bad input leaves no run directory behind
                raise
            finally:
                self.lock.release()

    run_header_written = False
    finished_before = False

    def _train(self, candidate: Path | None, stop: StopRequested) -> dict:
        self.task.setup(self.accelerator, self.run_dir)  # bad data fails here, before the run dir is written
        self._resolve_batch()
        history = self._check_resume(candidate) if candidate is not None else None
        if candidate is not None and (done := self._already_done(candidate)) is not None:
            self._print(f"{self.run_dir}: already finished at step {self.tc.max_steps}; nothing to do")
            return done
        self._write_run_header(history)
        self.run_header_written = True

        model = self.task.build_model()
        optimizer = build_optimizer(model, self.tc, fused=self.accelerator.device.type == "cuda")
        if self.tc.compile:
            model = torch.compile(model)
        scheduler = build_scheduler(optimizer, self.tc)
        eval_dl = self.task.eval_dataloader()
        # Without a generator of its own, every new iterator draws a seed from the global RNG and shifts dropout.
        eval_dl.generator = torch.Generator().manual_seed(self.tc.seed)
        model, optimizer, eval_dl = self.accelerator.prepare(model, optimizer, eval_dl)
        self.accelerator.register_for_checkpointing(scheduler)
        self.model, self.optimizer, self.scheduler, self.eval_dl = model, optimizer, scheduler, eval_dl
        self.flops_per_token, self.peak_flops = self.task.flops_per_token(), self._peak_flops()

        geometry = {"num_processes": self.accelerator.num_processes, "micro_batch_size": self.micro_batch_size}
        self.state = TrainerState(**geometry)
        resumed = self._load(candidate, geometry) if candidate is not None else False
        self.log = MetricsLog(self.run_dir, self.accelerator, self.state.step if resumed else None)
        if self.accelerator.log_with:
            self.accelerator.init_trackers(
                self.tc.project,
                config=_flat(self.cfg.to_dict()),
                init_kwargs={"wandb": {"dir": str(self.run_dir), "name": self.run_dir.name}},
            )

        stop.armed = True
        self._loop(stop)
        stop.armed = False
        if self.state.status == "interrupted":
            self.accelerator.end_training()
            return {"status": "interrupted", "step": self.state.step}
        results = self._finish(log_eval=not self.finished_before)
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

    def _load(self, candidate: Path, geometry: dict) -> bool:
        """Restore `candidate`; with resume_from=latest a broken one falls back to the previous complete one."""
        if self.tc.resume_from == "latest":
            loaded = self.checkpoints.load_newest()
            if loaded is None:
                raise UserError(f"{self.checkpoints.root}: no checkpoint here can be loaded (see the warnings above)")
            path, state = loaded
        else:
            try:
                path, state = candidate, self.checkpoints.load(candidate)
            except CheckpointError as err:
                raise UserError(f"train.resume_from={self.tc.resume_from}: {err}") from None
        self.state = TrainerState(**{**geometry, **state})
        self._check_geometry(path, geometry)
        # finished at this step but stopped before final/ was written: its evaluation row is already logged
        self.finished_before = self.state.status == "done" and self.state.step >= self.tc.max_steps
        self.state.status = "running"
        self._print(f"resumed from {path} at step {self.state.step}")
        return True

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
            self._pending_tokens += tokens
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
                self._flush_tokens()
                tokens_per_s = tokens_sum / max(elapsed, 1e-9)
                row = {
                    "train/loss": mean_loss,
                    "train/lr": self.scheduler.get_last_lr()[0],
                    "train/tokens_per_s": tokens_per_s,
                    "train/tokens": self.state.tokens_seen,
                    "train/epoch": self.state.epoch,
                }
                if self.flops_per_token and self.peak_flops:  # per device: its share of the tokens
                    row["train/mfu"] = mfu(self.flops_per_token, tokens_per_s / acc.num_processes, self.peak_flops)
                self.log.log(row, step)
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

    def _peak_flops(self) -> float | None:
        """One device's peak FLOP/s for train/mfu: train.peak_tflops, else a known GPU's bf16 peak."""
        if self.tc.peak_tflops:
            return self.tc.peak_tflops * 1e12
        if self.accelerator.device.type == "cuda":
            return device_peak_flops(torch.cuda.get_device_name(self.accelerator.device))
        return None

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

    def _flush_tokens(self) -> None:
        """Add every process's pending token count to the state (so a checkpoint holds the exact count)."""
        acc = self.accelerator
        self.state.tokens_seen += int(acc.reduce(torch.tensor(self._pending_tokens, device=acc.device), "sum").item())
        self._pending_tokens = 0

    def _save(self) -> Path:
        self._flush_tokens()
        return self.checkpoints.save(self.state.step, asdict(self.state), self.cfg.to_yaml())

    # ---------------------------------------------------------------------------------------------
    # The end
    # ---------------------------------------------------------------------------------------------

    def _finish(self, log_eval: bool = True) -> dict:
        """The last evaluation, a `done` checkpoint, then final/ and eval_results.json. Resumed from a `done`
        checkpoint (stopped before final/ was written), the evaluation row is already in metrics.jsonl."""
        acc, tc = self.accelerator, self.tc
        step = self.state.step
        if log_eval:
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
