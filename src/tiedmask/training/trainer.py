"""`Trainer`: the one training loop of every task (images, language modelling).

A task owns its data, its loss and its metric (`Task` below; `training/train.py` classifies
images, `training/lm.py` predicts tokens). The Trainer owns what every run shares: epochs,
the learning-rate schedule (by step, or by the clock under a time budget, so that it anneals
when time runs out), precision, gradient clipping, lookahead, the time budget, failures, the
process context, and the `on_epoch(row)` hooks that keep the run directory, print the log
line and hand a caller its curve.

Honest timing: `seconds` count training steps only; scoring after an epoch is not timed.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Callable, Protocol

import torch
from tqdm import tqdm

from ..core.deq.equilibrium import SolverDiverged
from .compile_choice import CompileChoice
from .distributed import Dist
from .lookahead import Lookahead
from .muon import MuonSGD
from .precision import autocast_context, decide_precision, legacy_auto, training_step
from .rundir import RunDir, RunState
from .settings import TrainConfig, config_hash

EpochHook = Callable[[dict], None]


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The learning rate at a step, or, under a time budget, at the step the clock has reached."""

    total_steps: int
    warmup_steps: int
    peak_lr: float
    time_budget_s: float = 0.0

    @classmethod
    def of(cls, cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
        steps_per_epoch = max(1, steps_per_epoch)
        return cls(steps_per_epoch * cfg.epochs, max(1, round(cfg.optim.warmup_epochs * steps_per_epoch)),
                   cfg.optim.lr, cfg.time_budget_s)

    def lr(self, step: int, trained_s: float) -> float:
        if self.time_budget_s:
            step = max(step, int(trained_s / self.time_budget_s * self.total_steps))
        return lr_at(step, self.total_steps, self.warmup_steps, self.peak_lr)


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    # No weight decay on norms and biases (1-D tensors, or stacks of them per application
    # marked by `tie`), as is usual for AdamW.
    params = [p for p in model.parameters() if p.requires_grad]  # adapters only, when fine-tuning
    exempt = [p.dim() <= 1 or getattr(p, "no_weight_decay", False) for p in params]
    decay = [p for p, e in zip(params, exempt) if not e]
    no_decay = [p for p, e in zip(params, exempt) if e]
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "sgd" and o.muon_lr:
        filters = [p for p in decay if p.dim() == 4]
        groups[0]["params"] = [p for p in decay if p.dim() != 4]
        groups.append({"params": filters, "weight_decay": o.weight_decay, "orthogonal": True,
                       "lr_scale": o.muon_lr / o.lr})
        return MuonSGD(groups, lr=o.lr, momentum=o.momentum)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=True)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr)


def epoch_generator(seed: int, epoch: int, device: torch.device | str) -> torch.Generator:
    """The random stream of one epoch's order and augmentation: a resumed epoch draws as an
    uninterrupted one."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


class Task(Protocol):
    """What a kind of training owns; the Trainer calls `start_epoch`, `set_deadline`, then per
    step `batch`, `losses`, `after_backward`, `tally`; at the epoch's end `end_epoch`, `score`
    (when the epoch is scored), `record`, and `describe` from the printer hook."""

    unit: str  # what one training example is, for rates: "img" | "tok"
    rate_key: str  # the row's field of examples per training second
    score_keys: tuple[str, ...]  # the metric fields of a row, None when an epoch is not scored
    counts_correct: bool  # whether `tally` counts right predictions (rows then have train_acc)

    def start_epoch(self, model, epoch: int) -> int:
        """Draw the epoch's order (seeded by seed and epoch); the number of batches."""

    def set_deadline(self, model, deadline: float | None) -> None:
        """Tell iterative parts of the model when the time budget ends (None: no bound)."""

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of batch `index` of this epoch, on the device."""

    def losses(self, model, runner, inputs, targets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the loss reported, the loss trained on, the logits), under autocast."""

    def after_backward(self, model) -> None:
        """Adjust gradients before the optimizer steps (freeze what has settled)."""

    def tally(self, model, logits, targets) -> tuple[int, int]:
        """(examples, correct predictions (0 unless `counts_correct`)) of a step, after it."""

    def end_epoch(self, model) -> dict:
        """Row fields of the epoch's own statistics (a DEQ's solver iterations)."""

    def score(self, model) -> dict:
        """The `score_keys` fields measured now, and any statistics of measuring them."""

    def describe(self, row: dict) -> str:
        """The task's part of the epoch's log line."""

    def record(self, state: RunState, row: dict) -> None:
        """Keep in the run's state what its result reports (the best score)."""

    def probe_inputs(self) -> torch.Tensor:
        """A batch of the run's shape (random values, the run's random stream unmoved), for
        timing a training step before the run starts (`choose_precision`)."""


