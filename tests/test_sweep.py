import json
from pathlib import Path

import pytest
import yaml

from tiedmask.experiments.advise import advise
from tiedmask.cli import main
from tiedmask.errors import ConfigError, TiedmaskError
from tiedmask.experiments.runner import RUN_FIELDS
from tiedmask.experiments.store import ResultsStore
from tiedmask.experiments.sweep import grid_jobs, run_sweep
from tiedmask.training.settings import config_from_dict

BASE = {"model": {"name": "tied-resnet-xs", "width": 4}, "data": {"name": "digits"},
        "epochs": 1, "batch_size": 64}


def test_grid_is_the_cartesian_product_crossed_with_variants_and_seeds():
    jobs, _ = grid_jobs({"base": BASE, "grid": {"model.density": [0.25, 0.5], "model.depth": [1, 2]},
                         "variants": [{"label": "a"}, {"label": "b", "model.width": 8}], "seeds": [0, 1]})
    assert len(jobs) == 2 * 2 * 2 * 2
    widths = {j.variant.split(",")[0]: j.config["model"].get("width") for j in jobs}
    assert widths == {"a": 4, "b": 8}
    assert {(j.config["model"]["masks"]["density"], j.config["model"]["depth"]) for j in jobs} == {
        (0.25, 1), (0.25, 2), (0.5, 1), (0.5, 2)}


def test_a_grid_point_overrides_an_old_spelling_in_base():
    jobs, _ = grid_jobs({"base": {"data": "digits", "model": {"name": "tied-resnet-xs", "density": 0.5}},
                         "grid": {"model.masks.density": [0.25, 1.0]}})
    assert sorted(config_from_dict(j.config).model.masks.density for j in jobs) == [0.25, 1.0]


@pytest.mark.parametrize("spec,match", [
    ({"grid": {"model.density": 0.5}}, "non-empty lists"),
    ({"gird": {}}, "unknown grid key"),
    ({"grid": {"model.density": [2.0]}}, "outside"),
    ({"grid": {"model.colour": ["red"]}}, "unknown"),
    ({"base": {"model": {"execution": "equilibrium", "masks": {"scope": "same"}}},
      "grid": {"model.deq.stop_mode": ["sideways"]}}, "stop_mode"),
    ({"base": {"model": {"execution": "equilibrium", "masks": {"scope": "same"}}},
      "grid": {"model.deq.solver_options": [{"momentum": 0.5}]}}, "takes no option"),
    ({"reuse": "runs/other"}, "grid key reuse is 'runs/other'; it must be a list"),
    ({"seeds": [0, 0]}, "distinct whole numbers"),
    ({"seeds": "0 1"}, "grid key seeds"),
    ({"workers": 0}, "grid key workers is 0"),
    ({"timeout_s": -5}, "positive number of seconds"),
    ({"analyze": "yes"}, "true or false"),
    ({"variants": [{"label": 3}]}, "optional text label"),
    ({"launcher": "k8s"}, "local or slurm"),
    ({"base": [1, 2]}, "grid key base"),
])
def test_bad_grids_fail_before_anything_runs(spec, match):
    with pytest.raises(ConfigError, match=match):
        grid_jobs(spec)


def test_sweep_with_cka_then_report_and_advise(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": BASE, "grid": {"model.mask_scope": ["dense", "multi"]},
                                    "variants": [{"label": "d2", "model.depth": 2}], "analyze": True}))
    store = tmp_path / "store"
    records = run_sweep(grid, store, log=lambda *a: None)
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert all(0 <= r["cka_offdiag_mean"] <= 1.0 + 1e-6 for r in records)
    assert main(["report", str(store)]) == 0
    assert "mean off-diagonal CKA" in (store / "report.md").read_text()
    text = advise(10**6, stores=[store])
    best = max(records, key=lambda r: r["test_acc"])
    assert f"{100 * best['test_acc']:.2f}" in text.splitlines()[3] and best["config_hash"] in text
    with pytest.raises(TiedmaskError, match="no measured configuration fits"):
        advise(10, stores=[store])


