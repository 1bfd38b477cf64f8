import itertools

import pytest

from tiedmask.core.spec import DataShape
import torch
import torch.nn.functional as F

from tiedmask.core.flops import count_macs
from tiedmask.core.layers import MaskedConv2d, masked_layers
from tiedmask.core.masks import MASK_KINDS, MASK_SCOPES
from tiedmask.core.backbones import count_params
from tiedmask.core.presets import MODEL_PRESETS, create_model
from tiedmask.errors import ConfigError


def tiny(name, **kw):
    # Presets at their own depth/stages, narrowed so the whole registry runs in seconds.
    return create_model(name, **{"shape": DataShape(size=16), "width": 8, **kw})


@pytest.mark.parametrize("name,kind,scope",
                         list(itertools.product(sorted(MODEL_PRESETS), sorted(MASK_KINDS), MASK_SCOPES)))
def test_every_model_and_mask_kind_runs_deterministically(name, kind, scope):
    torch.manual_seed(0)
    model = tiny(name, masks={"kind": kind, "scope": scope}, shape=DataShape(size=16, classes=7))
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.manual_seed(0)
    again = tiny(name, masks={"kind": kind, "scope": scope}, shape=DataShape(size=16, classes=7))
    assert torch.equal(again(x), out.detach())


def test_scopes_share_parameters_and_parameters_do_not_grow_with_depth():
    counts = {count_params(create_model("tied-resnet-s", depth=d, masks={"scope": s}))
              for s in MASK_SCOPES for d in (1, 4, 12)}
    assert len(counts) == 1


def test_scope_decides_how_many_distinct_masks_a_cell_has():
    for scope, expected in (("dense", None), ("same", 1), ("multi", 5)):
        model = create_model("tied-resnet-s", depth=5, masks={"scope": scope})
        for _, layer in masked_layers(model):
            stack = layer.mask_stack()
            assert (stack is None) if expected is None else len(stack) == expected
    multi = create_model("tied-resnet-s", depth=3, masks={"scope": "multi"})
    stack = masked_layers(multi)[0][1].mask_stack()
    assert not torch.equal(stack[0], stack[1])


def test_masks_do_not_depend_on_construction_order():
    a = create_model("tied-resnet-s", depth=3)
    torch.manual_seed(99)
    b = create_model("tied-resnet-s", depth=3)
    for (name, la), lb in zip(reversed(masked_layers(a)), reversed([l for _, l in masked_layers(b)])):
        lb.build_masks("unstructured", 3, 0.5, 0, f"{name}.weight")  # regenerate in reverse order
        assert torch.equal(la.mask_stack(), lb.mask_stack())


def test_masked_conv_equals_conv_with_zeroed_weights():
    layer = MaskedConv2d(4, 6, 3, padding=1, bias=False)
    layer.build_masks("unstructured", 2, 0.3, 0, "w")
    x = torch.randn(2, 4, 5, 5)
    for i in range(2):
        mask = layer.mask_stack()[i]
        expected = F.conv2d(x, layer.weight.detach() * mask.float(), padding=1)
        assert torch.allclose(layer(x, i), expected, atol=1e-6)
    assert torch.allclose(layer(x, None), F.conv2d(x, layer.weight, padding=1))


def test_masked_weights_get_no_gradient_where_masked():
    model = create_model("tied-resnet-xs", shape=DataShape(channels=1), depth=1, masks={"scope": "same"})
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    for _, layer in masked_layers(model):
        assert (layer.weight.grad[~layer.mask_stack()[0]] == 0).all()


def test_macs_match_closed_form():
    w, depth, density = 8, 3, 0.5
    model = create_model("tied-resnet-xs", shape=DataShape(channels=1), width=w, depth=depth, masks={"density": density})
    macs = count_macs(model, (1, 8, 8))
    stem = 64 * w * 9
    cells = depth * 2 * 64 * w * w * 9
    head = w * 16 * 10  # a 4x4 pooled grid
    assert macs["dense"] == stem + cells + head
    assert macs["effective"] == stem + cells * density + head


def test_checkpointed_unrolling_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = create_model("tied-resnet-s", width=8, depth=3)
    torch.manual_seed(0)
    ckpt = create_model("tied-resnet-s", width=8, depth=3, checkpointing=True)
    x = torch.randn(2, 3, 16, 16)
    plain(x).sum().backward()
    ckpt(x).sum().backward()
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_transformer_macs_match_closed_form():
    d, depth, n_tokens, classes = 16, 3, 16, 10  # 16x16 image, patch 4 -> 16 tokens
    model = create_model("tied-vit-s", shape=DataShape(size=16), width=d, depth=depth, heads=4, mlp_ratio=2.0, masks={"density": 0.25})
    macs = count_macs(model, (3, 16, 16))
    embed = n_tokens * d * 3 * 4 * 4
    linear = n_tokens * (3 * d * d + d * d + 2 * d * 2 * d)  # qkv, proj, fc1, fc2
    attention = 2 * n_tokens * n_tokens * d  # scores and weighted values: never masked
    head = d * classes
    assert macs["dense"] == embed + depth * (linear + attention) + head
    assert macs["effective"] == embed + depth * (0.25 * linear + attention) + head


