"""`compile: auto`: a trial of the run's own steps, eager against compiled, keeps the faster."""

import json
import shutil
import statistics
import warnings

import pytest
import torch

from tiedmask.cli import main
from tiedmask.training.compile_choice import MIN_GAIN, OPENING, TIMED_PAIRS, CompileChoice
from tiedmask.training.rundir import RunState
from tiedmask.training.settings import load_config

QUIET = ["--data", "digits", "--progress", "false", "--model", "tied-resnet-xs", "--width", "8",
         "--depth", "2", "--test_subset", "97", "--precision", "fp32"]  # fp32: not a timed choice


class Wrapped(torch.nn.Module):
    """A stand-in for torch.compile's module around the model: runs it, or raises."""

    def __init__(self, inner, error: Exception | None = None):
        super().__init__()
        self.inner, self.error = inner, error

    def forward(self, x):
        if self.error is not None:
            raise self.error
        return self.inner(x)


def trial(eager_s: list[float], compiled_s: list[float]) -> tuple[CompileChoice, list[str]]:
    """Run a trial whose timed steps take these seconds (eager and compiled, alternating)."""
    model = torch.nn.Linear(2, 2)
    choice = CompileChoice(model, "auto", RunState(config_hash="ab" * 8), compiler=Wrapped)
    ran, times = [], {"eager": iter(eager_s), "compiled": iter(compiled_s)}
    while choice.deciding:
        runner = choice.runner()
        which = "eager" if runner is model else "compiled"
        opening = len(ran) < len(OPENING)
        ran.append(which)
        choice.record(60.0 if len(ran) == 2 else 1.0 if opening else next(times[which]))
    return choice, ran


def test_the_trial_alternates_after_its_opening_and_keeps_a_clearly_faster_compiled_step():
    eager = [1.0, 1.2, 0.9, 1.1, 1.0, 5.0]  # a slow outlier: medians, not means
    compiled = [0.5, 0.6, 0.4, 0.5, 0.5, 0.5]
    choice, ran = trial(eager, compiled)
    assert ran[:len(OPENING)] == list(OPENING)
    assert ran[len(OPENING):] == ["eager", "compiled"] * TIMED_PAIRS
    gain = statistics.median(eager) / statistics.median(compiled)  # 1.05 / 0.5
    assert choice.state.compile_choice == "compiled" and f"{gain:.2f}x" in choice.state.compile_why
    assert "compiling took 59 s" in choice.state.compile_why  # its first compiled step less an eager one
    assert isinstance(choice.runner(), Wrapped)


@pytest.mark.parametrize("ratio, kept", [(1.0, "eager"), (MIN_GAIN - 0.01, "eager"), (MIN_GAIN + 0.01, "compiled"),
                                         (0.8, "eager")])
def test_compiled_is_kept_only_from_the_minimum_gain(ratio, kept):
    choice, _ = trial([ratio] * TIMED_PAIRS, [1.0] * TIMED_PAIRS)
    assert choice.state.compile_choice == kept
    assert (choice.compiled is None) == (kept == "eager")  # a compiled graph not kept is dropped


def test_a_decided_run_does_not_try_again_and_a_set_mode_needs_no_trial():
    model = torch.nn.Linear(2, 2)
    resumed = RunState(config_hash="ab" * 8, compile_choice="compiled", compile_why="auto: ...")
    choice = CompileChoice(model, "auto", resumed, compiler=Wrapped)
    assert not choice.deciding and isinstance(choice.runner(), Wrapped) and resumed.compile_why == "auto: ..."
    unfinished = CompileChoice(model, "auto", RunState(config_hash="ab" * 8), compiler=Wrapped)
    unfinished.runner(), unfinished.record(1.0), unfinished.end()  # the run stopped after one step
    assert unfinished.state.compile_why.startswith("auto: the run ended during the trial (1 steps")
    earlier_set = RunState(config_hash="ab" * 8, compile_choice="eager", compile_why="set")
    assert CompileChoice(model, "auto", earlier_set, compiler=Wrapped).deciding  # trained under false: try now
    for mode, chosen in (("true", "compiled"), ("false", "eager")):
        state = RunState(config_hash="ab" * 8, compile_choice="eager" if mode == "true" else "compiled")
        choice = CompileChoice(model, mode, state, compiler=Wrapped)
        assert (state.compile_choice, state.compile_why) == (chosen, "set")
        assert (choice.runner() is model) == (chosen == "eager")


