"""Hugging Face causal language models for `task: lm`, untied or tied.

    hf:MODEL_TYPE   AutoModelForCausalLM.from_config(AutoConfig.for_model(MODEL_TYPE,
                    vocab_size, max_position_embeddings=seq_len, **model.args))

A model that starts from trained weights (a run's checkpoint, or a Hugging Face checkpoint
folder: safetensors only, no remote code) gets them before it is tied, so `model.tie.init: mean`
and `relax_init: svd` start from the trained blocks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, TiedmaskError
from .spec import ModelConfig
from .tie import tie_with


class CausalLM(nn.Module):
    """A causal LM that maps token ids (batch, time) to next-token logits (batch, time, vocab)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=ids, use_cache=False).logits


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("language-model runs need transformers: pip install 'tiedmask[hf]'") from None
    return transformers


def build_causal_lm(cfg: ModelConfig, vocab_size: int, seq_len: int,
                    weights: dict[str, torch.Tensor] | None = None, hf_folder: Path | None = None) -> CausalLM:
    """The model `cfg` describes for a vocabulary and window length; `weights` (a CausalLM's
    state dict) or `hf_folder` give it trained values before `cfg.execution: unrolled` ties it."""
    net = _from_folder(hf_folder, cfg, seq_len) if hf_folder else _from_config(cfg, vocab_size, seq_len)
    if net.get_input_embeddings().num_embeddings < vocab_size:
        raise ConfigError(f"{cfg.name} embeds {net.get_input_embeddings().num_embeddings} tokens, fewer than "
                          f"the tokenizer's {vocab_size}")
    model = CausalLM(net)
    if weights is not None:
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise TiedmaskError(f"the starting weights do not fit {cfg.name} with model.args {cfg.args} "
                                f"({first[:160]}); start from a run of the same model") from None
    if cfg.execution == "unrolled":
        tie_with(net, cfg.masks, cfg.tie)
    return model


def _from_config(cfg: ModelConfig, vocab_size: int, seq_len: int) -> nn.Module:
    transformers = _transformers()
    model_type = cfg.name.partition(":")[2]
    values = {"vocab_size": vocab_size, "max_position_embeddings": seq_len, **cfg.args}
    try:
        config = transformers.AutoConfig.for_model(model_type, **values)
        return transformers.AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        unknown = "Unrecognized" in str(exc)
        problem = " is not a model type of transformers" if unknown else f": {str(exc).splitlines()[0][:160]}"
        raise ConfigError(f"hf:{model_type}{problem}; causal language models include hf:llama, hf:gpt2, "
                          "hf:qwen2, hf:mistral, hf:gpt_neox") from None
    except Exception as exc:  # TypeError of a wrong argument, transformers' own validation errors
        if not isinstance(exc, TypeError) and type(exc).__module__.split(".")[0] not in ("transformers",
                                                                                         "huggingface_hub"):
            raise
        first = " ".join(str(exc).split())[:200]
        raise ConfigError(f"hf:{model_type}: {first}; check model.args") from None


def _from_folder(folder: Path, cfg: ModelConfig, seq_len: int) -> nn.Module:
    transformers = _transformers()
    if cfg.args:
        raise ConfigError(f"model.args {cfg.args} would configure a model built from its config; the model of "
                          f"{folder} keeps the folder's own configuration: drop model.args")
    if not list(Path(folder).glob("*.safetensors")):
        raise ConfigError(f"{folder} holds no safetensors weights; tiedmask never loads pickled weights "
                          "(save the model with safe_serialization=True)")
    try:
        net = transformers.AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, trust_remote_code=False)
    except Exception as exc:
        first = " ".join(str(exc).split())[:200]
        raise TiedmaskError(f"cannot load the Hugging Face checkpoint {folder} ({first}); check the folder") from None
    if net.config.model_type != cfg.name.partition(":")[2]:
        raise ConfigError(f"{folder} holds a {net.config.model_type} model; set --model hf:{net.config.model_type}")
    positions = getattr(net.config, "max_position_embeddings", None)
    if positions is not None and seq_len > positions:
        raise ConfigError(f"lm.seq_len {seq_len} is longer than the {positions} positions the model of {folder} "
                          "knows; lower lm.seq_len")
    return net
