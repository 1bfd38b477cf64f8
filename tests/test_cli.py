import json
import subprocess
import sys

import pytest

from tiedmask.cli import main

QUICK = ["--data", "digits", "--model", "tied-resnet-xs", "--width", "8", "--depth", "1",
         "--epochs", "1", "--progress", "false"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv,words", [
    (["train", "--model", "resnet9000"], "unknown model"),
    (["train", "--model.colour", "red"], "unknown"),
    (["train", "--density", "1.5"], "outside (0, 1]"),
    (["train", "--density", "0"], "outside (0, 1]"),
    (["train", "--depth", "0"], "depth must be an integer >= 1"),
    (["train", "--data", "cifar10", "--data.root", "/nonexistent/place", "--epochs", "1"], "--data.root"),
    (["train", "missing.yaml"], "does not exist"),
    (["train", "--resume", "/nonexistent/run"], "no run to resume"),
    (["info", "--mask_kind", "dots"], "unknown mask kind"),
])
def test_bad_input_is_one_error_line(capsys, argv, words):
    code, _, err = run_cli(capsys, *argv)
    assert code != 0
    assert err.startswith("error: ") and words in err and err.count("\n") == 1
    assert "Traceback" not in err


def test_corrupt_data_directory(capsys, tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x02garbage")
    code, _, err = run_cli(capsys, "train", "--data.root", str(tmp_path), "--epochs", "1")
    assert code == 2 and err.startswith("error: ") and "re-download" in err


def test_unwritable_output_directory(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "train", *QUICK, "--out", str(blocker / "run"))
    assert code == 2 and err.startswith("error: cannot write") and "--out" in err


def test_an_existing_run_is_not_overwritten(capsys, tmp_path):
    out = tmp_path / "run"
    assert run_cli(capsys, "train", *QUICK, "--out", str(out))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run_cli(capsys, "train", *QUICK, "--out", str(out))
    assert code == 2 and "--resume" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_train_eval_and_info_commands(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "train", *QUICK, "--out", str(out))
    assert code == 0 and "test acc" in stdout
    acc = json.loads((out / "result.json").read_text())["test_acc"]
    code, stdout, _ = run_cli(capsys, "eval", str(out))
    assert code == 0 and f"{acc:.2%}" in stdout  # eval reproduces the recorded accuracy
    code, stdout, _ = run_cli(capsys, "info", "--model", "tied-resnet-s", "--mask_scope", "multi")
    assert code == 0 and "parameters" in stdout and "mean overlap" in stdout
    code, stdout, _ = run_cli(capsys, "models")
    assert code == 0 and "tied-resnet-s" in stdout


def test_console_entry_point_reports_errors_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "tiedmask.cli", "train", "--model", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown model") and "Traceback" not in proc.stderr


def test_the_help_lists_every_setting_in_its_section():
    """`tiedmask train --help` is the settings' reference: a key added to a section must be in it."""
    import re

    from tiedmask.cli import overrides_help
    from tiedmask.training.settings import TrainConfig
    from tiedmask.typed import nested_fields

    text = " ".join(overrides_help().split())
    listed = {section: set(keys.split()) for section, keys in re.findall(r"([\w.]+) \(([^)]*)\)", text)}
    top = set(text.split(", and ")[1].split(".")[0].split())
    for key, _ in nested_fields(TrainConfig):
        section, _, leaf = key.rpartition(".")
        assert leaf in (listed.get(section, set()) if section else top), key


def test_ctrl_c_in_a_sweep_names_the_sweep_command_to_continue(tmp_path, monkeypatch, capsys):
    from tiedmask.experiments import sweep

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_jobs", interrupted)
    grid = tmp_path / "grid.yaml"
    grid.write_text("base: {data: digits, model: tied-resnet-xs, epochs: 1}\nseeds: [0]\n")
    assert main(["sweep", str(grid), "--out", str(tmp_path / "store")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tiedmask sweep GRID --out STORE" in err[0] and "--resume" not in err[0]


def test_ctrl_c_after_the_command_finished_keeps_its_exit_code(monkeypatch):
    """The console entry: a Ctrl-C between the command's end and the exit ends it cleanly."""
    import signal

    from tiedmask import cli

    def finished_then_interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", finished_then_interrupted)
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.run()
        assert exit_info.value.code == 130
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
