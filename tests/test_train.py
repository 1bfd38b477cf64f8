import importlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiedmask.training.settings import load_config
from tiedmask.training.datasets import load_dataset
from tiedmask.training.train import train
from tiedmask.training.trainer import Trainer, lr_at

QUICK = ["--data", "digits", "--model", "tied-resnet-xs", "--width", "8", "--depth", "2",
         "--batch_size", "64", "--progress", "false"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_training_learns_the_digits(digits):
    result = train(load_config(overrides=QUICK + ["--epochs", "4", "--lr", "1e-2"]), dataset=digits)
    assert result.status == "ok" and result.test_acc > 0.5  # chance is 0.1
    assert result.train_time_s > 0 and result.img_per_s > 0


def test_run_directory_contents(tmp_path, digits):
    out, handed = tmp_path / "run", []
    train(load_config(overrides=QUICK + ["--epochs", "2"]), out=out, dataset=digits, on_epoch=handed.append)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert handed == rows  # the caller's hook gets each epoch's row as the run directory keeps it
    result = json.loads((out / "result.json").read_text())
    assert {"test_acc", "params", "train_time_s", "img_per_s", "seed"} <= set(result)
    meta = json.loads((out / "checkpoint.json").read_text())
    tensors = load_file(out / meta["tensor_file"])
    assert any(k.startswith("optim.") for k in tensors)
    assert json.loads((out / "data.json").read_text())["channels"] == 1  # the shape it was built for


@pytest.mark.parametrize("extra, averaged", [
    ([], False),
    (["--optim.lookahead_every", "3", "--data.augment", "crop_altflip"], False),
    # evaluation changing BatchNorm statistics between epochs (as data-parallel averaging does)
    (["--optim.lookahead_every", "3", "--norm", "batch"], True),
    (["--optim.name", "sgd", "--optim.muon_lr", "0.02"], False),  # Muon state in the checkpoint
])
def test_resume_reaches_the_uninterrupted_result(tmp_path, digits, monkeypatch, extra, averaged):
    if averaged:
        def halve_statistics(self, model):
            for name, buffer in model.state_dict().items():
                if name.endswith("running_mean"):
                    buffer.mul_(0.5)

        monkeypatch.setattr(importlib.import_module("tiedmask.training.distributed").Dist,
                            "average_buffers", halve_statistics)
    cfg = load_config(overrides=QUICK + ["--epochs", "3", *extra])
    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg, out=full, dataset=digits)

    real_epoch, calls = Trainer.run_epoch, []

    def interrupted_in_epoch_two(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "run_epoch", interrupted_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=part, dataset=digits)
    monkeypatch.setattr(Trainer, "run_epoch", real_epoch)
    assert not (part / "result.json").exists()
    assert json.loads((part / "checkpoint.json").read_text())["epoch"] == 1

    train(cfg, out=part, resume=True, dataset=digits)
    a, b = (load_file(d / json.loads((d / "checkpoint.json").read_text())["tensor_file"])
            for d in (full, part))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (full, part))
    assert ra["test_acc"] == rb["test_acc"]
    assert len((part / "metrics.jsonl").read_text().splitlines()) == 3


def test_learning_rate_schedule_closed_form():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)  # half way through the cosine
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.0)


