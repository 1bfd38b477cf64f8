"""DEQ solvers and gradients, checked against closed forms and against torchdeq."""

import pytest

from tiedmask.core.spec import DataShape
import torch
from torch import nn

from tiedmask.core.deq import Equilibrium, solve
from tiedmask.core.deq.equilibrium import SolverDiverged
from tiedmask.core.spec import DeqConfig
from tiedmask.errors import ConfigError
from tiedmask.core.presets import create_model

torchdeq = pytest.importorskip("torchdeq")

SOLVERS = ["fixed_point", "anderson", "broyden"]
TORCHDEQ_NAMES = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}


class TanhCell(nn.Module):
    """f(z, x) = tanh(W z + x), a contraction when ||W||_2 < 1."""

    def __init__(self, dim=12, scale=0.6, linear=False):
        super().__init__()
        self.lin = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.lin.weight.mul_(scale / torch.linalg.matrix_norm(self.lin.weight, 2))
        self.linear = linear

    def forward(self, z, x, index=None, step=0):
        out = self.lin(z) + x
        return out if self.linear else torch.tanh(out)


@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_find_the_known_fixed_point_of_an_affine_contraction(solver):
    torch.manual_seed(0)
    a = torch.randn(10, 10)
    a = 0.7 * a / torch.linalg.matrix_norm(a, 2)
    b = torch.randn(3, 10)
    exact = torch.linalg.solve(torch.eye(10) - a, b.T).T  # z = A z + b
    z, stats = solve(solver, lambda z: z @ a.T + b, torch.zeros(3, 10), max_iter=200, tol=1e-6,
                     stop_mode="abs")
    assert torch.allclose(z, exact, atol=1e-5)
    assert not stats.diverged and stats.abs_residual < 1e-5


@pytest.mark.parametrize("solver", SOLVERS)
def test_fixed_points_match_torchdeq(solver):
    torch.manual_seed(1)
    cell = TanhCell(scale=0.9)
    x = torch.randn(4, 12)
    f = lambda z: cell(z, x)  # noqa: E731
    with torch.no_grad():
        ours, _ = solve(solver, f, torch.zeros(4, 12), max_iter=100, tol=1e-6, stop_mode="abs")
        ref, _, _ = torchdeq.solver.get_solver(TORCHDEQ_NAMES[solver])(
            f, torch.zeros(4, 12), max_iter=100, tol=1e-6, stop_mode="abs")
    assert torch.allclose(ours, ref, atol=1e-5)


def test_anderson_and_broyden_beat_plain_iteration_on_a_slow_contraction():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(30, 30))
    a = q @ torch.diag(torch.linspace(-0.97, 0.97, 30)) @ q.T  # spectral radius 0.97
    f = lambda z: z @ a.T + 1.0  # noqa: E731
    iters = {s: solve(s, f, torch.zeros(2, 30), max_iter=500, tol=1e-5)[1].iterations for s in SOLVERS}
    assert iters["anderson"] < iters["fixed_point"] and iters["broyden"] < iters["fixed_point"]


@pytest.mark.parametrize("solver", SOLVERS)
def test_implicit_gradient_equals_the_closed_form(solver):
    torch.manual_seed(2)
    cell = TanhCell(dim=8, scale=0.5, linear=True)  # z* = (I - W)^-1 x, exactly differentiable
    x = torch.randn(3, 8, requires_grad=True)
    deq = Equilibrium(cell, "dense", DeqConfig(solver=solver, grad="implicit", train_iter=200,
                      backward_iter=200, tol=1e-7, stop_mode="abs")).train()
    target = torch.randn(3, 8)
    ((deq(x) - target) ** 2).sum().backward()
    ours_w, ours_x = cell.lin.weight.grad.clone(), x.grad.clone()

    w = cell.lin.weight.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    z = torch.linalg.solve(torch.eye(8) - w, x2.T).T
    ((z - target) ** 2).sum().backward()
    assert torch.allclose(ours_w, w.grad, atol=1e-4)
    assert torch.allclose(ours_x, x2.grad, atol=1e-4)


def test_implicit_gradient_matches_torchdeq():
    torch.manual_seed(3)
    cell = TanhCell(dim=12, scale=0.8)
    x = torch.randn(4, 12)
    target = torch.randn(4, 12)
    ours = Equilibrium(cell, "dense", DeqConfig(solver="anderson", grad="implicit", train_iter=60,
                       backward_iter=60, tol=1e-6, stop_mode="abs")).train()
    ((ours(x) - target) ** 2).sum().backward()
    ours_grad = cell.lin.weight.grad.clone()
    cell.lin.weight.grad = None

    ref = torchdeq.get_deq(f_solver="anderson", b_solver="anderson", f_max_iter=60, b_max_iter=60,
                           f_tol=1e-6, b_tol=1e-6, f_stop_mode="abs", b_stop_mode="abs", ift=True)
    ref.train()
    z_out, _ = ref(lambda z: cell(z, x), torch.zeros(4, 12))
    ((z_out[-1] - target) ** 2).sum().backward()
    assert torch.allclose(ours_grad, cell.lin.weight.grad, atol=1e-5)


