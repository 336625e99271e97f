"""Image-classification data: an in-memory DataModule over several real sources, transforms in plain torch.

Sources (``source=``):

* ``"digits"`` (embedded default): scikit-learn's handwritten digits, 1,797 8×8 grey images, 10 classes.
  Ships with scikit-learn, so it works offline everywhere. Split 60/20/20 with a fixed ``split_seed``.
* ``"fashion_mnist"``: IDX files (``train-images-idx3-ubyte[.gz]`` ...) from ``root``, by default the Debian
  package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``). ``"mnist"`` and ``"idx"`` read
  the same format from ``root``. The last ``val_size`` training images form the validation split.
* ``"cifar10"`` / ``"cifar100"``: the official "python version" archives, extracted
  (``cifar-10-batches-py/``, ``cifar-100-python/``) or as the ``.tar.gz`` in ``root`` (default:
  ``<cache root>/data``, see :func:`lit_cascades.io.cache_dir`); ``download=True`` fetches the archive from
  the official URL (needs internet).

  Safety: an archive (downloaded or found in ``root``) is checked against its published MD5
  (:data:`CIFAR_MD5`) before extraction; a mismatch raises an error naming the file and both digests (a bad
  download is deleted). A folder extracted from a checked archive is marked as such
  (:data:`CIFAR_VERIFIED_MARKER`); an unmarked folder next to its archive is re-extracted from the checked
  archive. An extracted folder without its archive cannot be checked: its batch files (Python pickles) are
  then read with a restricted unpickler that only rebuilds numpy arrays and plain containers and refuses
  any other object, so a tampered file cannot run code (as with every file, only use data you trust).

Batches are dicts ``{"x": [B, C, H, W] float, "y": [B] long, "index": [B] long}`` plus any per-example
fields attached with :meth:`ImageClassificationDataModule.attach` (e.g. a large model's cached quality).
"""

from __future__ import annotations

import gzip
import numbers
import os
import pickle
import struct
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lit_cascades.data.sampling import EpochSeededSampler, SplitLoaders, process_batch_size
from lit_cascades.functional._checks import check_choice
from lit_cascades.io import cache_dir, file_md5

SOURCES = ("digits", "fashion_mnist", "mnist", "idx", "cifar10", "cifar100")
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_MD5 = {  # published on https://www.cs.toronto.edu/~kriz/cifar.html
    "cifar10": "c58f30108f718f92721af3b95e74349a",
    "cifar100": "eb9058c3a382ffc7106e4002c42a8d85",
}
CIFAR_VERIFIED_MARKER = ".lit_cascades_md5"
"""File written into an extracted CIFAR folder holding the MD5 of the checked archive it came from."""


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
        f"root: missing IDX file '{stem}[.gz]' in {root}. Expected train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (optionally .gz). For Fashion-MNIST on Debian/Ubuntu: "
        "`apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist), or pass "
        "root=<directory with the files>."
    )


def load_idx_dataset(root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_x [N,H,W] uint8, train_y, test_x, test_y)`` from the four IDX files in ``root``."""
    root = Path(root)
    if not root.is_dir():
        _find_idx(root, "train-images-idx3-ubyte")  # raises the helpful error
    parts = [read_idx(_find_idx(root, s)) for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    return parts[0], parts[1].astype(np.int64), parts[2], parts[3].astype(np.int64)


def _check_md5(path: Path, source: str, delete: bool) -> str:
    """Check ``path`` against the published MD5 of ``source``'s archive; on a mismatch raise (and delete it)."""
    expected = CIFAR_MD5[source]
    got = file_md5(path)
    if got != expected:
        if delete:
            path.unlink(missing_ok=True)
        raise ValueError(
            f"root: {path.name} ({path}) has MD5 {got}, but the published MD5 of the {source} archive is "
            f"{expected}; " + ("the bad download was deleted, retry" if delete else
                               "the file is corrupt or not the official archive: delete it and download again")
        )
    return got


def _extract_checked(archive: Path, root: Path, source: str, delete_bad: bool) -> Path:
    digest = _check_md5(archive, source, delete=delete_bad)
    folder = root / CIFAR_DIRS[source]
    (folder / CIFAR_VERIFIED_MARKER).unlink(missing_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    (folder / CIFAR_VERIFIED_MARKER).write_text(digest + "\n")
    return folder


def _cifar_dir(root: Path, source: str, download: bool, own_root: bool = False) -> Path:
    """The extracted CIFAR folder in ``root``, extracting (and first downloading) a checked archive if needed.

    ``own_root``: ``root`` is the library's cache, so a corrupt archive found there is deleted too.
    """
    folder = root / CIFAR_DIRS[source]
    archive = root / Path(CIFAR_URLS[source]).name
    marker = folder / CIFAR_VERIFIED_MARKER
    if folder.is_dir() and marker.is_file() and marker.read_text().strip() == CIFAR_MD5[source]:
        return folder  # extracted from a checked archive
    if archive.exists():
        return _extract_checked(archive, root, source, delete_bad=own_root)
    if folder.is_dir():
        return folder  # user-extracted, no archive to check: read with the restricted unpickler
    if download:
        root.mkdir(parents=True, exist_ok=True)
        tmp = archive.with_name(archive.name + ".part")
        try:
            urllib.request.urlretrieve(CIFAR_URLS[source], tmp)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise FileNotFoundError(f"download: could not download {CIFAR_URLS[source]} ({err}); place the "
                                    f"archive or its extracted folder '{CIFAR_DIRS[source]}' in {root}") from None
        try:
            _check_md5(tmp, source, delete=True)
        except ValueError as err:
            raise ValueError(str(err).replace(tmp.name, archive.name, 1)) from None
        os.replace(tmp, archive)
        return _extract_checked(archive, root, source, delete_bad=True)
    raise FileNotFoundError(
        f"root: neither '{CIFAR_DIRS[source]}/' nor '{archive.name}' found in {root}. Download the python "
        f"version from {CIFAR_URLS[source]} or set download=true (needs internet)."
    )


_PICKLE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only; any other global is refused (no code can run)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch file holds only "
                                         "numpy arrays, lists and dicts")
        if module.startswith("numpy.core."):  # numpy >= 2 moved numpy.core to numpy._core
            module = "numpy._core." + module.split(".", 2)[2]
        return super().find_class(module, name)


