"""One road for a run's data: `tiedmask eval` and `tiedmask analyze` see a trained run exactly
as training did (same images, adaptation, statistics and test-time augmentation)."""

import json

import pytest
import torch

from tiedmask.cli import main
from tiedmask.errors import ConfigError
from tiedmask.training.rundir import RunDir, load_trained
from tiedmask.training.settings import config_hash
from tiedmask.training.evaluate import evaluate

QUIET = ["--progress", "false", "--epochs", "1"]


def recorded_and_evaluated(capsys, run_dir) -> tuple[str, str]:
    acc = json.loads((run_dir / "result.json").read_text())["test_acc"]
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    printed = capsys.readouterr().out.split("test acc ")[1].split("%")[0]
    return f"{100 * acc:.2f}", printed


def analyzes(run_dir) -> bool:
    assert main(["analyze", str(run_dir), "--images", "40"]) == 0
    return (run_dir / "analysis" / "analysis.json").exists()


@pytest.mark.parametrize("extra", [
    ["--model", "tied-resnet-xs", "--width", "8", "--depth", "2", "--test_subset", "97",
     "--eval_tta", "flip"],
    ["--model", "tied-resnet-xs", "--width", "8", "--execution", "equilibrium", "--mask_scope", "same",
     "--deq.eval_iter", "6", "--deq.train_iter", "6", "--deq.backward_iter", "6"],
])
def test_eval_reproduces_training_on_plain_and_deq_runs(tmp_path, capsys, extra):
    run = tmp_path / "run"
    assert main(["train", "--data", "digits", *QUIET, *extra, "--out", str(run)]) == 0
    recorded, evaluated = recorded_and_evaluated(capsys, run)
    assert recorded == evaluated
    assert analyzes(run)


def test_eval_scores_with_other_test_time_views_on_request(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "digits", *QUIET, "--model", "tied-resnet-xs", "--width", "8",
                 "--depth", "2", "--out", str(run)]) == 0
    recorded, plain = recorded_and_evaluated(capsys, run)
    assert recorded == plain
    assert main(["eval", str(run), "--tta", "flip_translate"]) == 0
    printed = capsys.readouterr().out
    # the score of the model under six views, computed here from the checkpoint
    model, cfg, data = load_trained(run)
    cfg.eval_tta = "flip_translate"
    _, loss = evaluate(model, data.test_x, data.test_y, data.stats.tensors(), cfg, torch.device("cpu"))
    assert f"test loss {loss:.4f}" in printed and "test-time views: flip_translate" in printed
    assert main(["eval", str(run)]) == 0  # the run itself is untouched
    assert f"test acc {plain}%" in capsys.readouterr().out


def test_fine_tuned_runs_change_channels_and_size_and_still_evaluate(tmp_path, capsys, shared_data):
    """CIFAR-10 (3x32x32) -> Fashion-MNIST (1x28x28 grey, adapted to 3x32x32)."""
    pre = tmp_path / "pre"
    assert main(["train", "--data", "cifar10", "--data.root", str(shared_data), "--train_subset", "256",
                 "--test_subset", "64", "--model", "tied-vit-s", "--width", "16", "--depth", "2",
                 "--patch_size", "8", *QUIET, "--out", str(pre)]) == 0
    for method in ("full", "lora", "multimask_lora"):
        out = tmp_path / method
        assert main(["finetune", str(pre), "--method", method, "--data", "fashion_mnist",
                     "--data.root", str(shared_data), "--train_subset", "256", "--test_subset", "101",
                     *QUIET, "--out", str(out)]) == 0
        stats = json.loads((out / "data.json").read_text())
        assert (stats["channels"], stats["size"]) == (3, 32)  # grey 28x28 adapted to the model
        recorded, evaluated = recorded_and_evaluated(capsys, out)
        assert recorded == evaluated
        assert analyzes(out)


def test_result_config_hash_is_the_hash_of_the_saved_config(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", "digits", "--model", "tied-resnet-xs", "--width", "4", *QUIET,
                 "--out", str(run)]) == 0
    result = json.loads((run / "result.json").read_text())
    assert result["config_hash"] == config_hash(RunDir(run).read_config())


