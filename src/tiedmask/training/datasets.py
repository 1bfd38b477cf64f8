"""Datasets as whole uint8 tensors: loaders, safe readers, checked downloads.

Supported: cifar10, cifar100 (official python pickles), fashion_mnist (idx, .gz or raw),
imagenet32 (the official downsampled-ImageNet npz batches), digits (scikit-learn's 8x8 digits,
shipped with the package: the offline demo). Local directories are checked for structure;
downloads are checked against the official md5. Pickles are read with an unpickler that only
rebuilds numpy arrays, so a data file can never run code.

>>> ds = load_dataset("digits")
>>> ds.train_x.shape[1:], ds.num_classes
(torch.Size([1, 8, 8]), 10)
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import DataError


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor  # uint8 [N, C, H, W]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    augment: str  # default augmentation for this kind of image

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]


LOADERS: dict[str, Callable[[Path, bool], Dataset]] = {}


def register_dataset(*names: str):
    def wrap(fn):
        for n in names:
            LOADERS[n] = fn
        return fn

    return wrap


def default_root() -> Path:
    return Path(os.environ.get("TIEDMASK_DATA", Path.home() / ".cache" / "tiedmask" / "data"))


def load_dataset(name: str, root: str | Path = "", download: bool = False) -> Dataset:
    """Load `name` from `root` (or $TIEDMASK_DATA, or ~/.cache/tiedmask/data)."""
    if name not in LOADERS:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(LOADERS)}")
    return LOADERS[name](Path(root) if root else default_root(), download)


# ---------------------------------------------------------------- safe readers

class _ArrayUnpickler(pickle.Unpickler):
    """Only what a numpy array pickle needs; anything else (code) is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # Python-3 pickles of bytes; a pure function
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # corrupt, truncated or hostile: all the same to the user
        raise DataError(f"{path} is not a readable dataset pickle ({exc}); re-download it") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a batch dict; re-download it")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format), gzipped or raw."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
        if zero != b"\x00\x00" or dtype_code != 0x08:
            raise ValueError("bad magic number")
        dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        return data.reshape(dims)
    except Exception as exc:
        raise DataError(f"{path} is not a valid idx file ({exc}); re-download it") from None


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, expected_md5: str) -> Path:
    """Fetch `url` to `dest` atomically and check its md5; a mismatch is an error."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as src:
            shutil.copyfileobj(src, out)
        got = md5(Path(tmp))
        if got != expected_md5:
            raise DataError(f"download of {url} has md5 {got}, expected {expected_md5}; try again")
        os.replace(tmp, dest)
    except OSError as exc:
        raise DataError(
            f"could not download {url} ({exc}); download it by hand to {dest} "
            f"(md5 {expected_md5}), where it is checked and used, or pass --data.root DIR"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def obtain(url: str, dest: Path, expected_md5: str, allow_download: bool) -> Path | None:
    """`dest` if it is there (a file placed by hand: its md5 is checked), else downloaded when
    allowed, else None."""
    if dest.exists():
        got = md5(dest)
        if got != expected_md5:
            raise DataError(f"{dest} has md5 {got}, expected {expected_md5}; replace it with the "
                            f"official file from {url}")
        return dest
    return download(url, dest, expected_md5) if allow_download else None


def _archive_fetcher(url: str, dest: Path, expected_md5: str, allow_download: bool) -> Callable[[], None]:
    """Extracts `dest` (placed by hand and checked, or downloaded when allowed) beside itself."""
    def fetch() -> None:
        archive = obtain(url, dest, expected_md5, allow_download)
        if archive:
            extract_tar(archive, dest.parent)
    return fetch


def extract_tar(archive: Path, into: Path) -> None:
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():  # no absolute paths, no escapes, no links
            target = (into / member.name).resolve()
            if not str(target).startswith(str(into.resolve())) or member.issym() or member.islnk():
                raise DataError(f"{archive} holds an unsafe path {member.name!r}; delete it")
        tar.extractall(into)


def _find_dir(root: Path, subdir: str, marker: str) -> Path | None:
    for candidate in (root / subdir, root):
        if (candidate / marker).exists():
            return candidate
    return None


def _locate(root: Path, subdir: str, marker: str, fetch: Callable[[], None] | None, what: str) -> Path:
    found = _find_dir(root, subdir, marker)
    if found is None and fetch is not None:
        fetch()
        found = _find_dir(root, subdir, marker)
    if found is None:
        raise DataError(
            f"{what} not found under {root}: expected {root / subdir}/{marker}; point "
            f"--data.root at the folder that holds {subdir}/, place the official archive there, "
            "or pass --data.download true"
        )
    return found


def _to_images(flat: np.ndarray, channels: int, size: int, source: Path) -> torch.Tensor:
    flat = np.asarray(flat)
    if flat.dtype != np.uint8 or flat.ndim != 2 or flat.shape[1] != channels * size * size:
        raise DataError(f"{source} holds data of shape {flat.shape} {flat.dtype}, "
                        f"expected (N, {channels * size * size}) uint8; re-download it")
    return torch.from_numpy(flat.reshape(-1, channels, size, size).copy())


def _labels(values, n: int, num_classes: int, source: Path, offset: int = 0) -> torch.Tensor:
    labels = torch.as_tensor(np.asarray(values, dtype=np.int64)) - offset
    if labels.numel() != n or labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{source} has {labels.numel()} labels for {n} images or labels outside "
                        f"0..{num_classes - 1}; re-download it")
    return labels


# ---------------------------------------------------------------- datasets

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


def _cifar(root, fetch, subdir, train_files, test_files, label_key, num_classes, name) -> Dataset:
    folder = _locate(root, subdir, test_files[0], fetch, name)

    def read(files):
        xs, ys = [], []
        for f in files:
            path = folder / f
            if not path.exists():
                raise DataError(f"{name} is incomplete: {path} is missing; re-download it")
            batch = read_pickle(path)
            if "data" not in batch or label_key not in batch:
                raise DataError(f"{path} lacks 'data' or '{label_key}'; is it really {name}?")
            x = _to_images(batch["data"], 3, 32, path)
            xs.append(x)
            ys.append(_labels(batch[label_key], len(x), num_classes, path))
        return torch.cat(xs), torch.cat(ys)

    train_x, train_y = read(train_files)
    test_x, test_y = read(test_files)
    return Dataset(name, train_x, train_y, test_x, test_y, num_classes, "crop_flip")


@register_dataset("cifar10")
def load_cifar10(root: Path, allow_download: bool) -> Dataset:
    fetch = _archive_fetcher(CIFAR10_URL, root / "cifar-10-python.tar.gz", CIFAR10_MD5, allow_download)
    train = [f"data_batch_{i}" for i in range(1, 6)]
    return _cifar(root, fetch, "cifar-10-batches-py", train,
                  ["test_batch"], "labels", 10, "cifar10")


@register_dataset("cifar100")
def load_cifar100(root: Path, allow_download: bool) -> Dataset:
    fetch = _archive_fetcher(CIFAR100_URL, root / "cifar-100-python.tar.gz", CIFAR100_MD5, allow_download)
    return _cifar(root, fetch, "cifar-100-python", ["train"],
                  ["test"], "fine_labels", 100, "cifar100")


@register_dataset("fashion_mnist", "fashion-mnist")
def load_fashion_mnist(root: Path, allow_download: bool) -> Dataset:
    def fetch():
        for fname, digest in FASHION_FILES.items():
            obtain(FASHION_URL + fname, root / "fashion-mnist" / fname, digest, allow_download)

    def find(folder: Path, stem: str) -> Path:
        for candidate in (folder / stem, folder / stem.removesuffix(".gz")):
            if candidate.exists():
                return candidate
        raise DataError(f"fashion_mnist is incomplete: {folder / stem} is missing; re-download it")

    folder = _find_dir(root, "fashion-mnist", "t10k-labels-idx1-ubyte.gz") or _find_dir(
        root, "fashion-mnist", "t10k-labels-idx1-ubyte")
    if folder is None:
        folder = _locate(root, "fashion-mnist", "t10k-labels-idx1-ubyte.gz", fetch, "fashion_mnist")

    def split(prefix: str):
        images = read_idx(find(folder, f"{prefix}-images-idx3-ubyte.gz"))
        source = find(folder, f"{prefix}-labels-idx1-ubyte.gz")
        labels = read_idx(source)
        if images.ndim != 3:
            raise DataError(f"{folder}/{prefix}-images is not an image idx file; re-download it")
        x = torch.from_numpy(images.copy()).unsqueeze(1)
        return x, _labels(labels, len(x), 10, source)

    train_x, train_y = split("train")
    test_x, test_y = split("t10k")
    return Dataset("fashion_mnist", train_x, train_y, test_x, test_y, 10, "crop")


@register_dataset("imagenet32")
def load_imagenet32(root: Path, allow_download: bool) -> Dataset:
    """The official npz batches: train_data_batch_1..10.npz and val_data.npz, labels 1..1000."""
    folder = _find_dir(root, "imagenet32", "val_data.npz")
    if folder is None:
        raise DataError(
            f"imagenet32 not found under {root}: expected {root / 'imagenet32'}/val_data.npz and "
            "train_data_batch_*.npz; ImageNet needs a login, so download Imagenet32_train_npz.zip "
            "and Imagenet32_val_npz.zip from image-net.org, unzip them there, and pass --data.root"
        )

    def read(path: Path):
        try:
            with np.load(path, allow_pickle=False) as npz:
                data, labels = npz["data"], npz["labels"]
        except Exception as exc:
            raise DataError(f"{path} is not a readable ImageNet32 npz ({exc}); re-download it") from None
        x = _to_images(data, 3, 32, path)
        return x, _labels(labels, len(x), 1000, path, offset=1)

    train_files = sorted(folder.glob("train_data_batch_*.npz"),
                         key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not train_files:
        raise DataError(f"{folder} has val_data.npz but no train_data_batch_*.npz; unzip the train set there")
    parts = [read(p) for p in train_files]
    test_x, test_y = read(folder / "val_data.npz")
    return Dataset("imagenet32", torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                   test_x, test_y, 1000, "crop_flip")


@register_dataset("digits")
def load_digits(root: Path, allow_download: bool) -> Dataset:
    """scikit-learn's 1797 8x8 digits (real scans, shipped with the package); 20% held out."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.from_numpy((bunch.images * (255 / 16)).round().astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test, train = order[:360], order[360:]
    return Dataset("digits", x[train], y[train], x[test], y[test], 10, "crop")
