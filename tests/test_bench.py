import json
import sys
import tempfile
from pathlib import Path

import pytest

from tiedmask.experiments.bench import VARIANTS, bench_jobs, write_bench_report
from tiedmask.training.settings import config_from_dict, config_hash
from tiedmask.core.backbones import count_params
from tiedmask.core.presets import build_model, resolve_model
from tiedmask.errors import ConfigError
from tiedmask.experiments.report import markdown_table, summarize
from tiedmask.experiments.runner import Job, run_jobs
from tiedmask.experiments.store import ResultsStore

TINY = {"model": {"name": "tied-resnet-xs", "width": 4, "depth": 1}, "data": {"name": "digits"},
        "epochs": 1, "batch_size": 64}


def test_bench_variants_share_parameters_and_differ_only_in_execution():
    jobs = bench_jobs("cifar10", seeds=[0], budgets=("epochs",))
    assert [j.variant for j in jobs] == list(VARIANTS)
    models = {j.variant: resolve_model(j.config["model"]).config for j in jobs}
    for m in models.values():
        assert (m.name, m.width, m.depth, m.masks.density) == ("tied-resnet-s", 16, 4, 0.5)
    counts = {v: count_params(build_model(m)) for v, m in models.items()}
    assert len({c for v, c in counts.items() if v != "untied"}) == 1
    # Untied: the same network with its own cell per application, depth times the cell's weights.
    cells = sum(count_params(r.cells[0]) for r in build_model(models["untied"]).runners())
    assert counts["untied"] - counts["tied-dense"] == (4 - 1) * cells


def test_equal_time_budget_lets_the_clock_end_runs():
    jobs = bench_jobs("demo", seeds=[0], budgets=("time",), time_budget_s=5)
    assert all(j.config["time_budget_s"] == 5 and j.config["epochs"] >= 50 for j in jobs)


def test_bad_bench_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="unknown bench preset"):
        bench_jobs("imagenet-9000")
    with pytest.raises(ConfigError, match="unknown variant"):
        bench_jobs("demo", variants=["tied-best"])


def test_runner_records_ok_failed_and_diverged_and_skips_finished(tmp_path):
    store = ResultsStore(tmp_path / "store")
    ok = Job("ok", TINY)
    failing = Job("no-data", {**TINY, "data": {"name": "cifar10", "root": str(tmp_path / "none")}})
    diverging = Job("diverging", {**TINY, "optim": {"name": "sgd", "lr": 1e12}})
    records = {r["variant"]: r for r in run_jobs([ok, failing, diverging], store, log=lambda *a: None)}
    assert records["ok"]["status"] == "ok" and 0 <= records["ok"]["test_acc"] <= 1
    assert records["no-data"]["status"] == "failed" and "not found" in records["no-data"]["reason"]
    assert records["diverging"]["status"] == "diverged" and "non-finite" in records["diverging"]["reason"]
    assert records["ok"]["config_hash"] == config_hash(config_from_dict(TINY))

    lines = []
    run_jobs([ok, diverging], store, log=lines.append)
    assert "2 finished, 0 to run" in lines[0]


def test_summarize_gives_mean_and_sample_std_per_group():
    records = [{"variant": "a", "status": "ok", "test_acc": v, "params": 10} for v in (0.2, 0.4, 0.6)]
    records.append({"variant": "a", "status": "failed", "reason": "boom"})
    (row,) = summarize(records, by=("variant",))
    assert row["n"] == 3 and row["failed"] == 1 and row["reasons"] == ["boom"]
    assert row["test_acc"] == pytest.approx((0.4, 0.2))
    assert "| a | 10 | 3 (+1 failed) | 40.00 ± 20.00 |" in markdown_table([row], ("variant",), ("test_acc",))


def test_bench_report_writes_markdown_and_plots(tmp_path):
    records = [{"variant": v, "budget": "equal-epochs", "status": "ok", "test_acc": 0.5 + 0.1 * i,
                "s_per_epoch": 1.0 + i, "params": 5, "seed": s}
               for i, v in enumerate(["tied-multi", "deq-anderson-implicit"]) for s in (0, 1)]
    report = write_bench_report(records, tmp_path, "t")
    assert "deq-anderson-implicit over tied-multi: **2.00x**" in report
    assert (tmp_path / "report.md").exists() and (tmp_path / "acc_epochs.png").exists()


def test_store_survives_new_config_fields(tmp_path):
    """A record written before a field existed is found under today's hash of its config."""
    import json

    store = ResultsStore(tmp_path)
    old_config = {"model": {"name": "tied-resnet-xs", "width": 4}, "data": {"name": "digits"}, "epochs": 1}
    store.append({"variant": "v", "status": "ok", "config": old_config, "config_hash": "old-hash"})
    (record,) = store.records()
    assert record["config_hash"] == config_hash(config_from_dict(old_config))
    assert store.run_dir_of(record) == tmp_path / "runs" / "old-hash"
    assert json.loads(store.path.read_text())["config_hash"] == "old-hash"  # the file is untouched


