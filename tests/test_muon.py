"""MuonSGD against torch's own optimizers: Nesterov SGD for plain groups, torch.optim.Muon for
orthogonal ones (a conv filter bank is checked against Muon on its flattened 2-D copy)."""

import pytest
import torch

from tiedmask.errors import ConfigError
from tiedmask.training.muon import MuonSGD, orthogonalize
from tiedmask.training.settings import load_config
from tiedmask.training.trainer import make_optimizer


def run_steps(optimizer, params, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()


def test_plain_groups_take_torch_nesterov_sgd_steps():
    torch.manual_seed(0)
    ours = [torch.randn(5, 3, requires_grad=True), torch.randn(5, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    grads = [[torch.randn_like(p) for p in ours] for _ in range(4)]
    groups = lambda ps: [{"params": [ps[0]], "weight_decay": 0.01}, {"params": [ps[1]], "weight_decay": 0.0}]
    run_steps(MuonSGD(groups(ours), lr=0.1, momentum=0.9), ours, grads)
    run_steps(torch.optim.SGD(groups(ref), lr=0.1, momentum=0.9, nesterov=True), ref, grads)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_orthogonal_groups_take_torch_muon_steps_on_the_flattened_filters(layout):
    torch.manual_seed(0)
    filters = torch.randn(8, 4, 3, 3).contiguous(memory_format=layout).requires_grad_()
    start = filters.detach().clone()
    flat = filters.detach().reshape(8, 36).clone().requires_grad_()
    grads = [torch.randn(8, 4, 3, 3) for _ in range(3)]
    ours = MuonSGD([{"params": [filters], "orthogonal": True, "lr_scale": 0.5}], lr=0.1,
                   momentum=0.9, weight_decay=0.1)
    run_steps(ours, [filters], [[g] for g in grads])
    ref = torch.optim.Muon([flat], lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=True)
    run_steps(ref, [flat], [[g.reshape(8, 36)] for g in grads])
    # torch iterates in bfloat16 and we in fp32: equal up to bf16 rounding (~1e-3 here), while
    # the filters moved ~0.08, so a wrong step size or a missed step would show
    torch.testing.assert_close(filters.detach().reshape(8, 36), flat.detach(), rtol=0, atol=3e-3)
    assert (filters.detach() - start).abs().max() > 0.05


def test_orthogonalize_equalises_singular_values_and_keeps_the_singular_vectors():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 6))
    v, _ = torch.linalg.qr(torch.randn(20, 6))
    s = torch.tensor([10.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    g = u @ torch.diag(s) @ v.T
    o = orthogonalize(g)
    core = u.T @ o @ v  # diagonal if o = U S' V^T
    assert (core - torch.diag(torch.diagonal(core))).abs().max() < 1e-4
    assert torch.diagonal(core).min() > 0.6 and torch.diagonal(core).max() < 1.25
    assert torch.allclose(orthogonalize(g.T), o.T, atol=1e-5)  # tall matrices by their transpose


def test_muon_lr_puts_conv_filters_in_an_orthogonal_group():
    from tiedmask.core.presets import create_model

    cfg = load_config(overrides=["--optim.name", "sgd", "--optim.lr", "0.2", "--optim.muon_lr", "0.05"])
    model = create_model("tied-fast", width=8, depth=2)
    optimizer = make_optimizer(cfg, model)
    ortho = [g for g in optimizer.param_groups if g.get("orthogonal")]
    assert len(ortho) == 1 and ortho[0]["lr_scale"] == pytest.approx(0.25)
    trained_filters = {id(p) for p in model.parameters() if p.dim() == 4 and p.requires_grad}
    assert {id(p) for p in ortho[0]["params"]} == trained_filters  # the frozen whitening stays out
    others = [p for g in optimizer.param_groups if not g.get("orthogonal") for p in g["params"]]
    assert all(p.dim() != 4 for p in others)


def test_muon_lr_with_adam_is_refused():
    with pytest.raises(ConfigError, match="optim.muon_lr works with optim.name sgd"):
        load_config(overrides=["--optim.name", "adamw", "--optim.muon_lr", "0.05"])
