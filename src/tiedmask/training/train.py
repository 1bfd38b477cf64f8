"""`train(config) -> Result`: the one training pipeline every model and benchmark goes through.

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
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..core.backbones import count_params
from ..core.deq.equilibrium import SolverDiverged
from ..core.flops import count_macs
from ..core.presets import build_model
from ..errors import ConfigError
from .data import alternating_flips, augment, normalize, prepare_data
from .datasets import Dataset
from .evaluate import evaluate
from .distributed import Dist, setup as setup_distributed, teardown as teardown_distributed
from .finetune import prepare_finetune
from .lookahead import Lookahead
from .muon import MuonSGD
from .precision import autocast_context, legacy_auto, resolve_precision
from .rundir import RunDir, RunState
from .runtime import hardware_name, peak_memory_mb, place, resolve_device, use_channels_last
from .settings import TrainConfig, check_whitening_stem, config_hash


@dataclass
class Result:
    status: str  # ok | diverged (with `reason`)
    test_acc: float
    best_test_acc: float
    final_train_loss: float
    params: int
    macs_dense: int
    macs_effective: int
    train_time_s: float
    img_per_s: float
    epochs: int
    seed: int
    config_hash: str
    reason: str = ""
    s_per_epoch: float = 0.0
    trainable_params: int = 0
    peak_mem_mb: float = 0.0
    hardware: str = ""  # the CPU or GPU the run trained on (timings compare only within one)
    precision: str = ""  # what `precision` resolved to on that machine: bf16 | fp32 ("" before 0.3)
    warning: str = ""  # e.g. a run that ended at chance accuracy
    eval_split: str = "test"  # "val": test_acc is measured on images held out of training (data.val_split)
    # task lm: test_acc is next-token accuracy; losses are mean nats per token over a whole split
    task: str = "image"
    test_loss: float = 0.0
    test_ppl: float = 0.0
    val_ppl: float = 0.0
    tokens_per_s: float = 0.0
    # passes over the training data (images trained on / the epoch's images): fractional where a
    # time budget stopped the last epoch part-way; s_per_epoch is train_time_s per pass
    data_epochs: float = 0.0
    solver: dict = dataclasses.field(default_factory=dict)  # DEQ: mean iterations, residuals

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- runtime settings

def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


# ---------------------------------------------------------------- loops

@dataclass
class EpochStats:
    loss: float
    acc: float
    images: int
    seconds: float
    step: int
    failure: str = ""  # why training stopped early: a diverged solver or loss
    out_of_time: bool = False
    solver: dict = dataclasses.field(default_factory=dict)


def summarize_solver(forward, backward) -> dict:
    """Mean iterations and residuals of DEQ solves (empty for unrolled models)."""
    out = {}
    for label, stats in (("fwd", forward), ("bwd", backward)):
        if stats:
            out[f"{label}_iters"] = sum(s.iterations for s in stats) / len(stats)
            out[f"{label}_rel_residual"] = sum(s.rel_residual for s in stats) / len(stats)
    return out


def train_epoch(model, optimizer, data, mean, std, cfg, device, epoch, step, schedule,
                time_left: float = math.inf, ctx: Dist = Dist(), runner=None,
                channels_last: bool = False, lookahead: Lookahead | None = None) -> EpochStats:
    """One epoch (or until `time_left` seconds of training are spent).

    `runner` is what computes the forward pass when it is not `model` itself: `model` wrapped
    by DistributedDataParallel and/or torch.compile. `lookahead` averages the weights as the
    steps go and leaves its slow weights in the model at the end of the epoch.
    """
    model.train()
    runner = model if runner is None else runner  # not `or`: a compiled module has no truth value
    train_x, train_y, aug = data
    total_steps, warmup, elapsed_before = schedule
    gen = epoch_generator(cfg.seed, epoch, device)
    order = torch.randperm(len(train_x), device=device, generator=gen)
    flips = alternating_flips(len(train_x), cfg.seed, epoch, device) if aug == "crop_altflip" else None
    if lookahead is not None:
        lookahead.restart()
    n_batches = max(1, len(train_x) // cfg.batch_size)  # drop the last partial batch
    loss_sum, correct, seen, forward, backward = 0.0, 0, 0, [], []
    terminal = sys.stderr.isatty()
    bar = tqdm(range(n_batches), leave=False, desc=f"epoch {epoch}",
               disable=not (cfg.progress and terminal and ctx.is_main))
    # Not a terminal (a log file, a job's output): a plain line every tenth of an epoch.
    report_every = max(1, n_batches // 10) if cfg.progress and not terminal and ctx.is_main else 0
    start = time.perf_counter()
    # A DEQ solve inside a step stops when the budget is spent (one process: its own clock).
    model.set_deadline(start + time_left if math.isfinite(time_left) and not ctx.enabled else None)
    settled_bias = model.whitening_bias() if epoch > cfg.optim.whiten_bias_epochs > 0 else None
    stats = EpochStats(math.nan, 0.0, 0, 0.0, step)
    for b in bar:
        idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        # Every process augments the whole global batch (same generator), then keeps its slice.
        x = ctx.shard(augment(normalize(train_x[idx], mean, std), aug, gen,
                              flips[idx] if flips is not None else None))
        y = ctx.shard(train_y[idx])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # With a wall-clock budget the schedule follows time, so it anneals when time runs out.
        # Rank 0's clock decides, so that every process uses the same learning rate.
        progress_step, spent_epoch = step, 0.0
        if cfg.time_budget_s:
            spent_epoch = ctx.from_main(time.perf_counter() - start)
            progress_step = max(step, int((elapsed_before + spent_epoch) / cfg.time_budget_s * total_steps))
        lr = lr_at(progress_step, total_steps, warmup, cfg.optim.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            with autocast_context(device, cfg.precision):
                logits = runner(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.optim.label_smoothing)
                aux = model.aux_loss()
                total = loss if aux is None else loss + aux
            optimizer.zero_grad(set_to_none=True)
            total.backward()
        except SolverDiverged as exc:
            stats.failure = str(exc)
            break
        if settled_bias is not None:
            settled_bias.grad = None  # the optimizer skips it (after data-parallel averaging)
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        step += 1
        if lookahead is not None:
            lookahead.after_step(step)
        f, bwd = model.pop_solver_stats()
        forward += f
        backward += bwd
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            stats.failure = f"non-finite training loss at epoch {epoch}"
            break
        loss_sum += loss_value * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if report_every and (b + 1) % report_every == 0 and b + 1 < n_batches:
            print(f"epoch {epoch}: {b + 1}/{n_batches} batches, loss {loss_value:.3f}",
                  file=sys.stderr, flush=True)
        # One process: its clock after the step. Several: rank 0's clock before it (all agree).
        if (spent_epoch if ctx.enabled else time.perf_counter() - start) >= time_left:
            stats.out_of_time = True
            break
    model.set_deadline(None)  # evaluation is bounded by its iteration limit alone
    if lookahead is not None:
        lookahead.sync()  # the checkpoint holds the slow weights, the next epoch restarts from it
    if device.type == "cuda":
        torch.cuda.synchronize()
    loss_sum, correct, seen = ctx.sum(loss_sum, correct, seen)
    # Rank 0's clock, so that every process agrees on the time budget.
    stats.seconds, stats.step, stats.images = ctx.from_main(time.perf_counter() - start), step, int(seen)
    if seen:
        stats.loss, stats.acc = loss_sum / seen, correct / seen
    stats.solver = summarize_solver(forward, backward)
    return stats


def chance_warning(test_acc: float, classes: int) -> str:
    """Non-empty when the accuracy is no better than guessing (within half a class's share)."""
    if test_acc <= 1.5 / classes:
        return f"test accuracy {test_acc:.1%} is at chance level (1/{classes}): the run learned nothing"
    return ""


def train(cfg: TrainConfig, out: str | Path | None = None, resume: bool = False,
          dataset: Dataset | None = None, log=print) -> Result:
    """Train `cfg`; write the run to `out` when given (resuming it when `resume`).

    Started by torchrun (WORLD_SIZE > 1), the processes train one model data-parallel
    (see `tiedmask.training.distributed`); rank 0 writes the run and logs.
    """
    device = resolve_device(cfg)
    ctx = setup_distributed(device.type, cfg.batch_size)
    new_folder = out is not None and ctx.is_main and not Path(out).exists()
    try:
        if device.type == "cuda" and ctx.enabled:
            device = torch.device("cuda", ctx.local_rank)
        if cfg.task == "lm":
            if ctx.enabled:
                raise ConfigError("language-model runs train in one process; start them without torchrun")
            from .lm import train_lm  # imported here: it builds on this module's parts

            return train_lm(cfg, out, resume, log, device)
        return _train(cfg, out, resume, dataset, log if ctx.is_main else (lambda *_: None), ctx, device)
    except BaseException:
        if new_folder:  # a run that failed before writing anything (missing data) leaves no folder
            with contextlib.suppress(OSError):
                Path(out).rmdir()  # only if still empty
        raise
    finally:
        teardown_distributed(ctx)


def _train(cfg: TrainConfig, out, resume: bool, dataset, log, ctx: Dist, device: torch.device) -> Result:
    run, finished = open_run(cfg, out, resume, ctx, log)
    if finished is not None:
        return finished
    saved_stats = run.read_stats() if run is not None and resume else None
    data = prepare_data(cfg.data, stats=saved_stats, dataset=dataset)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    mean, std = data.stats.tensors(device)
    channels_last = use_channels_last(cfg, data.shape.size)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.shape)
    model.init_from_data(normalize(train_x[:5000], mean, std))
    check_whitening_stem(cfg, model.whitening_bias() is not None)  # a config built by hand
    if cfg.finetune.init_from:
        pretrained, _, _ = RunDir(cfg.finetune.init_from).load_checkpoint()
        model = prepare_finetune(model, cfg, pretrained)
    model = model.to(device)
    macs = count_macs(model, tuple(data.train_x.shape[1:]))
    model.pop_solver_stats()  # the MAC-count probe is not a training solve
    model = place(model, device, channels_last)
    optimizer = make_optimizer(cfg, model)
    steps_per_epoch = max(1, len(train_x) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = max(1, round(cfg.optim.warmup_epochs * steps_per_epoch))

    state = RunState(config_hash=config_hash(cfg))
    if run is not None:
        if resume and run.has_checkpoint():
            state = run.restore(model, optimizer, cfg)
            log(f"resuming {run.path} after epoch {state.epoch}")
        elif resume:
            log(f"{run.path} has no checkpoint yet; starting it from the beginning")
        if ctx.is_main:
            run.keep_metrics_until(state.epoch)  # rows of epochs no checkpoint holds
            run.write_config(cfg)
            run.write_stats(data.stats)
    choose_precision(state, cfg, ctx, device)
    compute_cfg = dataclasses.replace(cfg, precision=state.precision)  # what the loops compute in
    runner = wrap_for_training(model, cfg, ctx, device)
    lookahead = Lookahead(model, cfg.optim.lookahead_every, cfg.optim.lookahead_decay) \
        if cfg.optim.lookahead_every else None

    params, trainable = count_params(model), count_params(model, trainable_only=True)
    m = cfg.model
    log(f"model {m.name} ({m.execution}, masks {m.masks.scope} at density {m.masks.density}): "
        f"{params:,} params ({trainable:,} trained), {macs['effective'] / 1e6:.1f}M effective MACs/img, "
        f"on {device} in {state.precision}" + (f" x {ctx.world} processes" if ctx.enabled else ""))
    status, reason = "ok", ""
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        time_left = cfg.time_budget_s - state.train_time_s if cfg.time_budget_s else math.inf
        if time_left <= 0:
            break
        ep = train_epoch(model, optimizer, (train_x, train_y, data.augment), mean, std, compute_cfg, device,
                         epoch, state.step, (total_steps, warmup, state.train_time_s), time_left,
                         ctx=ctx, runner=runner, channels_last=channels_last, lookahead=lookahead)
        state.step = ep.step
        state.train_time_s += ep.seconds
        state.images += ep.images
        if ep.failure:
            status, reason = "diverged", ep.failure
            state.last_train_loss = ep.loss
            log(f"epoch {epoch}: {reason}")
            break
        last = (epoch == cfg.epochs or ep.out_of_time
                or bool(cfg.time_budget_s) and state.train_time_s >= cfg.time_budget_s)
        test_acc = test_loss = None  # not scored this epoch (eval_every)
        if last or (cfg.eval_every and epoch % cfg.eval_every == 0):
            test_acc, test_loss = evaluate(model, data.test_x, data.test_y, mean, std, compute_cfg, device, ctx,
                                           channels_last)
            eval_fwd, _ = model.pop_solver_stats()
            ep.solver.update({f"eval_{k}": v for k, v in summarize_solver(eval_fwd, []).items()})
            state.best_test_acc = max(state.best_test_acc, test_acc)
            state.last_test_acc = test_acc
        state.epoch, state.solver, state.last_train_loss = epoch, ep.solver, ep.loss
        row = {"epoch": epoch, "train_loss": ep.loss, "train_acc": ep.acc, "test_loss": test_loss,
               "test_acc": test_acc, "lr": optimizer.param_groups[0]["lr"],
               "epoch_time_s": ep.seconds, "train_time_s": state.train_time_s,
               "img_per_s": ep.images / ep.seconds, **ep.solver}
        solver_note = "".join(f"  {k} {v:.3g}" for k, v in ep.solver.items() if k.endswith("iters"))
        scored = "   –   " if test_acc is None else f"{test_acc:6.2%}"
        log(f"epoch {epoch:>3}/{cfg.epochs}  loss {ep.loss:.4f}  train {ep.acc:6.2%}  "
            f"test {scored}  {ep.seconds:6.1f}s  {ep.images / ep.seconds:7.1f} img/s{solver_note}")
        if run is not None and ctx.is_main:
            run.append_metrics(row)
            run.save_checkpoint(model, optimizer, state, cfg)
        if ep.out_of_time:
            log(f"time budget of {cfg.time_budget_s:.0f}s spent after epoch {epoch}")
            break
    passes = state.images / (steps_per_epoch * cfg.batch_size) or float(state.epoch)  # older checkpoints: no count
    result = Result(
        status=status, reason=reason, test_acc=state.last_test_acc, best_test_acc=state.best_test_acc,
        final_train_loss=state.last_train_loss, params=params, trainable_params=trainable,
        macs_dense=macs["dense"], macs_effective=macs["effective"], train_time_s=state.train_time_s,
        img_per_s=state.images / state.train_time_s if state.train_time_s else 0.0,
        s_per_epoch=state.train_time_s / passes if passes else 0.0, data_epochs=passes,
        epochs=state.epoch, seed=cfg.seed, config_hash=state.config_hash,
        peak_mem_mb=peak_memory_mb(device), hardware=hardware_name(device), precision=state.precision,
        solver=state.solver,
        # A diverged run keeps the score of its last scored epoch (0 if none was: eval_every);
        # its status says what happened, so it gets no "learned nothing" warning.
        warning=(chance_warning(state.last_test_acc, data.shape.classes)
                 if state.epoch and status == "ok" else ""),
        eval_split=data.eval_split)
    if run is not None and ctx.is_main:
        run.write_result(result.to_dict())
    return result


def open_run(cfg: TrainConfig, out, resume: bool, ctx: Dist, log) -> tuple[RunDir | None, Result | None]:
    """(the run directory of `out`, created or reopened by rank 0 (None: keep nothing), the
    result of a finished run being resumed (None: train)); sets the threads the run asks for."""
    run = None
    if out is not None:
        run = RunDir.create(out, resume) if ctx.is_main else RunDir(out)  # other ranks only read
        ctx.barrier()
        if resume and run.is_finished():
            log(f"{run.path} is already finished; its result stands")
            return run, Result(**run.read_result())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return run, None


def choose_precision(state: RunState, cfg: TrainConfig, ctx: Dist, device: torch.device) -> None:
    """Set `state.precision` (what the run computes in) once, when the run starts."""
    if not state.precision:
        older_run = state.epoch > 0 and cfg.precision == "auto"  # resumed, from before it was recorded
        chosen = legacy_auto(device) if older_run else resolve_precision(cfg.precision, device)
        # Rank 0's choice on every process: the timed check could tip differently on each.
        state.precision = "bf16" if ctx.from_main(float(chosen == "bf16")) else "fp32"


def wrap_for_training(model, cfg: TrainConfig, ctx: Dist, device: torch.device):
    """What runs the training forward pass: the model, under DDP and/or torch.compile."""
    runner = model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # Masks are deterministic on every process and BatchNorm statistics are averaged before
        # evaluation, so nothing needs broadcasting each step.
        runner = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)
    if cfg.compile:
        runner = torch.compile(runner)
    return runner
