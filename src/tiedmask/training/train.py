"""`train(config) -> Result`: the one training pipeline every model and benchmark goes through;
here the image task the `Trainer` (training/trainer.py) runs, and the image run's result.

Honest timing: `train_time_s` counts training steps only (evaluation excluded); `img_per_s` is
training images per training second. Resumable at epoch boundaries: every epoch's shuffle and
augmentation are seeded by (seed, epoch), so a resumed run reproduces an uninterrupted one.

>>> from tiedmask.training.settings import load_config
>>> cfg = load_config(overrides=["--data", "digits", "--model", "tied-resnet-xs", "--epochs", "1"])
>>> train(cfg, log=lambda *_: None).test_acc > 0.1
True
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.backbones import count_params
from ..core.flops import count_macs
from ..core.presets import build_model
from ..errors import ConfigError
from .data import RunData, alternating_flips, augment, normalize, prepare_data
from .datasets import Dataset
from .evaluate import evaluate
from .distributed import Dist, setup as setup_distributed, teardown as teardown_distributed
from .finetune import prepare_finetune
from .lm import train_lm
from .lookahead import Lookahead
from .precision import described
from .result import Result
from .rundir import RunDir, RunState
from .runtime import hardware_name, peak_memory_mb, place, resolve_device, use_channels_last
from .settings import TrainConfig, check_whitening_stem
from .trainer import (EpochHook, Schedule, Trainer, choose_precision, epoch_generator, epoch_printer, make_optimizer,
                      open_run, start_state, wrap_for_training)


# ---------------------------------------------------------------- the image task

class ImageTask:
    """Image classification for the `Trainer`: each epoch a permutation of the training images
    seeded by (seed, epoch), augmented on the device; cross-entropy (plus a runner's regulariser,
    the DEQ Jacobian penalty); accuracy on the evaluation images. Under torchrun every process
    draws the whole global batch (same generator) and keeps its slice."""

    unit, rate_key, score_keys, counts_correct = "img", "img_per_s", ("test_loss", "test_acc"), True

    def __init__(self, cfg: TrainConfig, data: RunData, device: torch.device, ctx: Dist, channels_last: bool):
        self.cfg, self.data, self.device, self.ctx, self.channels_last = cfg, data, device, ctx, channels_last
        self.train_x, self.train_y = data.train_x.to(device), data.train_y.to(device)
        self.mean, self.std = data.stats.tensors(device)
        self.precision = "fp32"  # what scoring computes in: the run's, once chosen
        self.solver: dict = {}  # the epoch's DEQ solver statistics (training and scoring)

    def start_epoch(self, model, epoch: int) -> int:
        cfg = self.cfg
        self.gen = epoch_generator(cfg.seed, epoch, self.device)
        self.order = torch.randperm(len(self.train_x), device=self.device, generator=self.gen)
        self.flips = alternating_flips(len(self.train_x), cfg.seed, epoch, self.device) \
            if self.data.augment == "crop_altflip" else None
        # the whitening stem's bias trains for its first epochs, then stays
        self.settled_bias = model.whitening_bias() if epoch > cfg.optim.whiten_bias_epochs > 0 else None
        self.forward, self.backward = [], []
        return max(1, len(self.train_x) // cfg.batch_size)  # drop the last partial batch

    def set_deadline(self, model, deadline: float | None) -> None:
        model.set_deadline(deadline)

    def probe_inputs(self) -> torch.Tensor:
        """A batch of the run's shape, for timing a step (`choose_precision`); random values
        from a generator of its own, so the run's random stream does not move."""
        shape, size = self.data.shape, min(self.cfg.batch_size, 256)
        x = torch.randn(size, shape.channels, shape.size, shape.size, generator=torch.Generator().manual_seed(0))
        x = x.to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def batch(self, index: int):
        idx = self.order[index * self.cfg.batch_size:(index + 1) * self.cfg.batch_size]
        flips = self.flips[idx] if self.flips is not None else None
        x = self.ctx.shard(augment(normalize(self.train_x[idx], self.mean, self.std), self.data.augment, self.gen, flips))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.ctx.shard(self.train_y[idx])

    def losses(self, model, runner, x, y):
        logits = runner(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.optim.label_smoothing)
        aux = model.aux_loss()
        return loss, loss if aux is None else loss + aux, logits

    def after_backward(self, model) -> None:
        if self.settled_bias is not None:
            self.settled_bias.grad = None  # the optimizer skips it (after data-parallel averaging)

    def tally(self, model, logits, y) -> tuple[int, int]:
        forward, backward = model.pop_solver_stats()
        self.forward += forward
        self.backward += backward
        return len(y), int((logits.argmax(1) == y).sum())

    def end_epoch(self, model) -> dict:
        self.solver = summarize_solver(self.forward, self.backward)
        return self.solver

    def score(self, model) -> dict:
        cfg = dataclasses.replace(self.cfg, precision=self.precision)
        acc, loss = evaluate(model, self.data.test_x, self.data.test_y, (self.mean, self.std), cfg, self.device,
                             self.ctx, self.channels_last)
        eval_forward, _ = model.pop_solver_stats()
        # the epoch's statistics (the row's last fields, as before) gain the scoring solves'
        self.solver.update({f"eval_{k}": v for k, v in summarize_solver(eval_forward, []).items()})
        return {"test_loss": loss, "test_acc": acc}

    def describe(self, row: dict) -> str:
        scored = "   –   " if row["test_acc"] is None else f"{row['test_acc']:6.2%}"
        iterations = "".join(f"  {k} {v:.3g}" for k, v in self.solver.items() if k.endswith("iters"))
        return f"train {row['train_acc']:6.2%}  test {scored}{iterations}"

    def record(self, state: RunState, row: dict) -> None:
        if row["test_acc"] is not None:
            state.best_test_acc = max(state.best_test_acc, row["test_acc"])
            state.last_test_acc = row["test_acc"]
        state.solver = dict(self.solver)