@dataclasses.dataclass
class EpochStats:
    loss: float = math.nan
    acc: float = 0.0
    examples: int = 0  # images or tokens trained on
    seconds: float = 0.0
    step: int = 0
    failure: str = ""  # why training stopped early: a diverged solver or loss
    out_of_time: bool = False
    extra: dict = dataclasses.field(default_factory=dict)  # the task's statistics of the epoch


@dataclasses.dataclass
class Trainer:
    """Trains `model` on `task` from `state` on: `fit()` runs the epochs, calling each hook in
    `on_epoch` with every finished epoch's row after `state` holds that epoch."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    task: Task
    cfg: TrainConfig
    schedule: Schedule
    state: RunState
    device: torch.device
    ctx: Dist = Dist()
    forward: CompileChoice | None = None  # what each step runs when not the bare model: DDP, compiled or not
    lookahead: Lookahead | None = None
    on_epoch: list[EpochHook] = dataclasses.field(default_factory=list)
    log: Callable[[str], None] = lambda line: None  # how a failure or the budget's end is told

    def fit(self) -> tuple[str, str]:
        """Train until the last epoch or the time budget; (status ok | diverged, reason)."""
        try:
            return self._fit()
        finally:
            if self.forward is not None:
                self.forward.end()

    def _fit(self) -> tuple[str, str]:
        cfg, state = self.cfg, self.state
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            time_left = cfg.time_budget_s - state.train_time_s if cfg.time_budget_s else math.inf
            if time_left <= 0:
                break
            ep = self.run_epoch(epoch, time_left)
            state.step, state.train_time_s, state.images = ep.step, state.train_time_s + ep.seconds, \
                state.images + ep.examples  # images counts the tokens of a language-model run
            if ep.failure:
                state.last_train_loss = ep.loss
                self.log(f"epoch {epoch}: {ep.failure}")
                return "diverged", ep.failure
            last = (epoch == cfg.epochs or ep.out_of_time
                    or bool(cfg.time_budget_s) and state.train_time_s >= cfg.time_budget_s)
            row = self._row(epoch, ep, last)
            state.epoch, state.last_train_loss = epoch, ep.loss
            self.task.record(state, row)
            for hook in self.on_epoch:
                hook(row)
            if ep.out_of_time:
                self.log(f"time budget of {cfg.time_budget_s:.0f}s spent after epoch {epoch}")
                break
        return "ok", ""

    def _row(self, epoch: int, ep: EpochStats, scored: bool) -> dict:
        """The epoch's metrics row (scored on the task's metric when `scored` or every `eval_every`)."""
        if scored or (self.cfg.eval_every and epoch % self.cfg.eval_every == 0):
            scores = self.task.score(self.model)
        else:
            scores = dict.fromkeys(self.task.score_keys)
        rate = ep.examples / ep.seconds if ep.seconds else 0.0
        accuracy = {"train_acc": ep.acc} if self.task.counts_correct else {}
        return {"epoch": epoch, "train_loss": ep.loss, **accuracy, **scores,
                "lr": self.optimizer.param_groups[0]["lr"], "epoch_time_s": ep.seconds,
                "train_time_s": self.state.train_time_s, self.task.rate_key: rate, **ep.extra}

    def run_epoch(self, epoch: int, time_left: float = math.inf) -> EpochStats:
        """One epoch (or until `time_left` seconds of training are spent)."""
        model, task, ctx = self.model, self.task, self.ctx
        model.train()
        batches = task.start_epoch(model, epoch)
        if self.lookahead is not None:
            self.lookahead.restart()
        progress = Progress(self.cfg, epoch, batches, ctx, task.unit)
        ep, loss_sum, correct = EpochStats(step=self.state.step), 0.0, 0
        start = time.perf_counter()
        # A DEQ solve inside a step stops when the budget is spent (one process: its own clock).
        task.set_deadline(model, start + time_left if math.isfinite(time_left) and not ctx.enabled else None)
        for index in progress:
            # Rank 0's clock sets the learning rate, so that every process uses the same one.
            step_start = time.perf_counter()
            spent = ctx.from_main(step_start - start) if self.cfg.time_budget_s else 0.0
            try:
                loss, logits, targets = self._step(index, self.schedule.lr(ep.step, self.state.train_time_s + spent))
            except SolverDiverged as exc:
                ep.failure = str(exc)
                break
            ep.step += 1
            if self.lookahead is not None:
                self.lookahead.after_step(ep.step)
            examples, right = task.tally(model, logits, targets)
            value = loss.item()  # waits for the step on a GPU, so the step's time below is whole
            if self.forward is not None:
                self.forward.record(time.perf_counter() - step_start)
            if not math.isfinite(value):
                ep.failure = f"non-finite training loss at epoch {epoch}"
                break
            loss_sum, correct, ep.examples = loss_sum + value * examples, correct + right, ep.examples + examples
            progress.show(index, value, ep.examples * ctx.world, time.perf_counter() - start)  # all processes'
            # One process: its clock after the step. Several: rank 0's clock before it (all agree).
            if (spent if ctx.enabled else time.perf_counter() - start) >= time_left:
                ep.out_of_time = True
                break
        return self._end_epoch(ep, start, loss_sum, correct)

    def _step(self, index: int, lr: float):
        """One optimizer step on batch `index` at learning rate `lr`: (loss, logits, targets)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.task.batch(index)
        try:
            return self._step_on(batch, self.model if self.forward is None else self.forward.runner())
        except SolverDiverged:
            raise
        except Exception as exc:  # noqa: BLE001  (only a compiled step under `compile: auto`'s trial is retried)
            if self.forward is None or not self.forward.failed(exc):
                raise
            return self._step_on(batch, self.forward.runner())  # the same batch, eager

    def _step_on(self, batch, runner: torch.nn.Module):
        inputs, targets = batch
        with autocast_context(self.device, self.state.precision):
            loss, total, logits = self.task.losses(self.model, runner, inputs, targets)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.task.after_backward(self.model)
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        return loss, logits, targets

    def _end_epoch(self, ep: EpochStats, start: float, loss_sum: float, correct: int) -> EpochStats:
        self.task.set_deadline(self.model, None)  # scoring is bounded by its iteration limit alone
        if self.lookahead is not None:
            self.lookahead.sync()  # the checkpoint holds the slow weights, the next epoch restarts from it
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        loss_sum, correct, examples = self.ctx.sum(loss_sum, correct, ep.examples)
        # Rank 0's clock, so that every process agrees on the time budget.
        ep.seconds, ep.examples = self.ctx.from_main(time.perf_counter() - start), int(examples)
        if examples:
            ep.loss, ep.acc = loss_sum / examples, correct / examples
        ep.extra = self.task.end_epoch(self.model)
        return ep


