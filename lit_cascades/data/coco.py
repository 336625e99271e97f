"""COCO captions + images for text + sketch → image retrieval (TASK-former's real setting, Sangkloy et al.,
ECCV 2022; arXiv:2208.03354), from local files. Sketches are synthetic edge sketches made
from each image (:func:`~lit_cascades.data.drawing.make_sketch`; the paper trained on synthetic PhotoSketch
sketches and tested on 5,000 human sketches, which ``sketch_dir`` can supply for the evaluation splits).

Expected files under ``root`` (the official downloads, https://cocodataset.org/#download, unzipped):

* ``annotations/captions_train2014.json`` and ``annotations/captions_val2014.json`` (COCO caption format);
* ``train2014/<file_name>`` and ``val2014/<file_name>`` images;
* optional ``annotations/instances_{train,val}2014.json``: object categories → multi-hot labels for the
  classification loss (without them the data has no labels and that loss is off);
* optional ``dataset_coco.json`` (Karpathy's split, ``karpathy_json``): 113,287 train (+restval) / 5,000 val /
  5,000 test images, the split the reimplementations report. Without it, train = train2014 and val / test are
  the first ``num_val`` / next ``num_test`` images of val2014 by id.

Training items take a random one of the image's captions each time; evaluation items use caption
``eval_caption`` (one query per image, so the split's images are the gallery).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lit_cascades.data.drawing import make_sketch, resize, resize_center_crop
from lit_cascades.data.text_sketch import TextSketchImageDataModule, check_caption

COCO_URL = "https://cocodataset.org/#download"


def load_image(path: str | Path, size: int) -> Tensor:
    """Read an image file as RGB ``[3, size, size]`` in ``[0, 1]`` (grey / CMYK / RGBA are converted;
    shorter side resized to ``size``, centre crop)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return resize_center_crop(torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0, size)


def load_sketch_file(path: str | Path, size: int) -> Tensor:
    """Read a drawn sketch (dark strokes on light paper) as ink ``[1, size, size]`` in ``{0, 1}``."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    ink = resize(1.0 - torch.from_numpy(arr.copy())[None], size)
    return (ink > 0.5).float()


def _read_json(path: Path, what: str, arg: str = "root") -> dict[str, Any]:
    """Read a COCO JSON file; a missing file raises ``FileNotFoundError`` starting with ``arg`` (the argument
    that located it)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{arg}: missing COCO {what}: {path}. Expected under root: annotations/captions_train2014.json, "
            f"annotations/captions_val2014.json, train2014/ and val2014/ image folders (optional: "
            f"annotations/instances_*2014.json for object labels, dataset_coco.json for the Karpathy split); "
            f"download them from {COCO_URL}")
    with open(path) as f:
        return json.load(f)


def _captions(doc: dict[str, Any], folder: Path) -> dict[int, tuple[Path, list[str]]]:
    """``{image_id: (path, captions)}`` from a COCO captions file."""
    out: dict[int, tuple[Path, list[str]]] = {int(im["id"]): (folder / im["file_name"], []) for im in doc["images"]}
    for ann in doc["annotations"]:
        iid = int(ann["image_id"])
        if iid not in out:
            raise ValueError(f"caption annotation {ann.get('id')} refers to image {iid}, which is not in 'images'")
        out[iid][1].append(check_caption(ann["caption"], f"image {iid} (annotation {ann.get('id')})"))
    return out


class CocoItems(Dataset):
    """Items of one split (see :mod:`lit_cascades.data.text_sketch`) from image paths and captions."""

    def __init__(self, paths: list[Path], captions: list[list[str]], labels: Tensor, image_size: int, train: bool,
                 seed: int = 0, eval_caption: int = 0, sketch_kwargs: dict[str, Any] | None = None,
                 sketch_paths: list[Path] | None = None) -> None:
        self.paths, self.captions, self.labels, self.image_size = paths, captions, labels, image_size
        self.train, self.seed, self.eval_caption = train, seed, eval_caption
        self.sketch_kwargs, self.sketch_paths = sketch_kwargs or {}, sketch_paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = load_image(self.paths[i], self.image_size)
        if self.sketch_paths is not None:
            sketch = load_sketch_file(self.sketch_paths[i], self.image_size)
        else:
            g = None if self.train else torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            sketch = make_sketch(image, generator=g, **self.sketch_kwargs)
        caps = self.captions[i]
        caption = caps[int(torch.randint(len(caps), ()))] if self.train else caps[min(self.eval_caption, len(caps) - 1)]
        return {"image": image, "sketch": sketch, "caption": caption, "labels": self.labels[i], "index": torch.tensor(i)}


