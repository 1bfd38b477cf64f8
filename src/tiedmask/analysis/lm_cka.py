"""CKA between the layers of a language-model run (claim 2 for decoders: do tied applications
compute near-identical features?).

Samples are tokens of the run's test split: windows of `lm.seq_len` side by side, each layer's
output at every token (Hugging Face's `output_hidden_states`, embeddings left out; in
transformers the last entry is taken after the final norm). Minibatches of `TOKENS_PER_BATCH`
tokens feed the unbiased minibatch CKA of `analysis/cka.py`. The result has the shape of
`analyze_model`'s, with one "stage": the decoder's layers.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..training.lm import load_lm_run, prepare_text
from ..training.precision import autocast_context
from ..training.rundir import RunDir
from .cka import MinibatchCKA

TOKENS_PER_BATCH = 512


def off_diagonal(matrix: torch.Tensor) -> tuple[float, float]:
    """(mean off-diagonal, mean adjacent) CKA of a layers x layers matrix."""
    n = matrix.shape[0]
    if n < 2:
        return float("nan"), float("nan")
    return float((matrix.sum() - matrix.diagonal().sum()) / (n * n - n)), float(matrix.diagonal(1).mean())


@torch.no_grad()
def layer_cka(model, stream: torch.Tensor, seq_len: int, tokens: int, precision: str = "fp32") -> torch.Tensor:
    """CKA between every pair of layer outputs over the first `tokens` tokens of `stream`."""
    if tokens < 4:
        raise ConfigError(f"CKA needs at least 4 tokens, got {tokens}; raise --images (tokens for a language model)")
    model.eval()
    windows = min(len(stream) // seq_len, -(-tokens // seq_len))
    if windows < 1:
        raise ConfigError(f"the test split has {len(stream)} tokens, fewer than one window of {seq_len}")
    ids = stream[:windows * seq_len].view(windows, seq_len)
    accumulator, left = None, tokens
    for batch in ids.split(max(1, TOKENS_PER_BATCH // seq_len)):
        with autocast_context(torch.device("cpu"), precision):
            states = model.net(input_ids=batch, use_cache=False, output_hidden_states=True).hidden_states[1:]
        flat = [s.float().reshape(-1, s.shape[-1])[:left] for s in states]  # every token, up to `tokens`
        left -= len(flat[0])
        for chunk in zip(*(f.split(TOKENS_PER_BATCH) for f in flat)):  # long windows: several minibatches
            if len(chunk[0]) >= 4:
                accumulator = accumulator or MinibatchCKA(len(chunk))
                accumulator.update(list(chunk))
    if accumulator is None:
        raise ConfigError(f"windows of {seq_len} tokens are too short for CKA; it needs 4 tokens a batch")
    return accumulator.compute()


def analyze_lm_run(run_dir, tokens: int = 4096, data_root: str = "") -> dict:
    run = RunDir(run_dir)
    cfg = run.read_config()
    if data_root:
        cfg.data.root = data_root
    model, _, state = load_lm_run(run_dir)
    data = prepare_text(cfg, run, resume=True)
    matrix = layer_cka(model, data.streams["test"], cfg.lm.seq_len, tokens, state.precision or "fp32")
    offdiag, adjacent = off_diagonal(matrix)
    used = min(tokens, len(data.streams["test"]) // cfg.lm.seq_len * cfg.lm.seq_len)
    return {"images": used, "samples": "tokens", "cka": [matrix.tolist()],
            "cka_offdiag_mean": [offdiag], "cka_adjacent_mean": [adjacent], "relative_change": [[]], "masks": {}}
