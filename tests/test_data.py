import gzip
import pickle

import numpy as np
import pytest
import torch

from tiedmask.training.data import alternating_flips, augment, channel_stats
from tiedmask.training.datasets import load_dataset, read_pickle
from tiedmask.errors import ConfigError, DataError


def test_cifar10_from_the_shared_directory(shared_data):
    ds = load_dataset("cifar10", shared_data)
    assert ds.train_x.shape == (50000, 3, 32, 32) and ds.test_x.shape == (10000, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8
    assert torch.bincount(ds.train_y).tolist() == [5000] * 10
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10
    mean, _ = channel_stats(ds.train_x)  # published CIFAR-10 channel means
    assert mean.tolist() == pytest.approx([0.4914, 0.4822, 0.4465], abs=1e-3)


def test_fashion_mnist_from_idx_files(shared_data):
    ds = load_dataset("fashion_mnist", shared_data)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10


def _write_cifar100(folder, n_train=20, n_test=10):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"fine_labels": list(rng.integers(0, 100, n)), b"coarse_labels": [0] * n}
        (folder / split).write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar100_in_the_official_format(tmp_path):
    _write_cifar100(tmp_path / "cifar-100-python")
    ds = load_dataset("cifar100", tmp_path)
    assert ds.num_classes == 100 and ds.train_x.shape == (20, 3, 32, 32) and len(ds.test_y) == 10


def test_cifar_pixel_layout_is_channel_major(tmp_path):
    _write_cifar100(tmp_path / "cifar-100-python", n_train=1)
    raw = read_pickle(tmp_path / "cifar-100-python" / "train")["data"][0]
    ds = load_dataset("cifar100", tmp_path)
    assert ds.train_x[0, 1, 2, 3].item() == raw[1024 + 2 * 32 + 3]  # R plane, then G, then B


def test_imagenet32_npz_batches_with_one_based_labels(tmp_path):
    folder = tmp_path / "imagenet32"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train_data_batch_1", 6), ("train_data_batch_2", 4), ("val_data", 5)):
        np.savez(folder / f"{name}.npz", data=rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 labels=np.array([1, 1000] + [5] * (n - 2)), mean=np.zeros(3072))
    ds = load_dataset("imagenet32", tmp_path)
    assert ds.train_x.shape == (10, 3, 32, 32) and ds.num_classes == 1000
    assert ds.train_y[:2].tolist() == [0, 999]


def test_hostile_pickle_is_refused_without_running(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "test").write_bytes(pickle.dumps({b"data": Evil()}))
    (folder / "train").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match="refusing"):
        load_dataset("cifar100", tmp_path)
    assert not marker.exists()


def test_missing_and_corrupt_directories_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="--data.root"):
        load_dataset("cifar10", tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="re-download"):
        load_dataset("cifar10", tmp_path)


def test_truncated_idx_file_is_a_data_error(tmp_path):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (folder / name).write_bytes(gzip.compress(b"\x00\x00\x08\x03\x00\x00\x00\x05"))
    with pytest.raises(DataError, match="idx"):
        load_dataset("fashion_mnist", tmp_path)


def test_augment_crops_are_windows_of_the_padded_image_and_flips_mirror():
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    gen = torch.Generator().manual_seed(0)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    out = augment(x, "crop_flip", gen)
    for i in range(2):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    assert torch.equal(augment(x, "none", gen), x)


def test_alternating_flips_mirror_each_image_in_exactly_one_of_two_epochs():
    first, second, third = (alternating_flips(1000, seed=3, epoch=e, device="cpu") for e in (1, 2, 3))
    assert torch.equal(first ^ second, torch.ones(1000, dtype=torch.bool))
    assert torch.equal(first, third)
    assert 400 < int(first.sum()) < 600
    assert not torch.equal(first, alternating_flips(1000, seed=4, epoch=1, device="cpu"))
    # crop_altflip mirrors exactly the images it is told to (the crops are random as before)
    x = torch.arange(4 * 8 * 8, dtype=torch.float32).view(4, 1, 8, 8)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    flips = torch.tensor([True, False, True, False])
    out = augment(x, "crop_altflip", torch.Generator().manual_seed(0), flips)
    for i in range(4):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i], w.flip(-1) if flips[i] else w) for w in windows)


def test_a_file_placed_by_hand_is_checked_and_used(tmp_path):
    import hashlib

    from tiedmask.training.datasets import obtain

    placed = tmp_path / "archive.tar.gz"
    placed.write_bytes(b"official bytes")
    good = hashlib.md5(b"official bytes").hexdigest()
    # Never touches the network: the placed file is used, or refused, before any download.
    assert obtain("http://127.0.0.1:9/none", placed, good, allow_download=True) == placed
    with pytest.raises(DataError, match="expected 0123"):
        obtain("http://127.0.0.1:9/none", placed, "0123" + good[4:], allow_download=True)
    assert obtain("http://127.0.0.1:9/none", tmp_path / "absent", good, allow_download=False) is None


def test_a_failed_download_names_the_file_to_place(tmp_path):
    from tiedmask.training.datasets import obtain

    dest = tmp_path / "cifar-10-python.tar.gz"
    with pytest.raises(DataError, match=f"by hand to {dest}"):
        obtain("http://127.0.0.1:9/none", dest, "0" * 32, allow_download=True)  # port 9: refused


def test_keeping_some_classes_relabels_them_in_the_order_given():
    from tiedmask.training.data import prepare_data
    from tiedmask.training.datasets import Dataset
    from tiedmask.training.settings import DataConfig

    y = torch.arange(20) % 10
    x = y.view(-1, 1, 1, 1).expand(-1, 1, 4, 4).to(torch.uint8).contiguous()  # each pixel = its label
    ds = Dataset("toy", x, y, x.clone(), y.clone(), 10, "crop")
    data = prepare_data(DataConfig(name="toy", classes=[7, 2]), dataset=ds)
    assert data.shape.classes == 2
    assert sorted(data.train_x[:, 0, 0, 0].tolist()) == [2, 2, 7, 7]  # only those images
    for images, labels in ((data.train_x, data.train_y), (data.test_x, data.test_y)):
        assert all({7: 0, 2: 1}[int(i)] == int(label) for i, label in zip(images[:, 0, 0, 0], labels))
    with pytest.raises(ConfigError, match=r"data.classes \[12\] are not among toy's 10 classes"):
        prepare_data(DataConfig(name="toy", classes=[1, 12]), dataset=ds)
