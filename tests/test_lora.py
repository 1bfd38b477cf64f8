import pytest
import torch
from torch import nn

from tiedmask.errors import ConfigError, TiedmaskError
from tiedmask.core.lora import (MultiMaskLoRALinear, adapters, apply_multimask_lora, load_adapter,
                           merge_all, save_adapter, trainable_parameters, unmerge_all)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def randomize(model):
    with torch.no_grad():
        for a in adapters(model).values():
            a.lora_B.shared.normal_()
    return model


def test_update_is_the_sum_of_masked_copies():
    base = nn.Linear(12, 10, bias=False)
    layer = MultiMaskLoRALinear(base, "x", rank=3, alpha=6, n_masks=3, density=0.5)
    with torch.no_grad():
        layer.lora_B.shared.normal_()
    a, b = layer.lora_A.shared, layer.lora_B.shared
    expected = sum((b * layer.lora_B.masks[i]) @ (a * layer.lora_A.masks[i]) for i in range(3)) * 2.0
    assert torch.allclose(layer.delta_weight(), expected, atol=1e-6)
    x = torch.randn(5, 12)
    assert torch.allclose(layer(x), base(x) + x @ expected.T, atol=1e-5)


def test_merged_model_gives_the_unmerged_outputs():
    model = randomize(apply_multimask_lora(mlp(), r"^\d$", rank=4, n_masks=3, density=0.5))
    x = torch.randn(7, 16)
    before = model(x)
    merge_all(model)
    assert torch.allclose(model(x), before, atol=1e-5)
    assert all(a.merged for a in adapters(model).values())
    unmerge_all(model)
    assert torch.allclose(model(x), before, atol=1e-5)


def test_several_masks_raise_the_rank_of_the_update():
    model = randomize(apply_multimask_lora(mlp(), r"^0$", rank=2, n_masks=4, density=0.5))
    delta = adapters(model)["0"].delta_weight()
    assert torch.linalg.matrix_rank(delta) > 2  # plain LoRA of rank 2 cannot exceed 2


def test_masks_differ_per_copy_and_are_reproducible():
    one = adapters(apply_multimask_lora(mlp(), r"^0$", rank=4, n_masks=3, density=0.5))["0"]
    two = adapters(apply_multimask_lora(mlp(), r"^0$", rank=4, n_masks=3, density=0.5))["0"]
    assert torch.equal(one.lora_A.masks, two.lora_A.masks)
    assert not torch.equal(one.lora_A.masks[0], one.lora_A.masks[1])
    assert int(one.lora_A.masks[0].sum()) == round(0.5 * 4 * 16)


def test_only_adapter_parameters_receive_gradients():
    model = randomize(apply_multimask_lora(mlp(), r"^\d$", rank=2, n_masks=2, train_also=None))
    model(torch.randn(3, 16)).sum().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert not p.requires_grad and p.grad is None
    assert trainable_parameters(model) == (2 * 16 + 32 * 2) + (2 * 32 + 8 * 2)


def test_one_dense_mask_equals_peft_lora_on_the_same_weights():
    peft = pytest.importorskip("peft")
    ours = apply_multimask_lora(mlp(), r"^0$", rank=4, alpha=8, n_masks=1, density=1.0)
    reference = peft.get_peft_model(mlp(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"],
                                                            lora_dropout=0.0))
    layer = reference.base_model.model[0]
    with torch.no_grad():
        adapter = adapters(ours)["0"]
        adapter.lora_B.shared.normal_()
        layer.lora_A["default"].weight.copy_(adapter.lora_A.shared)
        layer.lora_B["default"].weight.copy_(adapter.lora_B.shared)
    x = torch.randn(6, 16)
    assert torch.allclose(ours(x), reference(x), atol=1e-5)
    assert torch.allclose(adapter.delta_weight(), layer.get_delta_weight("default"), atol=1e-6)


def test_adapter_round_trip_holds_only_adapter_tensors(tmp_path):
    model = randomize(apply_multimask_lora(mlp(), r"^\d$", rank=2, n_masks=2))
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    from safetensors.torch import load_file

    assert sorted(load_file(path)) == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    fresh = apply_multimask_lora(mlp(), r"^\d$", rank=2, n_masks=2)
    load_adapter(fresh, path)
    x = torch.randn(4, 16)
    assert torch.allclose(fresh(x), model(x), atol=1e-6)


def test_no_matching_module_is_a_clear_error():
    with pytest.raises(ConfigError, match="no nn.Linear or nn.Conv2d module name matches"):
        apply_multimask_lora(mlp(), r"attention")