class Progress:
    """The batches of an epoch, with a progress bar on a terminal, or a plain line every tenth
    of an epoch when the output is a log file (a job's output); rank 0 only."""

    def __init__(self, cfg: TrainConfig, epoch: int, batches: int, ctx: Dist, unit: str):
        terminal = sys.stderr.isatty()
        shown = cfg.progress and ctx.is_main
        self.bar = tqdm(range(batches), leave=False, desc=f"epoch {epoch}", disable=not (shown and terminal))
        self.every = max(1, batches // 10) if shown and not terminal else 0
        self.epoch, self.batches, self.unit = epoch, batches, unit

    def __iter__(self):
        return iter(self.bar)

    def show(self, index: int, loss: float, examples: int, seconds: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.3f}")
        done = index + 1
        if self.every and done % self.every == 0 and done < self.batches:
            print(f"epoch {self.epoch}: {done}/{self.batches} batches, loss {loss:.3f}, "
                  f"{examples / seconds:.0f} {self.unit}/s, epoch ends in "
                  f"{seconds / done * (self.batches - done) / 60:.1f} min", file=sys.stderr, flush=True)


def epoch_printer(cfg: TrainConfig, task: Task, log) -> EpochHook:
    """The hook that logs one line per epoch, with the time left to the last epoch."""

    def print_row(row: dict) -> None:
        epoch, trained = row["epoch"], row["train_time_s"]
        eta = (cfg.epochs - epoch) * trained / epoch
        if cfg.time_budget_s:
            eta = min(eta, max(0.0, cfg.time_budget_s - trained))
        log(f"epoch {epoch:>3}/{cfg.epochs}  loss {row['train_loss']:.4f}  {task.describe(row)}  "
            f"{row['epoch_time_s']:6.1f}s  {row[task.rate_key]:7.1f} {task.unit}/s  eta {eta / 60:.1f} min")

    return print_row


# ---------------------------------------------------------------- starting a run (every task)

def open_run(cfg: TrainConfig, out, resume: bool, ctx: Dist, log) -> tuple[RunDir | None, dict | None]:
    """(the run directory of `out`, created or reopened by rank 0 (None: keep nothing), the
    result of a finished run being resumed (None: train)); sets the threads the run asks for."""
    run = None
    if out is not None:
        run = RunDir.create(out, resume) if ctx.is_main else RunDir(out)  # other ranks only read
        ctx.barrier()
        if resume and run.is_finished():
            log(f"{run.path} is already finished; its result stands")
            return run, run.read_result()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return run, None


def start_state(run: RunDir | None, resume: bool, model, optimizer, cfg: TrainConfig, ctx: Dist, log) -> RunState:
    """Where training starts: the checkpoint's state (weights and optimizer restored) when
    resuming one, else a fresh state; the run directory keeps the settings and only the metrics
    rows its checkpoint holds."""
    state = RunState(config_hash=config_hash(cfg))
    if run is None:
        return state
    if resume and run.has_checkpoint():
        state = run.restore(model, optimizer, cfg)
        log(f"resuming {run.path} after epoch {state.epoch}")
    elif resume:
        log(f"{run.path} has no checkpoint yet; starting it from the beginning")
    if ctx.is_main:
        run.keep_metrics_until(state.epoch)  # rows of epochs no checkpoint holds
        run.write_config(cfg)
    return state


def choose_precision(state: RunState, cfg: TrainConfig, ctx: Dist, device: torch.device, model: torch.nn.Module,
                     make_inputs: Callable[[], torch.Tensor]) -> None:
    """Set `state.precision` (what the run computes in) once, when the run starts; `auto` may
    time a training step of `model` on `make_inputs()` (a batch of the run's shape) both ways."""
    if not state.precision:
        older_run = state.epoch > 0 and cfg.precision == "auto"  # resumed, from before it was recorded
        chosen, why = (legacy_auto(device), "auto, before 0.3") if older_run else decide_precision(
            cfg.precision, device, training_step(model, make_inputs))
        # Rank 0's choice on every process: the timed check could tip differently on each.
        state.precision = "bf16" if ctx.from_main(float(chosen == "bf16")) else "fp32"
        state.precision_why = why if state.precision == chosen else "rank 0's choice"  # saved by rank 0 only


def wrap_for_training(model, cfg: TrainConfig, ctx: Dist, device: torch.device, state: RunState,
                      log: Callable[[str], None]) -> CompileChoice:
    """What runs the training forward pass: the model, under DDP, compiled or not as
    `cfg.compile` says (under `auto`, as the run's own timed steps decide)."""
    runner = model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # Masks are deterministic on every process and BatchNorm statistics are averaged before
        # evaluation, so nothing needs broadcasting each step.
        runner = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)
    return CompileChoice(runner, cfg.compile, state, ctx, log)
