"""Every subcommand answers bad input with one `error:` line, exit code 2, no traceback, and
leaves what is already on disk as it was."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiedmask.cli import main

TINY = ["--data", "digits", "--model", "tied-resnet-xs", "--width", "4", "--depth", "1",
        "--epochs", "1", "--progress", "false"]
EQ = ["--execution", "equilibrium", "--mask_scope", "same"]


def _settings_cases():
    """train and info: one bad value per setting (range, type, finiteness, choice)."""
    bad = {
        "--density": ["1.5", "0", "-1", "nan", "abc"], "--depth": ["0", "-1", "2.5", "x"],
        "--width": ["0", "-3"], "--stages": ["0"], "--lr": ["0", "-1", "nan", "inf", "fast"],
        "--momentum": ["1.5", "-0.1"], "--weight_decay": ["-1"], "--label_smoothing": ["1", "-0.1"],
        "--warmup_epochs": ["-1"], "--grad_clip": ["-1"],
        "--optim.lookahead_every": ["-1", "2.5"], "--optim.lookahead_decay": ["1", "-0.5"], "--epochs": ["0", "1.5"],
        "--batch_size": ["0"], "--eval_batch_size": ["0"], "--time_budget_s": ["-1", "nan"],
        "--threads": ["-1"], "--device": ["tpu"], "--precision": ["fp8"], "--channels_last": ["maybe"],
        "--eval_tta": ["rotate"], "--optim.name": ["lion"], "--data.augment": ["mixup"],
        "--data.channels": ["2"], "--data.train_subset": ["-5"], "--data.image_size": ["-1"],
        "--data.val_split": ["-1"], "--data.classes": ["[1]", "[0, 0]", "[-1, 2]", "[a, b]", "[true, 1]"], "--finetune.method": ["qlora"], "--finetune.rank": ["0"],
        "--finetune.alpha": ["-1"], "--finetune.density": ["0", "1.5"], "--finetune.n_masks": ["0"],
        "--mask_kind": ["dots"], "--mask_scope": ["some"], "--masks.nm_m": ["0"],
        "--execution": ["sideways"], "--weight_norm": ["batch"], "--norm": ["bogus"],
        "--mlp_ratio": ["0"], "--heads": ["0"], "--seed": ["one"], "--progress": ["perhaps"],
    }
    for key, values in bad.items():
        for value in values:
            yield ["train", *TINY, key, value]
    deq = {"--deq.solver": "newton", "--deq.grad": "magic", "--deq.stop_mode": "sideways",
           "--deq.train_iter": "0", "--deq.phantom_tau": "0", "--deq.tol": "-1",
           "--deq.solver_options": "{q: 1}", "--deq_anderson_m": "2.5", "--deq.jac_reg": "-1"}
    for key, value in deq.items():
        yield ["train", *TINY, *EQ, key, value]
    for solver, options in (("anderson", "{m: 0}"), ("anderson", "{lam: -1}"), ("anderson", "{beta: 0}"),
                            ("broyden", "{memory: 0}"), ("fixed_point", "{damping: 1.5}")):  # out of range
        yield ["train", *TINY, *EQ, "--deq.solver", solver, "--deq.solver_options", options]
    yield ["train", *TINY, "--execution", "equilibrium", "--mask_scope", "multi"]
    yield ["train", *TINY, "--execution", "untied", "--mask_scope", "multi"]
    yield ["train", *TINY, "--data.classes", "[0, 99]"]  # known only once the data is loaded
    yield ["train", "--model", "tied-fast", "--cell", "transformer"]
    yield ["train", "--model", "tied-fast", *EQ]
    yield ["train", "--model", "tied-vit-s", "--stages", "2"]
    yield ["train", "--model", "tied-vit-s", "--heads", "5"]
    for key in ("--model.colour", "--colour", "--data.colour", "--optim.betas"):
        yield ["train", key, "red"]
    yield ["train", "--model", "resnet9000"]
    yield ["train", "--data", "imagenet9000"]
    yield ["train", "--depth"]  # no value
    yield ["train", "depth", "6", "--epochs", "1"]  # a bare word that is no file
    yield ["train", "--recipe", "fastest"]
    for key, value in (("--image-size", "0"), ("--image-size", "99999"), ("--channels", "0"),
                       ("--image-size", "x")):
        yield ["info", key, value]
    yield ["info", "--mask_kind", "dots"]
    yield ["info", "--model", "nope"]
    # models of other libraries and how they are tied
    vit = ["--model", "hf:vit", "--model.args", "{num_hidden_layers: 2, hidden_size: 16}"]
    for key, value in (("--model.tie.relax", "bogus"), ("--model.tie.init", "average"),
                       ("--model.tie.per_application", "heads"), ("--model.tie.relax_rank", "0"),
                       ("--model.tie.relax_density", "0"), ("--model.tie.blocks", "nothing.here"),
                       ("--model.tie.blocks", "vit.layers[::2]"), ("--model.args", "[1, 2]"),
                       ("--model.args.num_labels", "3"), ("--execution", "equilibrium")):
        yield ["info", *vit, key, value]
    yield ["info", "--model", "hf:nope"]
    yield ["info", "--model", "hf:vit", "--model.args", "{hidden_size: abc}"]  # transformers' own type check
    yield ["info", "--model", "pytorch:resnet"]
    yield ["info", "--model", "tied-fast", "--model.tie.relax", "lora"]
    yield ["train", "--data", "digits", "--model", "tied-fast", "--epochs", "1"]  # 8x8 images, 3 poolings
    yield ["info", *vit, "--model.tie.group", "4"]  # does not divide the 2 blocks
    yield ["info", *vit, "--model.tie.strategy", "spiral"]


CASES = list(_settings_cases())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with a finished run, an unfinished one, a results store and a foreign file."""
    root = tmp_path_factory.mktemp("bad_input")
    assert main(["train", *TINY, "--out", str(root / "run")]) == 0
    (root / "notes").mkdir()
    (root / "notes" / "mine.txt").write_text("keep me")
    (root / "store").mkdir()
    (root / "store" / "results.jsonl").write_text("")
    (root / "torn").mkdir()
    (root / "torn" / "results.jsonl").write_text('{"config_hash": "ab\n[1, 2]\n')  # no readable record
    (root / "grid_list.yaml").write_text("- 1\n- 2\n")
    (root / "grid_bad.yaml").write_text("grid: {model.density: 0.5}\n")
    (root / "grid_key.yaml").write_text("gird: {}\n")
    (root / "grid_value.yaml").write_text("grid: {model.density: [2.0]}\n")
    (root / "grid_yaml.yaml").write_text("grid: [unclosed\n")
    (root / "config_list.yaml").write_text("- a\n- b\n")
    (root / "config_key.yaml").write_text("model: {colour: red}\n")
    (root / "norun").mkdir()
    (root / "grid_ok.yaml").write_text("base: {data: digits, model: {name: tied-resnet-xs, width: 4, depth: 1}, "
                                       "epochs: 1}\n")
    (root / "afile").write_text("not a folder")
    (root / "config_twice.yaml").write_text("model: {name: tied-resnet-xs, mask_scope: same, masks: {scope: multi}}\n")
    (root / "config_deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    return root


def _run_cases(root: Path):
    run, notes, store = str(root / "run"), str(root / "notes"), str(root / "store")
    yield ["train", *TINY, "--out", run]  # a finished run is not overwritten
    yield ["train", *TINY, "--out", notes]  # a folder that is not a run
    yield ["train", *TINY, "--out", "/proc/tiedmask-no-write"]
    yield ["train", "--resume", run, "--epochs", "3"]
    yield ["train", "--resume", run, "--out", notes]
    yield ["train", "--resume", str(root / "absent")]
    yield ["train", "--resume", str(root / "norun")]
    yield ["train", "--recipe", "cifar10-fast", str(root / "config_key.yaml")]
    yield ["train", str(root / "config_list.yaml")]
    yield ["train", str(root / "config_key.yaml")]
    yield ["train", str(root / "grid_yaml.yaml")]
    yield ["info", str(root / "config_twice.yaml")]  # an old and a new spelling of one setting, two values
    yield ["train", str(root / "config_deep.yaml")]
    yield ["info", "--model", "tied-resnet-xs", "--mask_scope", "same", "--model.masks.scope", "multi"]
    yield ["info", "--model.args", "[" * 5000 + "]" * 5000]
    yield ["train", *TINY[2:], "--data", "cifar10", "--data.root", str(root / "absent")]
    yield ["eval", str(root / "absent")]
    yield ["eval", str(root / "norun")]
    yield ["eval", run, "--data", "cifar10"]
    yield ["eval", run, "--data-root", str(root / "absent"), "--data.channels", "3"]
    yield ["eval", run, "--tta", "rotate"]
    yield ["analyze", str(root / "absent")]
    yield ["analyze", run, "--images", "0"]
    yield ["analyze", run, "--images", "-1"]
    yield ["analyze", run, "--images", "x"]
    yield ["analyze", str(root / "norun")]
    yield ["finetune", str(root / "absent"), "--data", "digits"]
    yield ["finetune", run, "--method", "bogus"]
    yield ["finetune", run, "--finetune.rank", "0", "--out", str(root / "ft")]
    yield ["finetune", run, "--colour", "red", "--out", str(root / "ft")]
    for grid in ("grid_list", "grid_bad", "grid_key", "grid_value", "grid_yaml", "absent"):
        yield ["sweep", str(root / f"{grid}.yaml"), "--out", store]
    yield ["sweep", str(root / "grid_key.yaml")]  # no --out
    yield ["sweep", str(root / "grid_ok.yaml"), "--out", str(root / "afile")]  # outputs that cannot be written
    yield ["sweep", str(root / "grid_ok.yaml"), "--out", "/proc/tiedmask-no-write"]
    yield ["bench", "demo", "--out", str(root / "afile")]
    yield ["bench", "demo", "--out", "/proc/tiedmask-no-write"]
    yield ["bench", "imagenet-9000", "--out", store]
    yield ["bench", "demo", "--out", store, "--variants", "tied-best"]
    yield ["bench", "demo", "--out", store, "--budgets", "forever"]
    yield ["bench", "demo", "--out", store, "--seeds", "x"]
    yield ["bench", "demo"]
    yield ["report", str(root / "absent")]
    yield ["report", store]  # empty
    yield ["report", str(root / "torn")]  # damaged lines only
    yield ["advise", "--params", "nan"]
    yield ["advise", "--params", "-1"]
    yield ["advise", "--params", "0"]
    yield ["advise", "--params", "50000", "--flops", "-5"]
    yield ["advise", "--params", "lots"]
    yield ["advise"]
    yield ["advise", "--params", "50000", "--store", str(root / "absent")]
    yield ["demo", "--epochs", "0", "--out", str(root / "demo")]
    yield ["demo", "--out", "/proc/tiedmask-no-write"]
    yield ["models", "--extra"]
    yield ["nonsense"]
    yield []


RUN_CASES = list(_run_cases(Path("/ROOT")))


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _check(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("warning:")]
    assert code == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", CASES, ids=[" ".join(a[-2:]) for a in CASES])
def test_bad_settings(capsys, workdir, argv):
    before = snapshot(workdir)
    _check(capsys, argv)
    assert snapshot(workdir) == before


@pytest.mark.parametrize("index", range(len(RUN_CASES)), ids=[" ".join(a[:2]) for a in RUN_CASES])
def test_bad_commands_on_runs_stores_and_files(capsys, workdir, index):
    argv = [a.replace("/ROOT", str(workdir)) for a in RUN_CASES[index]]
    before = snapshot(workdir)
    _check(capsys, argv)
    assert snapshot(workdir) == before


def test_there_are_at_least_a_hundred_cases():
    assert len(CASES) + len(RUN_CASES) >= 100
    assert {a[0] for a in CASES + RUN_CASES if a} >= {
        "train", "info", "eval", "analyze", "finetune", "sweep", "bench", "report", "advise", "demo", "models"}


def _tracked_outputs(root: Path) -> dict:
    """The files the benchmark scripts write into the repository, and their bytes."""
    paths = [*(root / "benchmarks" / "results").rglob("*"), *(root / "benchmarks" / "grids").glob("*"),
             root / "docs" / "results.md", root / "src" / "tiedmask" / "resources" / "measured_results.jsonl"]
    return {p: p.read_bytes() for p in paths if p.is_file()}


@pytest.mark.parametrize("script", ["paper_claims.py", "claims_cka.py", "transfer_select.py", "precision_bf16.py",
                                    "lm_uptrain.py"])
def test_benchmark_scripts_answer_a_wrong_store_with_one_error_line(tmp_path, script):
    """The scripts that read stores (benchmarks/) fail like the CLI: one line, exit 2, and the
    files they keep in the repository untouched, even when the stores named before the wrong
    one are good (every store is checked before anything is written)."""
    root = Path(__file__).resolve().parents[1]
    good = tmp_path / "good"
    good.mkdir()
    (good / "results.jsonl").write_text(json.dumps({"config_hash": "0123", "status": "ok"}) + "\n")
    before = _tracked_outputs(root)
    stores = [str(tmp_path / "absent")] if script in ("transfer_select.py", "precision_bf16.py", "lm_uptrain.py") else [str(good), str(tmp_path / "absent")]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / script), *stores],
                          cwd=root, capture_output=True, text=True, timeout=120)
    lines = [x for x in proc.stderr.splitlines() if x.strip() and not x.startswith("warning:")]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "absent" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert _tracked_outputs(root) == before


