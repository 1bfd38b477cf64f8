"""`precision: auto` by what the machine has, recorded with every run, and kept by eval/resume."""

import json

import pytest

from tiedmask.core.spec import DataShape
import torch

from tiedmask.cli import main
from tiedmask.training import precision
from tiedmask.training.precision import autocast_context, resolve_precision

CPU = torch.device("cpu")
QUIET = ["--data", "digits", "--progress", "false", "--model", "tied-resnet-xs", "--width", "8",
         "--depth", "2", "--test_subset", "97"]


@pytest.fixture(autouse=True)
def timed_precision(monkeypatch):
    """This file's tests are of the timed check (conftest.py turns it off elsewhere)."""
    monkeypatch.setenv(precision.CHECK_VARIABLE, "1")


@pytest.fixture
def machine(monkeypatch):
    """Pretend this CPU has AMX tiles or not (and AVX512-BF16 dot products: every AMX CPU has
    them), and that bf16 measures `speedup` times fp32."""
    def pretend(amx: bool, speedup: float = 2.0, avx512_bf16: bool | None = None):
        monkeypatch.setattr(precision, "has_amx", lambda: amx)
        monkeypatch.setattr(precision, "has_avx512_bf16", lambda: amx if avx512_bf16 is None else avx512_bf16)
        monkeypatch.setattr(precision, "bf16_speedup", lambda step: speedup)
    return pretend


def test_auto_is_fp32_without_bf16_instructions_and_bf16_on_cuda(machine):
    machine(amx=False)
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("bf16", CPU) == "bf16" and resolve_precision("fp32", CPU) == "fp32"


def test_auto_on_amx_follows_the_timed_check_unless_it_is_turned_off(machine, monkeypatch):
    step = lambda bf16: None  # noqa: E731  (the run's training step; timed by bf16_speedup)
    machine(amx=True, speedup=2.4)
    assert resolve_precision("auto", CPU, step) == "bf16"
    machine(amx=True, speedup=0.9)  # slower for this model, or tiles present but slow (a hypervisor)
    assert resolve_precision("auto", CPU, step) == "fp32"
    monkeypatch.setenv(precision.CHECK_VARIABLE, "0")
    assert resolve_precision("auto", CPU, step) == "bf16"


def test_avx512_bf16_without_amx_is_timed_and_stays_fp32_untimed(machine, monkeypatch):
    """AVX512-BF16 dot products without AMX tiles paid 1.67x for the recipe's step on a 2-core
    AMD EPYC and cost 0.24-0.66x on a 2-core Xeon (docs/results.md §9, §6): only the timed
    check can tell; untimed, such a CPU trains in fp32. A CPU without bf16 instructions is not
    timed at all."""
    step = lambda bf16: None  # noqa: E731
    machine(amx=False, avx512_bf16=True, speedup=1.67)
    chosen, why = precision.decide_precision("auto", CPU, step)
    assert chosen == "bf16" and "1.67x" in why and "AVX512-BF16" in why
    machine(amx=False, avx512_bf16=True, speedup=0.6)
    assert resolve_precision("auto", CPU, step) == "fp32"
    monkeypatch.setenv(precision.CHECK_VARIABLE, "0")
    assert precision.decide_precision("auto", CPU, step) == ("fp32", "auto: AVX512-BF16 without AMX tiles (step not timed)")
    monkeypatch.setenv(precision.CHECK_VARIABLE, "1")
    machine(amx=False, avx512_bf16=False)
    monkeypatch.setattr(precision, "bf16_speedup", lambda step: pytest.fail("timed on a CPU without bf16 instructions"))
    assert resolve_precision("auto", CPU, step) == "fp32"


