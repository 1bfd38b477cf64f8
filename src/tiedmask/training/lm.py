"""`task: lm`: next-token training of a causal language model, untied or tied, from scratch or
from a trained run, with optional distillation from a teacher run.

One epoch is a pass over the training split in windows of `lm.seq_len + 1` tokens at a random
offset, shuffled (or `lm.epoch_tokens` tokens of such windows), seeded by (seed, epoch): a
resumed run reproduces an uninterrupted one. The validation split is scored after every
`eval_every` epochs and the test split once, at the end; both over every token of the split
(windows side by side, each token predicted from the tokens before it in its window).
Perplexity = exp(mean nats per token). `tokens_per_s` counts training tokens per training second.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..core.backbones import count_params
from ..core.causal_lm import CausalLM, build_causal_lm
from ..errors import ConfigError, TiedmaskError
from ..files import atomic_write_json, read_json
from .checkpoint import CHECKPOINT_FILE
from .corpus import load_corpus
from .datasets import default_root
from .distributed import Dist
from .precision import autocast_context
from .rundir import CORPUS_FILE, TOKENIZER_FILE, RunDir, RunState
from .settings import TrainConfig, config_hash
from .tokens import BYTES_VOCAB, TokenData, load_tokenizer, tokenize, train_tokenizer
from .runtime import hardware_name, peak_memory_mb, resolve_device
from .train import Result, choose_precision, epoch_generator, lr_at, make_optimizer, open_run, wrap_for_training


# ---------------------------------------------------------------- data and models

def is_hf_folder(path: Path) -> bool:
    """A folder of `save_pretrained` (its config names a model type), not a tiedmask run."""
    config = Path(path) / "config.json"
    if not config.is_file() or (Path(path) / CHECKPOINT_FILE).exists():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def prepare_text(cfg: TrainConfig, run: RunDir | None, resume: bool) -> TokenData:
    """The corpus in token ids, with the tokenizer this run uses: its own when resumed, the one
    of the run (or checkpoint folder) it starts from, else one trained on the training split."""
    root = Path(cfg.data.root) if cfg.data.root else default_root()
    corpus = load_corpus(cfg.data.name, root, cfg.data.download)
    source = _tokenizer_source(cfg, run, resume)
    tokenizer = load_tokenizer(source) if source else train_tokenizer(
        cfg.lm.tokenizer, cfg.lm.vocab_size, corpus.documents["train"])
    asked = BYTES_VOCAB if cfg.lm.tokenizer == "bytes" else cfg.lm.vocab_size
    if source and not is_hf_folder(source.parent) and tokenizer.get_vocab_size() != asked:
        raise ConfigError(f"{source} has {tokenizer.get_vocab_size()} tokens, not the {asked} lm.tokenizer and "
                          "lm.vocab_size ask for; a run started from another takes its tokenizer: set them as it has")
    data = tokenize(corpus, tokenizer)
    saved = run.path / CORPUS_FILE if run is not None else None
    recorded = read_json(saved) if resume and saved is not None and saved.exists() else {}
    if not isinstance(recorded, dict):
        raise TiedmaskError(f"{saved} is damaged (not a JSON object); delete it, the resume writes it again")
    if recorded and recorded.get("sha256") != corpus.digest:
        raise ConfigError(f"{cfg.data.root or root}/{cfg.data.name} is not the text {run.path} was trained on "
                          f"(its sha256 differs from {saved}'s); point --data.root at that corpus")
    return data


def _tokenizer_source(cfg: TrainConfig, run: RunDir | None, resume: bool) -> Path | None:
    own = run.path / TOKENIZER_FILE if run is not None else None
    if resume and own is not None and own.exists():
        return own
    start = cfg.finetune.init_from or cfg.lm.teacher
    if start:
        path = Path(start) / TOKENIZER_FILE
        if not path.is_file():
            raise ConfigError(f"{start} has no {TOKENIZER_FILE}; start from a language-model run of tiedmask "
                              "or a Hugging Face folder saved with its tokenizer")
        return path
    return None


def load_lm_run(run_dir: str | Path) -> tuple[CausalLM, TrainConfig, RunState]:
    """A trained language-model run's model (its last checkpoint), settings and progress."""
    run = RunDir(run_dir)
    cfg = run.read_config()
    if cfg.task != "lm":
        raise ConfigError(f"{run.path} is an image run; a language-model run is needed here")
    if not run.has_checkpoint():
        raise TiedmaskError(f"{run.path} has no checkpoint yet; train it first (`tiedmask train --resume {run.path}`)")
    weights, _, state = run.load_checkpoint()
    vocab = load_tokenizer(run.path / TOKENIZER_FILE).get_vocab_size()
    model = _build_for(cfg, vocab, start=False)  # its own structure; the checkpoint gives the values
    with run._fitting("was config.json edited?"):
        model.load_state_dict(weights)
    return model, cfg, state


