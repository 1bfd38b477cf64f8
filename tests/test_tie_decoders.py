"""`tie` on Hugging Face decoders: KV caches, layer kinds, loops of several blocks, interop.

The reference is built here from the untied model and `make_mask` alone: a copy of the original
decoder whose layer p holds its shared block's weights under position p's mask, its own norms
and the shared biases. The tied model must equal it with the cache on (the default) and off, in
forward, greedy and sampled `generate`, and training gradients.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

from tiedmask.core.masks import make_mask
from tiedmask.core.tie import tie
from tiedmask.core.tie_io import load_tied, save_tied
from tiedmask.core.tied_block import tie_summary
from tiedmask.core.untie import untie
from tiedmask.errors import ConfigError, TiedmaskError

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
VOCAB = 64


def decoder(family: str, layers: int = 4):
    torch.manual_seed(0)
    small = dict(num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    kinds = {
        "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(
            n_layer=layers, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
            eos_token_id=1, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(num_key_value_heads=2, **small)),
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(num_key_value_heads=2, **small)),
        "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig(num_key_value_heads=2, **small)),
        "gpt_neox": (transformers.GPTNeoXForCausalLM, transformers.GPTNeoXConfig(**small)),
        "phi": (transformers.PhiForCausalLM, transformers.PhiConfig(**small)),
    }
    cls, config = kinds[family]
    model = cls(config).eval()
    with torch.no_grad():  # norms that differ per layer: a position reading another's shows
        for name, module in model.named_modules():
            if "Norm" in type(module).__name__ and getattr(module, "weight", None) is not None:
                module.weight.uniform_(0.5, 1.5)
    return model


LAYERS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}
FAMILIES = ["gpt2", "llama", "qwen2", "mistral", "gpt_neox", "phi"]


def layers_path(family: str) -> str:
    return LAYERS.get(family, "model.layers")


def positions(count: int, group: int, strategy: str) -> list[tuple[int, int]]:
    """(shared block, application) per position, as Relaxed Recursive Transformers define them."""
    loops = count // group
    if strategy == "cycle":  # blocks 0 1 0 1
        return [(p % group, p // group) for p in range(count)]
    return [(p // loops, p % loops) for p in range(count)]  # blocks 0 0 1 1


def is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


@torch.no_grad()
def reference(original, path: str, group=1, strategy="cycle", density=0.5, seed=0, kind="unstructured"):
    """The untied decoder that a tie with init 'first' stands for, written out by hand."""
    ref = copy.deepcopy(original)
    layers, sources = ref.get_submodule(path), original.get_submodule(path)
    where = positions(len(layers), group, strategy)
    for p, layer in enumerate(layers):
        block, application = where[p]
        source = sources[next(q for q, (b, _) in enumerate(where) if b == block)]  # the block's first
        prefix = path if group == 1 else f"{path}.{block}"
        for name, module in layer.named_modules():
            if "Norm" in type(module).__name__:
                continue  # kept per position: its own
            for pname, param in module.named_parameters(recurse=False):
                value = source.get_submodule(name).get_parameter(pname).clone()
                if pname == "weight" and is_projection(module) and density < 1:
                    conv1d = type(module).__name__ == "Conv1D"  # stored (in, out): masked as (out, in)
                    mask = make_mask(kind, tuple(value.shape[::-1] if conv1d else value.shape),
                                     density, seed, f"{prefix}.{name}.weight", application)
                    value *= mask.t() if conv1d else mask
                param.copy_(value)
    return ref


def tied_pair(family, group=1, strategy="cycle", kind="unstructured", **options):
    original = decoder(family)
    path = layers_path(family)
    tied = tie(copy.deepcopy(original), blocks=path, density=0.5, init="first", group=group,
               strategy=strategy, kind=kind, **options)
    return tied, reference(original, path, group, strategy, kind=kind), original


PROMPT = torch.tensor([[5, 9, 13, 2, 40, 7], [3, 3, 17, 60, 11, 8]])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tied_decoder_equals_its_untied_twin_with_the_cache_on_and_off(family):
    tied, ref, _ = tied_pair(family)
    expected = ref(PROMPT, use_cache=False).logits
    torch.testing.assert_close(tied(PROMPT, use_cache=True).logits, expected)
    torch.testing.assert_close(tied(PROMPT, use_cache=False).logits, expected)
    # generation: greedy tokens identical, every step's scores equal
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    got, want = tied.generate(PROMPT, **kwargs), ref.generate(PROMPT, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b)
    # the cache holds one slot per position, as the untied model's does
    cache = tied(PROMPT, use_cache=True).past_key_values
    assert len(cache.layers) == len(ref(PROMPT, use_cache=True).past_key_values.layers)
    assert cache.get_seq_length() == PROMPT.shape[1]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sampled_generation_and_loops_of_several_blocks_equal_the_twin(family):
    for group, strategy in ((1, "cycle"), (2, "cycle"), (2, "sequence")):
        tied, ref, _ = tied_pair(family, group, strategy)
        runs = []
        for model in (tied, ref):
            torch.manual_seed(3)
            runs.append(model.generate(PROMPT, max_new_tokens=5, do_sample=True, top_k=20))
        assert torch.equal(*runs), (group, strategy)


def test_training_gradients_with_the_cache_on_equal_the_twins_summed_over_positions():
    tied, ref, original = tied_pair("llama")
    tied.train(), ref.train()
    tied(PROMPT, labels=PROMPT, use_cache=True).loss.backward()
    ref(PROMPT, labels=PROMPT, use_cache=True).loss.backward()
    shared = tied.model.layers.shared.self_attn.q_proj.parametrizations.weight
    expected = sum(make_mask("unstructured", tuple(layer.self_attn.q_proj.weight.shape), 0.5, 0,
                             "model.layers.self_attn.q_proj.weight", p) * layer.self_attn.q_proj.weight.grad
                   for p, layer in enumerate(ref.model.layers))
    torch.testing.assert_close(shared.original.grad, expected)
    # norms are per position: each copy gets its own layer's gradient
    norms = tied.model.layers.shared.input_layernorm.copies
    for p, layer in enumerate(ref.model.layers):
        torch.testing.assert_close(norms[p].weight.grad, layer.input_layernorm.weight.grad)


def test_gpt2_conv1d_weights_are_masked_and_relaxed_and_norms_of_any_class_are_per_position():
    tied = tie(decoder("gpt2"), blocks="transformer.h", density=0.5, relax="lora", relax_rank=2)
    run = tie_summary(tied)["runs"][0]
    assert run["masked_weights"] == 4 and run["relaxation"] > 0  # c_attn, c_proj, c_fc, mlp.c_proj
    llama = tie(decoder("llama"), blocks="model.layers", density=0.5, init="mean")
    norms = llama.model.layers.shared
    assert type(norms.input_layernorm).__name__ == "PerApplicationModule"  # LlamaRMSNorm, by behaviour
    assert len(norms.post_attention_layernorm.copies) == 4


def test_groups_loop_k_shared_blocks_and_the_summary_shows_the_loop():
    original = decoder("llama", layers=6)
    counts = {}
    for group, strategy in ((1, "cycle"), (2, "cycle"), (3, "sequence")):
        tied = tie(copy.deepcopy(original), blocks="model.layers", group=group, strategy=strategy, density=0.5)
        run = tie_summary(tied)["runs"][0]
        counts[group] = run["shared"]
        if group > 1:
            assert run["loop"] == [b for b, _ in positions(6, group, strategy)]
    assert counts[2] == 2 * counts[1] and counts[3] == 3 * counts[1]
    with pytest.raises(ConfigError, match="does not divide the 6 blocks"):
        tie(copy.deepcopy(original), blocks="model.layers", group=4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gradient_checkpointing_inside_tied_blocks_gives_the_same_gradients(family):
    tied, _, _ = tied_pair(family, relax="lora", relax_rank=2)
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(tied).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(PROMPT, labels=PROMPT).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_untie_gives_a_plain_model_of_the_same_class_with_equal_outputs():
    tied, ref, original = tied_pair("qwen2", group=2, strategy="sequence", relax="lora", relax_rank=2)
    with torch.no_grad():
        for p in tied.parameters():
            p.add_(0.01 * torch.randn_like(p))  # trained relaxations, not zeros
    expected = tied(PROMPT).logits
    plain = untie(copy.deepcopy(tied))
    assert type(plain) is type(original) and type(plain.model.layers) is nn.ModuleList
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in original.parameters())
    torch.testing.assert_close(plain(PROMPT).logits, expected)
    assert set(plain.state_dict()) == set(original.state_dict())  # what from_pretrained expects


def test_save_pretrained_is_refused_and_save_tied_round_trips_a_loop(tmp_path):
    tied, _, original = tied_pair("llama", group=2, strategy="cycle", relax="lora", relax_rank=2)
    with pytest.raises(TiedmaskError, match="save_tied"):
        tied.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    save_tied(tied, tmp_path / "tied.safetensors")
    loaded = load_tied(copy.deepcopy(original), tmp_path / "tied.safetensors")
    torch.testing.assert_close(loaded(PROMPT).logits, tied(PROMPT).logits)
    untie(tied).save_pretrained(tmp_path / "plain")  # the way to Hugging Face's format
    again = type(original).from_pretrained(tmp_path / "plain").eval()
    torch.testing.assert_close(again(PROMPT).logits, tied(PROMPT).logits)


def test_weights_read_outside_a_forward_are_the_positions_own():
    tied, ref, _ = tied_pair("llama")
    for p in range(4):
        torch.testing.assert_close(tied.model.layers[p].self_attn.q_proj.weight,
                                   ref.model.layers[p].self_attn.q_proj.weight)
        assert tied.model.layers[p].self_attn.layer_idx == p
        torch.testing.assert_close(tied.model.layers[p].input_layernorm.weight,
                                   ref.model.layers[p].input_layernorm.weight)


@pytest.mark.parametrize("order", ["before", "after"])
def test_peft_before_or_after_tie_trains_only_adapters_and_runs(order):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    if order == "before":
        model = peft.get_peft_model(decoder("llama"), lora)
        tie(model, blocks="base_model.model.model.layers", density=0.5)
    else:
        model = peft.get_peft_model(tie(decoder("llama"), blocks="model.layers", density=0.5), lora)
    model.train()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    model(input_ids=PROMPT, labels=PROMPT).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


class CachedBlock(nn.Module):
    """A block that takes a cache but keeps no index to find its slot in it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x, past_key_value=None):
        return self.proj(x)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.proj = nn.GRU(4, 4, batch_first=True), nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(self.rnn(x)[0])


