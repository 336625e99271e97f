"""Constructed scenes for text + sketch → image retrieval, built offline from real images that ship with a
dependency (scikit-learn's handwritten digits; Fashion-MNIST when the Debian package ``dataset-fashion-mnist``
is installed). This is *constructed* data, not natural images: it is named so in logs and docs.

A scene is a black ``S × S`` canvas with ``num_objects`` real glyphs (digit or garment images, cropped to their
bounding box) at random positions and sizes, each tinted with a random named colour. From the scene:

* caption: what and which colour, never where (``"a red three, a blue sneaker and a green seven"``);
* sketch: edge strokes of the scene's colour-free intensity layer (each object drawn in white), thinned, with
  stroke dropout and a small random offset (:func:`~lit_cascades.data.drawing.make_sketch`): where and what
  shape, never which colour.

So text and sketch each carry what the other lacks — TASK-former's premise (Sangkloy et al., ECCV 2022). With
``twins=True`` scenes come in families of three that make this explicit: a base scene, a *recoloured* twin
(same objects, glyphs and layout, other colours: its sketch matches the base, its caption does not) and a
*re-laid-out* twin (same classes and colours, other glyph instances, positions and sizes: its caption is the
base's, its sketch is not). In a gallery holding whole families a text-only query cannot tell a scene from
its re-laid-out twin, a sketch-only query cannot tell it from its recoloured twin, and text + sketch can.

Glyph instances are split between train / val / test (digits: 70/15/15 of the 1,797 images; Fashion-MNIST:
its train file for training, its test file halved for val/test), so evaluation scenes show unseen glyphs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lit_cascades.data.drawing import edge_strokes, paste, resize, shift, stroke_dropout
from lit_cascades.data.image import FASHION_MNIST_DEBIAN_DIR, load_idx_dataset
from lit_cascades.data.text_sketch import TextSketchImageDataModule

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FASHION_NAMES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle boot")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.2, 0.35, 1.0), "yellow": (0.95, 0.9, 0.1),
    "magenta": (0.9, 0.2, 0.85), "cyan": (0.1, 0.85, 0.9), "orange": (1.0, 0.55, 0.05), "white": (1.0, 1.0, 1.0),
}
TEMPLATES = ("{}", "a picture of {}", "{} on a black background", "there is {}")
POSITION_WORDS = ("left", "right", "top", "bottom", "above", "below", "middle", "center", "centre", "corner")
SOURCES = ("digits", "fashion_mnist")


# --------------------------------------------------------------------------------------------------------
# glyphs
# --------------------------------------------------------------------------------------------------------
@dataclass
class GlyphBank:
    """Real object images cropped to their bounding box: ``glyphs[i]`` ``[h_i, w_i]`` in ``[0, 1]`` of class
    ``labels[i]`` (an index into ``class_names``)."""

    glyphs: list[Tensor]
    labels: Tensor
    class_names: list[str]

    def by_class(self) -> list[Tensor]:
        return [torch.nonzero(self.labels == c).flatten() for c in range(len(self.class_names))]


def _crop(img: Tensor, threshold: float = 0.1) -> Tensor:
    ys, xs = torch.nonzero(img > threshold, as_tuple=True)
    if ys.numel() == 0:
        return img
    return img[int(ys.min()) : int(ys.max()) + 1, int(xs.min()) : int(xs.max()) + 1]


def load_glyphs(sources: tuple[str, ...] | list[str], split: str, fashion_root: str | None = None,
                split_seed: int = 0, max_per_source: int | None = 6000) -> GlyphBank:
    """Glyphs of ``split`` (``"train"`` / ``"val"`` / ``"test"``) from ``sources`` (see the module docstring),
    at most ``max_per_source`` per source (the first ones of the split).

    Class ids follow the order of ``sources`` (digits 0–9, then Fashion-MNIST's 10 classes).
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"`split` must be train, val or test; got {split!r}")
    glyphs: list[Tensor] = []
    labels: list[int] = []
    names: list[str] = []
    for source in sources:
        if source == "digits":
            from sklearn.datasets import load_digits

            d = load_digits()
            perm = np.random.default_rng(split_seed).permutation(len(d.target))
            n_tr, n_va = int(0.7 * len(perm)), int(0.15 * len(perm))
            idx = {"train": perm[:n_tr], "val": perm[n_tr : n_tr + n_va], "test": perm[n_tr + n_va :]}[split]
            images, ys = torch.from_numpy(d.images[idx] / 16.0).float(), d.target[idx]
            class_names = DIGIT_NAMES
        elif source == "fashion_mnist":
            try:
                tr_x, tr_y, te_x, te_y = _fashion(fashion_root or FASHION_MNIST_DEBIAN_DIR)
            except FileNotFoundError as err:
                msg = str(err).removeprefix("root: ").replace("pass root=", "pass fashion_root=")
                raise FileNotFoundError(f"fashion_root: {msg}") from None
            half = len(te_y) // 2
            x, ys = {"train": (tr_x, tr_y), "val": (te_x[:half], te_y[:half]), "test": (te_x[half:], te_y[half:])}[split]
            images = torch.from_numpy(np.array(x[:max_per_source] if max_per_source else x)).float() / 255.0
            ys = ys[: len(images)]
            class_names = FASHION_NAMES
        else:
            raise ValueError(f"sources: unknown glyph source {source!r}; available: {list(SOURCES)}")
        if max_per_source and source == "digits":
            images, ys = images[:max_per_source], ys[:max_per_source]
        offset = len(names)
        glyphs += [_crop(g) for g in images]
        labels += [offset + int(y) for y in ys]
        names += list(class_names)
    return GlyphBank(glyphs, torch.tensor(labels), names)