def _build_for(cfg: TrainConfig, vocab: int, start: bool = True) -> CausalLM:
    """`cfg`'s model; with `start`, from the trained values `finetune.init_from` names (a run
    started from a Hugging Face folder takes its structure from that folder, started or not)."""
    source = cfg.finetune.init_from
    if source and is_hf_folder(Path(source)):
        return build_causal_lm(cfg.model, vocab, cfg.lm.seq_len, hf_folder=Path(source))
    weights = None
    if source and start:
        teacher, _, _ = load_lm_run(finished(source))
        if any("parametrizations" in k for k in teacher.state_dict()):
            raise ConfigError(f"{source} is a tied run; start from an untied one")
        weights = teacher.state_dict()
    return build_causal_lm(cfg.model, vocab, cfg.lm.seq_len, weights=weights)


def finished(source: str) -> str:
    """`source`, a run that finished training: one still training would change under its students."""
    if not RunDir(source).is_finished():
        raise ConfigError(f"{source} has not finished training (no result.json); start from or distil a "
                          "finished run (`tiedmask train --resume` it first)")
    return source


def load_teacher(cfg: TrainConfig, tokenizer, device: torch.device) -> CausalLM | None:
    """The run (or Hugging Face folder) to distil from, when `lm.distill` asks for one; its
    tokenizer must be the student's, token for token."""
    if not cfg.lm.distill:
        return None
    source = cfg.lm.teacher or cfg.finetune.init_from
    vocab = tokenizer.get_vocab_size()
    if is_hf_folder(Path(source)):
        teacher = build_causal_lm(dataclasses.replace(cfg.model, execution="untied"), vocab, cfg.lm.seq_len,
                                  hf_folder=Path(source))
    else:
        teacher, _, _ = load_lm_run(finished(source))
    theirs = Path(source) / TOKENIZER_FILE
    if not theirs.is_file() or load_tokenizer(theirs).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"the teacher {source} reads text with another tokenizer than the student; distil "
                          "from the run the student's tokenizer came from")
    return teacher.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------- windows, losses, scoring

def window_starts(length: int, seq_len: int, epoch_tokens: int, gen: torch.Generator) -> torch.Tensor:
    """Start positions of one epoch's training windows (of seq_len + 1 tokens) in a stream."""
    offset = int(torch.randint(seq_len, (1,), generator=gen))
    usable = (length - 1 - offset) // seq_len
    if usable < 1:
        raise ConfigError(f"the training split has {length} tokens, too few for windows of {seq_len}; "
                          "lower lm.seq_len")
    wanted = epoch_tokens // seq_len if epoch_tokens else usable
    rounds = [torch.randperm(usable, generator=gen) for _ in range(math.ceil(wanted / usable))]
    return offset + torch.cat(rounds)[:max(1, wanted)] * seq_len


def gather_windows(stream: torch.Tensor, starts: torch.Tensor, size: int) -> torch.Tensor:
    return stream[starts[:, None] + torch.arange(size)]


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(teacher || student) of next-token distributions at temperature T, per token."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature ** 2


@torch.no_grad()
def score_tokens(model: torch.nn.Module, stream: torch.Tensor, seq_len: int, batch_size: int,
                 device: torch.device, precision: str) -> tuple[float, float]:
    """(mean nats per token, next-token accuracy) over every token of `stream` after the first."""
    model.eval()
    targets = len(stream) - 1
    if targets < 1:
        raise ConfigError("a split of the corpus holds no text to score; its documents are empty")
    starts = torch.arange(0, targets, seq_len)
    nll, correct = 0.0, 0
    for chunk in starts.split(batch_size):
        full = chunk[chunk + seq_len <= targets]
        pieces = [gather_windows(stream, full, seq_len + 1)] if len(full) else []
        pieces += [stream[int(s):targets + 1][None] for s in chunk[chunk + seq_len > targets]]  # the last, shorter
        for windows in pieces:
            windows = windows.to(device)
            with autocast_context(device, precision):
                logits = model(windows[:, :-1]).float()
            nll += F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="sum").item()
            correct += (logits.argmax(-1) == windows[:, 1:]).sum().item()
    return nll / targets, correct / targets


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


# ---------------------------------------------------------------- training

@dataclasses.dataclass
class LmEpoch:
    loss: float = math.nan
    tokens: int = 0
    seconds: float = 0.0
    step: int = 0
    failure: str = ""
    out_of_time: bool = False


