"""2:4 semi-structured sparse inference against masked-dense inference (GPU only).

    python benchmarks/sparse24.py          # needs an NVIDIA Ampere-or-newer GPU; ~1 min

A tied Transformer (width 768, MLP ratio 4, 12 heads, depth 6, 2:4 multi-masks; ViT-B-sized
matmuls on 8x8 = 64 tokens) in bf16, batch 256: images/s with the masked weights run dense
(the training path) and with `tiedmask.core.sparse24.to_semi_structured`, plus the largest output
difference. On a machine without such a GPU it says so and exits 0. Writes
benchmarks/results/sparse24.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from tiedmask.core.presets import create_model
from tiedmask.core.sparse24 import gpu_problem, to_semi_structured
from tiedmask.errors import ArgumentParser, run_script


def images_per_s(model, x, repeats: int = 20) -> float:
    with torch.no_grad():
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
        torch.cuda.synchronize()
    return repeats * len(x) / (time.perf_counter() - start)


def main() -> int:
    ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help; no options
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = gpu_problem(device)
    if problem:
        print(f"skipped: {problem}")
        return 0
    torch.manual_seed(0)
    model = create_model("tied-vit-s", width=768, heads=12, mlp_ratio=4.0, depth=6,
                         masks={"kind": "nm", "nm_m": 4, "density": 0.5})
    model = model.to(device).eval().to(torch.bfloat16)
    x = torch.randn(256, 3, 32, 32, device=device, dtype=torch.bfloat16)
    dense = images_per_s(model, x)
    with torch.no_grad():
        reference = model(x).float()
    model = to_semi_structured(model)
    sparse = images_per_s(model, x)
    with torch.no_grad():
        diff = (model(x).float() - reference).abs().max().item()
    row = {"gpu": torch.cuda.get_device_name(), "dense_img_s": dense, "sparse24_img_s": sparse,
           "speedup": sparse / dense, "max_abs_diff": diff, "torch": torch.__version__}
    print(json.dumps(row, indent=1))
    (Path(__file__).parent / "results" / "sparse24.json").write_text(json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run_script(main)