def test_peft_integration_matches_our_adapter_and_merges_exactly():
    peft = pytest.importorskip("peft")
    from tiedmask.core.peft_integration import multimask_peft

    reference = peft.get_peft_model(mlp(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"],
                                                           lora_dropout=0.0))
    reference = multimask_peft(reference, n_masks=3, density=0.5, seed=1)
    ours = apply_multimask_lora(mlp(), r"^\d$", rank=4, alpha=8, n_masks=3, density=0.5, seed=1)
    with torch.no_grad():
        for name, adapter in adapters(ours).items():
            adapter.lora_B.shared.normal_()
            layer = reference.base_model.model[int(name)]
            layer.lora_A["default"].shared.copy_(adapter.lora_A.shared)
            layer.lora_B["default"].shared.copy_(adapter.lora_B.shared)
    x = torch.randn(5, 16)
    assert torch.allclose(reference(x), ours(x), atol=1e-5)
    trainable = {n for n, p in reference.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    merged = reference.merge_and_unload()
    assert torch.allclose(merged(x), ours(x), atol=1e-5)


@pytest.mark.parametrize("method", ["full", "lora", "multimask_lora"])
def test_finetune_a_pretrained_run_on_another_dataset(tmp_path, capsys, method):
    import json

    from tiedmask.cli import main

    pre = tmp_path / "pre"
    assert main(["train", "--data", "digits", "--model", "tied-vit-s", "--width", "16", "--depth", "2",
                 "--patch_size", "2", "--epochs", "1", "--progress", "false", "--out", str(pre)]) == 0
    out = tmp_path / method
    # Fashion-MNIST stand-in that needs no data: the digits again, as a different "task".
    assert main(["finetune", str(pre), "--method", method, "--data", "digits", "--epochs", "1",
                 "--progress", "false", "--finetune.rank", "2", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    head = 16 * 10 + 10
    adapters_per_block = sum(2 * (i + o) for i, o in [(16, 48), (16, 16), (16, 32), (32, 16)])
    expected = {"full": result["params"], "lora": head + adapters_per_block,
                "multimask_lora": head + adapters_per_block}[method]
    assert result["trainable_params"] == expected
    assert main(["eval", str(out)]) == 0  # the adapter structure is rebuilt to score it


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))


def test_one_dense_mask_on_a_convolution_equals_peft_conv_lora():
    peft = pytest.importorskip("peft")
    import copy

    ours = apply_multimask_lora(conv_net(), targets=r"^0$", rank=2, n_masks=1, density=1.0)
    reference = peft.get_peft_model(conv_net(), peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
    layer = reference.base_model.model[0]
    with torch.no_grad():
        ours[0].lora_A.shared.normal_()
        ours[0].lora_B.shared.normal_()
        layer.lora_A["default"].weight.copy_(ours[0].lora_A.shared)
        layer.lora_B["default"].weight.copy_(ours[0].lora_B.shared)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(ours(x), reference(x))
    merged = copy.deepcopy(reference).merge_and_unload()  # peft's merge as the reference delta
    merge_all(ours)
    torch.testing.assert_close(ours[0].base.weight, merged[0].weight)


def test_multimask_lora_on_a_convolution_merges_exactly_and_not_into_masked_weights():
    from tiedmask.core.layers import MaskedConv2d

    net = randomize(apply_multimask_lora(conv_net(), targets=r"^\d$", rank=2, n_masks=3, density=0.5))
    assert trainable_parameters(net) == (2 * 27 + 8 * 2) + (2 * 72 + 4 * 2)  # A and B of each conv
    x = torch.randn(2, 3, 9, 9)
    before = net(x)
    merge_all(net)
    torch.testing.assert_close(net(x), before, atol=1e-5, rtol=1e-5)
    tied = MaskedConv2d(4, 4, 3, padding=1)
    tied.build_masks("unstructured", 2, 0.5, 0, "c.weight")
    wrapped = apply_multimask_lora(nn.Sequential(tied), targets="0", rank=2)
    assert wrapped[0](torch.randn(1, 4, 5, 5), 1).shape == (1, 4, 5, 5)  # the mask index passes through
    with pytest.raises(TiedmaskError, match="masked shared weight"):
        merge_all(wrapped)


def test_conv_adapters_train_in_channels_last_as_in_nchw():
    """Training puts 32x32 models in channels_last (`place`); a 5-D mask stack used to make
    that fail for every fine-tuning run of a conv model."""
    from tiedmask.training.runtime import place

    net = randomize(apply_multimask_lora(conv_net(), targets=r"^\d$", rank=2, n_masks=2, density=0.5))
    x = torch.randn(2, 3, 9, 9)
    expected = net(x)
    fast = place(net, torch.device("cpu"), channels_last=True)
    torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), expected,
                               atol=1e-5, rtol=1e-5)