def test_a_run_failing_before_it_writes_anything_leaves_no_folder(tmp_path):
    from tiedmask.errors import TiedmaskError

    cfg = load_config(None, ["--data.name", "cifar10", "--data.root", str(tmp_path / "no-data"), "--epochs", "1"])
    with pytest.raises(TiedmaskError):
        train(cfg, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_lookahead_moves_the_slow_weights_part_of_the_way_every_k_steps():
    """Plain SGD on a loss with a constant gradient g: k steps move the weights by -k lr g, and
    each lookahead sync keeps (1 - decay) of that, so m syncs give w0 - m k (1 - decay) lr g.
    BatchNorm running statistics are averaged the same way."""
    from tiedmask.training.lookahead import Lookahead

    net = torch.nn.Sequential(torch.nn.Linear(3, 1, bias=False), torch.nn.BatchNorm1d(1))
    w0 = net[0].weight.detach().clone()
    g = torch.tensor([[1.0, -2.0, 0.5]])
    opt = torch.optim.SGD(net[0].parameters(), lr=0.1)
    avg = Lookahead(net, every=4, decay=0.75)
    for step in range(1, 13):
        opt.zero_grad()
        (net[0].weight * g).sum().backward()
        opt.step()
        with torch.no_grad():
            net[1].running_mean.add_(1.0)  # a statistic that grows by 1 a step
        avg.after_step(step)
    assert torch.allclose(net[0].weight, w0 - 3 * 4 * 0.25 * 0.1 * g)
    assert float(net[1].running_mean) == pytest.approx(3 * 4 * 0.25)


def test_the_whitening_bias_trains_for_its_epochs_then_stays(digits, monkeypatch):
    real_epoch, seen = Trainer.run_epoch, []

    def recording(self, *args, **kwargs):
        model = self.model
        if not seen:
            seen.append((model.whitening_bias().detach().clone(), model.head.weight.detach().clone()))
        stats = real_epoch(self, *args, **kwargs)
        seen.append((model.whitening_bias().detach().clone(), model.head.weight.detach().clone()))
        return stats

    monkeypatch.setattr(Trainer, "run_epoch", recording)
    overrides = ["--data", "digits", "--data.image_size", "32", "--model", "tied-fast", "--width", "8",
                 "--batch_size", "64", "--optim.name", "sgd", "--optim.lr", "0.05", "--epochs", "3",
                 "--optim.whiten_bias_epochs", "1", "--progress", "false"]
    train(load_config(overrides=overrides), dataset=digits)
    (b0, h0), (b1, h1), (b2, h2), (b3, h3) = seen
    assert not torch.equal(b0, b1)  # trained in epoch 1
    assert torch.equal(b1, b2) and torch.equal(b2, b3)  # then left alone (weight decay too)
    assert not torch.equal(h1, h2) and not torch.equal(h2, h3)  # while the rest trains on


def test_whitening_bias_epochs_without_a_whitening_stem_is_refused_with_the_config(digits):
    from tiedmask.core.presets import MODEL_PRESETS, create_model, resolve_model
    from tiedmask.errors import ConfigError

    for name in MODEL_PRESETS:  # what the config check reads agrees with the built model
        backbone = resolve_model({"name": name}).backbone
        assert backbone.has_whitening_stem == (create_model(name).whitening_bias() is not None), name
    with pytest.raises(ConfigError, match="whitening stem"):  # before any data is read
        load_config(overrides=QUICK + ["--epochs", "1", "--optim.whiten_bias_epochs", "2"])
    by_hand = load_config(overrides=QUICK + ["--epochs", "1"])
    by_hand.optim.whiten_bias_epochs = 2  # past the config check: train refuses it itself
    with pytest.raises(ConfigError, match="whitening stem"):
        train(by_hand, dataset=digits)


def test_scoring_every_other_epoch_trains_the_same_run(tmp_path, digits):
    from tiedmask.training.settings import config_hash

    every, sparse, last = (load_config(overrides=QUICK + ["--epochs", "3", "--eval_every", str(k)]) for k in (1, 2, 0))
    assert config_hash(every) == config_hash(sparse)  # a run-time key: stores skip either
    a = train(every, out=tmp_path / "a", dataset=digits)
    b = train(sparse, out=tmp_path / "b", dataset=digits)
    assert a.test_acc == b.test_acc and a.final_train_loss == b.final_train_loss
    scored = [json.loads(x)["test_acc"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert scored[0] is None and scored[1] is not None and scored[2] is not None  # epoch 2, and the last
    train(last, out=tmp_path / "c", dataset=digits)
    scored = [json.loads(x)["test_acc"] for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert scored[:2] == [None, None] and scored[2] == b.test_acc  # 0: only the last


def test_hardware_name_tells_apart_cpus_of_one_model_name():
    """Records name the vector instructions in use, read against the kernel's CPU flags: two
    machines both called "AMD EPYC" (one with AVX-512, one without) must not look alike."""
    from tiedmask.training.runtime import hardware_name

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists() or "ATEN_CPU_CAPABILITY" in os.environ:
        pytest.skip("needs Linux's /proc/cpuinfo and torch's own choice of kernels")
    flags = next((x.split(":", 1)[1].split() for x in cpuinfo.read_text().splitlines()
                  if x.startswith("flags")), [])
    name = hardware_name(torch.device("cpu"))
    assert f"({torch.backends.cpu.get_cpu_capability()}" in name
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags):  # what torch's AVX512 kernels need
        assert "(AVX512" in name
    elif {"avx2", "fma"} <= set(flags):
        assert "(AVX2" in name
    # bf16 instructions make `precision: auto` time bf16: named exactly where the kernel lists them
    assert ("AMX" in name) == ({"amx_bf16", "amx_tile"} <= set(flags))
    assert ("AVX512-BF16" in name) == ("avx512_bf16" in flags and "AMX" not in name)
    assert name.endswith(f"{torch.get_num_threads()} threads")