def _load_batch(path: Path) -> dict[bytes, Any]:
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise ValueError(f"root: {path} is not a CIFAR batch file ({err})") from None
    if not isinstance(d, dict) or b"data" not in d:
        raise ValueError(f"root: {path} is not a CIFAR batch file (expected a dict with b'data')")
    return d


def load_cifar(root: str | Path, source: str = "cifar10", download: bool = False, own_root: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_x [N,32,32,3] uint8, train_y, test_x, test_y)`` from the CIFAR python-version files.

    Archives are MD5-checked before extraction; batch files are read with a restricted unpickler (see the
    module docstring). ``own_root=True`` (``root`` is the library's cache) also deletes a corrupt archive
    found there.
    """
    folder = _cifar_dir(Path(root), source, download, own_root)
    label_key = b"labels" if source == "cifar10" else b"fine_labels"
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if source == "cifar10" else ["train"]

    def _load(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for name in names:
            d = _load_batch(folder / name)
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


# --------------------------------------------------------------------------------------------------------
# the DataModule
# --------------------------------------------------------------------------------------------------------
class ImageClassificationDataModule(SplitLoaders, pl.LightningDataModule):
    """In-memory image classification splits (train/val/test) from one of :data:`SOURCES`.

    Args:
        source: ``"digits"`` | ``"fashion_mnist"`` | ``"mnist"`` | ``"idx"`` | ``"cifar10"`` | ``"cifar100"``.
        root: directory of the files (Fashion-MNIST defaults to the Debian package's directory, CIFAR to
            ``<cache root>/data``; ``"mnist"``/``"idx"`` need it).
        batch_size: training batch size, >= 1 (evaluation uses ``eval_batch_size``, >= 1).
        val_size: validation images taken from the training set: a fraction in ``(0, 1)`` or a count >= 1
            (smaller than the training set).
        split_seed: seed of the train/val(/test) split, fixed so every run sees the same test set.
        seed: seed of the per-epoch shuffling.
        augment: random crop + flip on training images (useful for CIFAR).
        limit_train: ``None`` (all) or keep only the first ``limit_train`` (>= 1) training images (quick runs).
        download: allow downloading CIFAR archives (MD5-checked).
        num_workers: DataLoader workers (>= 0).

    Raises:
        ValueError: a bad value, with a message starting with the argument name (``val_size: ...``).
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
        if source not in SOURCES:
            raise ValueError(f"source: expected one of {list(SOURCES)}; got {source!r}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1; got {value!r}")
        if isinstance(val_size, bool) or not isinstance(val_size, numbers.Real):
            raise ValueError(f"val_size: expected a fraction in (0, 1) or a count >= 1; got {val_size!r}")
        is_count = isinstance(val_size, numbers.Integral)
        if not is_count and not 0.0 < val_size < 1.0:
            raise ValueError(f"val_size: expected a fraction in (0, 1) (or an integer count >= 1); got {val_size}")
        if is_count and val_size < 1:
            raise ValueError(f"val_size: expected a count >= 1 (or a fraction in (0, 1)); got {val_size}")
        if limit_train is not None and (isinstance(limit_train, bool) or not isinstance(limit_train, numbers.Integral)
                                        or limit_train < 1):
            raise ValueError(f"limit_train: expected None (all training images) or an integer >= 1; "
                             f"got {limit_train!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers: expected >= 0; got {num_workers}")
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
                raise ValueError(f"root: source {self.source!r} needs root=<directory with the IDX files>; got None")
            return load_idx_dataset(root)
        if self.root:
            return load_cifar(self.root, self.source, self.download)
        return load_cifar(cache_dir("data"), self.source, self.download, own_root=True)

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
        is_count = isinstance(self.val_size, numbers.Integral)
        n_val = int(self.val_size) if is_count else round(self.val_size * len(train_x))
        if not 0 < n_val < len(train_x):
            raise ValueError(f"val_size: {self.val_size} gives {n_val} validation images out of {len(train_x)} "
                             "training images; expected at least one of each")
        perm = g.permutation(len(train_x))
        val_idx, tr_idx = perm[:n_val], perm[n_val:]
        if self.limit_train is not None:
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
            return DataLoader(ds, batch_size=process_batch_size(self.batch_size, self.trainer),
                              sampler=EpochSeededSampler(len(ds), self.seed), num_workers=self.num_workers,
                              drop_last=False)
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers)


def _to_nchw(x: np.ndarray) -> Tensor:
    t = torch.from_numpy(np.array(x, copy=True))
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if t.ndim == 3:  # [N, H, W] grey
        return t[:, None]
    if t.ndim == 4 and t.shape[-1] in (1, 3):  # [N, H, W, C]
        return t.permute(0, 3, 1, 2).contiguous()
    raise ValueError(f"expected images [N, H, W] or [N, H, W, C]; got shape {tuple(t.shape)}")