def test_a_run_under_auto_records_its_choice_in_result_and_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", Wrapped)
    run = tmp_path / "run"
    assert main(["train", *QUIET, "--epochs", "2", "--compile", "auto", "--out", str(run)]) == 0
    result = json.loads((run / "result.json").read_text())
    assert result["compile_choice"] in ("eager", "compiled")
    assert result["compile_why"].startswith("auto: a compiled step ran")
    checkpoint = json.loads((run / "checkpoint.json").read_text())
    assert (checkpoint["compile_choice"], checkpoint["compile_why"]) == (result["compile_choice"], result["compile_why"])


def test_a_compiled_step_that_fails_under_auto_trains_eager_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model: Wrapped(model, RuntimeError("no C++ compiler")))
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", *QUIET, "--epochs", "1", "--compile", "auto", "--out", str(run)]) == 0
    assert any("no C++ compiler" in str(w.message) for w in caught)
    result = json.loads((run / "result.json").read_text())
    assert result["compile_choice"] == "eager" and "failed (RuntimeError)" in result["compile_why"]
    # the failed step was trained again, eager: the run is the one `compile: false` trains
    assert main(["train", *QUIET, "--epochs", "1", "--out", str(tmp_path / "eager")]) == 0
    eager = json.loads((tmp_path / "eager" / "result.json").read_text())
    assert (result["test_acc"], result["final_train_loss"]) == (eager["test_acc"], eager["final_train_loss"])


def test_a_resumed_compiled_run_whose_compiler_fails_trains_eager():
    model = torch.nn.Linear(2, 2)
    resumed = RunState(config_hash="ab" * 8, compile_choice="compiled", compile_why="auto: 1.3x")
    choice = CompileChoice(model, "auto", resumed, compiler=lambda m: Wrapped(m, RuntimeError("gone")))
    assert choice.compiled is None  # compiled at the first step, where a failure is handled
    assert isinstance(choice.runner(), Wrapped)
    with pytest.warns(UserWarning, match="gone"):
        assert choice.failed(RuntimeError("gone"))
    assert choice.runner() is model and resumed.compile_choice == "eager"
    choice.runner(), choice.record(0.1)  # an eager step later failing is the caller's to raise
    assert not choice.failed(RuntimeError("out of memory"))


def test_a_compiled_step_that_fails_under_true_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", lambda model: Wrapped(model, RuntimeError("no C++ compiler\nmore")))
    assert main(["train", *QUIET, "--epochs", "1", "--compile", "true", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [next(line for line in err if line.startswith("error:"))]  # one line, no traceback
    assert "no C++ compiler" in err[0] and "--compile false" in err[0] and "more" not in err[0]


@pytest.mark.parametrize("written, meant", [("true", "true"), ("false", "false"), ("auto", "auto"),
                                            ("yes", "true")])
def test_compile_and_channels_last_take_the_words_they_document(written, meant):
    """YAML reads `true` as a bool; a text setting of true/false/auto takes it as its word."""
    assert load_config(None, ["--compile", written]).compile == meant
    if meant != "auto":
        assert load_config(None, ["--channels_last", written]).channels_last == meant


def test_a_compile_mode_it_does_not_know_is_refused(capsys):
    assert main(["train", "--data", "digits", "--compile", "sometimes"]) == 2
    assert "compile" in capsys.readouterr().err


@pytest.mark.skipif(not shutil.which("c++"), reason="torch.compile on a CPU needs a C++ compiler")
def test_a_trial_with_the_real_compiler_trains_and_decides(tmp_path):
    """torch.compile in the loop: the trial switches between the compiled and the eager forward
    of one model (shared weights) and ends with a measured decision."""
    run = tmp_path / "run"
    assert main(["train", *QUIET, "--epochs", "1", "--batch_size", "32", "--compile", "auto", "--out", str(run)]) == 0
    result = json.loads((run / "result.json").read_text())
    assert result["compile_why"].startswith("auto: a compiled step ran"), result["compile_why"]
    assert result["test_acc"] > 0.3  # chance is 0.1: the switching trained one model
