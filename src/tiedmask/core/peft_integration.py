"""Multi-mask LoRA inside Hugging Face `peft` (the `peft` extra).

Fine-tune as usual with `peft.get_peft_model(model, LoraConfig(...))`, then call
`multimask_peft(peft_model, n_masks=..., density=...)`: every LoRA layer's `lora_A` / `lora_B`
become `MaskedFactor`s holding the same shared weights and n static masks. peft's forward
(`lora_B(lora_A(x)) * scaling`) then sums the n masked copies, and peft's merge reads the
factors' `weight` (the stacked copies), so `merge_and_unload()` folds the exact update in.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .lora import MaskedFactor


def multimask_peft(peft_model, n_masks: int = 2, density: float = 0.5, kind: str = "unstructured",
                   seed: int = 0, adapter: str = "default"):
    """Turn the LoRA adapters of a peft model into multi-mask LoRA (in place); returns the model."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        raise ConfigError("multimask_peft needs peft: pip install 'tiedmask[peft]'") from None
    count = 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        old_a, old_b = module.lora_A[adapter], module.lora_B[adapter]
        name = name.removeprefix("base_model.model.")  # masks named by the user's module path
        if not isinstance(old_a, torch.nn.Linear):
            raise ConfigError(f"{name}: only Linear LoRA layers can be multi-masked")
        new_a = MaskedFactor(tuple(old_a.weight.shape), 0, n_masks, kind, density, seed, f"{name}.lora_A")
        new_b = MaskedFactor(tuple(old_b.weight.shape), 1, n_masks, kind, density, seed, f"{name}.lora_B")
        with torch.no_grad():
            new_a.shared.copy_(old_a.weight)
            new_b.shared.copy_(old_b.weight)
        module.lora_A[adapter] = new_a.to(old_a.weight.device)
        module.lora_B[adapter] = new_b.to(old_b.weight.device)
        count += 1
    if not count:
        raise ConfigError(f"no LoRA layers with adapter {adapter!r}; call peft.get_peft_model first")
    return peft_model
