"""The fast path: conv cell, whitening stem, masked weights built once, TTA, recipe, DDP."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiedmask.core.spec import DataShape
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tiedmask.core.cells import ConvCell
from tiedmask.training.settings import load_config, recipe_path
from tiedmask.errors import ConfigError
from tiedmask.core.layers import masked_weights_built_once
from tiedmask.core.masks import make_mask
from tiedmask.core.backbones import count_params
from tiedmask.core.presets import create_model
from tiedmask.training.evaluate import evaluate
from tiedmask.core.execution import Unrolled
from tiedmask.core.whitening import whitening_filters


def test_one_conv_cell_application_is_a_plain_conv_bn_gelu_block():
    torch.manual_seed(0)
    cell = ConvCell(6, depth=1)
    x = torch.randn(4, 6, 5, 5)
    conv = torch.nn.Conv2d(6, 6, 3, padding=1, bias=False)
    conv.weight.data.copy_(cell.conv.weight)
    reference = F.gelu(torch.nn.BatchNorm2d(6)(conv(x)))
    torch.testing.assert_close(Unrolled(cell, 1, "dense")(x), reference)


def test_conv_cell_applications_use_their_own_mask_and_norm():
    torch.manual_seed(0)
    cell = ConvCell(4, depth=3)
    cell.conv.build_masks("unstructured", 3, 0.5, 0, "conv.weight")
    for norm in cell.norms:  # distinct affine parameters, so a shared norm would show
        norm.weight.data.uniform_(0.5, 2)
    x = torch.randn(2, 4, 6, 6)
    z = torch.zeros_like(x)
    for step in range(3):
        mask = make_mask("unstructured", tuple(cell.conv.weight.shape), 0.5, 0, "conv.weight", step)
        h = F.conv2d(z + x, cell.conv.weight * mask, padding=1)
        z = F.gelu(cell.norms[step](h))
    torch.testing.assert_close(Unrolled(cell, 3, "multi")(x), z)


def test_whitening_filters_whiten_patches():
    torch.manual_seed(0)
    mixing = torch.randn(3, 3)
    images = torch.einsum("ij,njhw->nihw", mixing, torch.randn(200, 3, 8, 8)) + 0.5
    filters = whitening_filters(images, eps=0.0)
    assert filters.shape == (24, 3, 2, 2)
    out = F.conv2d(images, filters[:12])  # the second half are the negatives
    flat = out.transpose(0, 1).reshape(12, -1)
    cov = torch.cov(flat)
    torch.testing.assert_close(cov, torch.eye(12), atol=1e-3, rtol=0)
    torch.testing.assert_close(filters[12:], -filters[:12])


def test_tied_fast_preset_stays_under_a_million_parameters_and_freezes_the_stem():
    model = create_model("tied-fast")
    assert count_params(model) < 1_000_000
    assert not model.whiten.weight.requires_grad and model.whiten.bias.requires_grad
    with pytest.raises(ConfigError, match="fixed point"):
        create_model("tied-fast", execution="equilibrium", masks={"scope": "same"})


@pytest.mark.parametrize("scope", ["same", "multi"])
def test_weights_built_once_give_the_same_outputs_and_gradients(scope):
    torch.manual_seed(0)
    model = create_model("tied-resnet-xs", width=8, masks={"scope": scope})
    x = torch.randn(3, 3, 8, 8)
    grads = []
    for built_once in (True, False):
        model.zero_grad()
        if built_once:
            out = model(x)  # Stage.forward builds every masked weight once
        else:
            model.stages[0].tied.checkpointing = True  # per-call masking, the original path
            out = model(x)
            model.stages[0].tied.checkpointing = False
        out.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        outs = out.detach() if built_once else (outs, out.detach())
    torch.testing.assert_close(outs[0], outs[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_built_weights_are_dropped_after_the_forward_pass():
    model = create_model("tied-resnet-xs", width=8)
    layer = model.stages[0].tied.cell.conv1
    with masked_weights_built_once(model):
        assert layer._built is not None and layer._built.shape[0] == model.config.depth
    assert layer._built is None


def test_flip_tta_averages_the_logits_of_an_image_and_its_mirror():
    torch.manual_seed(0)
    model = create_model("tied-resnet-xs", shape=DataShape(classes=3, channels=1), width=8).eval()
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 3, (10,))
    mean, std = torch.tensor([100.0 / 255]), torch.tensor([0.3])
    cfg = load_config(overrides=["--eval_tta", "flip", "--eval_batch_size", "4", "--precision", "fp32"])
    acc, loss = evaluate(model, images, labels, (mean, std), cfg, torch.device("cpu"))
    with torch.no_grad():
        x = (images.float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        logits = (model(x) + model(x.flip(3))) / 2
    assert acc == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_flip_translate_tta_averages_six_views_with_weights_half_and_quarters():
    torch.manual_seed(0)
    model = create_model("tied-resnet-xs", shape=DataShape(classes=3, channels=1), width=8).eval()
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 3, (6,))
    mean, std = torch.tensor([0.5]), torch.tensor([0.25])
    cfg = load_config(overrides=["--eval_tta", "flip_translate", "--precision", "fp32"])
    _, loss = evaluate(model, images, labels, (mean, std), cfg, torch.device("cpu"))
    x = (images.float() / 255 - 0.5) / 0.25
    # Shifts built by index: row/column i of the shifted image is i - 1 (down-right) or i + 1
    # (up-left) of the original, mirrored at the border (-1 -> 1, 8 -> 6).
    down_right, up_left = [1, *range(7)], [*range(1, 8), 6]
    views = {"x": (x, 1 / 2), "dr": (x[:, :, down_right][..., down_right], 1 / 4),
             "ul": (x[:, :, up_left][..., up_left], 1 / 4)}
    with torch.no_grad():
        logits = sum(w * (model(v) + model(v.flip(3))) / 2 for v, w in views.values())
    assert loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_recipe_resolves_to_a_multi_mask_model_under_a_million_parameters():
    cfg = load_config(recipe_path("cifar10-fast"))
    assert cfg.model.masks.scope == "multi" and cfg.data.name == "cifar10"
    assert count_params(create_model(cfg.model.name, masks={"density": cfg.model.masks.density})) < 1_000_000
    with pytest.raises(ConfigError, match="unknown recipe"):
        recipe_path("cifar10-slow")


def _train_cmd(out, *launcher):
    return [*launcher, "-m", "tiedmask.cli", "train", "--data", "digits", "--model", "tied-resnet-xs",
            "--model.width", "8", "--epochs", "1", "--batch_size", "64", "--threads", "1",
            "--optim.lr", "0.01", "--seed", "3", "--out", str(out),
            "--precision", "fp32"]  # equal to float tolerance: bf16 rounds each process's sums apart


def test_two_processes_train_the_same_model_as_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(_train_cmd(tmp_path / "one", sys.executable), env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    double = subprocess.run(_train_cmd(tmp_path / "two", *torchrun), env=env,
                            capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "x 2 processes" in double.stdout
    one = load_file(next((tmp_path / "one").glob("checkpoint-*.safetensors")))
    two = load_file(next((tmp_path / "two").glob("checkpoint-*.safetensors")))
    model_keys = [k for k in one if k.startswith("model.")] or list(one)
    for key in model_keys:
        torch.testing.assert_close(two[key], one[key], atol=2e-4, rtol=1e-3, msg=key)
    # and the run moved its weights: equality is not trivial
    init = create_model("tied-resnet-xs", shape=DataShape(channels=1), width=8).state_dict()
    assert any(not torch.allclose(one[k], init[k.removeprefix("model.")])
               for k in model_keys if k.removeprefix("model.") in init)


def test_semi_structured_conversion_names_what_stops_it():
    from tiedmask.core.sparse24 import semi_structured_problems, to_semi_structured

    ready = create_model("tied-vit-s", width=64, heads=4, masks={"kind": "nm", "nm_m": 4, "density": 0.5})
    assert semi_structured_problems(ready) == []
    unstructured = create_model("tied-vit-s", width=64, heads=4)
    assert any("2:4 masks" in p for p in semi_structured_problems(unstructured))
    narrow = create_model("tied-vit-s", width=48, heads=4, masks={"kind": "nm", "nm_m": 4, "density": 0.5})
    assert any("multiple of 32x64" in p for p in semi_structured_problems(narrow))
    convs = create_model("tied-resnet-xs", masks={"kind": "nm", "nm_m": 4, "density": 0.5})
    assert any("no masked Linear" in p for p in semi_structured_problems(convs))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="NVIDIA GPU"):
            to_semi_structured(ready)
        assert type(ready.stages[0].tied.cell.qkv).__name__ == "MaskedLinear"  # untouched


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="2:4 sparse kernels need an Ampere or newer GPU")
def test_semi_structured_model_matches_the_masked_dense_model():
    from tiedmask.core.sparse24 import to_semi_structured

    torch.manual_seed(0)
    model = create_model("tied-vit-s", width=128, heads=4, masks={"kind": "nm", "nm_m": 4, "density": 0.5})
    model = model.cuda().eval().to(torch.bfloat16)
    x = torch.randn(16, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        dense = model(x).float()
        sparse = to_semi_structured(model)(x).float()
    torch.testing.assert_close(sparse, dense, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("name", ["tied-fast", "tied-resnet-xs", "tied-vit-s"])
def test_channels_last_computes_what_nchw_computes(name):
    torch.manual_seed(0)
    model = create_model(name, shape=DataShape(size=16), width=16, heads=4)
    x = torch.randn(4, 3, 16, 16)
    reference = model(x)
    reference.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model = model.to(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last))
    out.square().sum().backward()
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-3, rtol=1e-3, msg=n)