def test_phantom_gradient_matches_torchdeq():
    torch.manual_seed(4)
    cell = TanhCell(dim=12, scale=0.8)
    x = torch.randn(4, 12)
    ours = Equilibrium(cell, "dense", DeqConfig(solver="fixed_point", grad="phantom", train_iter=80,
                       tol=1e-6, stop_mode="abs", phantom_steps=3, phantom_tau=0.6)).train()
    ours(x).pow(2).sum().backward()
    ours_grad = cell.lin.weight.grad.clone()
    cell.lin.weight.grad = None

    ref = torchdeq.get_deq(f_solver="fixed_point_iter", f_max_iter=80, f_tol=1e-6,
                           f_stop_mode="abs", grad=3, tau=0.6)
    ref.train()
    z_out, _ = ref(lambda z: cell(z, x), torch.zeros(4, 12))
    z_out[-1].pow(2).sum().backward()
    assert torch.allclose(ours_grad, cell.lin.weight.grad, atol=1e-5)


@pytest.mark.parametrize("bad", [lambda z: z * z + 2.0, lambda z: z * float("nan")])
def test_divergence_is_reported_not_hidden(bad):
    # z*z + 2 = z has no real root. Plain iteration explodes (diverged); the quasi-Newton
    # solvers may stall at a bounded residual instead: not converged, and reported as such.
    _, stats = solve("fixed_point", bad, torch.ones(2, 4), max_iter=50, tol=1e-6)
    assert stats.diverged and stats.reason
    for solver in SOLVERS:
        z, stats = solve(solver, bad, torch.ones(2, 4), max_iter=50, tol=1e-6)
        assert stats.diverged or (stats.abs_residual > 1.0 and torch.isfinite(z).all()), solver

    class Exploding(nn.Module):
        def forward(self, z, x, index=None, step=0):
            return bad(z) + x

    with pytest.raises(SolverDiverged, match="diverged"):
        Equilibrium(Exploding(), "dense", DeqConfig(solver="fixed_point", train_iter=50))(torch.zeros(2, 4))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("grad", ["implicit", "phantom"])
def test_equilibrium_models_train_a_step(solver, grad):
    torch.manual_seed(0)
    model = create_model("tied-resnet-s", width=8, execution="equilibrium", masks={"scope": "same"},
                         deq={"solver": solver, "grad": grad, "train_iter": 6, "backward_iter": 6, "jac_reg": 0.1})
    out = model(torch.randn(2, 3, 16, 16))
    loss = out.sum() + model.aux_loss()
    loss.backward()
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    forward, backward = model.pop_solver_stats()
    assert len(forward) == 2 and all(1 <= s.iterations <= 6 for s in forward)
    assert (len(backward) == 2) == (grad == "implicit")


def test_equal_parameters_across_executions():
    counts = {sum(p.numel() for p in create_model("tied-resnet-s", **kw, masks={"scope": "same"}).parameters())
              for kw in ({}, {"execution": "equilibrium"})}
    assert len(counts) == 1


@pytest.mark.parametrize("kind", ["weight", "spectral"])
def test_weight_normalisation_keeps_masks(kind):
    model = create_model("tied-resnet-xs", shape=DataShape(channels=1), width=8, weight_norm=kind, masks={"scope": "same"})
    assert torch.isfinite(model(torch.randn(2, 1, 8, 8))).all()


def test_multi_mask_has_no_fixed_point():
    with pytest.raises(ConfigError, match="no fixed point"):
        create_model("tied-resnet-s", execution="equilibrium", masks={"scope": "multi"})


def test_epoch_solver_statistics_count_only_training_solves(tmp_path):
    """The MAC-count probe (an eval-mode forward) must not leak into the first epoch's stats."""
    import json

    from tiedmask.training.settings import load_config
    from tiedmask.training.train import train

    cfg = load_config(overrides=["--data", "digits", "--model", "tied-resnet-xs", "--width", "4",
                                 "--execution", "equilibrium", "--mask_scope", "dense",
                                 "--deq_train_iter", "3", "--deq_eval_iter", "7", "--deq_tol", "1e-12",
                                 "--epochs", "1", "--batch_size", "256", "--progress", "false"])
    train(cfg, out=tmp_path / "run", log=lambda *a: None)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["fwd_iters"] == 3 and row["eval_fwd_iters"] == 7


def test_a_solve_stops_at_its_deadline_without_calling_it_divergence():
    import time

    f = lambda z: 0.999 * z + 1.0  # noqa: E731  (slow: thousands of iterations to converge)
    _, stats = solve("fixed_point", f, torch.zeros(2, 3), max_iter=10**6, tol=0.0,
                     deadline=time.perf_counter() - 1)
    assert stats.iterations == 1 and stats.out_of_time and not stats.diverged


def test_training_of_a_deq_keeps_to_the_time_budget_inside_a_step():
    import time

    from tiedmask.training.settings import load_config
    from tiedmask.training.train import train

    cfg = load_config(overrides=["--data", "digits", "--model", "tied-resnet-xs", "--width", "4",
                                 "--execution", "equilibrium", "--mask_scope", "same", "--deq.tol", "0",
                                 "--deq.train_iter", "1000000", "--deq.backward_iter", "1000000",
                                 "--deq.eval_iter", "2", "--time_budget_s", "1", "--epochs", "1",
                                 "--progress", "false"])
    start = time.perf_counter()
    result = train(cfg, log=lambda *_: None)
    assert result.train_time_s < 3 and time.perf_counter() - start < 30