def test_the_isa_names_the_bf16_instructions_the_kernel_reports():
    """Checked against the flags Linux reads from the CPU itself (not torch's probe)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this system")
    assert precision.has_avx512_bf16() == ("avx512_bf16" in flags)
    expected = "AMX" if precision.has_amx() else "AVX512-BF16" if "avx512_bf16" in flags else ""
    assert precision.bf16_instructions() == expected
    assert precision.cpu_isa().endswith(f", {expected}") if expected else "," not in precision.cpu_isa()


def test_the_check_times_the_runs_own_step_without_touching_the_model_or_its_random_stream():
    """bf16_speedup divides the fp32 time by the bf16 time of the step it is given (a step that
    sleeps 3x as long in fp32 measures ~3x), on a copy: the model's norm statistics, gradients and
    the global random stream are as before."""
    import time

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5))
    step = precision.training_step(model, lambda: torch.randn(8, 4))
    before = ({k: v.clone() for k, v in model.state_dict().items()}, torch.random.get_rng_state())
    speedup = precision.bf16_speedup(lambda bf16: (step(bf16), time.sleep(0.01 if bf16 else 0.03)))
    assert 1.5 < speedup < 6.0  # 3 by the sleeps; the steps themselves take well under a millisecond
    assert all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.random.get_rng_state(), before[1])


def test_bf16_autocast_computes_in_bf16_and_fp32_does_not(machine):
    machine(amx=False)
    layer, x = torch.nn.Linear(4, 4), torch.randn(2, 4)
    with autocast_context(CPU, "bf16"):
        assert layer(x).dtype == torch.bfloat16
    with autocast_context(CPU, "auto"):
        assert layer(x).dtype == torch.float32


@pytest.mark.parametrize("chosen", ["bf16", "fp32"])
def test_a_run_records_its_precision_and_eval_computes_in_it(tmp_path, capsys, machine, chosen):
    machine(amx=chosen == "bf16")  # auto resolves to `chosen` while training...
    run = tmp_path / "run"
    assert main(["train", *QUIET, "--epochs", "1", "--out", str(run)]) == 0
    result = json.loads((run / "result.json").read_text())
    assert result["precision"] == chosen
    assert json.loads((run / "checkpoint.json").read_text())["precision"] == chosen
    machine(amx=chosen != "bf16")  # ...and the other way on the machine that scores it
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert f"test loss {metrics[-1]['test_loss']:.4f}" in capsys.readouterr().out


def test_a_run_from_before_precision_was_recorded_keeps_fp32_on_a_cpu(tmp_path, capsys, machine):
    machine(amx=False)
    run = tmp_path / "run"
    assert main(["train", *QUIET, "--epochs", "2", "--out", str(run)]) == 0
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    checkpoint = json.loads((run / "checkpoint.json").read_text())
    del checkpoint["precision"]  # as 0.2 wrote it
    (run / "checkpoint.json").write_text(json.dumps(checkpoint))
    machine(amx=True)  # today's auto would pick bf16 here; the old run trained in fp32
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert f"test loss {metrics[-1]['test_loss']:.4f}" in capsys.readouterr().out


def test_implicit_deq_gradients_run_under_bf16_autocast():
    """The adjoint solve re-runs the cell in backward, outside the caller's autocast: it must
    re-enter it (bf16 z* against fp32 weights raised before)."""
    from tiedmask.core.presets import create_model

    torch.manual_seed(0)
    model = create_model("tied-resnet-xs", shape=DataShape(channels=1), width=8, execution="equilibrium", masks={"scope": "same"}).train()
    x = torch.randn(4, 1, 8, 8)
    grads = {}
    for dtype in ("fp32", "bf16"):
        model.zero_grad()
        with autocast_context(CPU, dtype):
            loss = model(x).float().logsumexp(1).mean()
        loss.backward()
        grads[dtype] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    # the bf16 gradient points where the fp32 one does (bf16 keeps ~3 significant digits)
    cosine = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    assert cosine > 0.95


def test_training_runs_through_a_runner_that_has_no_truth_value(tmp_path, machine, monkeypatch):
    """A compiled module raises on len()/bool(): the loop must not test it for truth."""
    machine(amx=False)

    class Opaque(torch.nn.Module):  # like torch.compile's OptimizedModule around a non-container
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

        def __len__(self):
            raise TypeError("no len()")

    made = []
    monkeypatch.setattr(torch, "compile", lambda model: made.append(Opaque(model)) or made[-1])
    assert main(["train", *QUIET, "--epochs", "1", "--compile", "true", "--out", str(tmp_path / "run")]) == 0
    assert len(made) == 1


@pytest.mark.skipif(not __import__("shutil").which("c++"), reason="torch.compile on a CPU needs a C++ compiler")
def test_the_fast_models_compiled_bf16_gradients_are_finite():
    """torch 2.13's compiled CPU kernel for a bf16 amax gave NaN gradients: the head takes its
    max in fp32, and the compiled gradient equals the eager one."""
    from tiedmask.core.presets import create_model

    torch.manual_seed(0)
    model = create_model("tied-fast", width=8, depth=1, masks={"scope": "multi", "density": 0.5}).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    grads = []
    for runner in (model, torch.compile(model)):
        model.zero_grad()
        with autocast_context(CPU, "bf16"):
            loss = torch.nn.functional.cross_entropy(runner(x).float(), y)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.isfinite(grads[1]).all()
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.95  # bf16 rounds each fusion apart


def test_a_check_that_fails_trains_in_fp32_and_says_why(machine, monkeypatch):
    """A step that raises while being timed (a solve that diverges under bf16, a copy that does
    not fit) must not stop a run that fp32 would train: auto falls back to fp32 with a warning."""
    monkeypatch.setattr(precision, "has_amx", lambda: True)

    def failing(bf16):
        raise RuntimeError("out of memory")

    with pytest.warns(UserWarning, match="out of memory"):
        assert resolve_precision("auto", CPU, failing) == "fp32"


def test_the_check_runs_on_a_real_run_start(tmp_path, monkeypatch):
    """On a pretended AMX CPU, a run's start times the run's own model on its probe batch (the
    image task's) and records what it chose and the ratio it measured."""
    monkeypatch.setattr(precision, "has_amx", lambda: True)
    seen = []
    real = precision.bf16_speedup
    monkeypatch.setattr(precision, "bf16_speedup", lambda step: seen.append(real(step)) or 0.5)
    run = tmp_path / "run"
    assert main(["train", *QUIET, "--epochs", "1", "--out", str(run)]) == 0
    assert len(seen) == 1 and seen[0] > 0
    result = json.loads((run / "result.json").read_text())
    assert result["precision"] == "fp32"
    assert "0.50x" in result["precision_why"]  # the measured ratio is kept with the result
    assert json.loads((run / "checkpoint.json").read_text())["precision_why"] == result["precision_why"]
