import gzip
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_cascades.data import EpochSeededSampler, ImageClassificationDataModule, load_cifar, read_idx
from lit_cascades.data import image as image_module
from lit_cascades.data.image import CIFAR_VERIFIED_MARKER, FASHION_MNIST_DEBIAN_DIR
from lit_cascades.io import file_md5


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def _make_idx_dir(root: Path, gz: bool = True, n_train: int = 40, n_test: int = 10) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    parts = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in parts.items():
        _write_idx(root / name, arr, gz)
    return tuple(parts.values())


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_roundtrip(tmp_path, gz):
    tr_x, _tr_y, _te_x, te_y = _make_idx_dir(tmp_path, gz)
    suffix = ".gz" if gz else ""
    np.testing.assert_array_equal(read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}"), tr_x)
    dm = ImageClassificationDataModule("idx", root=str(tmp_path), val_size=8, batch_size=4)
    dm.setup()
    assert len(dm.splits["train"]) == 32 and len(dm.splits["val"]) == 8 and len(dm.splits["test"]) == 10
    assert dm.input_shape == (1, 28, 28) and dm.num_classes == 10
    torch.testing.assert_close(dm.labels("test"), torch.as_tensor(te_y.astype(np.int64)))
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (4, 1, 28, 28) and batch["x"].dtype == torch.float32


def test_idx_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="^root: missing IDX file.*apt-get install dataset-fashion-mnist"):
        ImageClassificationDataModule("fashion_mnist", root=str(tmp_path / "nowhere")).setup()
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    with pytest.raises(ValueError, match="^root: source 'idx' needs root="):
        ImageClassificationDataModule("idx").setup()


def _cifar_files(folder: Path, source: str, n: int = 6, protocol: int = pickle.DEFAULT_PROTOCOL
                 ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    key = b"labels" if source == "cifar10" else b"fine_labels"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if source == "cifar10" else ["train", "test"]
    written = {}
    for name in names:
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10 if source == "cifar10" else 100, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, key: labels, b"filenames": [b"x.png"] * n}, f, protocol=protocol)
        written[name] = data
    return written


@pytest.mark.parametrize(("source", "protocol"), [("cifar10", 2), ("cifar100", pickle.DEFAULT_PROTOCOL)])
def test_cifar_from_extracted_folder(tmp_path, source, protocol):
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[source]
    written = _cifar_files(tmp_path / folder, source, protocol=protocol)
    tr_x, _tr_y, _te_x, _te_y = load_cifar(tmp_path, source)
    assert tr_x.shape == ((30 if source == "cifar10" else 6), 32, 32, 3) and tr_x.dtype == np.uint8
    first = written["data_batch_1" if source == "cifar10" else "train"][0]
    np.testing.assert_array_equal(tr_x[0], first.reshape(3, 32, 32).transpose(1, 2, 0))  # channel order
    dm = ImageClassificationDataModule(source, root=str(tmp_path), val_size=2, augment=True, batch_size=2)
    dm.setup()
    assert dm.input_shape == (3, 32, 32)
    assert next(iter(dm.train_dataloader()))["x"].shape == (2, 3, 32, 32)


