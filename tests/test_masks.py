import subprocess
import sys

import pytest
import torch

from tiedmask.errors import ConfigError
from tiedmask.core.masks import MASK_KINDS, make_mask, mask_statistics

SHAPES = [(16, 16, 3, 3), (10, 7), (64, 32, 1, 1), (3, 5, 3, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.01, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_unstructured_keeps_exactly_round_density_times_numel(shape, density):
    mask = make_mask("unstructured", shape, density, seed=3, name="w", index=0)
    numel = torch.Size(shape).numel()
    assert mask.dtype == torch.bool and mask.shape == shape
    assert int(mask.sum()) == max(1, round(density * numel))


@pytest.mark.parametrize("density,n", [(0.25, 1), (0.5, 2), (0.75, 3), (1.0, 4)])
def test_nm_masks_keep_n_of_every_m_consecutive_inputs(density, n):
    mask = make_mask("nm", (8, 16, 3, 3), density, seed=0, name="conv", index=2)
    groups = mask.reshape(8, -1, 4)  # groups of 4 along the reduction axis (in*kh*kw)
    assert (groups.sum(-1) == n).all()


def test_nm_mask_on_linear_is_valid_2_4():
    mask = make_mask("nm", (32, 64), 0.5, seed=1, name="fc", index=0)
    assert (mask.reshape(32, 16, 4).sum(-1) == 2).all()


def test_nm_rejects_density_without_whole_n_and_ragged_rows():
    with pytest.raises(ConfigError, match="multiple of 1/4"):
        make_mask("nm", (8, 16), 0.6, seed=0, name="w", index=0)
    with pytest.raises(ConfigError, match="not a multiple of M=4"):
        make_mask("nm", (8, 6), 0.5, seed=0, name="w", index=0)


@pytest.mark.parametrize("density", [0.25, 0.5, 1.0])
def test_channel_mask_keeps_whole_filters(density):
    mask = make_mask("channel", (16, 8, 3, 3), density, seed=0, name="w", index=0)
    per_filter = mask.reshape(16, -1)
    assert ((per_filter.all(1)) | (~per_filter.any(1))).all()  # each filter all-or-nothing
    assert int(per_filter.all(1).sum()) == round(density * 16)


@pytest.mark.parametrize("kind", sorted(MASK_KINDS))
def test_masks_are_a_function_of_seed_name_and_index_only(kind):
    a = make_mask(kind, (16, 16, 3, 3), 0.5, seed=7, name="stages.0.conv1.weight", index=1)
    torch.manual_seed(12345)  # global RNG state must not matter
    torch.rand(100)
    b = make_mask(kind, (16, 16, 3, 3), 0.5, seed=7, name="stages.0.conv1.weight", index=1)
    assert torch.equal(a, b)
    for other in (dict(seed=8, name="stages.0.conv1.weight", index=1),
                  dict(seed=7, name="stages.0.conv2.weight", index=1),
                  dict(seed=7, name="stages.0.conv1.weight", index=2)):
        assert not torch.equal(a, make_mask(kind, (16, 16, 3, 3), 0.5, **other))


def test_masks_match_across_processes():
    code = ("from tiedmask.core.masks import make_mask;"
            "print(make_mask('unstructured',(8,8,3,3),0.5,seed=1,name='x',index=4).flatten().nonzero().flatten().tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = make_mask("unstructured", (8, 8, 3, 3), 0.5, seed=1, name="x", index=4)
    assert out.strip() == str(here.flatten().nonzero().flatten().tolist())


def test_mask_statistics_closed_form():
    a = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    stats = mask_statistics(torch.stack([a, a, b]))
    assert stats["density"] == pytest.approx(0.5)
    assert stats["overlaps"] == pytest.approx([1.0, 0.5, 0.5])  # (a,a), (a,b), (a,b)


def test_independent_masks_overlap_about_their_density():
    stack = torch.stack([make_mask("unstructured", (64, 64, 3, 3), 0.3, 0, "w", i) for i in range(4)])
    assert mask_statistics(stack)["mean_overlap"] == pytest.approx(0.3, abs=0.02)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_unit_interval_is_refused(density):
    with pytest.raises(ConfigError, match="outside"):
        make_mask("unstructured", (4, 4), density, 0, "w", 0)


def test_unknown_kind_is_refused():
    with pytest.raises(ConfigError, match="unknown mask kind"):
        make_mask("random", (4, 4), 0.5, 0, "w", 0)


def test_one_mask_bank_holds_the_masks_of_layers_ties_and_lora_factors():
    """Every masked weight keeps its masks in a MaskBank: mask i is make_mask(..., i) in the
    weight's shape (made for (out, in) and transposed for a weight stored (in, out)), channel
    masks name their kept rows, and nothing of it is stored in a checkpoint."""
    from torch import nn

    from tiedmask.core.layers import MaskedConv2d
    from tiedmask.core.lora import MultiMaskLoRALinear
    from tiedmask.core.masks import MaskBank
    from tiedmask.core.tie import tie

    bank = MaskBank("unstructured", (6, 4), 3, 0.5, 1, "w")
    for i in range(3):
        assert torch.equal(bank.mask(i), make_mask("unstructured", (6, 4), 0.5, 1, "w", i))
    flipped = MaskBank("nm", (8, 6), 2, 0.5, 1, "c", transposed=True)
    assert torch.equal(flipped.stack()[1], make_mask("nm", (6, 8), 0.5, 1, "c", 1).t())
    channel = MaskBank("channel", (5, 3, 3, 3), 2, 0.6, 0, "k")
    for i in range(2):
        rows = make_mask("channel", (5, 3, 3, 3), 0.6, 0, "k", i)[:, 0, 0, 0].nonzero().flatten()
        assert torch.equal(channel.kept_rows[i], rows)
    conv = MaskedConv2d(3, 5, 3)
    conv.build_masks("unstructured", 2, 0.5, 0, "conv.weight")
    lora = MultiMaskLoRALinear(nn.Linear(4, 4), "fc", rank=2, n_masks=2)
    tied = tie(nn.Sequential(nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)])), blocks="0")
    weight_chain = tied[0].shared.parametrizations.weight[0]
    for owner in (conv, lora.lora_A, weight_chain):
        assert isinstance(owner.mask_bank, MaskBank)
    for module in (conv, lora, tied):
        assert not any("mask" in key for key in module.state_dict())