def summarize_solver(forward, backward) -> dict:
    """Mean iterations and residuals of DEQ solves (empty for unrolled models)."""
    out = {}
    for label, stats in (("fwd", forward), ("bwd", backward)):
        if stats:
            out[f"{label}_iters"] = sum(s.iterations for s in stats) / len(stats)
            out[f"{label}_rel_residual"] = sum(s.rel_residual for s in stats) / len(stats)
    return out


def chance_warning(test_acc: float, classes: int) -> str:
    """Non-empty when the accuracy is no better than guessing (within half a class's share)."""
    if test_acc <= 1.5 / classes:
        return f"test accuracy {test_acc:.1%} is at chance level (1/{classes}): the run learned nothing"
    return ""


def train(cfg: TrainConfig, out: str | Path | None = None, resume: bool = False,
          dataset: Dataset | None = None, log=print, on_epoch: EpochHook | None = None) -> Result:
    """Train `cfg`; write the run to `out` when given (resuming it when `resume`); call
    `on_epoch(row)` with each finished epoch's metrics row (on rank 0 only under torchrun).

    Started by torchrun (WORLD_SIZE > 1), the processes train one model data-parallel
    (see `tiedmask.training.distributed`); rank 0 writes the run and logs.
    """
    device = resolve_device(cfg)
    ctx = setup_distributed(device.type, cfg.batch_size)
    new_folder = out is not None and ctx.is_main and not Path(out).exists()
    hooks = [on_epoch] if on_epoch is not None and ctx.is_main else []
    try:
        if device.type == "cuda" and ctx.enabled:
            device = torch.device("cuda", ctx.local_rank)
        if cfg.task == "lm":
            if ctx.enabled:
                raise ConfigError("language-model runs train in one process; start them without torchrun")
            return train_lm(cfg, out, resume, log, device, hooks)
        return _train(cfg, out, resume, dataset, log if ctx.is_main else (lambda *_: None), ctx, device, hooks)
    except BaseException:
        if new_folder:  # a run that failed before writing anything (missing data) leaves no folder
            with contextlib.suppress(OSError):
                Path(out).rmdir()  # only if still empty
        raise
    finally:
        teardown_distributed(ctx)