def test_blocks_it_cannot_map_or_mask_are_refused_or_named_and_nothing_changes():
    model = nn.Sequential(nn.ModuleList([CachedBlock() for _ in range(3)]))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="cache slot"):
        tie(model, blocks="0")
    assert model.state_dict().keys() == before.keys()
    recurrent = nn.Sequential(nn.Sequential(*[Recurrent() for _ in range(3)]))
    with pytest.raises(ConfigError, match="strict=True.*rnn.weight_ih_l0"):
        tie(recurrent, blocks="0", strict=True)
    assert isinstance(recurrent[0], nn.Sequential)  # untouched
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tie(recurrent, blocks="0")
    assert any("rnn.weight_hh_l0 (GRU)" in str(w.message) for w in caught)


def test_multihead_attention_packed_weights_are_masked():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()
    original, first = copy.deepcopy(encoder), copy.deepcopy(encoder.layers[0])
    tie(encoder, blocks="layers", density=0.5, init="first")
    x = torch.randn(2, 5, 8)
    with torch.no_grad():  # the reference: layer p's packed projection under position p's mask
        for p, plain in enumerate(original.layers):
            plain.self_attn.in_proj_weight.copy_(first.self_attn.in_proj_weight * make_mask(
                "unstructured", (24, 8), 0.5, 0, "layers.self_attn.in_proj_weight", p))
            for name in ("self_attn.out_proj", "linear1", "linear2"):
                source, target = first.get_submodule(name), plain.get_submodule(name)
                mask = make_mask("unstructured", tuple(source.weight.shape), 0.5, 0, f"layers.{name}.weight", p)
                target.weight.copy_(source.weight * mask)
    torch.testing.assert_close(encoder(x), original(x))
    assert tie_summary(encoder)["runs"][0]["masked_weights"] == 4  # in_proj, out_proj, linear1, linear2


