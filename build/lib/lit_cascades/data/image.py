"""Image-classification data: an in-memory DataModule over several real sources, transforms in plain torch.

Sources (``source=``):

* ``"digits"`` (embedded default): scikit-learn's handwritten digits, 1,797 8×8 grey images, 10 classes.
  Ships with scikit-learn, so it works offline everywhere. Split 60/20/20 with a fixed ``split_seed``.
* ``"fashion_mnist"``: IDX files (``train-images-idx3-ubyte[.gz]`` ...) from ``root``, by default the Debian
  package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``). ``"mnist"`` and ``"idx"`` read
  the same format from ``root``. The last ``val_size`` training images form the validation split.
* ``"cifar10"`` / ``"cifar100"``: the official "python version" archives, extracted
  (``cifar-10-batches-py/``, ``cifar-100-python/``) or as the ``.tar.gz`` in ``root``; ``download=True``
  fetches the archive from the official URL (needs internet).

Batches are dicts ``{"x": [B, C, H, W] float, "y": [B] long, "index": [B] long}`` plus any per-example
fields attached with :meth:`ImageClassificationDataModule.attach` (e.g. a large model's cached quality).
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lit_cascades.functional._checks import check_choice

SOURCES = ("digits", "fashion_mnist", "mnist", "idx", "cifar10", "cifar100")
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


# --------------------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------------------
def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format; ``.gz`` or raw) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[data[2]]
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {arr.size} values")
    return arr.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(
        f"missing IDX file '{stem}[.gz]' in {root}. Expected train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (optionally .gz). For Fashion-MNIST on Debian/Ubuntu: "
        "`apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist), or pass "
        "data.root=<directory with the files>."
    )


def load_idx_dataset(root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_x [N,H,W] uint8, train_y, test_x, test_y)`` from the four IDX files in ``root``."""
    root = Path(root)
    if not root.is_dir():
        _find_idx(root, "train-images-idx3-ubyte")  # raises the helpful error
    parts = [read_idx(_find_idx(root, s)) for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    return parts[0], parts[1].astype(np.int64), parts[2], parts[3].astype(np.int64)


def _cifar_dir(root: Path, source: str, download: bool) -> Path:
    folder = root / CIFAR_DIRS[source]
    if folder.is_dir():
        return folder
    archive = root / Path(CIFAR_URLS[source]).name
    if not archive.exists() and download:
        root.mkdir(parents=True, exist_ok=True)
        tmp = archive.with_name(archive.name + ".part")
        try:
            urllib.request.urlretrieve(CIFAR_URLS[source], tmp)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise FileNotFoundError(f"could not download {CIFAR_URLS[source]} ({err}); place the archive or its "
                                    f"extracted folder '{CIFAR_DIRS[source]}' in {root}") from None
        os.replace(tmp, archive)
    if archive.exists():
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
        return folder
    raise FileNotFoundError(
        f"{source}: neither '{CIFAR_DIRS[source]}/' nor '{archive.name}' found in {root}. Download the python "
        f"version from {CIFAR_URLS[source]} or set data.download=true (needs internet)."
    )


def load_cifar(root: str | Path, source: str = "cifar10", download: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_x [N,32,32,3] uint8, train_y, test_x, test_y)`` from the CIFAR python-version files."""
    folder = _cifar_dir(Path(root), source, download)
    label_key = b"labels" if source == "cifar10" else b"fine_labels"
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if source == "cifar10" else ["train"]

    def _load(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for name in names:
            with open(folder / name, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    return (*_load(train_files), *_load(["test_batch" if source == "cifar10" else "test"]))


# --------------------------------------------------------------------------------------------------------
# datasets and sampler
# --------------------------------------------------------------------------------------------------------
class TensorImageDataset(Dataset):
    """Images ``[N, C, H, W]`` (float, already normalised), labels and optional per-example extras."""

    def __init__(self, x: Tensor, y: Tensor, augment: bool = False) -> None:
        self.x, self.y, self.augment = x, y, augment
        self.extras: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = self.x[i]
        if self.augment:
            x = random_crop_flip(x)
        item = {"x": x, "y": self.y[i], "index": torch.tensor(i)}
        item.update({k: v[i] for k, v in self.extras.items()})
        return item


def random_crop_flip(x: Tensor, padding: int = 4) -> Tensor:
    """Random horizontal flip and random crop after zero padding (the usual CIFAR augmentation), ``[C,H,W]``."""
    if bool(torch.rand(()) < 0.5):
        x = x.flip(-1)
    _c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    i, j = (int(v) for v in torch.randint(0, 2 * padding + 1, (2,)))
    return padded[:, i : i + h, j : j + w]


class EpochSeededSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` every epoch, so a run resumed from a checkpoint sees exactly the same
    batches as an uninterrupted one.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


# --------------------------------------------------------------------------------------------------------
# the DataModule
# --------------------------------------------------------------------------------------------------------
class ImageClassificationDataModule(pl.LightningDataModule):
    """In-memory image classification splits (train/val/test) from one of :data:`SOURCES`.

    Args:
        source: ``"digits"`` | ``"fashion_mnist"`` | ``"mnist"`` | ``"idx"`` | ``"cifar10"`` | ``"cifar100"``.
        root: directory of the files (Fashion-MNIST defaults to the Debian package's directory).
        batch_size: training batch size (evaluation uses ``eval_batch_size``).
        val_size: validation images taken from the training set (int count or fraction); digits uses 20%.
        split_seed: seed of the train/val(/test) split, fixed so every run sees the same test set.
        seed: seed of the per-epoch shuffling.
        augment: random crop + flip on training images (useful for CIFAR).
        limit_train: keep only the first ``limit_train`` training images (quick runs).
        download: allow downloading CIFAR archives.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        source: str = "digits",
        root: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        val_size: float | int = 0.2,
        split_seed: int = 0,
        seed: int = 0,
        augment: bool = False,
        limit_train: int | None = None,
        download: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_choice("source", source, SOURCES)
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1; got {batch_size}")
        self.source, self.root, self.batch_size, self.eval_batch_size = source, root, batch_size, eval_batch_size
        self.val_size, self.split_seed, self.seed, self.augment = val_size, split_seed, seed, augment
        self.limit_train, self.download, self.num_workers = limit_train, download, num_workers
        self.splits: dict[str, TensorImageDataset] = {}
        self.num_classes = 0
        self.input_shape: tuple[int, int, int] = (0, 0, 0)

    # -- loading --------------------------------------------------------------------------------------------
    def _raw(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        if self.source == "digits":
            from sklearn.datasets import load_digits

            d = load_digits()
            return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64), None, None
        if self.source in ("fashion_mnist", "mnist", "idx"):
            root = self.root or (FASHION_MNIST_DEBIAN_DIR if self.source == "fashion_mnist" else None)
            if root is None:
                raise ValueError(f"source={self.source!r} needs data.root=<directory with the IDX files>")
            return load_idx_dataset(root)
        root = self.root or os.path.join("data", self.source)
        return load_cifar(root, self.source, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train_x, train_y, test_x, test_y = self._raw()
        g = np.random.default_rng(self.split_seed)
        if test_x is None:  # digits: one pool, split 60/20/20
            perm = g.permutation(len(train_x))
            n_test = round(0.2 * len(perm))
            test_idx, rest = perm[:n_test], perm[n_test:]
            test_x, test_y = train_x[test_idx], train_y[test_idx]
            train_x, train_y = train_x[rest], train_y[rest]
        n_val = round(self.val_size * len(train_x)) if isinstance(self.val_size, float) else int(self.val_size)
        perm = g.permutation(len(train_x))
        val_idx, tr_idx = perm[:n_val], perm[n_val:]
        if self.limit_train:
            tr_idx = tr_idx[: self.limit_train]
        xs = {"train": train_x[tr_idx], "val": train_x[val_idx], "test": test_x}
        ys = {"train": train_y[tr_idx], "val": train_y[val_idx], "test": test_y}
        tensors = {k: _to_nchw(v) for k, v in xs.items()}
        mean = tensors["train"].mean(dim=(0, 2, 3), keepdim=True)
        std = tensors["train"].std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-6)
        self.num_classes = int(max(train_y.max(), test_y.max())) + 1
        self.input_shape = tuple(tensors["train"].shape[1:])  # type: ignore[assignment]
        for split in ("train", "val", "test"):
            x = (tensors[split] - mean[0]) / std[0]
            self.splits[split] = TensorImageDataset(x, torch.as_tensor(ys[split]), self.augment and split == "train")

    # -- extras -------------------------------------------------------------------------------------------------
    def attach(self, split: str, name: str, values: Tensor) -> None:
        """Attach a per-example tensor ``[N_split]`` to ``split``; batches then carry ``batch[name]``."""
        self.setup()
        check_choice("split", split, ("train", "val", "test"))
        ds = self.splits[split]
        if values.shape[0] != len(ds):
            raise ValueError(f"`values` for split '{split}' must have length {len(ds)}; got {values.shape[0]}")
        ds.extras[name] = values.detach().cpu()

    def labels(self, split: str) -> Tensor:
        """The labels ``[N_split]`` of a split."""
        self.setup()
        return self.splits[split].y

    # -- loaders --------------------------------------------------------------------------------------------
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        ds = self.splits[split]
        if shuffle:
            return DataLoader(ds, batch_size=self.batch_size, sampler=EpochSeededSampler(len(ds), self.seed),
                              num_workers=self.num_workers, drop_last=False)
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self, split: str = "test") -> DataLoader:
        return self._loader(split, shuffle=False)


def _to_nchw(x: np.ndarray) -> Tensor:
    t = torch.from_numpy(np.array(x, copy=True))
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if t.ndim == 3:  # [N, H, W] grey
        return t[:, None]
    if t.ndim == 4 and t.shape[-1] in (1, 3):  # [N, H, W, C]
        return t.permute(0, 3, 1, 2).contiguous()
    raise ValueError(f"expected images [N, H, W] or [N, H, W, C]; got shape {tuple(t.shape)}")