def test_a_grid_reuses_another_stores_finished_run_of_the_same_config(tmp_path, monkeypatch):
    first = tmp_path / "first.yaml"
    # a grid axis, so the record carries the tag depth: 2
    first.write_text(yaml.safe_dump({"base": BASE, "grid": {"model.depth": [2]}}))
    run_sweep(first, tmp_path / "a", log=lambda *a: None)
    (original,) = ResultsStore(tmp_path / "a").records()
    original = {**original, "cka_offdiag_mean": 0.9}  # as the analyze step adds it
    ResultsStore(tmp_path / "a").append(original)
    trained = []
    import tiedmask.experiments.runner as runner
    real = runner._run_one
    monkeypatch.setattr(runner, "_run_one", lambda job, *rest: trained.append(job.variant) or real(job, *rest))
    second = tmp_path / "second.yaml"
    # a store that another grid has yet to fill: a warning (and checked again as each run starts)
    typo = tmp_path / "typo.yaml"
    (tmp_path / "afile").write_text("")
    typo.write_text(yaml.safe_dump({"base": BASE, "reuse": [str(tmp_path / "afile")]}))
    with pytest.raises(ConfigError, match="afile is a file, not a store folder"):
        run_sweep(typo, tmp_path / "b", log=lambda *a: None)
    assert not (tmp_path / "b").exists()
    second.write_text(yaml.safe_dump({
        "base": BASE, "reuse": [str(tmp_path / "missing"), str(tmp_path / "a")],
        "variants": [{"label": "depth-2", "model.depth": 2}, {"label": "depth-1", "model.depth": 1}]}))
    begun = tmp_path / "b" / "runs" / original["config_hash"]  # a run of its own this store had begun
    begun.mkdir(parents=True)
    (begun / "checkpoint.json").write_text("{}")
    (begun / "checkpoint-1.safetensors").write_bytes(b"partial")
    logged = []
    records = {r["variant"]: r for r in run_sweep(second, tmp_path / "b", log=logged.append)}
    assert trained == ["depth-1"]  # the shared config did not train again
    assert any("missing has no results.jsonl" in line for line in logged)
    reused = records["depth-2"]
    assert reused["config_hash"] == original["config_hash"] and reused["test_acc"] == original["test_acc"]
    assert reused["reused_from"] == str((tmp_path / "a").resolve())
    assert original["depth"] == 2 and "depth" not in reused  # the other grid's tags stay there
    assert {k: reused[k] for k in original if k in RUN_FIELDS} == {
        k: original[k] for k in original if k in RUN_FIELDS} and reused["cka_offdiag_mean"] == 0.9
    copied = ResultsStore(tmp_path / "b").run_dir_of(reused)
    source = ResultsStore(tmp_path / "a").run_dir_of(original)
    assert sorted(p.name for p in copied.iterdir() if p.name != ".claim") == sorted(
        p.name for p in source.iterdir() if p.name != ".claim")  # the partial run's files are gone
    assert (copied / "checkpoint.json").read_bytes() == (source / "checkpoint.json").read_bytes()
    assert [r["variant"] for r in ResultsStore(tmp_path / "a").records()] == ["depth=2"]  # source untouched
    run_sweep(second, tmp_path / "b", log=lambda *a: None)
    assert trained == ["depth-1"] and len(ResultsStore(tmp_path / "b").path.read_text().splitlines()) == 2


def test_advise_reads_the_shipped_results_or_says_what_is_missing(tmp_path):
    with pytest.raises(TiedmaskError, match="no results"):
        advise(10**6, stores=[tmp_path / "empty"])


def test_shipping_a_store_only_adds_its_finished_runs(tmp_path, monkeypatch):
    """What `paper_claims.py --ship` and `cifar10_guidelines.py` add to the shipped results:
    finished runs the file lacks, never a failed one, never a run twice, nothing taken out."""
    from tiedmask.experiments import advise as advise_module

    shipped = tmp_path / "package" / "measured_results.jsonl"
    shipped.parent.mkdir()
    kept = {"config_hash": "a1", "status": "ok", "test_acc": 0.5}
    shipped.write_text(json.dumps(kept) + "\n")
    monkeypatch.setattr(advise_module, "SHIPPED", shipped)
    store = ResultsStore(tmp_path / "store")
    for record in ({"config_hash": "a1", "status": "ok", "test_acc": 0.9},
                   {"config_hash": "b2", "status": "ok", "test_acc": 0.6},
                   {"config_hash": "c3", "status": "failed", "reason": "out of memory"}):
        store.append(record)
    assert advise_module.ship(store) == 1
    assert advise_module.ship(store) == 0
    lines = [json.loads(line) for line in shipped.read_text().splitlines()]
    assert [(r["config_hash"], r["test_acc"]) for r in lines] == [("a1", 0.5), ("b2", 0.6)]
    assert not (shipped.parent / ".lock").exists()


