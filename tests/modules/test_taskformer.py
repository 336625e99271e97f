"""TaskFormer: fusion, the loss against its written-out parts, encoders sharing, evaluation vs brute force,
bad input, and a short fit that learns."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lit_cascades.data.scenes import SceneRetrievalDataModule
from lit_cascades.data.text_sketch import WordVocab
from lit_cascades.functional import asymmetric_loss
from lit_cascades.modules.taskformer import TaskFormer

S = 24
CAPTIONS = ["a red three and a blue one", "a green bag", "a white seven, a red two and a cyan bag", "an orange one"]


def tiny(**kw) -> TaskFormer:
    args = {"image_size": S, "embed_dim": 16, "image_encoder_kwargs": {"width": 4, "depth": 2},
            "text_encoder_kwargs": {"hidden": 16, "layers": 1, "heads": 2}, "num_classes": 5,
            "caption_vocab": WordVocab.build(CAPTIONS).words, "decoder_kwargs": {"dim": 16, "heads": 2},
            "warmup_steps": 2}
    args.update(kw)
    return TaskFormer(**args)


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, S, S, generator=g), "sketch": (torch.rand(n, 1, S, S, generator=g) < 0.1).float(),
            "caption": [CAPTIONS[i % 4] for i in range(n)], "labels": (torch.rand(n, 5, generator=g) < 0.4).float(),
            "index": torch.arange(n)}


def test_query_is_normalised_mean_of_text_and_sketch_embeddings():
    m = tiny().eval()
    b = batch()
    with torch.no_grad():
        t, s = m.encode_text(b["caption"]), m.encode_sketch(b["sketch"])
        q = m.encode_query(b["caption"], b["sketch"])
        torch.testing.assert_close(q, F.normalize((t + s) / 2, dim=-1))
        torch.testing.assert_close(m.encode_query(text=b["caption"]), t)
        torch.testing.assert_close(m.encode_query(sketch=b["sketch"]), s)
        assert torch.allclose(t.norm(dim=-1), torch.ones(4)) and torch.allclose(s.norm(dim=-1), torch.ones(4))
        emb = m.embed(b)
        torch.testing.assert_close(emb["text+sketch"], q)
    assert tiny(renormalize_fusion=False).eval().encode_query(b["caption"], b["sketch"]).norm(dim=-1).max() < 1


def test_loss_equals_its_written_out_parts():
    m = tiny(p_text_only=0.0, p_sketch_only=0.0, classify=("image", "sketch", "text")).eval()
    b = batch()
    out = m.compute_losses(b)
    with torch.no_grad():
        v, s, t = m.encode_image(b["image"]), m.encode_sketch(b["sketch"]), m.encode_text(b["caption"])
        q = F.normalize((s + t) / 2, dim=-1)
        scale = m.logit_scale.exp()
        logits = scale * q @ v.T
        labels = torch.arange(4)
        clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2  # CLIP's loss
        asl = sum(asymmetric_loss(m.classifier(e), b["labels"]) for e in (v, s, t)) / 3
        tokens = m.vocab.encode(b["caption"], 32)
        cap = m.decoder.loss(tokens, v)
    assert out["contrastive"].item() == pytest.approx(clip.item(), rel=1e-5)
    assert out["classification"].item() == pytest.approx(asl.item(), rel=1e-5)
    assert out["caption"].item() == pytest.approx(cap.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(100 * clip.item() + 10 * asl.item() + cap.item(), rel=1e-5)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_zero_weights_remove_the_auxiliary_heads():
    m = tiny(w_classification=0.0, w_caption=0.0)
    assert m.classifier is None and m.decoder is None
    assert set(m.compute_losses(batch())) == {"loss", "contrastive", "logit_scale"}
    assert tiny(num_classes=0).classifier is None and tiny(caption_vocab=None).decoder is None


def test_modality_dropout_rates():
    m = tiny(p_text_only=0.2, p_sketch_only=0.3)
    torch.manual_seed(0)
    tp, sp = m.modality_masks(20000)
    assert (tp | sp).all()
    assert (~sp).float().mean().item() == pytest.approx(0.2, abs=0.015)
    assert (~tp).float().mean().item() == pytest.approx(0.3, abs=0.015)
    assert tiny(query="text").modality_masks(5) == (None, None)


def test_shared_and_separate_sketch_encoders():
    shared, separate = tiny(share_encoders=True), tiny(share_encoders=False)
    assert shared.sketch_tower is shared.image_tower
    assert separate.sketch_tower is not separate.image_tower
    for (n1, p1), (_, p2) in zip(separate.image_tower.named_parameters(), separate.sketch_tower.named_parameters()):
        assert torch.equal(p1, p2), n1  # the copy starts from the image tower's weights
    n_shared = sum(p.numel() for p in shared.parameters())
    n_sep = sum(p.numel() for p in separate.parameters())
    assert n_sep - n_shared == sum(p.numel() for p in separate.sketch_tower.parameters())
    text_only, sketch_only = tiny(query="text"), tiny(query="sketch")
    assert text_only.sketch_tower is None and sketch_only.text_tower is None
    assert text_only.query_types == ("text",) and tiny().query_types == ("text+sketch", "text", "sketch")


def test_bad_input():
    m = tiny().eval()
    b = batch()
    with pytest.raises(ValueError, match=f"must be {S}x{S}"):
        m.encode_sketch(torch.zeros(2, 1, S + 4, S + 4))
    with pytest.raises(ValueError, match=f"must be {S}x{S}"):
        m.encode_image(torch.zeros(2, 3, S, S - 1))
    with pytest.raises(ValueError, match="one sketch per image"):
        m.compute_losses({**b, "sketch": b["sketch"][:3]})
    with torch.no_grad():  # grey images are converted (repeated to RGB), RGB sketches reduced to their luminance
        grey = b["image"][:, :1]
        torch.testing.assert_close(m.encode_image(grey), m.encode_image(grey.expand(-1, 3, -1, -1)))
        torch.testing.assert_close(m.encode_sketch(b["sketch"].expand(-1, 3, -1, -1)), m.encode_sketch(b["sketch"]))
    with pytest.raises(ValueError, match="channels"):
        m.encode_image(torch.zeros(2, 2, S, S))
    with pytest.raises(ValueError, match="caption 1 is empty"):
        m.encode_query(["a red three", ""], b["sketch"][:2])
    with pytest.raises(ValueError, match="neither"):
        m.encode_query()
    with pytest.raises(ValueError, match="no sketch encoder"):
        tiny(query="text").encode_sketch(b["sketch"])
    with pytest.raises(ValueError, match="query"):
        tiny(query="image")
    with pytest.raises(ValueError, match="fewer than k=5"):
        m.retrieve(torch.randn(2, 16), torch.randn(3, 16), k=5)


def _brute_recall(q, g, targets, k):
    s = q @ g.T
    hits = [int(t) in sorted(range(g.shape[0]), key=lambda j: (-float(s[i, j]), j))[:k] for i, t in enumerate(targets)]
    return sum(hits) / len(hits)


@pytest.fixture(scope="module")
def scenes():
    dm = SceneRetrievalDataModule(sources=["digits"], num_train=96, num_val=36, num_test=36, image_size=S,
                                  object_size=(7, 12), batch_size=16, eval_batch_size=10)
    dm.setup()
    return dm


def test_validation_recall_equals_brute_force(scenes):
    m = tiny(num_classes=scenes.num_classes, caption_vocab=scenes.vocab.words)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    logged = trainer.validate(m, scenes, verbose=False)[0]
    m.eval()
    embs = [m.embed(b) for b in scenes.val_dataloader()]
    gallery = torch.cat([e["image"] for e in embs])
    targets = torch.cat([e["index"] for e in embs])
    for qt in ("text", "sketch", "text+sketch"):
        queries = torch.cat([e[qt] for e in embs])
        for k in (1, 5, 10):
            assert logged[f"val/retrieval/{qt}/recall@{k}"] == pytest.approx(
                _brute_recall(queries, gallery, targets, k)), (qt, k)


def test_gallery_smaller_than_k_is_an_error(scenes):
    m = tiny(num_classes=scenes.num_classes, caption_vocab=scenes.vocab.words, recall_ks=(1, 50))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with pytest.raises(ValueError, match="36 images, fewer than the largest recall cut-off k=50"):
        trainer.validate(m, scenes, verbose=False)


def test_short_fit_learns_to_retrieve(scenes):
    pl.seed_everything(0)
    m = tiny(num_classes=scenes.num_classes, caption_vocab=scenes.vocab.words, lr=3e-3)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=15, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    before = trainer.validate(m, scenes, verbose=False)[0]
    trainer.fit(m, scenes)
    after = trainer.validate(m, scenes, verbose=False)[0]
    key = "val/retrieval/text+sketch/recall@5"
    assert after[key] > max(before[key] + 0.2, 2 * 5 / 36), (before[key], after[key])  # chance: 5/36


def test_optimizer_groups_text_lr_and_no_decay():
    from types import SimpleNamespace

    m = tiny(lr=1e-3, text_lr=1e-5, weight_decay=0.1)
    m._trainer = SimpleNamespace(estimated_stepping_batches=10)
    opt = m.configure_optimizers()["optimizer"]
    text = {id(p) for p in m.text_tower.parameters()}
    seen = 0
    for g in opt.param_groups:
        for p in g["params"]:
            seen += 1
            assert g["initial_lr"] == (1e-5 if id(p) in text else 1e-3)  # before the warm-up factor
            assert g["weight_decay"] == (0.0 if p.ndim < 2 else 0.1)
    assert seen == len(list(m.parameters()))
    assert any(p is m.logit_scale for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"])