@pytest.mark.parametrize("change, named", [("=", "KEY=VALUE"), ("optim.muon_lr=../x", "KEY=VALUE"),
                                           ("optim.no_such_key=1", "no_such_key"), ("seed=3", "seed"),
                                           ("optim.muon_lr=abc", "muon_lr")])
def test_fast_benchmark_refuses_a_bad_recipe_change_before_training(tmp_path, change, named):
    """`cifar10_fast.py --set` names folders and changes the recipe for every variant: a
    malformed one, an unknown key, a key the benchmark sets itself or a value of the wrong type
    is one `error:` line and exit code 2 before anything trains or is written."""
    root = Path(__file__).resolve().parents[1]
    before = _tracked_outputs(root)
    # a missing data folder and empty runs folder: were the change let through, training would stop at once
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "cifar10_fast.py"), "--minutes", "7",
                           "--data-root", str(tmp_path / "no-data"), "--runs", str(tmp_path / "runs"),
                           "--set", change], cwd=root, capture_output=True, text=True, timeout=120)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], proc.stderr
    assert _tracked_outputs(root) == before


def test_every_benchmark_script_answers_an_unknown_option_with_one_error_line():
    """A mistyped option to any script in benchmarks/ is one `error:` line and exit code 2, as
    in the CLI (not argparse's usage block), and `--help` is a usage text and exit code 0, both
    before the script measures or writes anything (a script without a parser used to start its
    sweeps on `--help`). One interpreter runs them all, so torch is imported once."""
    root = Path(__file__).resolve().parents[1]
    scripts = sorted((root / "benchmarks").glob("*.py"))
    driver = (
        "import contextlib, io, json, runpy, sys\n"
        f"sys.path.insert(0, {str(root / 'benchmarks')!r})\n"
        "answers = {}\n"
        "for path in sys.argv[1:]:\n"
        "    for option in ('--no-such-option', '--help'):\n"
        "        sys.argv = [path, option]\n"
        "        err, out = io.StringIO(), io.StringIO()\n"
        "        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):\n"
        "            try:\n"
        "                runpy.run_path(path, run_name='__main__')\n"
        "                code = 'ran'\n"
        "            except SystemExit as exc:\n"
        "                code = exc.code\n"
        "        answers[path + ' ' + option] = [code, err.getvalue(), out.getvalue()]\n"
        "print(json.dumps(answers))\n")
    before = _tracked_outputs(root)
    proc = subprocess.run([sys.executable, "-c", driver, *map(str, scripts)], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    answers = json.loads(proc.stdout.splitlines()[-1])
    assert len(answers) == 2 * len(scripts) >= 20
    for call, (code, stderr, stdout) in answers.items():
        if call.endswith("--help"):
            assert code == 0 and stdout.startswith("usage:"), (call, stdout[:200], stderr)
            continue
        lines = [x for x in stderr.splitlines() if x.strip()]
        assert code == 2, (call, stderr)
        # the unknown option, or first a missing positional argument: either way one line
        assert len(lines) == 1 and lines[0].startswith("error: ") and "--help" in lines[0], (call, stderr)
    assert _tracked_outputs(root) == before
