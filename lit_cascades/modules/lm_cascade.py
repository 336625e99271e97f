"""Sequence-level LM cascades: deferral scores from token-level uncertainty, and learned post-hoc deferral.

Reference: Gupta et al., "Language Model Cascades: Token-level Uncertainty and Beyond", ICLR 2024
(arXiv:2404.10136). The small LM answers every prompt; a deferral rule decides from the
small model's output whether to keep it or to run the large LM on the prompt instead.

Two modules:

* :class:`LMCascade` holds the pair. ``predict_step`` greedily generates with both models on a batch of
  prompts and returns *records* (tokens, per-token log-probs, masks, qualities, Embed-1/Embed-2 features),
  which are cached so that every rule is compared on the same generations. ``test_step`` on a batch of
  records returns the scores of every rule (:meth:`LMCascade.deferral_scores`) for
  :class:`~lit_cascades.callbacks.DeferralCurveLogger`. Subclass and override ``deferral_scores`` to add a
  rule.
* :class:`PostHocDeferral` is the learned rule: an MLP on a feature vector Φ(x) trained to predict the
  golden deferral label; its deferral score feeds the same curve.

:func:`predict_records` generates the records of a whole prompt loader outside a Trainer, with a progress bar
(``Trainer.predict(cascade, loader)`` + :func:`concat_records` gives the same records under Lightning).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from lit_cascades._progress import progress_bar
from lit_cascades.data.lm import newline_counts, next_line
from lit_cascades.functional.sequence_scores import DEFAULT_QUANTILES, quantile_features, sequence_scores
from lit_cascades.functional.text import QUALITY_FUNCTIONS, text_quality
from lit_cascades.models.generation import greedy_generate, output_hidden_states
from lit_cascades.models.lm_pair import check_same_vocab, model_vocab_size
from lit_cascades.modules._optim import adamw

FEATURE_SETS: tuple[str, ...] = ("quantile", "embed1", "embed1+2")
LABELS: tuple[str, ...] = ("large_better", "gain")
ROLES: tuple[str, ...] = ("small", "large")


def golden_deferral_label(small_quality: Tensor, large_quality: Tensor, label: str = "large_better") -> Tensor:
    """Target of the post-hoc rule (the paper's "golden deferral label"; its exact definition is unverified).

    * ``"large_better"`` (default): ``1[q_L > q_S]`` — deferring strictly helps; a binary label.
    * ``"gain"``: ``q_L − q_S`` — the expected gain of deferring, whose conditional mean is the
      Bayes-optimal deferral score for real-valued qualities; a regression target.
    """
    if label not in LABELS:
        raise ValueError(f"`label` must be one of {list(LABELS)}; got {label!r}")
    if label == "large_better":
        return (large_quality > small_quality).float()
    return (large_quality - small_quality).float()


def post_hoc_features(
    records: Mapping[str, Tensor], features: str = "quantile", alphas: Sequence[float] = DEFAULT_QUANTILES
) -> Tensor:
    """The post-hoc feature vector Φ(x) ``[N, F]`` from cascade records.

    * ``"quantile"`` (Post-Hoc-Quantile): quantiles of the small model's per-token log-probs at ``alphas``.
    * ``"embed1"`` (Post-Hoc-Embed-1): + the small model's final-layer hidden state (mean over its output).
    * ``"embed1+2"`` (Post-Hoc-Embed-1+2): + an intermediate-layer hidden state of the large model run on the
      prompt and the small model's output (mean over the output positions).
    """
    if features not in FEATURE_SETS:
        raise ValueError(f"`features` must be one of {list(FEATURE_SETS)}; got {features!r}")
    parts = [quantile_features(records["small_logprobs"], records["small_mask"], alphas)]
    needed = {"embed1": ["small_embed"], "embed1+2": ["small_embed", "large_embed"]}.get(features, [])
    for key in needed:
        if key not in records:
            raise ValueError(f"features={features!r} needs `{key}` in the records; enable it when generating")
        parts.append(records[key].float())
    return torch.cat([p.float() for p in parts], dim=-1)


def post_hoc_in_features(features: str, alphas: Sequence[float], small: nn.Module, large: nn.Module) -> int:
    """The width of :func:`post_hoc_features` for ``features`` without computing it (to build rules up front):
    ``len(alphas)`` quantiles, + the small model's hidden size (Embed-1), + the large model's (Embed-2)."""
    if features not in FEATURE_SETS:
        raise ValueError(f"`features` must be one of {list(FEATURE_SETS)}; got {features!r}")
    width = len(alphas)
    if features in ("embed1", "embed1+2"):
        width += int(small.config.hidden_size)
    if features == "embed1+2":
        width += int(large.config.hidden_size)
    return width


def concat_records(batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Concatenate per-batch records (tensors along dim 0, lists by extension)."""
    if not batches:
        raise ValueError("no record batches to concatenate")
    out: dict[str, Any] = {}
    for key in batches[0]:
        values = [b[key] for b in batches]
        out[key] = torch.cat(values, 0) if isinstance(values[0], Tensor) else [v for b in values for v in b]
    return out


@torch.no_grad()
def predict_records(module: L.LightningModule, batches: Iterable[Mapping[str, Any]], progress: bool = True,
                    desc: str = "generating records") -> dict[str, Any]:
    """``module.predict_step`` over every batch of ``batches`` outside a Trainer, concatenated.

    For :class:`LMCascade` (and any module whose ``predict_step`` returns record dicts, e.g. the speculative
    cascade): tensors of each batch are moved to the module's device, the module is put in eval mode.
    ``progress`` shows a bar over the batches (stderr), labelled ``desc``.
    """
    from lightning.fabric.utilities.apply_func import move_data_to_device

    module.eval()
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    out = [module.predict_step(move_data_to_device(batch, module.device), i)
           for i, batch in enumerate(progress_bar(batches, desc=desc, total=total, unit="batch", progress=progress))]
    return concat_records(out)


def merge_records(*records: Mapping[str, Any]) -> dict[str, Any]:
    """Merge records of the same prompts computed separately (e.g. small after fine-tuning + cached large)."""
    merged: dict[str, Any] = {}
    n = None
    for rec in records:
        for key, value in rec.items():
            size = len(value)
            if n is None:
                n = size
            elif size != n:
                raise ValueError(f"records have different lengths: `{key}` has {size}, expected {n}")
            merged[key] = value
    return merged


class RecordsDataset(Dataset):
    """Per-example view of cascade records (tensor fields only), for ``test_step``/post-hoc training.

    Each item also carries ``"id"`` (its position), which :class:`DeferralCurveLogger` uses to drop the
    duplicates a ``DistributedSampler`` pads in under DDP.
    """

    def __init__(self, records: Mapping[str, Any], keys: Sequence[str] | None = None) -> None:
        self.records = {k: v for k, v in records.items() if isinstance(v, Tensor) and (keys is None or k in keys)}
        if not self.records:
            raise ValueError("records hold no tensors")
        sizes = {k: v.shape[0] for k, v in self.records.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"records have different lengths: {sizes}")
        self.n = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"id": torch.tensor(i), **{k: v[i] for k, v in self.records.items()}}


