import pytest

from tiedmask.training.settings import config_from_dict, config_hash, load_config, parse_overrides
from tiedmask.errors import ConfigError


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name: tied-resnet-deep\n  density: 0.25\nepochs: 3\n")
    cfg = load_config(path, ["--model.density", "0.75", "--lr=1e-3"])
    assert cfg.model.name == "tied-resnet-deep" and cfg.model.width == 24  # preset filled in
    assert cfg.model.masks.density == 0.75 and cfg.optim.lr == 1e-3 and cfg.epochs == 3


@pytest.mark.parametrize("args,match", [
    (["--model.colour", "red"], "unknown"),
    (["--model", "resnet9000"], "unknown model"),
    (["--depth", "0"], ">= 1"),
    (["--depth", "two"], "integer"),
    (["--density", "1.5"], "outside"),
    (["--epochs"], "needs a value"),
    (["depth", "3"], "expected an override"),
    (["--precision", "fp8"], "not one of"),
])
def test_bad_overrides_are_errors(args, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=args)


def test_yaml_is_read_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("!!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_override_values_are_typed():
    assert parse_overrides(["--model.checkpointing", "true", "--epochs", "4"]) == {
        "model": {"checkpointing": True}, "epochs": 4}


def test_shared_leaf_names_mean_the_model_setting():
    cfg = load_config(overrides=["--density", "0.25", "--finetune.density", "0.75", "--name", "tied-resnet-xs"])
    assert cfg.model.masks.density == 0.25 and cfg.finetune.density == 0.75 and cfg.model.name == "tied-resnet-xs"


def test_old_and_new_spellings_mix_in_files_overrides_and_grids(tmp_path):
    from tiedmask.experiments.sweep import grid_jobs

    path = tmp_path / "old.yaml"
    path.write_text("model:\n  name: tied-resnet-s\n  execution: equilibrium\n  mask_scope: same\n"
                    "  deq_damping: 0.5\n")
    cfg = load_config(path, ["--deq_solver", "fixed_point", "--deq_anderson_m", "3"])
    assert cfg.model.deq.solver == "fixed_point" and cfg.model.deq.solver_options == {"damping": 0.5}
    jobs, _ = grid_jobs({"base": {"model": {"masks": {"density": 0.5}}}, "grid": {"model.density": [0.25, 1.0]}})
    assert [j.config["model"]["masks"]["density"] for j in jobs] == [0.25, 1.0]


def test_solver_options_are_typed_like_the_solvers_defaults():
    cfg = load_config(overrides=["--execution", "equilibrium", "--masks.scope", "same",
                                 "--deq.solver_options", "{lam: 1e-4, m: 3}"])
    assert cfg.model.deq.solver_options == {"lam": 1e-4, "m": 3}
    with pytest.raises(ConfigError, match="solver_options.m must be an integer"):
        load_config(overrides=["--execution", "equilibrium", "--masks.scope", "same",
                               "--deq.solver_options", "{m: 2.5}"])


def test_moving_the_data_keeps_the_config_hash():
    a = load_config(overrides=["--data.root", "/one/place"])
    b = load_config(overrides=["--data.root", "/another", "--threads", "1"])
    assert config_hash(a) == config_hash(b) != config_hash(load_config(overrides=["--seed", "1"]))


def test_old_spellings_are_read_once_where_settings_are_read_and_the_core_takes_todays_only():
    """training/migrate.py's table: every 0.1 flat key gives the hash of today's spelling; the
    core's `create_model` refuses the old keyword."""
    from tiedmask.core.presets import create_model
    from tiedmask.errors import ConfigError
    from tiedmask.training.migrate import MODEL_KEY_ALIASES

    values = {"mask_kind": "nm", "mask_scope": "same", "density": 0.5, "mask_seed": 3, "nm_m": 4,
              "deq_solver": "broyden", "deq_grad": "phantom", "deq_train_iter": 7, "deq_eval_iter": 8,
              "deq_backward_iter": 9, "deq_tol": 1e-4, "deq_stop_mode": "abs", "deq_phantom_steps": 3,
              "deq_phantom_tau": 0.4, "deq_jac_reg": 0.1}
    assert set(values) == set(MODEL_KEY_ALIASES)
    today: dict = {}
    for old, value in values.items():
        section, key = MODEL_KEY_ALIASES[old].split(".")
        today.setdefault(section, {})[key] = value
    old_cfg = config_from_dict({"model": {"name": "tied-resnet-s", **values}})
    new_cfg = config_from_dict({"model": {"name": "tied-resnet-s", **today}})
    assert config_hash(old_cfg) == config_hash(new_cfg)
    with pytest.raises(ConfigError):
        create_model("tied-resnet-s", mask_scope="same")


@pytest.mark.parametrize("old, new, first, second", [("mask_scope", "masks.scope", "same", "multi"),
                                                      ("density", "masks.density", 0.3, 0.5)])
def test_a_setting_under_its_old_and_new_spelling_with_different_values_is_refused(tmp_path, old, new, first, second):
    """One setting given twice (0.1's flat key and today's) never lets one win silently: refused
    where they differ, in a config file and on the command line; equal values are one request."""
    path = tmp_path / "config.yaml"
    section, key = new.split(".")
    path.write_text(f"model: {{{old}: {first}, {section}: {{{key}: {second}}}}}\n")
    with pytest.raises(ConfigError, match=f"model.{new}"):
        load_config(path)
    with pytest.raises(ConfigError, match=f"model.{new}"):
        load_config(overrides=[f"--model.{old}", str(first), f"--model.{new}", str(second)])
    same = load_config(overrides=[f"--model.{old}", str(first), f"--model.{new}", str(first)])
    assert getattr(getattr(same.model, section), key) == first


def test_committed_runs_hash_today_as_they_were_trained():
    """Behaviour kept through refactors: every run folder kept in git (the race's, the compile
    runs') has a config that today's code reads and hashes to the hash its result was written
    under, so a refactor that changed a default, a key or the hash itself fails here."""
    import json
    from pathlib import Path

    import subprocess

    root = Path(__file__).resolve().parents[1]
    listed = subprocess.run(["git", "ls-files", "benchmarks/results"], cwd=root, capture_output=True, text=True)
    if listed.returncode:  # not a git checkout (an unpacked sdist): every folder there
        kept = sorted((root / "benchmarks" / "results").rglob("result.json"))
    else:  # the runs git keeps, not a local store's ignored run folders
        kept = [root / p for p in listed.stdout.split() if p.endswith("/result.json")]
    assert len(kept) >= 20  # the race's runs (benchmarks/results/cifar10_fast_runs) and others
    changed = [str(r.parent) for r in kept
               if config_hash(config_from_dict(json.loads((r.parent / "config.json").read_text())))
               != json.loads(r.read_text())["config_hash"]]
    assert changed == []
