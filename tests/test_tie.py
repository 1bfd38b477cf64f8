"""tiedmask.tie on models of other libraries and on hand-built ones.

References are independent of the code under test: the untied model itself (tying identical
blocks must not change it), hand-built untied copies with the masked weights written out (for
outputs and gradients), and peft/Hugging Face modules as their libraries define them.
"""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from tiedmask.core.masks import make_mask
from tiedmask.core.presets import create_model
from tiedmask.core.spec import DataShape
from tiedmask.core.tie import repeated_blocks, tie
from tiedmask.core.tie_io import load_tied, save_tied
from tiedmask.core.tied_block import tie_summary
from tiedmask.errors import ConfigError, TiedmaskError

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def block(width=8):
    return nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width), nn.LayerNorm(width))


def mlp(depth=4, width=8, identical=False):
    torch.manual_seed(0)
    first = block(width)
    blocks = [copy.deepcopy(first) if identical else block(width) for _ in range(depth)]
    if not identical:
        with torch.no_grad():  # norms that differ per block: routing to the wrong copy shows
            for b in blocks:
                b[3].weight.uniform_(0.5, 1.5)
                b[3].bias.normal_()
    return nn.Sequential(nn.Linear(3, width), nn.Sequential(*blocks), nn.Linear(width, 2))


def tiny_vit(layers=4):
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, num_labels=5, hidden_size=32,
                                    num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64)
    return transformers.ViTForImageClassification(config).eval()


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=64)
    return transformers.BertModel(config).eval()


def test_tying_identical_blocks_at_density_one_changes_nothing():
    net = mlp(identical=True)
    x = torch.randn(5, 3)
    tied = tie(copy.deepcopy(net), blocks="1", density=1.0, init="first")
    assert torch.equal(tied(x), net(x))

    vit = tiny_vit()
    for layer in vit.vit.layers[1:]:
        layer.load_state_dict(vit.vit.layers[0].state_dict())
    images = torch.randn(2, 3, 16, 16)
    tied_vit = tie(copy.deepcopy(vit), blocks="vit.layers", density=1.0, init="first")
    assert torch.equal(tied_vit(images).logits, vit(images).logits)


def test_a_model_with_one_block_is_unchanged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ModuleList([block()]), nn.Linear(8, 2))
    net.forward = lambda x: net[2](net[1][0](net[0](x)))  # iterates like a Hugging Face encoder
    x = torch.randn(4, 3)
    expected = net(x)
    tie(net, blocks="1", density=1.0, init="first")
    assert torch.equal(net(x), expected)


def test_outputs_and_gradients_equal_hand_built_masked_copies():
    net = mlp()
    tied = tie(copy.deepcopy(net), blocks="1", density=0.5, init="first", per_application=[])
    # The reference: four untied blocks, each holding block 0's weights times its own mask.
    reference = copy.deepcopy(net)
    names = [n for n, _ in net[1][0].named_parameters() if n.endswith("weight") and n != "3.weight"]
    masks = {}
    with torch.no_grad():
        for i, b in enumerate(reference[1]):
            b.load_state_dict(net[1][0].state_dict())
            for name in names:
                masks[name, i] = make_mask("unstructured", tuple(b.get_parameter(name).shape), 0.5, 0, f"1.{name}", i)
                b.get_parameter(name).mul_(masks[name, i])
    x = torch.randn(6, 3)
    torch.testing.assert_close(tied(x), reference(x))
    tied(x).square().sum().backward()
    reference(x).square().sum().backward()
    shared = tied[1].shared
    for name in names:
        layer = shared.get_submodule(name.rpartition(".")[0])
        expected = sum(reference[1][i].get_parameter(name).grad * masks[name, i] for i in range(4))
        torch.testing.assert_close(layer.parametrizations.weight.original.grad, expected)
    # Only the model's own parameters take gradients; masks are buffers.
    assert all(p.grad is not None for p in tied.parameters())
    assert not any(b.requires_grad for b in tied.buffers())


