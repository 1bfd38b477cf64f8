import itertools

import pytest
import torch

from tiedmask.analysis.cka import MinibatchCKA, linear_cka, unbiased_hsic
from tiedmask.analysis.states import relative_changes, stage_states
from tiedmask.core.presets import create_model


def brute_force_hsic(k: torch.Tensor, l: torch.Tensor) -> float:
    """The U-statistic definition: average over ordered distinct (i, j, q, r)."""
    n = k.shape[0]
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
        count += 1
    return float(total / count)


def test_unbiased_hsic_matches_the_u_statistic_definition():
    torch.manual_seed(0)
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    k, l = x @ x.T, y @ y.T
    assert float(unbiased_hsic(k, l)) == pytest.approx(brute_force_hsic(k, l), rel=1e-9, abs=1e-12)


def test_cka_of_a_representation_with_itself_is_one():
    x = torch.randn(50, 20)
    assert float(linear_cka([x, x])[0, 1]) == pytest.approx(1.0, abs=1e-9)


def test_cka_is_invariant_to_orthogonal_maps_and_isotropic_scaling():
    torch.manual_seed(1)
    x, y = torch.randn(60, 16), torch.randn(60, 16)
    y = y + x  # some shared structure
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    base = float(linear_cka([x, y])[0, 1])
    assert float(linear_cka([x @ q, 4.2 * y])[0, 1]) == pytest.approx(base, abs=1e-6)


def test_cka_is_near_zero_for_independent_representations():
    torch.manual_seed(2)
    acc = MinibatchCKA(2)
    for _ in range(20):
        acc.update([torch.randn(64, 50), torch.randn(64, 50)])
    assert abs(float(acc.compute()[0, 1])) < 0.02


def test_minibatch_cka_approaches_the_full_batch_linear_cka():
    torch.manual_seed(3)
    w = torch.randn(30, 30)
    xs = [torch.randn(100, 30) for _ in range(30)]
    acc = MinibatchCKA(2)
    for x in xs:
        acc.update([x, torch.relu(x @ w)])
    x = torch.cat(xs)
    y = torch.relu(x @ w)
    x, y = (t.double() - t.double().mean(0) for t in (x, y))
    full = (y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())  # Kornblith et al. 2019
    assert float(acc.compute()[0, 1]) == pytest.approx(float(full), abs=0.02)


@pytest.mark.parametrize("execution,scope", [("unrolled", "multi"), ("equilibrium", "same")])
def test_states_are_captured_for_every_application(execution, scope):
    model = create_model("tied-resnet-s", width=8, depth=3, execution=execution, masks={"scope": scope},
                         deq={"eval_iter": 5, "tol": 1e-12})
    states = stage_states(model, torch.randn(4, 3, 16, 16))
    assert len(states) == 2
    assert all(len(s) == (3 if execution == "unrolled" else 5) for s in states)
    assert len(relative_changes(states[0])) == len(states[0]) - 1
    with torch.no_grad():
        model(torch.randn(4, 3, 16, 16))
    assert all(r._trace is None for r in model.runners())  # tracing is switched off again


def test_analysis_leaves_a_deq_model_as_it_found_it():
    from tiedmask.analysis.analyze import analyze_model

    model = create_model("tied-resnet-s", width=8, execution="equilibrium", masks={"scope": "same"},
                         deq={"eval_iter": 4, "tol": 1e9})
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    result = analyze_model(model, x, torch.zeros(3), torch.ones(3), batch_size=8)
    assert len(result["cka"][0]) == 4  # every iteration ran, whatever the tolerance
    model.pop_solver_stats()
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    forward, _ = model.pop_solver_stats()
    assert all(s.iterations == 1 for s in forward)  # the tolerance holds again afterwards


@pytest.mark.parametrize("execution", ["unrolled", "untied"])
def test_a_library_model_traces_its_blocks_as_the_library_reports_them(execution):
    """A Hugging Face ViT, tied or as it is: the states CKA compares are the outputs of its
    encoder layers, as transformers' own `output_hidden_states` gives them."""
    pytest.importorskip("transformers")
    from tiedmask.analysis.analyze import analyze_model
    from tiedmask.core.spec import DataShape

    args = {"hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 32,
            "patch_size": 4}
    model = create_model("hf:vit", DataShape(3, 16, 5), args=args, execution=execution,
                         masks={"scope": "multi" if execution == "unrolled" else "dense"}).eval()
    x = torch.randn(8, 3, 16, 16)
    states = stage_states(model, x)
    with torch.no_grad():
        reference = model.net(pixel_values=x, output_hidden_states=True).hidden_states[1:]
    assert len(states) == 1 and len(states[0]) == 3
    for ours, theirs in zip(states[0], reference):
        torch.testing.assert_close(ours, theirs)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    result = analyze_model(model, images, torch.zeros(3), torch.ones(3), batch_size=8)
    with torch.no_grad():
        hidden = model.net(pixel_values=images.float() / 255, output_hidden_states=True).hidden_states[1:]
    expected = linear_cka(list(hidden))
    torch.testing.assert_close(torch.tensor(result["cka"][0], dtype=torch.float64), expected.double())