def lm_epoch(model, runner, teacher, optimizer, stream, cfg: TrainConfig, device, epoch: int,
             state: RunState, schedule: tuple[int, int], time_left: float) -> LmEpoch:
    """One epoch of next-token steps (and distillation when a teacher is given)."""
    model.train()
    total_steps, warmup = schedule
    gen = epoch_generator(cfg.seed, epoch, torch.device("cpu"))
    torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # dropout: a resumed epoch draws as an uninterrupted one
    starts = window_starts(len(stream), cfg.lm.seq_len, cfg.lm.epoch_tokens, gen)
    batches = max(1, len(starts) // cfg.batch_size)
    out = LmEpoch(step=state.step)
    loss_sum, start = 0.0, time.perf_counter()
    terminal = sys.stderr.isatty()
    bar = tqdm(range(batches), leave=False, desc=f"epoch {epoch}", disable=not (cfg.progress and terminal))
    # Not a terminal (a log file, a job's output): a plain line every tenth of an epoch.
    report_every = max(1, batches // 10) if cfg.progress and not terminal else 0
    for b in bar:
        windows = gather_windows(stream, starts[b * cfg.batch_size:(b + 1) * cfg.batch_size],
                                 cfg.lm.seq_len + 1).to(device)
        inputs, targets = windows[:, :-1], windows[:, 1:]
        progress = out.step
        if cfg.time_budget_s:  # the schedule follows the clock, so it anneals when time runs out
            spent = state.train_time_s + time.perf_counter() - start
            progress = max(out.step, int(spent / cfg.time_budget_s * total_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(progress, total_steps, warmup, cfg.optim.lr)
        with autocast_context(device, state.precision):
            logits = runner(inputs)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                   label_smoothing=cfg.optim.label_smoothing)
            total = loss
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(inputs)
                total = loss + cfg.lm.distill * distillation_kl(logits, teacher_logits, cfg.lm.temperature)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        out.step += 1
        value = loss.item()
        if not math.isfinite(value):
            out.failure = f"non-finite training loss at epoch {epoch}"
            break
        loss_sum += value * targets.numel()
        out.tokens += targets.numel()
        bar.set_postfix(loss=f"{value:.3f}")
        if report_every and (b + 1) % report_every == 0 and b + 1 < batches:
            spent = time.perf_counter() - start
            print(f"epoch {epoch}: {b + 1}/{batches} batches, loss {value:.3f}, {out.tokens / spent:.0f} tok/s, "
                  f"epoch ends in {spent / (b + 1) * (batches - b - 1) / 60:.1f} min", file=sys.stderr, flush=True)
        if time.perf_counter() - start >= time_left:
            out.out_of_time = True
            break
    out.seconds = time.perf_counter() - start
    if out.tokens:
        out.loss = loss_sum / out.tokens
    return out


def train_lm(cfg: TrainConfig, out, resume: bool, log, device: torch.device) -> Result:
    """Train a language-model config on `device` (`training.train.train` calls this); write the
    run to `out` when given (resuming it when `resume`)."""
    ctx = Dist()  # one process
    run, done = open_run(cfg, out, resume, ctx, log)
    if done is not None:
        return done
    data = prepare_text(cfg, run, resume)
    torch.manual_seed(cfg.seed)
    model = _build_for(cfg, data.vocab_size).to(device)
    teacher = load_teacher(cfg, data.tokenizer, device)
    optimizer = make_optimizer(cfg, model)
    train_stream = data.streams["train"]
    # steps an epoch takes at the least (the windows' random offset can cost one): so the
    # schedule reaches its end; a step more runs at the last rate
    windows = cfg.lm.epoch_tokens // cfg.lm.seq_len or (len(train_stream) - cfg.lm.seq_len) // cfg.lm.seq_len
    per_epoch = windows // cfg.batch_size
    total_steps = max(1, per_epoch) * cfg.epochs
    warmup = max(1, round(cfg.optim.warmup_epochs * max(1, per_epoch)))

    state = RunState(config_hash=config_hash(cfg))
    if run is not None:
        if resume and run.has_checkpoint():
            state = run.restore(model, optimizer, cfg)
            log(f"resuming {run.path} after epoch {state.epoch}")
        run.keep_metrics_until(state.epoch)
        run.write_config(cfg)
        data.tokenizer.save(str(run.path / TOKENIZER_FILE))
        atomic_write_json(run.path / CORPUS_FILE, data.summary())
    choose_precision(state, cfg, ctx, device)
    runner = wrap_for_training(model, cfg, ctx, device)
    params, trainable = count_params(model), count_params(model, trainable_only=True)
    log(f"model {cfg.model.name} ({cfg.model.execution}): {params:,} params ({trainable:,} trained), "
        f"vocab {data.vocab_size}, {len(train_stream):,} training tokens, on {device} in {state.precision}"
        + (f", distilling from {cfg.lm.teacher or cfg.finetune.init_from}" if teacher is not None else ""))
    status, reason, val_loss = "ok", "", None
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        time_left = cfg.time_budget_s - state.train_time_s if cfg.time_budget_s else math.inf
        if time_left <= 0:
            break
        ep = lm_epoch(model, runner, teacher, optimizer, train_stream, cfg, device, epoch, state,
                      (total_steps, warmup), time_left)
        # RunState.images counts the training tokens of a language-model run
        state.step, state.train_time_s, state.images = ep.step, state.train_time_s + ep.seconds, \
            state.images + ep.tokens
        if ep.failure:
            status, reason, state.last_train_loss = "diverged", ep.failure, ep.loss
            log(f"epoch {epoch}: {reason}")
            break
        last = epoch == cfg.epochs or ep.out_of_time or bool(cfg.time_budget_s) and state.train_time_s >= cfg.time_budget_s
        val_loss = val_acc = None
        if last or (cfg.eval_every and epoch % cfg.eval_every == 0):
            val_loss, val_acc = score_tokens(model, data.streams["val"], cfg.lm.seq_len, cfg.eval_batch_size,
                                             device, state.precision)
        state.epoch, state.last_train_loss = epoch, ep.loss
        row = {"epoch": epoch, "train_loss": ep.loss, "val_loss": val_loss, "val_acc": val_acc,
               "val_ppl": None if val_loss is None else perplexity(val_loss), "lr": optimizer.param_groups[0]["lr"],
               "epoch_time_s": ep.seconds, "train_time_s": state.train_time_s,
               "tokens_per_s": ep.tokens / ep.seconds}
        eta = (cfg.epochs - epoch) * state.train_time_s / epoch
        scored = "    –   " if val_loss is None else f"{perplexity(val_loss):8.2f}"
        log(f"epoch {epoch:>3}/{cfg.epochs}  loss {ep.loss:.4f}  val ppl {scored}  {ep.seconds:6.1f}s  "
            f"{ep.tokens / ep.seconds:7.0f} tok/s  eta {eta / 60:.1f} min")
        if run is not None:
            run.append_metrics(row)
            run.save_checkpoint(model, optimizer, state, cfg)
        if ep.out_of_time:
            log(f"time budget of {cfg.time_budget_s:.0f}s spent after epoch {epoch}")
            break
    if val_loss is None or status != "ok":  # the last epoch was not scored, or none finished
        val_loss, _ = score_tokens(model, data.streams["val"], cfg.lm.seq_len, cfg.eval_batch_size, device,
                                   state.precision)
    return _finish(cfg, run, model, data, state, device, status, reason, (params, trainable, val_loss), log)


def _finish(cfg, run, model, data: TokenData, state: RunState, device, status: str, reason: str,
            counts: tuple[int, int, float], log) -> Result:
    """Score the test split at the end and write the result."""
    val_loss = counts[2]
    test_loss, test_acc = score_tokens(model, data.streams["test"], cfg.lm.seq_len, cfg.eval_batch_size, device,
                                       state.precision)
    log(f"test perplexity {perplexity(test_loss):.2f} (validation {perplexity(val_loss):.2f}), "
        f"next-token accuracy {test_acc:.2%}")
    seconds = state.train_time_s
    result = Result(
        status=status, reason=reason, task="lm", test_acc=test_acc, best_test_acc=test_acc,
        test_loss=test_loss, test_ppl=perplexity(test_loss), val_ppl=perplexity(val_loss),
        final_train_loss=state.last_train_loss, params=counts[0], trainable_params=counts[1],
        macs_dense=0, macs_effective=0, train_time_s=seconds, img_per_s=0.0,
        tokens_per_s=state.images / seconds if seconds else 0.0,
        s_per_epoch=seconds / state.epoch if state.epoch else 0.0, epochs=state.epoch, seed=cfg.seed,
        config_hash=state.config_hash, peak_mem_mb=peak_memory_mb(device), hardware=hardware_name(device),
        precision=state.precision)
    if run is not None:
        run.write_result(result.to_dict())
    return result


def score_lm_run(run_dir, data_root: str = "") -> tuple[float, float, int] | None:
    """(nats per token, next-token accuracy, tokens) of a language-model run on its test split,
    as its training scored it; None for an image run."""
    run = RunDir(run_dir)
    cfg = run.read_config()
    if cfg.task != "lm":
        return None
    if data_root:
        cfg.data.root = data_root
    model, _, state = load_lm_run(run_dir)
    data = prepare_text(cfg, run, resume=True)
    device = resolve_device(cfg)
    loss, acc = score_tokens(model.to(device), data.streams["test"], cfg.lm.seq_len, cfg.eval_batch_size,
                             device, state.precision or "fp32")
    return loss, acc, len(data.streams["test"]) - 1