@pytest.mark.parametrize("per_application", [["norms"], ["norms", "biases"]])
def test_channel_masked_convs_and_linears_compute_only_kept_rows_and_equal_masked_copies(per_application):
    """Under channel masks a tied Conv2d or Linear computes its kept rows alone (torch's FLOP
    counter: half the dense multiply-adds at density 0.5) and equals hand-built copies holding
    block 0's weights times their own channel masks, outputs and gradients; untie restores the
    layers' own forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from tiedmask.core.untie import untie

    torch.manual_seed(0)
    conv_block = lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(2),  # noqa: E731
                                       nn.Unflatten(2, (5, 5)))
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Sequential(*[conv_block() for _ in range(3)]))
    lin = mlp()
    for model, x, names in ((net, torch.randn(2, 3, 5, 5), ["0.weight"]), (lin, torch.randn(6, 3), ["0.weight", "2.weight"])):
        tied = tie(copy.deepcopy(model), blocks="1", kind="channel", density=0.5, init="first",
                   per_application=per_application)
        reference = copy.deepcopy(model)
        masks = {}
        with torch.no_grad():
            for i, b in enumerate(reference[1]):  # norms per application: each block keeps its own
                first = model[1][0]
                for name in names:
                    shape = tuple(b.get_parameter(name).shape)
                    masks[name, i] = make_mask("channel", shape, 0.5, 0, f"1.{name}", i)
                    b.get_parameter(name).copy_(first.get_parameter(name) * masks[name, i])
                    if "biases" not in per_application:
                        bias = name.replace("weight", "bias")
                        b.get_parameter(bias).copy_(first.get_parameter(bias))
        torch.testing.assert_close(tied(x), reference(x))
        tied(x).square().sum().backward()
        reference(x).square().sum().backward()
        for name in names:
            layer = tied[1].shared.get_submodule(name.rpartition(".")[0])
            expected = sum(reference[1][i].get_parameter(name).grad * masks[name, i] for i in range(len(reference[1])))
            torch.testing.assert_close(layer.parametrizations.weight.original.grad, expected)

        def block_flops(m):  # of the run of blocks (module path 1), all ops
            with FlopCounterMode(display=False) as counter:  # (under no_grad, torch's module tracker
                m(x)                                            # fails on parametrized biases)
            return sum(counter.get_flop_counts()["Sequential.1"].values())

        placing = 2 * len(x) * 25 * 8 * 4 * 3 if model is net else 0  # a 1x1 conv placing 4 kept of 8 filters
        assert block_flops(tied) == block_flops(reference) // 2 + placing
        plain = untie(tied)
        assert all(type(m) in (nn.Linear, nn.Conv2d) for m in plain.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        torch.testing.assert_close(plain(x), reference(x))


def test_parameter_count_is_the_shared_block_plus_per_application_parts():
    net = mlp(depth=5)
    one = block()
    norm = sum(p.numel() for p in one[3].parameters())
    shared = sum(p.numel() for p in one.parameters()) - norm
    tied = tie(copy.deepcopy(net), blocks="1", density=0.5)  # norms per application (default)
    run = tie_summary(tied)["runs"][0]
    assert (run["shared"], run["per_application"], run["applications"]) == (shared, 5 * norm, 5)
    assert tie_summary(tied)["parameters_before"] == sum(p.numel() for p in net.parameters())
    assert sum(p.numel() for p in tied.parameters()) == sum(p.numel() for p in net.parameters()) - 5 * shared + shared
    biases = tie(copy.deepcopy(net), blocks="1", per_application=["norms", "biases"])
    bias = one[0].bias.numel() + one[2].bias.numel()
    assert tie_summary(biases)["runs"][0]["per_application"] == 5 * (norm + bias)


def test_masks_differ_per_application_and_regenerate_in_a_new_process():
    code = ("import torch, copy; from torch import nn; from tiedmask.core.tie import tie\n"
            "torch.manual_seed(1)\n"
            "net = nn.Sequential(*[nn.Linear(6, 6) for _ in range(3)])\n"
            "t = tie(nn.Sequential(net), blocks='0', density=0.5, seed=7)\n"
            "print(t[0].shared.parametrizations.weight[0].mask_bank.flat.int().flatten().tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    net = nn.Sequential(*[nn.Linear(6, 6) for _ in range(3)])
    here = tie(nn.Sequential(net), blocks="0", density=0.5, seed=7)[0].shared.parametrizations.weight[0].mask_bank.flat
    assert out.strip() == str(here.int().flatten().tolist())
    assert len({tuple(m.tolist()) for m in here}) == 3  # a distinct mask per application
    same = tie(nn.Sequential(copy.deepcopy(net)), blocks="0", scope="same").get_submodule("0.shared")
    assert len(same.parametrizations.weight[0].mask_bank) == 1


def test_lora_relaxation_of_full_rank_restores_the_untied_blocks():
    net = mlp()  # four different blocks: tying alone changes the outputs
    x = torch.randn(5, 3)
    lossy = tie(copy.deepcopy(net), blocks="1", density=0.5, init="mean")
    assert not torch.allclose(lossy(x), net(x), atol=1e-3)
    # rank 8 = min(out, in) of every weight: the SVD start is exactly what tying lost (biases
    # and norms kept per position)
    relaxed = tie(copy.deepcopy(net), blocks="1", density=0.5, init="mean", relax="lora", relax_rank=8,
                  relax_init="svd", per_application=["norms", "biases"])
    torch.testing.assert_close(relaxed(x), net(x), atol=1e-5, rtol=1e-5)
    zero = tie(copy.deepcopy(net), blocks="1", density=0.5, init="mean", relax="lora")
    torch.testing.assert_close(zero(x), lossy(x))  # B = 0 (the default): starts as the tied model


def test_multimask_lora_relaxation_shares_one_pair_under_distinct_masks():
    net = mlp(depth=4)
    tied = tie(copy.deepcopy(net), blocks="1", relax="multimask-lora", relax_rank=2, relax_density=0.5)
    run = tie_summary(tied)["runs"][0]
    assert run["relaxation"] == 2 * (16 + 8) + 2 * (8 + 16)  # one A and one B per weight, not per position
    relaxation = tied[1].shared[0].parametrizations.weight[0].relaxation
    with torch.no_grad():
        relaxation.B.shared.normal_()
    deltas = [relaxation.delta(i) for i in range(4)]
    assert all(not torch.equal(deltas[0], d) for d in deltas[1:])


def test_save_and_load_round_trip_exactly(tmp_path):
    net = mlp()
    tied = tie(copy.deepcopy(net), blocks="1", density=0.5, relax="lora", relax_rank=2,
               per_application=["norms", "biases"])
    with torch.no_grad():
        for p in tied.parameters():
            p.add_(0.1 * torch.randn_like(p))  # every tensor, norms and relaxations included, moved
    path = tmp_path / "tied.safetensors"
    save_tied(tied, path)
    loaded = load_tied(mlp(), path)
    x = torch.randn(4, 3)
    assert torch.equal(loaded(x), tied(x))
    assert not any("masks" in k for k in tied.state_dict())  # regenerated, never stored
    with pytest.raises(TiedmaskError, match="does not fit"):
        load_tied(nn.Sequential(nn.Linear(3, 8), nn.Sequential(*[block() for _ in range(4)]), nn.Linear(8, 3)), path)


def test_a_tied_model_copies_and_loads_through_a_library_model(tmp_path):
    shape = DataShape(3, 16, 5)
    args = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64}
    tied = create_model("hf:vit", shape, args=args, tie={"relax": "lora"})
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(copy.deepcopy(tied)(x), tied(x))
    # blocks that are bare Linears: the shared block is itself parametrized
    linears = tie(nn.Sequential(nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)])), blocks="0",
                  per_application=["biases"])
    y = torch.randn(2, 4)
    assert torch.equal(copy.deepcopy(linears)(y), linears(y))
    save_tied(tied, tmp_path / "vit.safetensors")
    untied = create_model("hf:vit", shape, args=args, execution="untied", masks={"scope": "dense"})
    assert torch.equal(load_tied(untied, tmp_path / "vit.safetensors")(x), tied(x))


def test_blocks_that_differ_in_a_setting_are_refused():
    blocks = [nn.Sequential(nn.Linear(4, 4), nn.Dropout(p)) for p in (0.0, 0.0, 0.1)]
    net = nn.Sequential(nn.Sequential(*blocks))
    with pytest.raises(ConfigError, match=r"0\[2\] differs .* setting 1.p \(0.0 against 0.1\)"):
        tie(net, blocks="0")
    assert repeated_blocks(net) == [("0[0:2]", 2, "Sequential")]
    tie(net, blocks="0[0:2]")
    assert repeated_blocks(net) == []  # nothing inside a tied run is offered again


def test_stacked_biases_are_exempt_from_weight_decay():
    from tiedmask.training.settings import load_config
    from tiedmask.training.trainer import make_optimizer

    tied = tie(mlp(), blocks="1", per_application=["norms", "biases"])
    groups = make_optimizer(load_config(None, []), tied).param_groups
    exempt = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    stacked = tied[1].shared[0].parametrizations.bias.original
    assert stacked.dim() == 2 and id(stacked) in exempt
    assert id(tied[1].shared[0].parametrizations.weight.original) not in exempt


def test_hugging_face_vit_resnet_stage_and_bert():
    vit = tie(tiny_vit(6), blocks="vit.layers", density=0.5)
    out = vit(torch.randn(2, 3, 16, 16), output_hidden_states=True)
    assert out.logits.shape == (2, 5) and len(out.hidden_states) == 7  # one per application

    config = transformers.ResNetConfig(num_channels=3, num_labels=4, embedding_size=8, hidden_sizes=[8, 16],
                                       depths=[2, 3], layer_type="basic")
    resnet = transformers.ResNetForImageClassification(config).eval()
    assert ("resnet.encoder.stages.1.layers[1:3]", 2, "ResNetBasicLayer") in repeated_blocks(resnet)
    with pytest.raises(ConfigError, match=r"layers\[1\] differs .* '(resnet.encoder.stages.1.layers)\[1:\]'"):
        tie(copy.deepcopy(resnet), blocks="resnet.encoder.stages.1.layers")
    tied = tie(resnet, blocks="resnet.encoder.stages.1.layers[1:]", density=0.5)
    assert tied(torch.randn(2, 3, 32, 32)).logits.shape == (2, 4)
    assert type(tied.resnet.encoder.stages[1].layers[0]).__name__ == "ResNetBasicLayer"  # the first stays

    bert = tiny_bert()
    ids = torch.randint(0, 50, (2, 7))
    expected_shape = bert(ids).last_hidden_state.shape
    tied_bert = tie(bert, density=0.5)  # blocks found: the longest run
    assert tie_summary(tied_bert)["runs"][0]["blocks"] == "encoder.layer"
    assert tied_bert(ids).last_hidden_state.shape == expected_shape
    with pytest.raises(ConfigError, match="not in the model; runs of identical blocks here: encoder.layer"):
        tie(tiny_bert(), blocks="encoder.layers")


def test_peft_adapters_stay_per_application_and_alone_trainable():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query", "value"]))
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    tied = tie(model, blocks="base_model.model.encoder.layer", density=0.5)
    trainable = [n for n, p in tied.named_parameters() if p.requires_grad]
    assert len(before) == 12 and len(trainable) == 4 and all("lora_" in n for n in trainable)
    stacked = dict(tied.named_parameters())[trainable[0]]
    assert stacked.shape[0] == 3  # one adapter per position (Relaxed Recursive Transformers)
    tied(torch.randint(0, 50, (2, 5))).last_hidden_state.sum().backward()
    assert all(dict(tied.named_parameters())[n].grad is not None for n in trainable)


def test_timm_vit_and_resnet_stage():
    try:
        import timm
    except Exception as exc:  # absent, or a torchvision built for another torch (CPU wheels)
        pytest.skip(f"timm is not usable here: {type(exc).__name__}")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4,
                            num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    for b in vit.blocks[1:]:
        b.load_state_dict(vit.blocks[0].state_dict())
    expected = vit(x)
    assert torch.equal(tie(vit, blocks="blocks", density=1.0, init="first")(x), expected)
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=3)
    assert tie(resnet, blocks="layer2[1:]", density=0.5)(x).shape == (2, 3)


def test_library_models_by_name_untied_and_tied():
    args = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 64}
    shape = DataShape(3, 16, 5)
    untied = create_model("hf:vit", shape, args=args, execution="untied", masks={"scope": "dense"})
    tied = create_model("hf:vit", shape, args=args, masks={"scope": "multi", "density": 0.5})
    direct = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, num_channels=3, num_labels=5, **args))
    assert sum(p.numel() for p in untied.parameters()) == sum(p.numel() for p in direct.parameters())
    assert tie_summary(tied)["parameters_before"] == sum(p.numel() for p in direct.parameters())
    assert tied(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    with pytest.raises(ConfigError, match="equilibrium"):
        create_model("hf:vit", shape, args=args, execution="equilibrium", masks={"scope": "same"})
    with pytest.raises(ConfigError, match="apply to models of other libraries"):
        create_model("tied-resnet-xs", shape, tie={"relax": "lora"})
    with pytest.raises(ConfigError, match="image classifiers include"):
        create_model("hf:not-a-model", shape)


def test_bad_tie_settings_are_named():
    with pytest.raises(ConfigError, match="tie.relax 'low-rank' is not one of"):
        tie(mlp(), blocks="1", relax="low-rank")
    with pytest.raises(ConfigError, match="tie.per_application has"):
        tie(mlp(), blocks="1", per_application=["heads"])
    with pytest.raises(ConfigError, match="not a module path"):
        tie(mlp(), blocks="1[::2]")
    with pytest.raises(ConfigError, match="is not an nn.ModuleList or nn.Sequential"):
        tie(mlp(), blocks="0")
    tied = tie(mlp(), blocks="1")
    with pytest.raises(TiedmaskError, match="outside an application"):
        tied[1].shared(torch.randn(2, 8))


def test_timm_names_reach_timm_create_model_with_the_data_shape(monkeypatch):
    """The timm: road without timm installed here: a stand-in module records what it is asked."""
    import types

    calls = []

    def create(name, pretrained, num_classes, in_chans, **kwargs):
        calls.append((name, pretrained, num_classes, in_chans, kwargs))
        if name == "conv_like" and "img_size" in kwargs:  # as timm's ResNet does
            raise TypeError("ResNet.__init__() got an unexpected keyword argument 'img_size'")
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * 16, 8),
                             nn.Sequential(*[block() for _ in range(kwargs.get("depth", 3))]), nn.Linear(8, num_classes))

    fake = types.SimpleNamespace(create_model=create, list_models=lambda: ["vit_like", "conv_like"])
    monkeypatch.setitem(sys.modules, "timm", fake)
    shape = DataShape(1, 4, 7)
    model = create_model("timm:vit_like", shape, args={"depth": 5}, masks={"density": 0.5})
    assert calls[-1] == ("vit_like", False, 7, 1, {"img_size": 4, "depth": 5})
    assert tie_summary(model)["runs"][0]["applications"] == 5
    assert model(torch.randn(2, 1, 4, 4)).shape == (2, 7)
    create_model("timm:conv_like", shape, execution="untied", masks={"scope": "dense"})
    assert calls[-1] == ("conv_like", False, 7, 1, {})  # retried without img_size
    with pytest.raises(ConfigError, match="timm has no model 'nope'"):
        create_model("timm:nope", shape)


def test_channel_masks_on_grouped_convolutions_keep_computing_every_row():
    """A depthwise convolution's filters belong to their groups: the kept-rows forward would
    break them, so such a layer keeps its own forward (on the masked weight) and stays exact."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1, groups=8) for _ in range(3)]))
    x = torch.randn(2, 3, 5, 5)
    tied = tie(copy.deepcopy(net), blocks="1", kind="channel", density=0.5, init="first")
    reference = copy.deepcopy(net)
    with torch.no_grad():
        for i, layer in enumerate(reference[1]):
            layer.weight.copy_(net[1][0].weight * make_mask("channel", (8, 1, 3, 3), 0.5, 0, "1.weight", i))
            layer.bias.copy_(net[1][0].bias)
    assert "forward" not in vars(type(tied[1].shared))
    torch.testing.assert_close(tied(x), reference(x))