class CocoCaptionsDataModule(TextSketchImageDataModule):
    """COCO 2014 captions, images and synthetic sketches (see the module docstring for the file layout).

    Args:
        root: the COCO directory (checked in :meth:`setup`: a missing directory or file raises
            ``FileNotFoundError`` starting with the argument that located it, ``root:``, ``karpathy_json:``,
            ``sketch_dir:``).
        karpathy_json: path of Karpathy's ``dataset_coco.json`` (default: ``root/dataset_coco.json`` if present).
        year: COCO release of the file names (2014).
        num_val / num_test: evaluation images (>= 1 each) taken from val2014 when no Karpathy split is used.
        image_size: side of images and sketches (224 for CLIP ViT-B/16).
        eval_caption: which caption of each evaluation image is its query (>= 0; the last one when an image
            has fewer).
        limit_train: ``None`` (all) or keep only the first ``limit_train`` (>= 1) training images (quick runs).
        sketch_dir: optional folder of drawn sketches ``<image file stem>.png`` for the evaluation splits.
        edge_threshold, blur_sigma, keep_min, max_shift: synthetic sketch settings (``edge_threshold`` in
            ``(0, 1)``, ``blur_sigma >= 0``, ``keep_min`` in ``(0, 1]``, ``max_shift >= 0``).
        vocab_min_count / vocab_max_size: caption-decoder vocabulary (Karpathy's preprocessing keeps words seen
            at least 5 times).
        batch_size, eval_batch_size, seed, num_workers: see :class:`TextSketchImageDataModule`.
    """

    def __init__(self, root: str, karpathy_json: str | None = None, year: int = 2014, num_val: int = 5000,
                 num_test: int = 5000, image_size: int = 224, eval_caption: int = 0, limit_train: int | None = None,
                 sketch_dir: str | None = None, edge_threshold: float = 0.2, blur_sigma: float = 1.0,
                 keep_min: float = 0.6, max_shift: int = 0, batch_size: int = 64, eval_batch_size: int = 256,
                 seed: int = 0, num_workers: int = 4, vocab_min_count: int = 5, vocab_max_size: int | None = 10000
                 ) -> None:
        super().__init__(image_size, batch_size, eval_batch_size, seed, vocab_min_count, vocab_max_size, num_workers)
        if root is None:
            raise ValueError("root: expected the COCO directory; got None")
        for name, value in (("num_val", num_val), ("num_test", num_test)):
            if value < 1:
                raise ValueError(f"{name}: expected >= 1 evaluation images; got {value}")
        if eval_caption < 0:
            raise ValueError(f"eval_caption: expected a caption index >= 0; got {eval_caption}")
        if limit_train is not None and limit_train < 1:
            raise ValueError(f"limit_train: expected None (all training images) or >= 1; got {limit_train}")
        if not 0.0 < edge_threshold < 1.0:
            raise ValueError(f"edge_threshold: expected a value in (0, 1); got {edge_threshold}")
        if blur_sigma < 0:
            raise ValueError(f"blur_sigma: expected >= 0; got {blur_sigma}")
        if not 0.0 < keep_min <= 1.0:
            raise ValueError(f"keep_min: expected a fraction in (0, 1]; got {keep_min}")
        if max_shift < 0:
            raise ValueError(f"max_shift: expected >= 0 pixels; got {max_shift}")
        self.root, self.karpathy_json, self.year = Path(root), karpathy_json, year
        self.num_val, self.num_test, self.eval_caption, self.limit_train = num_val, num_test, eval_caption, limit_train
        self.sketch_dir = Path(sketch_dir) if sketch_dir else None
        self.sketch_kwargs = {"edge_threshold": edge_threshold, "blur_sigma": blur_sigma, "keep_min": keep_min,
                              "max_shift": max_shift}
        self._train_captions: list[str] = []

    # -- reading ------------------------------------------------------------------------------------------------
    def _labels(self) -> tuple[dict[int, list[int]], list[str]]:
        files = [self.root / "annotations" / f"instances_{s}{self.year}.json" for s in ("train", "val")]
        if not all(f.is_file() for f in files):
            return {}, []
        cats: dict[int, str] = {}
        present: dict[int, set[int]] = {}
        for f in files:
            doc = _read_json(f, "instances file")
            cats.update({int(c["id"]): c["name"] for c in doc["categories"]})
            for ann in doc["annotations"]:
                present.setdefault(int(ann["image_id"]), set()).add(int(ann["category_id"]))
        order = sorted(cats)
        col = {cid: j for j, cid in enumerate(order)}
        return {iid: sorted(col[c] for c in cs) for iid, cs in present.items()}, [cats[c] for c in order]

    def _splits(self) -> dict[str, list[tuple[int, Path, list[str]]]]:
        kjson = Path(self.karpathy_json) if self.karpathy_json else self.root / "dataset_coco.json"
        if self.karpathy_json or kjson.is_file():
            doc = _read_json(kjson, "Karpathy split file", "karpathy_json" if self.karpathy_json else "root")
            out: dict[str, list[tuple[int, Path, list[str]]]] = {"train": [], "val": [], "test": []}
            for im in doc["images"]:
                split = "train" if im["split"] in ("train", "restval") else im["split"]
                caps = [check_caption(s["raw"], f"image {im['cocoid']}") for s in im["sentences"]]
                out[split].append((int(im["cocoid"]), self.root / im["filepath"] / im["filename"], caps))
            return out
        ann = self.root / "annotations"
        train = _captions(_read_json(ann / f"captions_train{self.year}.json", "captions file"),
                          self.root / f"train{self.year}")
        val = _captions(_read_json(ann / f"captions_val{self.year}.json", "captions file"), self.root / f"val{self.year}")
        val_ids = sorted(val)
        if len(val_ids) < self.num_val + self.num_test:
            raise ValueError(f"num_val: val{self.year} has {len(val_ids)} images; num_val + num_test = "
                             f"{self.num_val + self.num_test} expected at most that")
        rows = lambda d, ids: [(i, *d[i]) for i in ids]  # noqa: E731
        return {"train": rows(train, sorted(train)), "val": rows(val, val_ids[: self.num_val]),
                "test": rows(val, val_ids[self.num_val : self.num_val + self.num_test])}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if not self.root.is_dir():
            raise FileNotFoundError(f"root: the COCO root {self.root} does not exist; expected a directory with "
                                    f"annotations/, train{self.year}/, val{self.year}/ (from {COCO_URL})")
        if self.sketch_dir is not None and not self.sketch_dir.is_dir():
            raise FileNotFoundError(f"sketch_dir: no such directory: {self.sketch_dir}; expected a folder of drawn "
                                    "sketches <image file stem>.png")
        labels_of, self.class_names = self._labels()
        for split, rows in self._splits().items():
            if split == "train" and self.limit_train is not None:
                rows = rows[: self.limit_train]
            rows = [r for r in rows if r[2]]  # images without captions cannot be queries
            if not rows:
                raise ValueError(f"root: COCO split '{split}' has no images with captions")
            missing = [str(p) for _, p, _ in rows if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"root: {len(missing)} of {len(rows)} '{split}' images are missing, e.g. "
                                        f"{missing[:3]}; expected the image files of the captions file under {self.root}")
            labels = torch.zeros(len(rows), len(self.class_names))
            for j, (iid, _, _) in enumerate(rows):
                labels[j, labels_of.get(iid, [])] = 1.0
            sketch_paths = None
            if self.sketch_dir is not None and split != "train":
                sketch_paths = [self.sketch_dir / f"{p.stem}.png" for _, p, _ in rows]
                lacking = [str(s) for s in sketch_paths if not s.is_file()]
                if lacking:
                    raise FileNotFoundError(f"sketch_dir: {self.sketch_dir}: {len(lacking)} '{split}' images have no "
                                            f"sketch file, e.g. {lacking[:3]} (expected <image file stem>.png)")
            self.splits[split] = CocoItems([p for _, p, _ in rows], [c for _, _, c in rows], labels, self.image_size,
                                           train=split == "train", seed=self.seed, eval_caption=self.eval_caption,
                                           sketch_kwargs=self.sketch_kwargs, sketch_paths=sketch_paths)
            if split == "train":
                self._train_captions = [c for _, _, cs in rows for c in cs]
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        self.description = (f"COCO {self.year} captions ({sizes} images), "
                             f"{'human' if self.sketch_dir else 'synthetic edge'} sketches for evaluation, "
                             f"{len(self.class_names)} object classes")
        self._finish_setup()

    def train_captions(self) -> list[str]:
        return self._train_captions