@functools.lru_cache(maxsize=2)
def _fashion(root: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return load_idx_dataset(root)


def default_sources() -> tuple[str, ...]:
    """``("digits", "fashion_mnist")`` when the Fashion-MNIST files are installed, else ``("digits",)``."""
    ok = os.path.exists(os.path.join(FASHION_MNIST_DEBIAN_DIR, "train-images-idx3-ubyte.gz"))
    return ("digits", "fashion_mnist") if ok else ("digits",)


# --------------------------------------------------------------------------------------------------------
# scenes
# --------------------------------------------------------------------------------------------------------
@dataclass
class SceneObject:
    """One object of a scene: glyph ``glyph`` (index into a :class:`GlyphBank`) of class ``label``, colour
    ``colour`` (a key of :data:`COLOURS`) at brightness ``brightness``, box ``(top, left, h, w)``."""

    label: int
    glyph: int
    colour: str
    brightness: float
    box: tuple[int, int, int, int]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(objects: list[SceneObject], class_names: list[str], template: str = "{}") -> str:
    """Caption naming each object's colour and class, in the given order (never its position)."""
    parts = [f"{article(o.colour)} {o.colour} {class_names[o.label]}" for o in objects]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return template.format(body)


def render(objects: list[SceneObject], bank: GlyphBank, size: int) -> tuple[Tensor, Tensor]:
    """``(image [3, S, S], intensity [1, S, S])``: the coloured scene and its colour-free layer (objects in
    white), both composited in list order over black."""
    image, layer = torch.zeros(3, size, size), torch.zeros(1, size, size)
    for o in objects:
        top, left, h, w = o.box
        g = resize(bank.glyphs[o.glyph][None], (h, w))[0]
        paste(image, g, top, left, [c * o.brightness for c in COLOURS[o.colour]])
        paste(layer, g, top, left)
    return image, layer


class SceneSampler:
    """Draws scene families from a :class:`GlyphBank` with a ``numpy`` generator (see the module docstring)."""

    def __init__(self, bank: GlyphBank, size: int, num_objects: tuple[int, int], object_size: tuple[int, int],
                 colours: tuple[str, ...], rng: np.random.Generator) -> None:
        self.bank, self.size, self.rng = bank, size, rng
        self.num_objects, self.object_size, self.colours = num_objects, object_size, colours
        self.per_class = bank.by_class()
        self.classes = [c for c, idx in enumerate(self.per_class) if len(idx)]

    def _glyph(self, label: int) -> int:
        idx = self.per_class[label]
        return int(idx[self.rng.integers(len(idx))])

    def _layout(self, glyphs: list[int]) -> list[tuple[int, int, int, int]]:
        boxes: list[tuple[int, int, int, int]] = []
        for g in glyphs:
            gh, gw = self.bank.glyphs[g].shape
            side = int(self.rng.integers(self.object_size[0], self.object_size[1] + 1))
            scale = side / max(gh, gw)
            h, w = max(2, round(gh * scale)), max(2, round(gw * scale))
            for _attempt in range(50):  # avoid overlaps (1-pixel gap) when possible
                top, left = int(self.rng.integers(0, self.size - h + 1)), int(self.rng.integers(0, self.size - w + 1))
                if all(top + h + 1 <= t or t + bh + 1 <= top or left + w + 1 <= le or le + bw + 1 <= left
                       for t, le, bh, bw in boxes):
                    break
            boxes.append((top, left, h, w))
        return boxes

    def _colours(self, k: int) -> list[tuple[str, float]]:
        return [(self.colours[int(self.rng.integers(len(self.colours)))], float(self.rng.uniform(0.75, 1.0)))
                for _ in range(k)]

    def family(self, twins: bool) -> list[list[SceneObject]]:
        """A base scene and, with ``twins``, its recoloured and re-laid-out twins (lists of objects)."""
        k = int(self.rng.integers(self.num_objects[0], self.num_objects[1] + 1))
        labels = [self.classes[int(self.rng.integers(len(self.classes)))] for _ in range(k)]
        glyphs = [self._glyph(c) for c in labels]
        boxes = self._layout(glyphs)
        cols = self._colours(k)
        base = [SceneObject(c, g, col, b, box) for c, g, (col, b), box in zip(labels, glyphs, cols, boxes)]
        if not twins:
            return [base]
        while True:  # recolour until the caption differs (some object changes colour)
            new = self._colours(k)
            if [c for c, _ in new] != [c for c, _ in cols]:
                break
        recoloured = [SceneObject(o.label, o.glyph, col, b, o.box) for o, (col, b) in zip(base, new)]
        glyphs2 = [self._glyph(c) for c in labels]
        boxes2 = self._layout(glyphs2)
        relaid = [SceneObject(o.label, g, o.colour, o.brightness, box) for o, g, box in zip(base, glyphs2, boxes2)]
        return [base, recoloured, relaid]


@dataclass
class Scenes:
    """A split of constructed scenes: ``images [N, 3, S, S]`` uint8, ``strokes [N, 1, S, S]`` bool (thinned edges
    of the intensity layer, before dropout), ``captions``, ``labels [N, C]`` multi-hot, ``family [N]`` and
    ``objects`` (per scene)."""

    images: Tensor
    strokes: Tensor
    captions: list[str]
    labels: Tensor
    family: Tensor
    objects: list[list[SceneObject]]
    class_names: list[str]


def check_scene_settings(size: int, num_objects: Sequence[int], object_size: Sequence[int],
                         colours: Sequence[str] | None, twins: bool, size_name: str = "size") -> tuple[str, ...]:
    """Validate the scene settings (messages start with the argument name); return the colour names."""
    if len(num_objects) != 2 or not 1 <= num_objects[0] <= num_objects[1]:
        raise ValueError(f"num_objects: expected (min, max) with 1 <= min <= max; got {tuple(num_objects)}")
    if len(object_size) != 2 or not 2 <= object_size[0] <= object_size[1] <= size:
        raise ValueError(f"object_size: expected (min, max) with 2 <= min <= max <= {size_name}={size}; "
                         f"got {tuple(object_size)}")
    names = tuple(colours or COLOURS)
    unknown = [c for c in names if c not in COLOURS]
    if unknown or (twins and len(names) < 2):
        raise ValueError(f"colours: expected {'>= 2 ' if twins else ''}names from {list(COLOURS)}; got {list(names)}")
    return names


def generate_scenes(bank: GlyphBank, n: int, *, size: int = 40, num_objects: tuple[int, int] = (2, 3),
                    object_size: tuple[int, int] = (12, 20), colours: tuple[str, ...] | None = None,
                    twins: bool = True, seed: int = 0, edge_threshold: float = 0.3) -> Scenes:
    """Generate ``n`` scenes (whole families first; the last family may be cut) deterministically from ``seed``."""
    if n < 1:
        raise ValueError(f"n: the number of scenes must be >= 1; got {n}")
    colours = check_scene_settings(size, num_objects, object_size, colours, twins)
    rng = np.random.default_rng(seed)
    sampler = SceneSampler(bank, size, tuple(num_objects), tuple(object_size), colours, rng)  # type: ignore[arg-type]
    scenes: list[list[SceneObject]] = []
    captions: list[str] = []
    family: list[int] = []
    f = 0
    while len(scenes) < n:
        members = sampler.family(twins)
        order = rng.permutation(len(members[0]))  # the order objects are named in, shared by the family
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        for objs in members:
            scenes.append(objs)
            captions.append(describe([objs[i] for i in order], bank.class_names, template))
            family.append(f)
        f += 1
    scenes, captions, family = scenes[:n], captions[:n], family[:n]
    rendered = [render(objs, bank, size) for objs in scenes]
    images = torch.stack([im for im, _ in rendered])
    layers = torch.stack([la for _, la in rendered])
    labels = torch.zeros(n, len(bank.class_names))
    for i, objs in enumerate(scenes):
        labels[i, [o.label for o in objs]] = 1.0
    return Scenes(images=(images * 255).round().to(torch.uint8), strokes=edge_strokes(layers, edge_threshold=edge_threshold),
                  captions=captions, labels=labels, family=torch.tensor(family), objects=scenes,
                  class_names=list(bank.class_names))


class SceneDataset(Dataset):
    """Items of a :class:`Scenes` split (see :mod:`lit_cascades.data.text_sketch`). Sketches get stroke dropout
    and a random offset: fresh draws every time for training (the global torch RNG, seeded by the runner),
    fixed per index for evaluation (a generator seeded with ``(seed, index)``)."""

    def __init__(self, scenes: Scenes, train: bool, keep_min: float = 0.6, max_shift: int = 2, seed: int = 0) -> None:
        self.scenes, self.train, self.keep_min, self.max_shift, self.seed = scenes, train, keep_min, max_shift, seed

    def __len__(self) -> int:
        return len(self.scenes.captions)

    def sketch(self, i: int) -> Tensor:
        g = None if self.train else torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        s = stroke_dropout(self.scenes.strokes[i], self.keep_min, g)
        if self.max_shift:
            dy, dx = torch.randint(-self.max_shift, self.max_shift + 1, (2,), generator=g).tolist()
            s = shift(s, dy, dx)
        return s.float()

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.scenes.images[i].float() / 255.0, "sketch": self.sketch(i),
                "caption": self.scenes.captions[i], "labels": self.scenes.labels[i], "index": torch.tensor(i)}