def test_transformer_masks_every_linear_of_the_tied_block():
    model = create_model("tied-vit-s", shape=DataShape(size=16), width=16, depth=3)
    names = sorted(n.split(".")[-1] for n, _ in masked_layers(model))
    assert names == ["fc1", "fc2", "proj", "qkv"]
    assert all(len(layer.mask_stack()) == 3 for _, layer in masked_layers(model))


def test_transformer_config_errors_name_the_fix():
    from tiedmask.errors import ConfigError

    with pytest.raises(ConfigError, match="stages 1"):
        create_model("tied-vit-s", stages=2)
    with pytest.raises(ConfigError, match="divisible by heads"):
        create_model("tied-vit-s", width=30, heads=4)
    with pytest.raises(ConfigError, match="does not fit the transformer"):
        create_model("tied-vit-s", norm="batch")


def test_untied_network_with_copies_of_the_tied_cell_computes_the_tied_network():
    tied = create_model("tied-resnet-s", width=8, depth=3, masks={"scope": "dense"}).eval()
    untied = create_model("tied-resnet-s", width=8, depth=3, execution="untied", masks={"scope": "dense"}).eval()
    state = {}
    for key, value in tied.state_dict().items():
        if ".tied.cell." in key:  # one shared cell -> the same weights in every untied cell
            for step in range(3):
                state[key.replace(".tied.cell.", f".tied.cells.{step}.")] = value
        else:
            state[key] = value
    untied.load_state_dict(state)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(untied(x), tied(x), atol=1e-6)
    cell = sum(p.numel() for p in tied.stages[0].tied.cell.parameters())
    cell += sum(p.numel() for p in tied.stages[1].tied.cell.parameters())
    assert count_params(untied) - count_params(tied) == 2 * cell  # depth - 1 more cells per stage


def test_untied_execution_takes_no_masks():
    with pytest.raises(ConfigError, match="untied"):
        create_model("tied-resnet-s", execution="untied", masks={"scope": "multi"})


@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_channel_masks_compute_only_kept_rows_and_equal_the_masked_dense_layer(layer):
    from tiedmask.core.layers import MaskedLinear

    torch.manual_seed(0)
    if layer == "conv":
        mod, x = MaskedConv2d(6, 8, 3, padding=1, bias=True), torch.randn(2, 6, 5, 5)
        dense = lambda x, w: F.conv2d(x, w, mod.bias, padding=1)  # noqa: E731
    else:
        mod, x = MaskedLinear(6, 8), torch.randn(2, 3, 6)
        dense = lambda x, w: F.linear(x, w, mod.bias)  # noqa: E731
    mod.build_masks("channel", 3, 0.5, 0, "w")
    assert mod.kept_rows.shape == (3, 4)
    for index in range(3):
        mask = mod.mask_stack()[index]
        ours = mod(x, index)
        grad_ours = torch.autograd.grad(ours.square().sum(), mod.weight)[0]
        ref = dense(x, mod.weight * mask)  # the multiply-by-mask layer, written out
        grad_ref = torch.autograd.grad(ref.square().sum(), mod.weight)[0]
        assert torch.allclose(ours, ref, atol=1e-5) and torch.allclose(grad_ours, grad_ref, atol=1e-5)
        assert (grad_ours[~mask.bool()] == 0).all()


def test_channel_masked_models_equal_their_multiply_by_mask_version():
    for name in ("tied-fast", "tied-resnet-s", "tied-vit-s"):
        fast = create_model(name, width=8, depth=3, masks={"kind": "channel"}).eval()
        x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        ours = fast(x)
        for _, layer in masked_layers(fast):
            layer.mask_bank.kept_rows = None  # back to weight * mask
        assert torch.allclose(ours, fast(x), atol=1e-5), name


def test_resolving_a_config_never_builds_a_model(monkeypatch):
    """A sweep resolves every grid point: presets return typed specs; only `build` builds."""
    from tiedmask.core.backbones import Backbone
    from tiedmask.training.settings import load_config

    def no_building(self, *args, **kwargs):
        raise AssertionError("a model was built while resolving a config")

    monkeypatch.setattr(Backbone, "__init__", no_building)
    for name in MODEL_PRESETS:
        cfg = load_config(overrides=["--model", name, "--width", "8"])
        assert (cfg.model.name, cfg.model.width) == (name, 8)


def test_a_registered_preset_builds_what_its_spec_says_and_a_preset_without_a_spec_is_refused():
    from tiedmask.core.backbones import TiedNet
    from tiedmask.core.presets import register_model, spec

    @register_model
    def my_test_net(**settings):
        return spec(TiedNet, settings, cell="resnet", width=12, depth=3, stages=1)  # no name: its own

    @register_model
    def my_broken_net(**settings):
        return TiedNet  # a class, not a spec

    try:
        model = create_model("my-test-net", masks={"scope": "same"})
        assert isinstance(model, TiedNet)
        assert (model.config.width, model.config.depth, model.config.masks.scope) == (12, 3, "same")
        assert model.config.name == "my-test-net"  # what resume and eval rebuild through
        with pytest.raises(ConfigError, match="not a ModelSpec"):
            create_model("my-broken-net")
    finally:
        MODEL_PRESETS.pop("my-test-net")
        MODEL_PRESETS.pop("my-broken-net")