def test_runs_of_version_0_1_still_evaluate(tmp_path, capsys):
    """A config.json written before the settings had sections: flat mask/deq keys, and the
    input shape in the model section; no data.json (statistics are recomputed, as then)."""
    run = tmp_path / "run"
    assert main(["train", "--data", "digits", "--model", "tied-resnet-xs", "--width", "4",
                 "--mask_scope", "same", *QUIET, "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    masks = config["model"].pop("masks")
    deq = config["model"].pop("deq")
    config["model"].update({"mask_scope": masks["scope"], "density": masks["density"],
                            "mask_kind": masks["kind"], "mask_seed": masks["seed"], "nm_m": 4,
                            "deq_solver": deq["solver"], "deq_anderson_m": 5, "deq_damping": 1.0,
                            "in_channels": 1, "num_classes": 10, "image_size": 8})
    (run / "config.json").write_text(json.dumps(config))
    (run / "data.json").unlink()
    recorded, evaluated = recorded_and_evaluated(capsys, run)
    assert recorded == evaluated
    assert RunDir(run).read_config().model.masks.scope == "same"


def test_out_refuses_a_folder_that_is_not_a_run(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a tiedmask run"):
        RunDir.create(folder)
    assert (folder / "notes.txt").read_text() == "keep me"


def test_a_kill_during_the_first_checkpoint_resumes_cleanly(tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = ["train", "--data", "digits", "--model", "tied-resnet-xs", "--width", "4",
            "--progress", "false", "--epochs", "2", "--out", str(run)]

    def killed(self, *a, **k):
        (self.path / ".checkpoint-1.safetensors.tmp123").write_bytes(b"half a file")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(RunDir, "save_checkpoint", killed)
        assert main(args) == 130  # interrupted after epoch 1's metrics row, before its checkpoint
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert main(["train", "--resume", str(run)]) == 0
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not list(run.glob(".checkpoint-*"))  # the torn write was cleaned away


def test_resume_names_settings_changed_since_the_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "digits", "--model", "tied-resnet-xs", "--width", "4", *QUIET,
                 "--epochs", "2", "--out", str(run)]) == 0
    (run / "result.json").unlink()  # pretend it stopped after an epoch
    config = json.loads((run / "config.json").read_text())
    config["optim"]["lr"] = 0.5
    (run / "config.json").write_text(json.dumps(config))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "optim.lr: 0.003 -> 0.5" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing touched


def test_a_run_at_chance_accuracy_is_flagged():
    from tiedmask.training.train import chance_warning

    assert "chance" in chance_warning(0.10, 10) and "chance" in chance_warning(0.012, 100)
    assert chance_warning(0.16, 10) == "" and chance_warning(0.9, 2) == ""


def test_a_validation_split_is_held_out_of_training_and_the_test_set_is_untouched():
    from tiedmask.training.data import prepare_data
    from tiedmask.training.settings import DataConfig

    full = prepare_data(DataConfig(name="digits"))
    split = prepare_data(DataConfig(name="digits", val_split=200))
    assert split.eval_split == "val" and len(split.test_x) == 200
    assert len(split.train_x) == len(full.train_x) - 200
    rows = {bytes(x.numpy()) for x in split.train_x}
    assert not any(bytes(x.numpy()) in rows for x in split.test_x[:50] if (x > 0).any())
    with pytest.raises(ConfigError, match="val_split"):
        prepare_data(DataConfig(name="digits", val_split=10_000))


def test_coverage_rescale_of_multimask_lora():
    from tiedmask.core.lora import adapters
    from tiedmask.core.presets import create_model
    from tiedmask.training.finetune import attach_adapters
    from tiedmask.training.settings import load_config

    def scale(*extra):
        cfg = load_config(overrides=["--model", "tied-vit-s", "--width", "16", "--finetune.init_from", "x",
                                     "--finetune.method", "multimask_lora", "--finetune.rank", "4", *extra])
        model = attach_adapters(create_model("tied-vit-s", width=16), cfg)
        return next(iter(adapters(model).values())).scaling

    # 2 masks at density 0.5 cover B.A by 2 * 0.5^2 = 0.5 in expectation: the rescale doubles alpha.
    assert scale("--finetune.rescale", "true") == pytest.approx(2 * scale())