class SceneRetrievalDataModule(TextSketchImageDataModule):
    """Constructed scenes (digits + Fashion-MNIST objects) for text + sketch → image retrieval, fully offline.

    Args:
        sources: glyph sources (``"digits"``, ``"fashion_mnist"``); ``None``: both when Fashion-MNIST is
            installed, else digits only.
        fashion_root: directory of the Fashion-MNIST IDX files (default: the Debian package's); missing files
            raise ``FileNotFoundError`` starting with ``fashion_root:`` in :meth:`setup`.
        num_train / num_val / num_test: scenes per split, >= 1 (the test split is the reported gallery).
        image_size: canvas side ``S``; num_objects: ``(min, max)`` objects per scene; object_size: ``(min,
            max)`` longest side of an object in pixels; colours: colour names (default: all of :data:`COLOURS`).
        twins: scenes in families of three (see the module docstring).
        keep_min / max_shift: sketch stroke dropout and offset; edge_threshold: sketch edge threshold.
        seed: shuffling and evaluation-sketch seed; data_seed: scene generation and glyph split seed (fixed
            by default so every run sees the same scenes).
        batch_size, eval_batch_size, num_workers, vocab_min_count: see :class:`TextSketchImageDataModule`.
    """

    def __init__(self, sources: list[str] | tuple[str, ...] | None = None, fashion_root: str | None = None,
                 num_train: int = 3600, num_val: int = 300, num_test: int = 600, image_size: int = 40,
                 num_objects: tuple[int, int] = (2, 3), object_size: tuple[int, int] = (12, 20),
                 colours: list[str] | None = None, twins: bool = True, keep_min: float = 0.6, max_shift: int = 2,
                 edge_threshold: float = 0.3, batch_size: int = 64, eval_batch_size: int = 256, seed: int = 0,
                 data_seed: int = 0, num_workers: int = 0, vocab_min_count: int = 1) -> None:
        super().__init__(image_size, batch_size, eval_batch_size, seed, vocab_min_count, None, num_workers)
        self.sources = tuple(sources) if sources else default_sources()
        bad = [s for s in self.sources if s not in SOURCES]
        if bad:
            raise ValueError(f"sources: unknown {bad}; available: {list(SOURCES)}")
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if value < 1:
                raise ValueError(f"{name}: expected >= 1 scenes; got {value}")
        check_scene_settings(image_size, num_objects, object_size, colours, twins, size_name="image_size")
        if not 0.0 < keep_min <= 1.0:
            raise ValueError(f"keep_min: expected a fraction in (0, 1]; got {keep_min}")
        if max_shift < 0:
            raise ValueError(f"max_shift: expected >= 0 pixels; got {max_shift}")
        if not 0.0 < edge_threshold < 1.0:
            raise ValueError(f"edge_threshold: expected a value in (0, 1); got {edge_threshold}")
        self.fashion_root = fashion_root
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.gen_kwargs = {"size": image_size, "num_objects": tuple(num_objects), "object_size": tuple(object_size),
                           "colours": tuple(colours) if colours else None, "twins": twins,
                           "edge_threshold": edge_threshold}
        self.keep_min, self.max_shift, self.data_seed = keep_min, max_shift, data_seed
        self.scenes: dict[str, Scenes] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if "fashion_mnist" in self.sources and self.fashion_root and not os.path.isdir(self.fashion_root):
            raise FileNotFoundError(f"fashion_root: no such directory: {self.fashion_root}; expected the directory of "
                                    "the Fashion-MNIST IDX files")
        for i, split in enumerate(("train", "val", "test")):
            bank = load_glyphs(self.sources, split, self.fashion_root, split_seed=self.data_seed)
            self.scenes[split] = generate_scenes(bank, self.sizes[split], seed=self.data_seed * 101 + i,
                                                 **self.gen_kwargs)
            self.splits[split] = SceneDataset(self.scenes[split], train=split == "train", keep_min=self.keep_min,
                                              max_shift=self.max_shift, seed=self.seed)
        self.class_names = self.scenes["train"].class_names
        s, (lo, hi) = self.image_size, self.gen_kwargs["num_objects"]
        self.description = (
            f"constructed scenes (not natural images): {lo}-{hi} objects from {' + '.join(self.sources)} on a "
            f"{s}x{s} canvas, captions generated from the scene, edge sketches; "
            f"{'families of 3 (base, recoloured, re-laid-out)' if self.gen_kwargs['twins'] else 'independent scenes'}; "
            f"{', '.join(f'{k} {v}' for k, v in self.sizes.items())}")
        self._finish_setup()

    def train_captions(self) -> list[str]:
        return self.scenes["train"].captions