class LMCascade(L.LightningModule):
    """A sequence-level cascade of two causal LMs sharing a tokenizer (Gupta et al., ICLR 2024).

    Args:
        small, large: HF causal LMs (same vocabulary; checked here, before any compute).
        tokenizer: their shared tokenizer (decodes outputs for the quality metric).
        max_new_tokens: generation budget per prompt.
        stop_counts: ``[V]`` stop events per token; default :func:`~lit_cascades.data.lm.newline_counts`.
        num_stops: stop events that end an output (2: next-line prompts end before the newline that closes
            their last line, so the output is ``...\\n<line>\\n``).
        quality: per-example quality used for the deferral curve, ``"exact_match"`` or ``"token_f1"``
            (both are always recorded).
        chow_alphas: the α of the Chow-Quantile rules reported by :meth:`deferral_scores`.
        large_layer: hidden-state index of the large model for Embed-2 (0 = embeddings, ``-1`` = last);
            default: the middle layer. ``None`` together with ``embed_large=False`` skips it.
        embed_large: compute Embed-2 (one teacher-forced forward of the large model per prompt).
        include_stop: count the newline/stop token among the scored output tokens.
        roles: which models ``predict_step`` runs (``("small",)`` to re-score only the small model).
    """

    def __init__(
        self,
        small: nn.Module,
        large: nn.Module,
        tokenizer: Any,
        max_new_tokens: int = 32,
        stop_counts: Tensor | None = None,
        num_stops: int = 2,
        quality: str = "exact_match",
        chow_alphas: Sequence[float] = (0.0, 0.25, 0.5),
        large_layer: int | None = None,
        embed_large: bool = True,
        include_stop: bool = True,
        roles: Sequence[str] = ROLES,
    ) -> None:
        super().__init__()
        if quality not in QUALITY_FUNCTIONS:
            raise ValueError(f"`quality` must be one of {sorted(QUALITY_FUNCTIONS)}; got {quality!r}")
        bad_roles = [r for r in roles if r not in ROLES]
        if bad_roles or not roles:
            raise ValueError(f"`roles` must be a non-empty subset of {list(ROLES)}; got {list(roles)}")
        check_same_vocab(small, large, tokenizer, tokenizer)
        self.small, self.large, self.tokenizer = small.eval(), large.eval(), tokenizer
        if large_layer is None:
            large_layer = int(large.config.num_hidden_layers) // 2
        self.stop_counts = stop_counts if stop_counts is not None else newline_counts(tokenizer, model_vocab_size(small))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer needs a pad or eos token for batched generation")
        self.pad_token_id = int(pad)
        self.save_hyperparameters(ignore=["small", "large", "tokenizer", "stop_counts"])
        self.hparams.large_layer = large_layer
        self.post_hoc = nn.ModuleDict()

    def add_post_hoc(self, name: str, rule: PostHocDeferral) -> None:
        """Register a trained :class:`PostHocDeferral` whose score is reported as ``name``."""
        self.post_hoc[name] = rule

    # -- generation -------------------------------------------------------------------------------------
    def _generate_role(self, role: str, batch: Mapping[str, Any]) -> dict[str, Any]:
        model = self.small if role == "small" else self.large
        gen = greedy_generate(model, batch["input_ids"], batch["attention_mask"], self.hparams.max_new_tokens,
                              self.stop_counts, self.pad_token_id, self.hparams.num_stops, self.hparams.include_stop)
        texts = [next_line(t) for t in self.tokenizer.batch_decode(
            [row[m].tolist() for row, m in zip(gen.tokens, gen.mask)], skip_special_tokens=True)]
        rec: dict[str, Any] = {
            f"{role}_tokens": gen.tokens.cpu(), f"{role}_logprobs": gen.logprobs.cpu(),
            f"{role}_mask": gen.mask.cpu(), f"{role}_stopped": gen.stopped.cpu(), f"{role}_text": texts,
        }
        for metric in QUALITY_FUNCTIONS:
            rec[f"{role}_{metric}"] = text_quality(texts, batch["target"], metric)
        if role == "small":
            rec["small_embed"] = output_hidden_states(self.small, batch["input_ids"], batch["attention_mask"],
                                                      gen.tokens, gen.mask, layer=-1).cpu()
            if self.hparams.embed_large:
                rec["large_embed"] = output_hidden_states(
                    self.large, batch["input_ids"], batch["attention_mask"], gen.tokens, gen.mask,
                    layer=self.hparams.large_layer).cpu()
        return rec

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        """Records of one batch of prompts (from :func:`~lit_cascades.data.lm.collate_prompts`)."""
        rec: dict[str, Any] = {"target": list(batch["target"])}
        if "index" in batch:
            rec["index"] = batch["index"].cpu()
        for role in self.hparams.roles:
            rec.update(self._generate_role(role, batch))
        return rec

    # -- deferral rules ---------------------------------------------------------------------------------
    def deferral_scores(self, records: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every rule's deferral score ``[B]`` (higher = keep the small model's output), by name.

        Chow-Sum, Chow-Average and Chow-Quantile(α) on the small model's per-token log-probs, and each
        registered post-hoc rule. Override to add rules (call ``super()`` to keep these).
        """
        alphas = list(self.hparams.chow_alphas)
        seq = sequence_scores(records["small_logprobs"], records["small_mask"], alphas)
        scores = {"chow_sum": seq["chow_sum"], "chow_average": seq["chow_average"]}
        for k, alpha in enumerate(alphas):
            scores[f"chow_quantile_{alpha:g}"] = seq["quantiles"][:, k]
        for name, rule in self.post_hoc.items():
            scores[name] = rule.deferral_score(post_hoc_features(records, rule.hparams.features, rule.hparams.alphas))
        return scores

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int = 0) -> dict[str, Any]:
        """Scores of every rule on a batch of records, for :class:`DeferralCurveLogger`."""
        q = self.hparams.quality
        out = {"scores": self.deferral_scores(batch), "small_quality": batch[f"small_{q}"],
               "large_quality": batch[f"large_{q}"]}
        if "id" in batch:
            out["ids"] = batch["id"]
        return {"deferral": out}


class PostHocDeferral(L.LightningModule):
    """Learned post-hoc deferral rule: an MLP on Φ(x) predicting the golden deferral label.

    Reference: Gupta et al., ICLR 2024, §4 ("Post-Hoc-Quantile", "Post-Hoc-Embed-1", "Post-Hoc-Embed-1+2").
    The paper's MLP is reported (secondary source) as 5 layers; width, loss and label are not verified.
    Features are standardised with statistics of the training set (:meth:`fit_normalizer`).

    Batches are dicts with ``features [B, F]``, ``small_quality [B]`` and ``large_quality [B]`` (see
    :func:`post_hoc_dataset`).

    Args:
        in_features: ``F``.
        features: which Φ the rule reads from records (``"quantile"``, ``"embed1"``, ``"embed1+2"``).
        alphas: quantile levels of Φ.
        hidden: width of the hidden layers.
        num_layers: number of linear layers (≥ 1; 1 = logistic/linear regression).
        dropout: dropout after each hidden activation.
        lr, weight_decay: AdamW settings.
        label: ``"large_better"`` (BCE on ``1[q_L > q_S]``) or ``"gain"`` (MSE on ``q_L − q_S``).
    """

    def __init__(
        self,
        in_features: int,
        features: str = "quantile",
        alphas: Sequence[float] = DEFAULT_QUANTILES,
        hidden: int = 64,
        num_layers: int = 5,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        label: str = "large_better",
    ) -> None:
        super().__init__()
        if features not in FEATURE_SETS:
            raise ValueError(f"`features` must be one of {list(FEATURE_SETS)}; got {features!r}")
        if label not in LABELS:
            raise ValueError(f"`label` must be one of {list(LABELS)}; got {label!r}")
        if num_layers < 1 or in_features < 1:
            raise ValueError(f"`num_layers` and `in_features` must be >= 1; got {num_layers}, {in_features}")
        self.save_hyperparameters()
        self.hparams.alphas = [float(a) for a in alphas]
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("feature_mean", torch.zeros(in_features))
        self.register_buffer("feature_std", torch.ones(in_features))

    def fit_normalizer(self, features: Tensor) -> PostHocDeferral:
        """Set the standardisation from training features ``[N, F]``; returns ``self``."""
        if features.ndim != 2 or features.shape[1] != self.hparams.in_features:
            raise ValueError(f"`features` must be [N, {self.hparams.in_features}]; got {tuple(features.shape)}")
        self.feature_mean.copy_(features.float().mean(0))
        self.feature_std.copy_(features.float().std(0).clamp(min=1e-6) if features.shape[0] > 1
                               else torch.ones_like(self.feature_std))
        return self

    def forward(self, features: Tensor) -> Tensor:
        """The predicted deferral target ``[B]``: a logit of ``1[q_L > q_S]`` or the predicted gain."""
        if features.ndim != 2 or features.shape[1] != self.hparams.in_features:
            raise ValueError(f"`features` must be [B, {self.hparams.in_features}]; got {tuple(features.shape)}")
        x = (features.float() - self.feature_mean) / self.feature_std
        return self.mlp(x).squeeze(-1)

    def deferral_score(self, features: Tensor) -> Tensor:
        """Confidence ``[B]`` for the shared deferral curve: minus the predicted need to defer."""
        return -self(features)

    def compute_loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        if self.hparams.label == "large_better":
            return F.binary_cross_entropy_with_logits(prediction, target)
        return F.mse_loss(prediction, target)

    def _step(self, batch: Mapping[str, Tensor], stage: str) -> tuple[Tensor, Tensor]:
        pred = self(batch["features"])
        target = golden_deferral_label(batch["small_quality"], batch["large_quality"], self.hparams.label)
        loss = self.compute_loss(pred, target)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train", batch_size=pred.shape[0], sync_dist=stage != "train")
        return loss, pred

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")[0]

    def _eval(self, batch: Mapping[str, Tensor], stage: str) -> dict[str, Any]:
        _, pred = self._step(batch, stage)
        out = {"scores": -pred, "small_quality": batch["small_quality"], "large_quality": batch["large_quality"]}
        if "id" in batch:
            out["ids"] = batch["id"]
        return {"deferral": out}

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Any]:
        return self._eval(batch, "val")

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Any]:
        return self._eval(batch, "test")

    def configure_optimizers(self):
        return adamw(self, self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def post_hoc_dataset(records: Mapping[str, Tensor], features: str = "quantile",
                     alphas: Sequence[float] = DEFAULT_QUANTILES, quality: str = "exact_match") -> RecordsDataset:
    """``{"features", "small_quality", "large_quality"}`` examples for :class:`PostHocDeferral`."""
    return RecordsDataset({
        "features": post_hoc_features(records, features, alphas),
        "small_quality": records[f"small_{quality}"].float(),
        "large_quality": records[f"large_{quality}"].float(),
    })