def test_time_budget_reports_say_what_the_runs_did():
    """One run: its number alone (no '± 0.00'); passes over the data as trained, fractional;
    variants whose throughput differs several-fold at equal time are flagged."""
    records = [{"variant": "tied-multi", "budget": "equal-time-60s", "status": "ok", "test_acc": 0.6,
                "img_per_s": 100.0, "epochs": 3, "data_epochs": 2.4, "params": 5, "seed": 0},
               {"variant": "deq-anderson-implicit", "budget": "equal-time-60s", "status": "ok", "test_acc": 0.4,
                "img_per_s": 10.0, "epochs": 1, "data_epochs": 0.3, "params": 5, "seed": 0}]
    report = write_bench_report(records, Path(tempfile.mkdtemp()), "t")
    assert "± 0.00" not in report and "60.00" in report
    assert "2.40" in report and "0.30" in report
    assert "flag: in equal-time-60s, tied-multi trained 10.0x as many img/s as deq-anderson-implicit" in report


def test_a_clock_that_stops_an_epoch_counts_the_part_it_trained(tmp_path):
    from tiedmask.training.settings import load_config
    from tiedmask.training.train import train

    cfg = load_config(overrides=["--data", "digits", "--model", "tied-resnet-xs", "--width", "4", "--depth", "1",
                                 "--epochs", "50", "--time_budget_s", "0.5", "--progress", "false",
                                 "--precision", "fp32", "--batch_size", "32"])
    result = train(cfg, log=lambda *_: None)
    assert 0 < result.data_epochs <= result.epochs
    assert result.s_per_epoch == pytest.approx(result.train_time_s / result.data_epochs)


def test_a_sweep_of_language_models_reports_perplexity(tmp_path):
    from tiedmask.experiments.report import write_sweep_report

    records = [{"variant": v, "task": "lm", "status": "ok", "test_ppl": ppl, "val_ppl": ppl + 1, "test_acc": 0.3,
                "tokens_per_s": 1000.0, "params": 7, "seed": s}
               for v, base in (("tied", 20.0), ("untied", 30.0)) for s, ppl in ((0, base), (1, base + 2))]
    report = write_sweep_report(records, tmp_path, "lm")
    assert "test perplexity" in report and "21.00 ± 1.41" in report and "31.00 ± 1.41" in report
    assert (tmp_path / "ppl_by_variant.png").exists()


def benchmark_script(name: str):
    """A script of benchmarks/ as a module (its sibling scripts importable while it loads)."""
    import importlib.util

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def test_the_pareto_front_keeps_the_points_no_smaller_model_beats():
    """benchmarks/cifar10_pareto.py: a point is on the front unless another stores at most as many
    parameters and is more accurate; a beaten point names its best such rival."""
    pareto = benchmark_script("cifar10_pareto")
    found = [{"variant": v, "width": w, "params": n, "mean": a} for v, w, n, a in
             [("tied", 56, 900, 92.9), ("untied", 43, 880, 93.2), ("untied", 24, 300, 91.0),
              ("tied", 24, 310, 91.5), ("tied", 16, 150, 89.0)]]
    pareto.front(found)
    assert [p["on_front"] for p in found] == [False, True, True, True, True]
    assert found[0]["beaten_by"] == "untied w43"


def test_compiling_pays_after_the_time_its_faster_steps_make_up_the_compilation():
    """benchmarks/throughput.py: by time T a compiled run has done (T - c) / s_c steps and an eager
    one T / s_e; they are level at T = c / (1 - s_c / s_e). Checked by counting steps."""
    pays_after = benchmark_script("throughput").pays_after
    compile_s, eager, compiled = 60.0, 1.0, 0.5
    level = pays_after(compile_s, eager, compiled)
    assert level == pytest.approx(120.0)
    assert (level - compile_s) / compiled == pytest.approx(level / eager)  # equal step counts there
    assert pays_after(compile_s, eager, 1.0) is None and pays_after(compile_s, eager, 1.2) is None


def test_the_peaks_convolution_computes_the_same_product_as_the_matmul():
    """MFU's peak is the faster of `a @ b` and a 1x1 convolution counted as the same 2n^3 FLOPs:
    the convolution must compute that product (checked against the matmul)."""
    import torch

    a, b = torch.randn(128, 128, dtype=torch.float64), torch.randn(128, 128, dtype=torch.float64)
    pixels, kernel = benchmark_script("throughput").as_convolution(a, b)
    out = torch.nn.functional.conv2d(pixels, kernel)
    assert torch.allclose(out.reshape(128, 128).t(), a @ b)


def test_throughput_writes_its_table_without_compile_or_bf16(tmp_path, monkeypatch, capsys):
    """The script's own path with the timing stubbed out: a run without --compile once raised
    UnboundLocalError (an import inside main shadowed `torch`)."""
    script = benchmark_script("throughput")
    row = {"model": "tied-fast", "scope": "multi", "layout": "fast", "params": 1, "mflops_effective": 1.0,
           "mflops_dense": 2.0, "train_img_s": 10.0, "infer_img_s": 20.0, "train_gflops_s": 0.03}
    monkeypatch.setattr(script, "measure", lambda name, layouts, compile: [
        {**row, "scope": scope, "layout": layout} for scope in ("dense", "multi", "multi/channel")
        for layout in ("fast", *layouts)])
    monkeypatch.setattr(script, "peak_gflops", lambda n=2048, dtype=None: {"matmul": 1.0, "conv1x1": 2.0})
    out = tmp_path / "t.json"
    monkeypatch.setattr(sys, "argv", ["throughput.py", "--models", "tied-fast", "--bf16", "off", "--out", str(out)])
    script.main()
    written = json.loads(out.read_text())
    assert written["rows"][0]["model"] == "tied-fast" and written["peak_gflops"] == {"fp32": 2.0, "bf16": 2.0}
    assert written["rows"][0]["mfu_effective"] == pytest.approx(0.03 / 2.0)  # against the better product
