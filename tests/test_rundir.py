"""One road for a run's data: `tiedmask eval` and `tiedmask analyze` see a trained run exactly
as training did (same images, adaptation, statistics and test-time augmentation)."""

import json

import pytest

from tiedmask.cli import main
from tiedmask.errors import ConfigError
from tiedmask.training.rundir import RunDir
from tiedmask.training.settings import config_hash

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