def _train(cfg: TrainConfig, out, resume: bool, dataset, log, ctx: Dist, device: torch.device,
           hooks: list[EpochHook]) -> Result:
    run, finished = open_run(cfg, out, resume, ctx, log)
    if finished is not None:
        return Result(**finished)
    data = prepare_data(cfg.data, stats=run.read_stats() if run is not None and resume else None, dataset=dataset)
    task = ImageTask(cfg, data, device, ctx, use_channels_last(cfg, data.shape.size))
    model, macs = build_image_model(cfg, task)
    optimizer = make_optimizer(cfg, model)
    state = start_state(run, resume, model, optimizer, cfg, ctx, log)
    if run is not None and ctx.is_main:
        run.write_stats(data.stats)
        hooks = [run.epoch_keeper(model, optimizer, state, cfg), *hooks]
    choose_precision(state, cfg, ctx, device, model, task.probe_inputs)
    task.precision = state.precision
    trainer = Trainer(model, optimizer, task, cfg, Schedule.of(cfg, len(task.train_x) // cfg.batch_size), state,
                      device, ctx, forward=wrap_for_training(model, cfg, ctx, device, state, log),
                      lookahead=Lookahead(model, cfg.optim.lookahead_every, cfg.optim.lookahead_decay)
                      if cfg.optim.lookahead_every else None,
                      on_epoch=[epoch_printer(cfg, task, log), *hooks], log=log)
    counts = count_params(model), count_params(model, trainable_only=True)
    m = cfg.model
    log(f"model {m.name} ({m.execution}, masks {m.masks.scope} at density {m.masks.density}): "
        f"{counts[0]:,} params ({counts[1]:,} trained), {macs['effective'] / 1e6:.1f}M effective MACs/img, "
        f"on {device} in {described(state.precision, state.precision_why)}" + (f" x {ctx.world} processes" if ctx.enabled else ""))
    status, reason = trainer.fit()
    result = image_result(cfg, trainer, (status, reason), counts, macs, data)
    if run is not None and ctx.is_main:
        run.write_result(result.to_dict())
    return result


def build_image_model(cfg: TrainConfig, task: ImageTask):
    """The run's model on its device, initialised from its data (or from the pre-trained run it
    fine-tunes), and its (dense, effective) multiply-adds per image."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, task.data.shape)
    model.init_from_data(normalize(task.train_x[:5000], task.mean, task.std))
    check_whitening_stem(cfg, model.whitening_bias() is not None)  # a config built by hand
    if cfg.finetune.init_from:
        pretrained, _, _ = RunDir(cfg.finetune.init_from).load_checkpoint()
        model = prepare_finetune(model, cfg, pretrained)
    model = model.to(task.device)
    macs = count_macs(model, tuple(task.data.train_x.shape[1:]))
    model.pop_solver_stats()  # the MAC-count probe is not a training solve
    return place(model, task.device, task.channels_last), macs


def image_result(cfg: TrainConfig, trainer: Trainer, outcome: tuple[str, str], counts: tuple[int, int],
                 macs: dict, data: RunData) -> Result:
    state, (status, reason) = trainer.state, outcome
    per_pass = max(1, len(trainer.task.train_x) // cfg.batch_size) * cfg.batch_size
    passes = state.images / per_pass or float(state.epoch)  # older checkpoints: no count
    return Result(
        status=status, reason=reason, test_acc=state.last_test_acc, best_test_acc=state.best_test_acc,
        final_train_loss=state.last_train_loss, params=counts[0], trainable_params=counts[1],
        macs_dense=macs["dense"], macs_effective=macs["effective"], train_time_s=state.train_time_s,
        img_per_s=state.images / state.train_time_s if state.train_time_s else 0.0,
        s_per_epoch=state.train_time_s / passes if passes else 0.0, data_epochs=passes,
        epochs=state.epoch, seed=cfg.seed, config_hash=state.config_hash,
        peak_mem_mb=peak_memory_mb(trainer.device), hardware=hardware_name(trainer.device),
        precision=state.precision, precision_why=state.precision_why,
        compile_choice=state.compile_choice, compile_why=state.compile_why, solver=state.solver,
        # A diverged run keeps the score of its last scored epoch (0 if none was: eval_every);
        # its status says what happened, so it gets no "learned nothing" warning.
        warning=(chance_warning(state.last_test_acc, data.shape.classes)
                 if state.epoch and status == "ok" else ""),
        eval_split=data.eval_split)
