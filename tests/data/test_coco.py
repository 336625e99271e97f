"""COCO captions DataModule on tiny COCO-format files written by the test (images via Pillow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lit_cascades.data.coco import CocoCaptionsDataModule, load_image

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230)}


def write_tiny_coco(root: Path, n_train: int = 6, n_val: int = 6, grey_every: int = 3) -> Path:
    """COCO 2014 layout: annotations/{captions,instances}_{train,val}2014.json and {train,val}2014/*.jpg."""
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n, first in (("train", n_train, 1), ("val", n_val, 1000)):
        (root / f"{split}2014").mkdir(exist_ok=True)
        images, caps, inst = [], [], []
        for j in range(n):
            iid = first + j
            name = f"COCO_{split}2014_{iid:012d}.jpg"
            w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            colour = list(COLOURS)[j % 3]
            im = Image.new("RGB", (w, h), (250, 250, 240))
            ImageDraw.Draw(im).rectangle([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=COLOURS[colour])
            if j % grey_every == 0:
                im = im.convert("L")  # COCO holds some greyscale JPEGs
            im.save(root / f"{split}2014" / name)
            images.append({"id": iid, "file_name": name, "width": w, "height": h})
            caps += [{"id": 10 * iid, "image_id": iid, "caption": f"A {colour} box on white paper."},
                     {"id": 10 * iid + 1, "image_id": iid, "caption": f"a picture of a {colour} square"}]
            inst += [{"id": 10 * iid + c, "image_id": iid, "category_id": CATEGORIES[(j + c) % 3]["id"]}
                     for c in range(1 + j % 2)]
        (root / "annotations" / f"captions_{split}2014.json").write_text(
            json.dumps({"images": images, "annotations": caps}))
        (root / "annotations" / f"instances_{split}2014.json").write_text(
            json.dumps({"images": images, "annotations": inst, "categories": CATEGORIES}))
    return root


def _dm(root, **kw):
    args = {"image_size": 32, "num_val": 3, "num_test": 3, "batch_size": 4, "eval_batch_size": 3, "num_workers": 0,
            "vocab_min_count": 1}
    args.update(kw)
    return CocoCaptionsDataModule(str(root), **args)


def test_splits_labels_and_batches(tmp_path):
    dm = _dm(write_tiny_coco(tmp_path / "coco"))
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 6, "val": 3, "test": 3}
    assert dm.class_names == ["person", "car", "dog"] and "synthetic edge sketches" in dm.description
    item = dm.splits["test"][0]  # val2014 image 1003 (the first three by id are the val split)
    assert item["image"].shape == (3, 32, 32) and item["sketch"].shape == (1, 32, 32)
    assert item["labels"].tolist() == [1.0, 1.0, 0.0]  # j=3 holds categories 3%3, 4%3: person and car
    assert item["caption"] == "A red box on white paper."  # eval_caption=0
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["caption"]) == 4
    assert {"box", "square", "red"} <= set(dm.vocab.stoi)


def test_grey_images_become_rgb_and_eval_sketches_are_fixed(tmp_path):
    root = write_tiny_coco(tmp_path / "coco")
    grey = root / "train2014" / "COCO_train2014_000000000001.jpg"
    assert Image.open(grey).mode == "L"
    img = load_image(grey, 24)
    assert img.shape == (3, 24, 24) and torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    dm = _dm(root)
    dm.setup()
    a, b = dm.splits["val"][1]["sketch"], dm.splits["val"][1]["sketch"]
    assert torch.equal(a, b) and a.sum() > 0
    assert set(a.unique().tolist()) <= {0.0, 1.0}


def test_karpathy_split_and_drawn_sketches(tmp_path):
    root = write_tiny_coco(tmp_path / "coco")
    images = []
    for split, folder, first in (("train", "train2014", 1), ("restval", "val2014", 1000), ("val", "val2014", 1001),
                                 ("test", "val2014", 1002), ("test", "val2014", 1003)):
        images.append({"filepath": folder, "filename": f"COCO_{folder}_{first:012d}.jpg", "cocoid": first,
                       "split": split, "sentences": [{"raw": f"image {first}"}]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images}))
    sketches = tmp_path / "sketches"
    sketches.mkdir()
    for iid in (1001, 1002, 1003):
        im = Image.new("L", (50, 50), 255)
        ImageDraw.Draw(im).line([(5, 5), (45, 45)], fill=0, width=3)
        im.save(sketches / f"COCO_val2014_{iid:012d}.png")
    dm = _dm(root, sketch_dir=str(sketches))
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 2, "val": 1, "test": 2}
    s = dm.splits["test"][0]["sketch"]
    assert s[0, 3, 3] == 1 and s[0, 3, 28] == 0  # the drawn diagonal, as ink
    assert dm.splits["test"][1]["caption"] == "image 1003"


def test_missing_files_say_what_is_expected_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*annotations/"):
        _dm(tmp_path / "nowhere").setup()
    root = write_tiny_coco(tmp_path / "coco")
    (root / "annotations" / "captions_val2014.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"captions_val2014.json.*Expected under data.root"):
        _dm(root).setup()
    root = write_tiny_coco(tmp_path / "coco2")
    (root / "train2014" / "COCO_train2014_000000000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 6 'train' images are missing"):
        _dm(root).setup()
    root = write_tiny_coco(tmp_path / "coco3")
    with pytest.raises(FileNotFoundError, match="no sketch file"):
        _dm(root, sketch_dir=str(tmp_path)).setup()
    with pytest.raises(ValueError, match="num_val \\+ num_test"):
        _dm(root, num_val=5, num_test=5).setup()


def test_empty_caption_is_an_error(tmp_path):
    root = write_tiny_coco(tmp_path / "coco")
    path = root / "annotations" / "captions_train2014.json"
    doc = json.loads(path.read_text())
    doc["annotations"][3]["caption"] = "   "
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"caption of image 2 \(annotation 21\) is empty"):
        _dm(root).setup()