def test_the_shipped_results_hold_every_run_of_the_claims_table():
    """`tiedmask advise` ranks from the shipped store; every run behind docs/results.md §0
    (benchmarks/results/paper_claims.jsonl) must be in it, so a script that rewrites the
    shipped file from a failed or partial sweep shows up here."""
    from tiedmask.experiments.advise import SHIPPED, load_records

    root = Path(__file__).resolve().parents[1]
    shipped = {r["config_hash"]: r for r in load_records([SHIPPED])}  # re-keyed as advise reads them
    claims = [json.loads(line) for line in (root / "benchmarks/results/paper_claims.jsonl").read_text().splitlines()]
    assert len(claims) >= 50
    missing = [(c["variant"], c["seed"]) for c in claims if c["config_hash"] not in shipped]
    assert not missing
    assert all(shipped[c["config_hash"]]["status"] == "ok" for c in claims)


def test_slurm_launcher_through_submitit(tmp_path):
    submitit = pytest.importorskip("submitit")
    from tiedmask.experiments.runner import Job
    from tiedmask.experiments.slurm import run_jobs_slurm

    assert submitit
    store = ResultsStore(tmp_path / "store")
    records = run_jobs_slurm([Job("tiny", {**BASE, "model": {**BASE["model"], "depth": 1}})], store, {},
                             log=lambda *a: None, cluster="debug")
    assert records[0]["status"] == "ok"
    assert json.loads((store.run_dir(records[0]["config_hash"]) / "result.json").read_text())["status"] == "ok"
    other = ResultsStore(tmp_path / "other")  # another grid's store takes the run rather than submit it
    (taken,) = run_jobs_slurm([Job("same", {**BASE, "model": {**BASE["model"], "depth": 1}})], other, {},
                              log=lambda *a: None, cluster="debug", reuse=[store])
    assert taken["variant"] == "same" and taken["test_acc"] == records[0]["test_acc"] and "reused_from" in taken
    assert not (other.root / "slurm").exists()  # nothing was submitted


def test_slurm_jobs_leave_a_run_that_another_sweep_holds(tmp_path):
    pytest.importorskip("submitit")
    from tiedmask.experiments.runner import Job, resolve_jobs
    from tiedmask.experiments.slurm import run_jobs_slurm

    store = ResultsStore(tmp_path / "store")
    job = Job("tiny", {**BASE, "model": {**BASE["model"], "depth": 1}})
    digest = resolve_jobs([job])[0][2]
    with store.claim(digest) as mine:  # as a local sweep training this config would
        assert mine
        records = run_jobs_slurm([job], store, {}, log=lambda *a: None, cluster="debug")
    assert records == [] and not (store.run_dir(digest) / "result.json").exists()


def test_analyze_command_writes_heatmaps_and_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--model", "tied-resnet-xs", "--width", "4", "--depth", "3",
                 "--epochs", "1", "--progress", "false", "--out", str(out)]) == 0
    assert main(["analyze", str(out), "--images", "64"]) == 0
    assert (out / "analysis" / "cka_stage0.png").exists()
    cka = json.loads((out / "analysis" / "analysis.json").read_text())["cka"][0]
    assert len(cka) == 3 and all(abs(cka[i][i] - 1) < 1e-6 for i in range(3))


def test_a_sweep_analyses_a_tied_library_model_run(tmp_path, capsys):
    """analyze: true on an hf: run (a Hugging Face ViT tied by `tie`): CKA between its tied
    positions lands in the store's record (it once found no stages and divided by zero)."""
    pytest.importorskip("transformers")
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "base": {"data": "digits", "epochs": 1, "progress": False, "batch_size": 64,
                 "model": {"name": "hf:vit", "args": {"hidden_size": 16, "num_hidden_layers": 3,
                                                     "num_attention_heads": 2, "intermediate_size": 32,
                                                     "patch_size": 4}}},
        "seeds": [0], "analyze": True, "workers": 1}))
    assert main(["sweep", str(grid), "--out", str(tmp_path / "store")]) == 0
    record = ResultsStore(tmp_path / "store").records()[0]
    assert record["status"] == "ok" and 0 < record["cka_offdiag_mean"] <= 1
    cka = json.loads((ResultsStore(tmp_path / "store").run_dir_of(record) / "analysis" / "analysis.json")
                     .read_text())["cka"]
    assert len(cka) == 1 and len(cka[0]) == 3  # one tied run of three positions


