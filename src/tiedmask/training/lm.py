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
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.backbones import count_params
from ..core.causal_lm import CausalLM, build_causal_lm
from ..errors import ConfigError, TiedmaskError
from ..files import atomic_write_json, read_json
from .checkpoint import CHECKPOINT_FILE
from .corpus import load_corpus
from .datasets import default_root
from .distributed import Dist
from .precision import autocast_context, described
from .rundir import CORPUS_FILE, TOKENIZER_FILE, RunDir, RunState
from .settings import TrainConfig
from .tokens import BYTES_VOCAB, TokenData, load_tokenizer, tokenize, train_tokenizer
from .runtime import hardware_name, peak_memory_mb, resolve_device
from .result import Result
from .trainer import (EpochHook, Schedule, Trainer, choose_precision, epoch_generator, epoch_printer, make_optimizer,
                      open_run, start_state, wrap_for_training)


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

class LmTask:
    """Next-token prediction for the `Trainer`: each epoch windows of `seq_len + 1` tokens at
    random offsets seeded by (seed, epoch); cross-entropy, plus the T² KL to a teacher's logits
    when distilling; perplexity on the validation split."""

    unit, rate_key, score_keys, counts_correct = "tok", "tokens_per_s", ("val_loss", "val_acc", "val_ppl"), False

    def __init__(self, cfg: TrainConfig, data: TokenData, teacher: CausalLM | None, device: torch.device):
        self.cfg, self.data, self.teacher, self.device = cfg, data, teacher, device
        self.stream = data.streams["train"]
        self.precision = "fp32"  # what scoring computes in: the run's, once chosen
        self.val_loss: float | None = None  # of the last epoch, if it was scored

    def start_epoch(self, model, epoch: int) -> int:
        cfg = self.cfg
        gen = epoch_generator(cfg.seed, epoch, "cpu")
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # dropout: a resumed epoch draws as an uninterrupted one
        self.starts = window_starts(len(self.stream), cfg.lm.seq_len, cfg.lm.epoch_tokens, gen)
        return max(1, len(self.starts) // cfg.batch_size)

    def set_deadline(self, model, deadline: float | None) -> None:
        pass  # a decoder's forward pass is not iterative

    def probe_inputs(self) -> torch.Tensor:
        """A batch of windows of the run's shape, for timing a step (`choose_precision`)."""
        shape = (self.cfg.batch_size, self.cfg.lm.seq_len)
        return torch.randint(self.data.vocab_size, shape, generator=torch.Generator().manual_seed(0)).to(self.device)

    def batch(self, index: int):
        size = self.cfg.batch_size
        windows = gather_windows(self.stream, self.starts[index * size:(index + 1) * size],
                                 self.cfg.lm.seq_len + 1).to(self.device)
        return windows[:, :-1], windows[:, 1:]

    def losses(self, model, runner, inputs, targets):
        logits = runner(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                               label_smoothing=self.cfg.optim.label_smoothing)
        if self.teacher is None:
            return loss, loss, logits
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        lm = self.cfg.lm
        return loss, loss + lm.distill * distillation_kl(logits, teacher_logits, lm.temperature), logits

    def after_backward(self, model) -> None:
        pass

    def tally(self, model, logits, targets) -> tuple[int, int]:
        return targets.numel(), 0

    def end_epoch(self, model) -> dict:
        return {}

    def score(self, model) -> dict:
        loss, acc = score_tokens(model, self.data.streams["val"], self.cfg.lm.seq_len, self.cfg.eval_batch_size,
                                 self.device, self.precision)
        return {"val_loss": loss, "val_acc": acc, "val_ppl": perplexity(loss)}

    def describe(self, row: dict) -> str:
        return "val ppl " + ("    –   " if row["val_ppl"] is None else f"{row['val_ppl']:8.2f}")

    def record(self, state: RunState, row: dict) -> None:
        self.val_loss = row["val_loss"]


def train_lm(cfg: TrainConfig, out, resume: bool, log, device: torch.device, hooks: list[EpochHook] = ()) -> Result:
    """Train a language-model config on `device` (`training.train.train` calls this); write the
    run to `out` when given (resuming it when `resume`)."""
    ctx = Dist()  # one process
    run, finished = open_run(cfg, out, resume, ctx, log)
    if finished is not None:
        return Result(**finished)
    data = prepare_text(cfg, run, resume)
    torch.manual_seed(cfg.seed)
    model = _build_for(cfg, data.vocab_size).to(device)
    task = LmTask(cfg, data, load_teacher(cfg, data.tokenizer, device), device)
    optimizer = make_optimizer(cfg, model)
    state = start_state(run, resume, model, optimizer, cfg, ctx, log)
    if run is not None:
        data.tokenizer.save(str(run.path / TOKENIZER_FILE))
        atomic_write_json(run.path / CORPUS_FILE, data.summary())
        hooks = [run.epoch_keeper(model, optimizer, state, cfg), *hooks]
    choose_precision(state, cfg, ctx, device, model, task.probe_inputs)
    task.precision = state.precision
    # steps an epoch takes at the least (the windows' random offset can cost one): so the
    # schedule reaches its end; a step more runs at the last rate
    windows = cfg.lm.epoch_tokens // cfg.lm.seq_len or (len(task.stream) - cfg.lm.seq_len) // cfg.lm.seq_len
    trainer = Trainer(model, optimizer, task, cfg, Schedule.of(cfg, windows // cfg.batch_size), state, device, ctx,
                      forward=wrap_for_training(model, cfg, ctx, device, state, log),
                      on_epoch=[epoch_printer(cfg, task, log), *hooks], log=log)
    counts = count_params(model), count_params(model, trainable_only=True)
    log(f"model {cfg.model.name} ({cfg.model.execution}): {counts[0]:,} params ({counts[1]:,} trained), "
        f"vocab {data.vocab_size}, {len(task.stream):,} training tokens, on {device} in {described(state.precision, state.precision_why)}"
        + (f", distilling from {cfg.lm.teacher or cfg.finetune.init_from}" if task.teacher is not None else ""))
    status, reason = trainer.fit()
    val_loss = task.val_loss
    if val_loss is None or status != "ok":  # the last epoch was not scored, or none finished
        val_loss = task.score(model)["val_loss"]
    return _finish(trainer, run, data, (status, reason), (*counts, val_loss), log)


def _finish(trainer: Trainer, run, data: TokenData, outcome: tuple[str, str], counts: tuple[int, int, float],
            log) -> Result:
    """Score the test split at the end and write the result."""
    cfg, state, device, val_loss = trainer.cfg, trainer.state, trainer.device, counts[2]
    test_loss, test_acc = score_tokens(trainer.model, data.streams["test"], cfg.lm.seq_len, cfg.eval_batch_size,
                                       device, state.precision)
    log(f"test perplexity {perplexity(test_loss):.2f} (validation {perplexity(val_loss):.2f}), "
        f"next-token accuracy {test_acc:.2%}")
    seconds = state.train_time_s
    result = Result(
        status=outcome[0], reason=outcome[1], task="lm", test_acc=test_acc, best_test_acc=test_acc,
        test_loss=test_loss, test_ppl=perplexity(test_loss), val_ppl=perplexity(val_loss),
        final_train_loss=state.last_train_loss, params=counts[0], trainable_params=counts[1],
        macs_dense=0, macs_effective=0, train_time_s=seconds, img_per_s=0.0,
        tokens_per_s=state.images / seconds if seconds else 0.0,
        s_per_epoch=seconds / state.epoch if state.epoch else 0.0, epochs=state.epoch, seed=cfg.seed,
        config_hash=state.config_hash, peak_mem_mb=peak_memory_mb(device), hardware=hardware_name(device),
        precision=state.precision, precision_why=state.precision_why,
        compile_choice=state.compile_choice, compile_why=state.compile_why)
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
