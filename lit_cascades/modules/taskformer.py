"""TASK-former: image retrieval from text and sketch with a late-fusion dual encoder (Sangkloy, Jitkrittum,
Yang, Hays, "A Sketch Is Worth a Thousand Words: Image Retrieval with Text and Sketch", ECCV 2022;
arXiv:2208.03354).

* Towers: an image encoder, a sketch encoder (the same weights with ``share_encoders=True``; otherwise a
  separate copy initialised from the image encoder, as the official ``clip.load`` does) and a text encoder, each
  ending in the joint space; embeddings are L2-normalised.
* Query: late fusion, the normalised mean of the text and sketch embeddings (:func:`~lit_cascades.functional.
  fusion.late_fusion`); text-only / sketch-only queries use the one modality present. ``query`` picks what
  the model is trained for: ``"text+sketch"`` (TASK-former; with query-modality dropout, ``p_text_only`` /
  ``p_sketch_only`` of the training queries lose their sketch / caption, so one model serves all three query
  types) or the single-modality baselines ``"text"`` (CLIP-style text→image) and ``"sketch"``.
* Losses: ``L = w_e·L_e + w_c·L_c + w_d·L_d`` with

  - ``L_e``: symmetric InfoNCE between queries and images with a learnable temperature (CLIP's
    ``logit_scale = log(1/0.07)``, clamped at 100), gathered across processes with gradients
    (:func:`~lit_cascades.functional.contrastive.info_nce`);
  - ``L_c``: multi-label object classification with the asymmetric loss (γ⁻=4, γ⁺=1, clip 0.05) by an MLP
    head ``D → 2D → C`` on the embeddings listed in ``classify`` (default the image embedding; the Tmq244
    reimplementation averages image, sketch and text);
  - ``L_d``: caption generation by a small decoder cross-attending to one context vector
    (``decoder_context``: ``"image"`` (default), ``"image_sketch"`` = normalised mean of image and sketch
    (Tmq244), or ``"fused"`` = the query (zzmshinnosuke)).

  The weights ``100 / 10 / 1`` come from the two public reimplementations (the paper's text was not
  verified); a weight of 0 removes the loss and its head.
* Evaluation: Recall@{1,5,10} (and MRR@10) of text, sketch and text+sketch queries against the whole
  evaluation split's images, ranked by cosine similarity with chunked top-k; the gallery is gathered from every
  process, metrics are synced (:class:`~lit_cascades.metrics.retrieval.RetrievalMetrics`). Logged as
  ``{val,test}/retrieval/<query>/recall@<k>``.

Batches are the dicts of :mod:`lit_cascades.data.text_sketch`. Subclass hooks: :meth:`compute_losses`,
:meth:`classification_loss`, :meth:`caption_loss`, :meth:`embed`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lit_cascades.data.drawing import luminance, to_rgb
from lit_cascades.data.text_sketch import WordVocab
from lit_cascades.functional._checks import check_choice, check_ints, check_optimizer_args, check_range
from lit_cascades.functional.asymmetric import asymmetric_loss
from lit_cascades.functional.contrastive import gather_with_grad, info_nce
from lit_cascades.functional.fusion import late_fusion
from lit_cascades.functional.retrieval import Qrels, chunked_topk
from lit_cascades.metrics.retrieval import RetrievalMetrics
from lit_cascades.models.caption_decoder import CaptionDecoder
from lit_cascades.models.towers import build_text_tower, build_vision_tower
from lit_cascades.modules._optim import adamw, cosine_warmup_decay, per_step, total_steps

QUERY_TYPES = ("text+sketch", "text", "sketch")
MODALITIES = ("image", "sketch", "text")


class TaskFormer(pl.LightningModule):
    """Text + sketch → image retrieval (see the module docstring).

    Args:
        image_size: side ``S`` of the square images and sketches.
        embed_dim: joint embedding width ``D``.
        image_encoder / image_encoder_kwargs: vision tower spec (:func:`~lit_cascades.models.towers.
            build_vision_tower`), used for images and sketches.
        share_encoders: one tower for images and sketches (else a copy for sketches, same initial weights).
        text_encoder / text_encoder_kwargs / max_text_length: text tower spec (:func:`~lit_cascades.models.
            towers.build_text_tower`).
        projection: ``"auto"`` (no extra projection when a backbone already outputs ``D``) or ``"linear"``.
        query: ``"text+sketch"`` | ``"text"`` | ``"sketch"``: the queries trained and evaluated.
        p_text_only / p_sketch_only: query-modality dropout for ``query="text+sketch"`` (0.1 / 0.1 in the
            reimplementations).
        renormalize_fusion: L2-normalise the fused query (see :mod:`lit_cascades.functional.fusion`).
        num_classes / class_names: object classes of the multi-hot ``labels`` (0 disables ``L_c``).
        classify: embeddings classified by ``L_c`` (subset of ``"image"``, ``"sketch"``, ``"text"``).
        caption_vocab: the caption decoder's words (a :class:`WordVocab`'s ``words``; ``None`` disables ``L_d``).
        decoder_context / decoder_kwargs / max_caption_length: caption decoder settings.
        w_contrastive / w_classification / w_caption: loss weights (100 / 10 / 1 from the reimplementations).
        asl_gamma_neg / asl_gamma_pos / asl_clip / asl_reduction: asymmetric-loss parameters
            (:func:`~lit_cascades.functional.asymmetric.asymmetric_loss`; ``"mean"`` over the batch as in
            Tmq244, or ``"sum"`` as the official ASL module, which makes ``L_c`` grow with the batch size).
        init_temperature / max_logit_scale: CLIP temperature init (0.07) and the clamp of ``exp(logit_scale)``.
        lr / text_lr / weight_decay / warmup_steps / betas / eps: AdamW (no decay on biases, norms and the
            temperature; ``text_lr`` for the text tower, e.g. lower for a pretrained one; ``None``: ``lr``),
            linear warm-up then cosine decay.
        recall_ks: Recall@k cut-offs; eval_chunk_size: gallery rows scored at once.
        sketch_background: ``"black"`` feeds sketches as white strokes on black, ``"white"`` as black strokes on
            white (what pretrained image towers saw in photos of drawings).
    """

    def __init__(
        self,
        image_size: int = 40,
        embed_dim: int = 64,
        image_encoder: str = "cnn",
        image_encoder_kwargs: dict[str, Any] | None = None,
        share_encoders: bool = False,
        text_encoder: str = "tiny-bert",
        text_encoder_kwargs: dict[str, Any] | None = None,
        max_text_length: int = 32,
        projection: str = "auto",
        query: str = "text+sketch",
        p_text_only: float = 0.1,
        p_sketch_only: float = 0.1,
        renormalize_fusion: bool = True,
        num_classes: int = 0,
        class_names: Sequence[str] | None = None,
        classify: Sequence[str] = ("image",),
        caption_vocab: Sequence[str] | None = None,
        decoder_context: str = "image",
        decoder_kwargs: dict[str, Any] | None = None,
        max_caption_length: int = 32,
        w_contrastive: float = 100.0,
        w_classification: float = 10.0,
        w_caption: float = 1.0,
        asl_gamma_neg: float = 4.0,
        asl_gamma_pos: float = 1.0,
        asl_clip: float = 0.05,
        asl_reduction: str = "mean",
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        lr: float = 1e-3,
        text_lr: float | None = None,
        weight_decay: float = 0.05,
        warmup_steps: int = 50,
        betas: Sequence[float] = (0.9, 0.98),
        eps: float = 1e-6,
        recall_ks: Sequence[int] = (1, 5, 10),
        eval_chunk_size: int = 1024,
        sketch_background: str = "black",
    ) -> None:
        super().__init__()
        check_choice("query", query, QUERY_TYPES)
        check_choice("decoder_context", decoder_context, ("image", "image_sketch", "fused"))
        check_choice("sketch_background", sketch_background, ("black", "white"))
        check_choice("asl_reduction", asl_reduction, ("mean", "sum"))
        check_range("p_text_only", p_text_only, 0.0, 1.0)
        check_range("p_sketch_only", p_sketch_only, 0.0, 1.0)
        if p_text_only + p_sketch_only >= 1:
            raise ValueError(f"`p_text_only + p_sketch_only` must be < 1; got {p_text_only + p_sketch_only}")
        for name, w in (("w_contrastive", w_contrastive), ("w_classification", w_classification),
                        ("w_caption", w_caption)):
            if w < 0:
                raise ValueError(f"`{name}` must be >= 0; got {w}")
        bad = [m for m in classify if m not in MODALITIES]
        if bad:
            raise ValueError(f"`classify` must hold modalities from {list(MODALITIES)}; got {list(classify)}")
        if not init_temperature > 0:
            raise ValueError(f"`init_temperature` must be > 0; got {init_temperature}")
        if not max_logit_scale > 1:
            raise ValueError(f"`max_logit_scale` must be > 1; got {max_logit_scale}")
        check_ints(image_size=(image_size, 8), embed_dim=(embed_dim, 1), max_text_length=(max_text_length, 2),
                   max_caption_length=(max_caption_length, 2), warmup_steps=(warmup_steps, 0),
                   eval_chunk_size=(eval_chunk_size, 1))
        check_optimizer_args(recall_ks, weight_decay, lr=lr, text_lr=lr if text_lr is None else text_lr)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"`class_names` has {len(class_names)} names for num_classes={num_classes}")
        self.save_hyperparameters()
        self.uses_text = query in ("text+sketch", "text")
        self.uses_sketch = query in ("text+sketch", "sketch")
        self.classify = tuple(m for m in classify if m == "image" or (m == "text" and self.uses_text)
                              or (m == "sketch" and self.uses_sketch))
        if decoder_context != "image" and not self.uses_sketch:
            raise ValueError(f"decoder_context={decoder_context!r} needs sketches; this model has query={query!r}")

        self.image_tower = build_vision_tower(image_encoder, image_size, embed_dim, projection,
                                              **(image_encoder_kwargs or {}))
        self.sketch_tower = None
        if self.uses_sketch:
            self.sketch_tower = self.image_tower if share_encoders else copy.deepcopy(self.image_tower)
        self.text_tower = None
        if self.uses_text:
            self.text_tower = build_text_tower(text_encoder, embed_dim, max_text_length, projection,
                                               **(text_encoder_kwargs or {}))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

        self.classifier = None
        if num_classes > 0 and w_classification > 0 and self.classify:
            self.classifier = nn.Sequential(nn.Linear(embed_dim, 2 * embed_dim), nn.ReLU(),
                                            nn.Linear(2 * embed_dim, num_classes))
        self.vocab = WordVocab(caption_vocab) if caption_vocab is not None else None
        self.decoder = None
        if self.vocab is not None and w_caption > 0:
            self.decoder = CaptionDecoder(len(self.vocab), embed_dim, max_length=max_caption_length,
                                          pad_id=WordVocab.PAD, **(decoder_kwargs or {}))

        self.query_types = QUERY_TYPES if query == "text+sketch" else (query,)
        self.metrics = nn.ModuleDict({
            stage: nn.ModuleDict({q.replace("+", "_"): RetrievalMetrics(recall_ks=recall_ks, mrr_k=10, ndcg_k=10)
                                  for q in self.query_types})
            for stage in ("val", "test")})
        self._eval_buffer: list[dict[str, Tensor]] = []

    # ------------------------------------------------------------------------------------------ encoders
    def _check_size(self, x: Tensor, what: str) -> None:
        s = self.hparams.image_size
        if tuple(x.shape[-2:]) != (s, s):
            raise ValueError(f"{what} must be {s}x{s} pixels (the model's image_size); got {tuple(x.shape[-2:])}")

    def prepare_images(self, images: Tensor) -> Tensor:
        """``[B, C, S, S]`` in ``[0, 1]`` with ``C`` = 3 (RGB), 1 (grey: repeated) or 4 (RGBA: alpha dropped)."""
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise ValueError(f"`images` must be [B, C, H, W]; got shape {tuple(images.shape)}")
        self._check_size(images, "images")
        return to_rgb(images.float())

    def prepare_sketches(self, sketches: Tensor) -> Tensor:
        """Ink ``[B, 1, S, S]`` (1 = stroke) → the sketch tower's ``[B, 3, S, S]`` input. RGB sketches are
        reduced to their luminance first (sketches carry no colour)."""
        if sketches.ndim == 3:
            sketches = sketches[None]
        if sketches.ndim != 4 or sketches.shape[1] not in (1, 3):
            raise ValueError(f"`sketches` must be [B, 1, H, W] ink (or [B, 3, H, W]); got shape {tuple(sketches.shape)}")
        self._check_size(sketches, "sketches")
        ink = luminance(sketches.float()) if sketches.shape[1] == 3 else sketches.float()
        if self.hparams.sketch_background == "white":
            ink = 1.0 - ink
        return ink.expand(-1, 3, -1, -1)

    def encode_image(self, images: Tensor) -> Tensor:
        """Images ``[B, C, S, S]`` in ``[0, 1]`` → L2-normalised ``[B, D]``."""
        return F.normalize(self.image_tower(self.prepare_images(images)), dim=-1)

    def encode_sketch(self, sketches: Tensor) -> Tensor:
        """Sketch ink ``[B, 1, S, S]`` → L2-normalised ``[B, D]``."""
        if self.sketch_tower is None:
            raise ValueError(f"this model was trained with query={self.hparams.query!r} and has no sketch encoder")
        return F.normalize(self.sketch_tower(self.prepare_sketches(sketches)), dim=-1)

    def encode_text(self, captions: Sequence[str] | str) -> Tensor:
        """Captions → L2-normalised ``[B, D]``. Empty captions raise ``ValueError``."""
        if self.text_tower is None:
            raise ValueError(f"this model was trained with query={self.hparams.query!r} and has no text encoder")
        captions = [captions] if isinstance(captions, str) else list(captions)
        return F.normalize(self.text_tower(captions), dim=-1)

    def _encode_visual(self, images: Tensor, sketches: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Image and sketch embeddings; a shared tower sees both in one batch (one set of BatchNorm statistics)."""
        if sketches is None:
            return self.encode_image(images), None
        if images.shape[0] != sketches.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {sketches.shape[0]} sketches; expected one sketch per image")
        if self.sketch_tower is self.image_tower:
            x = torch.cat([self.prepare_images(images), self.prepare_sketches(sketches)])
            v, s = F.normalize(self.image_tower(x), dim=-1).chunk(2)
            return v, s
        return self.encode_image(images), self.encode_sketch(sketches)

    def fuse(self, text: Tensor | None, sketch: Tensor | None, text_present: Tensor | None = None,
             sketch_present: Tensor | None = None) -> Tensor:
        """Late fusion of the available query embeddings ``[B, D]`` (masks ``[B]`` mark rows that have them)."""
        embs, masks = [], []
        for e, m in ((text, text_present), (sketch, sketch_present)):
            if e is not None:
                embs.append(e)
                masks.append(m)
        if not embs:
            raise ValueError("a query needs a caption, a sketch or both; got neither")
        return late_fusion(embs, masks, renormalize=self.hparams.renormalize_fusion)

    def encode_query(self, text: Sequence[str] | str | None = None, sketch: Tensor | None = None) -> Tensor:
        """Query embeddings ``[B, D]`` from captions, sketch ink ``[B, 1, S, S]``, or both (late fusion)."""
        t = self.encode_text(text) if text is not None else None
        s = self.encode_sketch(sketch) if sketch is not None else None
        if t is not None and s is not None and t.shape[0] != s.shape[0]:
            raise ValueError(f"{t.shape[0]} captions but {s.shape[0]} sketches; expected one of each per query")
        return self.fuse(t, s)

    @torch.no_grad()
    def retrieve(self, queries: Tensor, gallery: Tensor, k: int = 5) -> tuple[Tensor, Tensor]:
        """``(scores [Q, k], gallery rows [Q, k])`` of the top-``k`` images by cosine similarity (chunked)."""
        if gallery.shape[0] < k:
            raise ValueError(f"the gallery has {gallery.shape[0]} images, fewer than k={k}")
        return chunked_topk(queries, gallery, k, chunk_size=self.hparams.eval_chunk_size)

    # ------------------------------------------------------------------------------------------ losses
    def modality_masks(self, batch_size: int) -> tuple[Tensor | None, Tensor | None]:
        """Training query-modality dropout: ``(text_present [B], sketch_present [B])`` (``None`` = all).

        Under DDP with ``W`` processes the uniforms of the whole global batch (``B·W`` rows) are drawn from the
        global RNG, which is in the same state on every process (the runner seeds each epoch), and this process
        keeps rows ``rank, rank + W, ...``: the rows the distributed sampler gave it. The masks are then those of
        one process with the global batch, as long as nothing else draws from the global RNG per row (sketch
        augmentation in the data, dropout in the towers).
        """
        if self.hparams.query != "text+sketch":
            return None, None
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        u = torch.rand(batch_size * world, device=self.device)[rank::world]
        text_only = u < self.hparams.p_text_only
        sketch_only = (u >= self.hparams.p_text_only) & (u < self.hparams.p_text_only + self.hparams.p_sketch_only)
        return ~sketch_only, ~text_only

    @property
    def temperature(self) -> Tensor:
        """``1 / exp(logit_scale)`` with ``exp(logit_scale)`` clamped at ``max_logit_scale``."""
        return self.logit_scale.clamp(max=math.log(self.hparams.max_logit_scale)).exp().reciprocal()

    def classification_loss(self, embeddings: dict[str, Tensor], labels: Tensor) -> Tensor:
        """Mean asymmetric loss of the classifier on the embeddings named in ``classify``."""
        hp = self.hparams
        losses = [asymmetric_loss(self.classifier(embeddings[m]), labels, gamma_neg=hp.asl_gamma_neg,
                                  gamma_pos=hp.asl_gamma_pos, clip=hp.asl_clip, reduction=hp.asl_reduction)
                  for m in self.classify]
        return torch.stack(losses).mean()

    def caption_loss(self, embeddings: dict[str, Tensor], captions: Sequence[str]) -> Tensor:
        """Teacher-forced caption loss of the decoder from the ``decoder_context`` embedding."""
        ctx = self.hparams.decoder_context
        if ctx == "image":
            context = embeddings["image"]
        elif ctx == "fused":
            context = embeddings["query"]
        else:
            context = late_fusion([embeddings["image"], embeddings["sketch"]])
        tokens = self.vocab.encode(list(captions), self.hparams.max_caption_length).to(context.device)
        return self.decoder.loss(tokens, context)

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``{"loss", "contrastive", ["classification"], ["caption"], "logit_scale"}`` of one training batch."""
        hp = self.hparams
        images = batch["image"]
        b = images.shape[0]
        v, s = self._encode_visual(images, batch["sketch"] if self.uses_sketch else None)
        t = self.encode_text(batch["caption"]) if self.uses_text else None
        text_present, sketch_present = self.modality_masks(b)
        q = self.fuse(t, s, text_present, sketch_present)
        emb = {"image": v, "query": q, **({"sketch": s} if s is not None else {}), **({"text": t} if t is not None else {})}
        out: dict[str, Tensor] = {}
        out["contrastive"] = info_nce(q, v, temperature=self.temperature, symmetric=True,
                                      key_ids=batch.get("index")).loss
        loss = hp.w_contrastive * out["contrastive"]
        if self.classifier is not None:
            out["classification"] = self.classification_loss(emb, batch["labels"].float())
            loss = loss + hp.w_classification * out["classification"]
        if self.decoder is not None:
            out["caption"] = self.caption_loss(emb, batch["caption"])
            loss = loss + hp.w_caption * out["caption"]
        out["loss"] = loss
        out["logit_scale"] = self.temperature.detach().reciprocal()
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self.compute_losses(batch)
        bs = batch["image"].shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        for k, v in out.items():
            if k != "loss":
                self.log(f"train/{k}", v, batch_size=bs)
        return out["loss"]

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def embed(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Embeddings of an evaluation batch: ``"image"`` and one entry per query type (``"text"``,
        ``"sketch"``, ``"text+sketch"``) the model serves, plus ``"index"``."""
        v, s = self._encode_visual(batch["image"], batch["sketch"] if self.uses_sketch else None)
        t = self.encode_text(batch["caption"]) if self.uses_text else None
        out = {"index": batch["index"], "image": v}
        if t is not None:
            out["text"] = t
        if s is not None:
            out["sketch"] = s
        if t is not None and s is not None:
            out["text+sketch"] = self.fuse(t, s)
        return out

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_buffer.append(self.embed(batch))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_buffer.append(self.embed(batch))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        return self.embed(batch)

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")

    def _evaluate(self, stage: str) -> None:
        buf, self._eval_buffer = self._eval_buffer, []
        if not buf or self.trainer.sanity_checking:
            return
        results = self.retrieval_results(buf, stage)
        for qt, res in results.items():
            for name in (*(f"recall@{r}" for r in self.hparams.recall_ks), "mrr@10"):
                self.log(f"{stage}/retrieval/{qt}/{name}", res[name].item(), prog_bar=(name == "recall@1"))

    @torch.no_grad()
    def retrieval_results(self, embeddings: Sequence[dict[str, Tensor]], stage: str = "val") -> dict[str, dict[str, Tensor]]:
        """Retrieval metrics of one evaluation epoch from this process's :meth:`embed` outputs.

        The gallery (every process's images, duplicates from sampler padding removed by ``index``) is gathered;
        this process's queries are ranked against all of it with chunked top-k; the metrics are synced across
        processes. Returns ``{query type: {"recall@k": ..., "mrr@10": ..., ...}}``.
        """
        ids = torch.cat([b["index"] for b in embeddings]).long()
        gallery = torch.cat([b["image"] for b in embeddings])
        all_ids, all_gallery = gather_with_grad(ids)[0], gather_with_grad(gallery)[0]
        order = torch.argsort(all_ids, stable=True)
        sorted_ids = all_ids[order]
        first = torch.ones_like(sorted_ids, dtype=torch.bool)
        first[1:] = sorted_ids[1:] != sorted_ids[:-1]
        gallery_ids, gallery = sorted_ids[first], all_gallery[order[first]]
        k = max(self.hparams.recall_ks)
        if gallery.shape[0] < k:
            raise ValueError(f"the {stage} gallery has {gallery.shape[0]} images, fewer than the largest recall "
                             f"cut-off k={k}; evaluate on at least {k} images or lower recall_ks")
        rows = torch.searchsorted(gallery_ids, ids)  # each query's own image is its single relevant item
        qrels = Qrels.from_targets(torch.arange(gallery.shape[0]))
        results = {}
        for qt in self.query_types:
            queries = torch.cat([b[qt] for b in embeddings])
            _, ranked = chunked_topk(queries, gallery, k, chunk_size=self.hparams.eval_chunk_size)
            metric = self.metrics[stage][qt.replace("+", "_")]
            metric.update(ranked, qrels, rows.cpu())
            results[qt] = metric.compute()
            metric.reset()
        return results

    # ------------------------------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        text_ids = {id(p) for p in self.text_tower.parameters()} if self.text_tower is not None else set()
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                no_decay = p.ndim < 2 or "logit_scale" in name
                groups.setdefault((id(p) in text_ids, no_decay), []).append(p)
        text_lr = hp.text_lr if hp.text_lr is not None else hp.lr
        opt = adamw(self, [{"params": ps, "lr": text_lr if is_text else hp.lr,
                                  "weight_decay": 0.0 if no_decay else hp.weight_decay}
                                 for (is_text, no_decay), ps in groups.items()], lr=hp.lr, betas=tuple(hp.betas),
                                eps=hp.eps)
        total = total_steps(self)
        # linear warm-up over at most half the run, then cosine decay to 0
        return per_step(opt, cosine_warmup_decay(opt, total, min(hp.warmup_steps, total // 2)))