def test_advise_never_averages_one_setting_across_budgets_or_training_regimes(tmp_path):
    store = ResultsStore(tmp_path / "store")
    model = {"name": "tied-resnet-xs", "width": 8, "depth": 2}
    for epochs, acc, digest in ((2, 0.50, "a"), (8, 0.90, "b")):
        store.append({"config_hash": digest, "status": "ok", "params": 1000, "macs_effective": 10,
                      "test_acc": acc, "config": {"model": model, "data": {"name": "digits"}, "epochs": epochs}})
    store.append({"config_hash": "c", "status": "ok", "params": 1000, "macs_effective": 10, "test_acc": 0.70,
                  "config": {"model": model, "data": {"name": "digits", "augment": "crop_altflip"},
                             "epochs": 8, "optim": {"lookahead_every": 5, "muon_lr": 0.0}}})
    store.append({"config_hash": "d", "status": "ok", "params": 1000, "macs_effective": 10, "test_acc": 0.99,
                  "config": {"model": model, "data": {"name": "digits"}, "epochs": 8,
                             "finetune": {"method": "lora"}}})  # an adapter's run, not advise's
    store.append({"config_hash": "e", "status": "ok", "params": 1000, "macs_effective": 10, "test_acc": 0.98,
                  "config": {"model": model, "data": {"name": "digits"}, "epochs": 8,
                             "finetune": {"method": "full", "init_from": "runs/base"}}})  # nor a full fine-tune
    text = advise(10**6, stores=[store.root])
    assert "3 measured runs fit" in text and "99.00" not in text and "98.00" not in text
    assert "90.00 ± 0.00% on digits (all training images, 8 epochs)" in text
    assert "50.00 ± 0.00% on digits (all training images, 2 epochs)" in text
    assert "70.00 ± 0.00% on digits (all training images, 8 epochs, data.augment crop_altflip, optim.lookahead_every 5)" in text


def test_plan_says_what_a_sweep_would_do_and_changes_nothing(tmp_path, capsys):
    import fcntl
    import os

    from tiedmask.experiments.runner import resolve_jobs
    from tiedmask.training.settings import read_yaml

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": BASE, "reuse": [str(tmp_path / "other")],
                                    "variants": [{"label": f"d{d}", "model.depth": d} for d in range(1, 7)]}))
    digest = {job.variant: d for job, _, d in resolve_jobs(grid_jobs(read_yaml(grid))[0])}
    store, other = ResultsStore(tmp_path / "store"), ResultsStore(tmp_path / "other")
    store.append({"config_hash": digest["d1"], "status": "ok"})
    other.append({"config_hash": digest["d2"], "status": "diverged"})  # finished too
    store.append({"config_hash": digest["d5"], "status": "failed", "reason": "killed (out of memory)"})
    store.append({"config_hash": digest["d3"], "status": "failed", "reason": "timed out after 60s"})
    other.append({"config_hash": digest["d6"], "status": "ok"})  # held here wins over reusable
    begun = store.run_dir(digest["d3"])
    begun.mkdir(parents=True)
    (begun / "config.json").write_text("{}")
    (begun / "checkpoint.json").write_text(json.dumps({"epoch": 2, "config_hash": "abc123",
                                                        "tensor_file": "checkpoint-2.safetensors"}))
    held = store.run_dir(digest["d6"])
    held.mkdir(parents=True)
    lock = os.open(held / ".claim", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a running sweep holds it
    snapshot = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    paths = set(tmp_path.rglob("*"))
    try:
        assert main(["sweep", str(grid), "--out", str(store.root), "--plan"]) == 0
    finally:
        os.close(lock)
    lines = capsys.readouterr().out.splitlines()
    plan = {line.split()[0]: line.split(None, 4)[4] for line in lines[:-1]}
    assert plan == {"d1": "finished", "d2": f"reuse {other.root}",
                    "d3": "resume after epoch 2 (last attempt failed: timed out after 60s)",
                    "d4": "run", "d5": "run (last attempt failed: killed (out of memory))",
                    "d6": "running now (another process holds it)"}
    assert lines[-1] == "6 runs: 2 finished or reusable, 1 running elsewhere, 3 to train"
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == snapshot
    assert set(tmp_path.rglob("*")) == paths  # no folder or claim file made for the other runs


def test_a_sweep_can_run_some_variants_first(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": BASE, "seeds": [0, 1],
                                    "variants": [{"label": f"d{d}", "model.depth": d} for d in (1, 2, 3)]}))
    assert main(["sweep", str(grid), "--out", str(tmp_path / "s"), "--plan", "--variants", "d3", "d1"]) == 0
    planned = [line.split()[:3] for line in capsys.readouterr().out.splitlines()[:-1]]
    assert planned == [["d1", "seed", "0"], ["d3", "seed", "0"], ["d1", "seed", "1"], ["d3", "seed", "1"]]
    assert main(["sweep", str(grid), "--out", str(tmp_path / "s"), "--plan", "--variants", "d9"]) == 2
    assert "no variant 'd9'" in capsys.readouterr().err