def _cifar10_archive(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    _cifar_files(src / "cifar-10-batches-py", "cifar10")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive


def test_cifar_from_checked_archive_and_missing(tmp_path, monkeypatch):
    archive = _cifar10_archive(tmp_path)
    monkeypatch.setitem(image_module.CIFAR_MD5, "cifar10", file_md5(archive))
    root = tmp_path / "root"
    root.mkdir()
    archive.rename(root / archive.name)
    assert load_cifar(root, "cifar10")[0].shape[0] == 30
    marker = root / "cifar-10-batches-py" / CIFAR_VERIFIED_MARKER
    assert marker.read_text().strip() == file_md5(root / archive.name)
    assert load_cifar(root, "cifar10")[0].shape[0] == 30  # marked folder: no second extraction needed
    with pytest.raises(FileNotFoundError, match=r"^root: neither .* download=true"):
        load_cifar(tmp_path / "empty", "cifar100")


def test_cifar_archive_with_wrong_md5_is_refused(tmp_path, monkeypatch):
    archive = _cifar10_archive(tmp_path)
    got = file_md5(archive)
    monkeypatch.setitem(image_module.CIFAR_MD5, "cifar10", "0" * 32)
    # the user's own archive: refused, named with both digests, kept; nothing extracted
    with pytest.raises(ValueError, match=rf"^root: cifar-10-python.tar.gz .* MD5 {got}.*published MD5 .* {'0' * 32}"):
        load_cifar(tmp_path, "cifar10")
    assert archive.exists() and not (tmp_path / "cifar-10-batches-py").exists()
    # in the library's cache the bad archive is deleted
    with pytest.raises(ValueError, match="deleted"):
        load_cifar(tmp_path, "cifar10", own_root=True)
    assert not archive.exists()


def test_cifar_unmarked_folder_is_reextracted_from_its_checked_archive(tmp_path, monkeypatch):
    archive = _cifar10_archive(tmp_path / "a")
    monkeypatch.setitem(image_module.CIFAR_MD5, "cifar10", file_md5(archive))
    root = tmp_path / "root"
    _cifar_files(root / "cifar-10-batches-py", "cifar10", n=2)  # some other, unchecked content
    archive.rename(root / archive.name)
    assert load_cifar(root, "cifar10")[0].shape[0] == 30  # from the archive, not the 5 × 2 stale images
    assert (root / "cifar-10-batches-py" / CIFAR_VERIFIED_MARKER).exists()


@pytest.mark.parametrize("good", [True, False])
def test_cifar_download_goes_to_the_cache_and_is_md5_checked(tmp_path, monkeypatch, good):
    archive = _cifar10_archive(tmp_path / "server")
    monkeypatch.setitem(image_module.CIFAR_MD5, "cifar10", file_md5(archive) if good else "f" * 32)
    monkeypatch.setenv("LIT_CASCADES_CACHE", str(tmp_path / "cache"))
    urls = []

    def fake_urlretrieve(url, filename):  # no network: "download" the local archive
        urls.append(url)
        Path(filename).write_bytes(archive.read_bytes())

    monkeypatch.setattr(image_module.urllib.request, "urlretrieve", fake_urlretrieve)
    monkeypatch.chdir(tmp_path)
    dm = ImageClassificationDataModule("cifar10", download=True, val_size=5)
    data_dir = tmp_path / "cache" / "data"
    if good:
        dm.setup()
        assert len(dm.splits["train"]) == 25 and len(dm.splits["test"]) == 6
        assert (data_dir / "cifar-10-python.tar.gz").exists()
        assert (data_dir / "cifar-10-batches-py" / CIFAR_VERIFIED_MARKER).exists()
    else:
        with pytest.raises(ValueError, match=r"^root: cifar-10-python.tar.gz .*the bad download was deleted"):
            dm.setup()
        assert not list(data_dir.iterdir())  # neither the archive nor a partial download is left
    assert urls == [image_module.CIFAR_URLS["cifar10"]]
    assert not (tmp_path / "data").exists()  # nothing in a relative data/ folder


def test_cifar_batch_files_cannot_run_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _cifar_files(folder, "cifar10")
    pwned = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(pwned),))

    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match=r"^root: .*data_batch_1 is not a CIFAR batch file \(refusing to load"):
        load_cifar(tmp_path, "cifar10")
    assert not pwned.exists()


def test_digits_split_is_fixed_and_normalised():
    a = ImageClassificationDataModule("digits", seed=1)
    b = ImageClassificationDataModule("digits", seed=2)
    a.setup(), b.setup()
    assert [len(a.splits[s]) for s in ("train", "val", "test")] == [1150, 288, 359]
    torch.testing.assert_close(a.labels("test"), b.labels("test"))  # the run seed does not move the split
    x = a.splits["train"].x
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 0.05


def test_attach_and_sampler():
    dm = ImageClassificationDataModule("digits", eval_batch_size=50)
    dm.setup()
    dm.attach("test", "large_quality", torch.arange(359).float())
    batch = next(iter(dm.test_dataloader()))
    torch.testing.assert_close(batch["large_quality"], batch["index"].float())
    with pytest.raises(ValueError, match="length 359"):
        dm.attach("test", "large_quality", torch.zeros(3))
    s = EpochSeededSampler(20, seed=3)
    s.set_epoch(4)
    first = list(s)
    s.set_epoch(5)
    assert list(s) != first
    s.set_epoch(4)
    assert list(s) == first and sorted(first) == list(range(20))


def test_bad_source():
    with pytest.raises(ValueError, match=r"^source: expected one of \['digits', 'fashion_mnist'"):
        ImageClassificationDataModule("imagenet")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"val_size": -0.1}, r"^val_size: expected a fraction in \(0, 1\).*got -0.1"),
    ({"val_size": 1.0}, r"^val_size: expected a fraction in \(0, 1\)"),
    ({"val_size": 0}, r"^val_size: expected a count >= 1"),
    ({"val_size": "0.2"}, r"^val_size: expected a fraction"),
    ({"limit_train": 0}, r"^limit_train: expected None .* or an integer >= 1; got 0"),
    ({"limit_train": -5}, r"^limit_train: "),
    ({"batch_size": 0}, r"^batch_size: expected an integer >= 1; got 0"),
    ({"eval_batch_size": 0}, r"^eval_batch_size: expected an integer >= 1"),
    ({"num_workers": -1}, r"^num_workers: expected >= 0"),
])
def test_bad_values_are_rejected_in_the_constructor(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageClassificationDataModule("digits", **kwargs)


def test_val_size_count_must_leave_training_images(tmp_path):
    _make_idx_dir(tmp_path, n_train=40)
    with pytest.raises(ValueError, match="^val_size: 40 gives 40 validation images out of 40"):
        ImageClassificationDataModule("idx", root=str(tmp_path), val_size=40).setup()
    dm = ImageClassificationDataModule("idx", root=str(tmp_path), val_size=0.25, limit_train=7)
    dm.setup()
    assert len(dm.splits["val"]) == 10 and len(dm.splits["train"]) == 7


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DEBIAN_DIR), reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package():
    dm = ImageClassificationDataModule("fashion_mnist", val_size=5000)
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [55000, 5000, 10000]
    assert dm.num_classes == 10 and dm.input_shape == (1, 28, 28)
