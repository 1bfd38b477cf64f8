"""Time per generated token of a tied decoder against its untied twin, KV cache on, and the
parameters each loop strategy keeps.

    python benchmarks/tie_decoder.py                  # ~3 min on 2 CPU cores; run alone
    python benchmarks/tie_decoder.py --rounds 5 --new-tokens 64

A Llama of 8 layers (width 256, 4 heads, 2 KV heads, vocabulary 4096) built from its config
(random weights: time and counts do not depend on training), then tied by `tiedmask.tie`:
one shared block (multi-masks at density 0.5), two blocks looped by cycle and by sequence, each
with and without a rank-8 LoRA per position, and the tied model given back by `untie`. Greedy
generation, batch 1, a 32-token prompt, `--new-tokens` new tokens; each variant timed in
alternating rounds (the best round kept), so drift of the machine hits all alike. Writes
benchmarks/results/tie_decoder.json.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from tiedmask.core.tie import tie
from tiedmask.core.untie import untie
from tiedmask.errors import ArgumentParser, run_script
from tiedmask.training.runtime import hardware_name

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # label: tie options (None: the untied model)
    "untied": None,
    "tied, 1 block": {"group": 1},
    "tied, 1 block + LoRA r8": {"group": 1, "relax": "lora", "relax_rank": 8},
    "tied, 2 blocks cycle": {"group": 2, "strategy": "cycle"},
    "tied, 2 blocks sequence": {"group": 2, "strategy": "sequence"},
    "tied, 2 blocks cycle + LoRA r8": {"group": 2, "strategy": "cycle", "relax": "lora", "relax_rank": 8},
    "untie(tied, 1 block + LoRA r8)": "untie",
}


def llama(layers: int):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=256, intermediate_size=688,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
                                      max_position_embeddings=512, bos_token_id=0, eos_token_id=1)
    return transformers.LlamaForCausalLM(config).eval()


def build(base, options):
    if options is None:
        return base
    if options == "untie":
        return untie(build(base, VARIANTS["tied, 1 block + LoRA r8"]))
    return tie(copy.deepcopy(base), blocks="model.layers", scope="multi", density=0.5, init="mean", **options)


@torch.no_grad()
def ms_per_token(model, prompt: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         use_cache=True, pad_token_id=0)
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return 1000 * (time.perf_counter() - start) / new_tokens


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/tie_decoder.json")
    args = parser.parse_args(argv)
    base = llama(args.layers)
    models = {label: build(base, options) for label, options in VARIANTS.items()}
    prompt = torch.randint(2, 4096, (1, 32), generator=torch.Generator().manual_seed(0))
    reference = models["untied"].generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    times = {label: [] for label in models}
    for model in models.values():
        ms_per_token(model, prompt, 4)  # warm-up
    for _ in range(args.rounds):
        for label, model in models.items():
            times[label].append(ms_per_token(model, prompt, args.new_tokens))
    hardware = hardware_name(torch.device("cpu"))
    print(f"Llama {args.layers} layers, width 256; greedy, batch 1, prompt 32, {args.new_tokens} new tokens, "
          f"KV cache on; best of {args.rounds} alternating rounds; {hardware}, torch {torch.__version__}\n")
    print("| variant | parameters | of untied | ms / token | vs untied |\n|---|---:|---:|---:|---:|")
    untied_params = sum(p.numel() for p in models["untied"].parameters())
    rows = []
    for label, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        best = min(times[label])
        rows.append({"variant": label, "parameters": params, "ms_per_token": best, "rounds_ms": times[label]})
        print(f"| {label} | {params:,} | {params / untied_params:.2f} | {best:.2f} | "
              f"{best / min(times['untied']):.2f}x |")
    same = torch.equal(models["untie(tied, 1 block + LoRA r8)"].generate(prompt, max_new_tokens=8, do_sample=False,
                                                                         pad_token_id=0),
                       models["tied, 1 block + LoRA r8"].generate(prompt, max_new_tokens=8, do_sample=False,
                                                                  pad_token_id=0))
    print(f"\nuntie gives the tied model's greedy tokens: {same}; untied reference tokens: {reference.shape[1]}")
    args.out.write_text(json.dumps({"hardware": hardware, "torch": torch.__version__, "settings": vars(args) | {"out": str(args.out)},
                                    "rows": rows, "untie_same_tokens": same}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main))