@pytest.mark.parametrize("options, message", [
    ({"group": 0}, "tie.group must be a whole number >= 1"),
    ({"group": "2"}, "tie.group"),
    ({"strategy": "spiral"}, "tie.strategy 'spiral' is not one of"),
    ({"relax": "lora", "relax_rank": 100_000}, "tie.relax_rank 100000 exceeds the rank any weight"),
])
def test_bad_loop_and_relaxation_settings_are_one_error_and_change_nothing(options, message):
    model = decoder("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        tie(model, blocks="model.layers", **options)
    assert type(model.model.layers) is nn.ModuleList
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_torch_checkpoint_around_positions_gives_the_same_gradients():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    blocks = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.GELU()) for _ in range(4)])
    tied = tie(nn.Sequential(blocks), blocks="0", density=0.5, relax="lora", relax_rank=2)
    x = torch.randn(3, 6)
    grads = []
    for wrap in (lambda f, h: f(h), lambda f, h: checkpoint(f, h, use_reentrant=False),
                 lambda f, h: checkpoint(f, h, use_reentrant=True)):
        tied.zero_grad()
        h = x.clone().requires_grad_()
        for position in tied[0]:
            h = wrap(position, h)
        h.square().sum().backward()
        grads.append([p.grad.clone() for p in tied.parameters()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b)


def test_conv1d_channel_masks_drop_output_features_and_biases_per_position_still_mask_it():
    model = decoder("gpt2")
    tied = tie(model, blocks="transformer.h", kind="channel", density=0.5, per_application=["norms", "biases"])
    for p in range(4):
        weight = tied.transformer.h[p].mlp.c_fc.weight  # (in 32, out 128): whole output columns kept
        kept_columns = (weight != 0).any(0)
        assert int(kept_columns.sum()) == weight.shape[1] // 2 and bool(((weight != 0) == kept_columns).all())
    assert tie_summary(tied)["runs"][0]["masked_weights"] == 4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_channel_masked_decoders_compute_only_kept_rows_and_equal_the_twin(family):
    """Tied projections under channel masks compute their kept rows alone (torch's FLOP counter:
    the projections' matmuls at half their dense count) and give the hand-written twin's logits
    and gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    tied, ref, _ = tied_pair(family, kind="channel")
    torch.testing.assert_close(tied(PROMPT, use_cache=False).logits, ref(PROMPT, use_cache=False).logits)
    torch.testing.assert_close(tied(PROMPT, use_cache=True).logits, ref(PROMPT, use_cache=False).logits)
    tied(PROMPT).logits.square().mean().backward()
    ref(PROMPT).logits.square().mean().backward()
    layers = ref.get_submodule(layers_path(family))
    for name, module in tied.get_submodule(layers_path(family)).shared.named_modules():
        if is_projection(module):
            twins = [layers[p].get_submodule(name).weight for p in range(len(layers))]
            expected = sum((w != 0) * w.grad for w in twins)  # a masked-out entry is 0 in the twin
            torch.testing.assert_close(module.parametrizations.weight.original.grad, expected, atol=1e-4, rtol=1e-4)

    def flops(model):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(PROMPT, use_cache=False)
        return counter.get_total_flops()

    dense = sum(2 * PROMPT.numel() * m.weight.numel() for m in layers.modules() if is_projection(m))
    assert flops(tied) == flops(ref) - dense // 2  # density 0.5: half of every projection's rows


def test_reads_outside_a_position_give_shapes_but_no_values_and_views_are_read_only():
    tied, _, _ = tied_pair("llama")
    shared = tied.model.layers.shared.self_attn.q_proj
    assert shared.weight.shape == (32, 32) and shared.weight.dtype == torch.float32  # what peft reads
    with pytest.raises(TiedmaskError, match="outside any position"):
        shared(torch.randn(1, 32))  # the shared layer alone has no mask to use
    with pytest.raises(TiedmaskError, match="outside any position"):
        tied.model.layers[2].self_attn.q_proj.forward(torch.randn(1, 32))  # a bound method leaves the position
    with pytest.raises(TiedmaskError, match="read-only view"):
        tied.model.layers[2].self_attn.scaling = 1.0


def test_peft_merge_on_a_tied_model_is_refused_and_untie_then_merge_works():
    peft = pytest.importorskip("peft")
    tied, _, _ = tied_pair("llama")
    model = peft.get_peft_model(tied, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    expected = model(PROMPT).logits
    with pytest.raises(TiedmaskError, match="untie"):
        copy.deepcopy(model).merge_and_unload()
    merged = untie(model).merge_and_unload()
    torch.testing.assert_close(merged(PROMPT).logits, expected)
