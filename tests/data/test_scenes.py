"""Constructed scenes: captions match the scene, twins carry what the other modality lacks, splits and batches."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from lit_cascades.data.scenes import (
    COLOURS,
    POSITION_WORDS,
    SceneRetrievalDataModule,
    generate_scenes,
    load_glyphs,
)
from lit_cascades.data.text_sketch import WordVocab


@pytest.fixture(scope="module")
def digits_train():
    return load_glyphs(("digits",), "train")


def _parse(caption, class_names):
    """Caption → multiset of (colour, class name)."""
    names = "|".join(re.escape(n) for n in sorted(class_names, key=len, reverse=True))
    found = re.findall(rf"\ban? ({'|'.join(COLOURS)}) ({names})\b", caption)
    return Counter(found)


def test_captions_name_each_object_and_colour_but_not_where(digits_train):
    scenes = generate_scenes(digits_train, 60, size=32, num_objects=(1, 3), object_size=(8, 14), seed=1)
    for cap, objs in zip(scenes.captions, scenes.objects):
        expected = Counter((o.colour, digits_train.class_names[o.label]) for o in objs)
        assert _parse(cap, digits_train.class_names) == expected, cap
        assert not set(WordVocab.tokenize(cap)) & set(POSITION_WORDS), cap
    for labels, objs in zip(scenes.labels, scenes.objects):
        assert set(torch.nonzero(labels).flatten().tolist()) == {o.label for o in objs}


def test_twins_split_what_text_and_sketch_carry(digits_train):
    scenes = generate_scenes(digits_train, 30, size=32, object_size=(8, 14), twins=True, seed=2)
    for f in range(10):
        base, recoloured, relaid = (3 * f + i for i in range(3))
        assert (scenes.family[[base, recoloured, relaid]] == f).all()
        # recoloured twin: same strokes (the sketch ignores colour), other caption, other pixels
        assert torch.equal(scenes.strokes[base], scenes.strokes[recoloured])
        assert scenes.captions[base] != scenes.captions[recoloured]
        assert not torch.equal(scenes.images[base], scenes.images[recoloured])
        # re-laid-out twin: same caption, other strokes
        assert scenes.captions[base] == scenes.captions[relaid]
        assert not torch.equal(scenes.strokes[base], scenes.strokes[relaid])
    independent = generate_scenes(digits_train, 30, size=32, object_size=(8, 14), twins=False, seed=2)
    assert len(set(independent.family.tolist())) == 30


def test_scenes_are_deterministic_under_a_seed(digits_train):
    a = generate_scenes(digits_train, 9, size=32, object_size=(8, 14), seed=5)
    b = generate_scenes(digits_train, 9, size=32, object_size=(8, 14), seed=5)
    c = generate_scenes(digits_train, 9, size=32, object_size=(8, 14), seed=6)
    assert torch.equal(a.images, b.images) and torch.equal(a.strokes, b.strokes) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)


def test_glyph_splits_are_disjoint():
    seen = {}
    for split in ("train", "val", "test"):
        bank = load_glyphs(("digits",), split)
        seen[split] = {tuple(g.flatten().tolist()) for g in bank.glyphs}
        assert len(bank.class_names) == 10
    assert sum(len(v) for v in seen.values()) == 1797  # every digit image once (none is duplicated)
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])


def test_bad_generation_settings(digits_train):
    with pytest.raises(ValueError, match="object_size"):
        generate_scenes(digits_train, 3, size=16, object_size=(8, 20))
    with pytest.raises(ValueError, match="colours"):
        generate_scenes(digits_train, 3, colours=("red",))
    with pytest.raises(ValueError, match="colours"):
        generate_scenes(digits_train, 3, colours=("red", "mauve"))
    with pytest.raises(ValueError, match="sources"):
        SceneRetrievalDataModule(sources=["mnist"])


def test_datamodule_batches():
    dm = SceneRetrievalDataModule(sources=["digits"], num_train=48, num_val=12, num_test=12, image_size=32,
                                  object_size=(8, 14), batch_size=16, eval_batch_size=12)
    dm.setup()
    assert "constructed scenes" in dm.description and dm.num_classes == 10
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["sketch"].shape == (16, 1, 32, 32)
    assert batch["labels"].shape == (16, 10) and len(batch["caption"]) == 16
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert set(batch["sketch"].unique().tolist()) <= {0.0, 1.0}
    # evaluation sketches are fixed per index; training sketches are drawn afresh
    val = dm.splits["val"]
    assert torch.equal(val[3]["sketch"], val[3]["sketch"])
    train = dm.splits["train"]
    assert not all(torch.equal(train[i]["sketch"], train[i]["sketch"]) for i in range(8))
    ev = next(iter(dm.val_dataloader()))
    assert ev["index"].tolist() == list(range(12))
    # the decoder vocabulary covers the training captions
    assert all(dm.vocab.stoi.get(w, 3) != 3 for c in dm.scenes["train"].captions for w in dm.vocab.tokenize(c))


def test_word_vocab_round_trip():
    vocab = WordVocab.build(["a red T-shirt and a blue two", "a red bag"])
    ids = vocab.encode(["a red t-shirt", "a green bag"], max_length=8)
    assert ids[0, 0] == WordVocab.BOS and vocab.decode(ids[0]) == "a red t-shirt"
    assert vocab.decode(ids[1]) == "a <unk> bag"
    assert vocab.encode(["a red bag and a red bag"], max_length=4).shape == (1, 4)
    with pytest.raises(ValueError, match="duplicates"):
        WordVocab(["a", "a"])
