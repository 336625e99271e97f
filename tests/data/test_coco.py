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
    with pytest.raises(FileNotFoundError, match="^root: .*does not exist.*annotations/"):
        _dm(tmp_path / "nowhere").setup()
    root = write_tiny_coco(tmp_path / "coco")
    (root / "annotations" / "captions_val2014.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"^root: missing COCO captions file: .*captions_val2014.json"):
        _dm(root).setup()
    with pytest.raises(FileNotFoundError, match=r"^karpathy_json: missing COCO Karpathy split file: .*nope.json"):
        _dm(root, karpathy_json=str(tmp_path / "nope.json")).setup()
    root = write_tiny_coco(tmp_path / "coco2")
    (root / "train2014" / "COCO_train2014_000000000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="^root: 1 of 6 'train' images are missing"):
        _dm(root).setup()
    root = write_tiny_coco(tmp_path / "coco3")
    with pytest.raises(FileNotFoundError, match="^sketch_dir: .*no sketch file"):
        _dm(root, sketch_dir=str(tmp_path)).setup()
    with pytest.raises(FileNotFoundError, match="^sketch_dir: no such directory"):
        _dm(root, sketch_dir=str(tmp_path / "no_sketches")).setup()
    with pytest.raises(ValueError, match="^num_val: .*num_val \\+ num_test"):
        _dm(root, num_val=5, num_test=5).setup()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_val": 0}, r"^num_val: expected >= 1"),
    ({"num_test": -1}, r"^num_test: expected >= 1"),
    ({"limit_train": 0}, r"^limit_train: expected None .* or >= 1; got 0"),
    ({"eval_caption": -1}, r"^eval_caption: expected a caption index >= 0"),
    ({"keep_min": 0.0}, r"^keep_min: expected a fraction in \(0, 1\]"),
    ({"edge_threshold": 1.5}, r"^edge_threshold: expected a value in \(0, 1\)"),
    ({"max_shift": -2}, r"^max_shift: expected >= 0"),
    ({"blur_sigma": -1.0}, r"^blur_sigma: expected >= 0"),
    ({"batch_size": 1}, r"^batch_size: expected >= 2"),
    ({"eval_batch_size": 0}, r"^eval_batch_size: expected >= 1"),
    ({"image_size": 4}, r"^image_size: expected >= 8"),
    ({"vocab_min_count": 0}, r"^vocab_min_count: expected >= 1"),
    ({"vocab_max_size": 0}, r"^vocab_max_size: expected None"),
])
def test_bad_values_are_rejected_in_the_constructor(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _dm(tmp_path, **kwargs)
    with pytest.raises(ValueError, match="^root: expected the COCO directory"):
        CocoCaptionsDataModule(None)


# The constructed-scenes DataModule shares the text + sketch base: its argument checks live here too.
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"sources": ["mnist"]}, r"^sources: unknown \['mnist'\]"),
    ({"num_train": 0}, r"^num_train: expected >= 1"),
    ({"num_test": 0}, r"^num_test: expected >= 1"),
    ({"num_objects": (3, 2)}, r"^num_objects: expected \(min, max\)"),
    ({"image_size": 16, "object_size": (8, 20)}, r"^object_size: expected .*image_size=16"),
    ({"colours": ["red"]}, r"^colours: expected >= 2 names"),
    ({"colours": ["red", "mauve"]}, r"^colours: "),
    ({"keep_min": 1.5}, r"^keep_min: expected a fraction in \(0, 1\]"),
    ({"max_shift": -1}, r"^max_shift: "),
    ({"edge_threshold": 0.0}, r"^edge_threshold: "),
    ({"batch_size": 1}, r"^batch_size: expected >= 2"),
])
def test_scene_datamodule_rejects_bad_values_in_the_constructor(kwargs, match):
    from lit_cascades.data.scenes import SceneRetrievalDataModule

    with pytest.raises(ValueError, match=match):
        SceneRetrievalDataModule(**{"sources": ["digits"], **kwargs})


def test_scene_datamodule_missing_fashion_root(tmp_path):
    from lit_cascades.data.scenes import SceneRetrievalDataModule

    with pytest.raises(FileNotFoundError, match="^fashion_root: no such directory"):
        SceneRetrievalDataModule(sources=["fashion_mnist"], fashion_root=str(tmp_path / "nowhere")).setup()
    with pytest.raises(FileNotFoundError, match="^fashion_root: missing IDX file .*pass fashion_root="):
        SceneRetrievalDataModule(sources=["fashion_mnist"], fashion_root=str(tmp_path)).setup()


def test_empty_caption_is_an_error(tmp_path):
    root = write_tiny_coco(tmp_path / "coco")
    path = root / "annotations" / "captions_train2014.json"
    doc = json.loads(path.read_text())
    doc["annotations"][3]["caption"] = "   "
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"caption of image 2 \(annotation 21\) is empty"):
        _dm(root).setup()
