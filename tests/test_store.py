"""The results store under concurrent writers and damaged files; honest exit codes."""

import json
import subprocess
import sys

import yaml

from tiedmask.cli import main
from tiedmask.experiments.store import ResultsStore

BASE = {"model": {"name": "tied-resnet-xs", "width": 4, "depth": 1}, "data": {"name": "digits"},
        "epochs": 2, "batch_size": 256}


def test_two_sweeps_on_one_store_train_and_record_each_config_once(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": BASE, "grid": {"model.width": [4, 6]}, "seeds": [0, 1],
                                    "threads": 1}))
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "tiedmask.cli", "sweep", str(grid), "--out", str(store)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    lines = (store / "results.jsonl").read_text().splitlines()
    hashes = [json.loads(x)["config_hash"] for x in lines]
    assert len(hashes) == 4 and len(set(hashes)) == 4  # each config recorded once
    for digest in hashes:
        epochs = [json.loads(x)["epoch"] for x in (store / "runs" / digest / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [1, 2]  # trained once: no interleaved or repeated epochs


def test_a_damaged_line_is_reported_and_skipped(tmp_path, capsys):
    store = ResultsStore(tmp_path)
    store.append({"config_hash": "a" * 16, "status": "ok", "test_acc": 0.5, "variant": "v", "seed": 0})
    with open(store.path, "a") as f:
        f.write('{"config_hash": "torn", "stat\n\x00\x01garbage\n')
    store.append({"config_hash": "b" * 16, "status": "failed", "reason": "boom", "variant": "w", "seed": 1})
    warnings = []
    records = store.records(warn=warnings.append)
    assert [r["config_hash"][0] for r in records] == ["a", "b"]
    assert [w.split(" line ")[1].split()[0] for w in warnings] == ["2", "3"]
    assert main(["report", str(tmp_path)]) == 0  # report reads past the damage
    assert "line 2" in capsys.readouterr().err


def test_sweep_exits_nonzero_and_names_each_failure(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": {**BASE, "epochs": 1, "optim": {"name": "sgd", "lr": 1.0e12}},
                                    "seeds": [0], "threads": 1}))
    assert main(["sweep", str(grid), "--out", str(tmp_path / "store")]) == 1
    err = capsys.readouterr().err
    assert "seed 0: diverged: non-finite" in err
    assert "non-finite" in (tmp_path / "store" / "report.md").read_text()


def test_a_run_started_before_settings_were_added_is_resumed_from_its_folder(tmp_path):
    """Adding a setting (with a default) changes every config's hash; an interrupted run keeps
    the folder its version named, and the store must find it there rather than start over."""
    from tiedmask.training.settings import config_hash, config_to_dict, load_config

    cfg = load_config(overrides=["--data", "digits", "--model", "tied-resnet-xs"])
    old = config_to_dict(cfg)
    del old["optim"]["lookahead_every"], old["optim"]["lookahead_decay"]  # as written before they existed
    folder = tmp_path / "runs" / "0123456789abcdef"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(old))
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "config.json").write_text("{not json")
    store = ResultsStore(tmp_path)
    assert store.run_dir(config_hash(cfg)) == folder
    other = load_config(overrides=["--data", "digits", "--model", "tied-resnet-xs", "--seed", "5"])
    assert store.run_dir(config_hash(other)) == tmp_path / "runs" / config_hash(other)
