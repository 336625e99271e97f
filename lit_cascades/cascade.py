"""A deployable two-model classification cascade: trained parts + a deferral rule + a calibrated threshold.

:class:`Cascade` answers with the small model unless its deferral score (a confidence: higher = keep) is
below a threshold ``τ``, in which case the row is sent to the large model. Only the deferred rows are run
through the large model. The threshold is set on held-out data by :meth:`Cascade.calibrate` so that the
deferral rate (the share of traffic the large model sees) stays at or below a target, with one of three
guarantees (see :meth:`Cascade.calibrate`):

* ``"quantile"``: the empirical rate on the calibration data is ``≤ target`` (no statement about new data);
* ``"conformal"``: ``E[rate on new data] ≤ target``, the expectation taken over the calibration draw
  (split-conformal reasoning; Vovk et al. 2005, Papadopoulos et al. 2002, Lei et al. 2018);
* ``"clopper_pearson"``: ``P(true rate > target) ≤ 1 − confidence`` over the calibration draw (an exact
  binomial / order-statistic bound).

All three assume the calibration rows and the rows served later are exchangeable (e.g. i.i.d. from one
distribution). Under a distribution shift no guarantee holds.

A cascade is saved as one directory (:meth:`Cascade.save` / :meth:`Cascade.load`)::

    <dir>/cascade.json   score kind, threshold, calibration report, model references (_target_ + kwargs)
    <dir>/small.pt       the small model's state dict
    <dir>/large.pt       the large model's state dict

and can be built from a ``gatekeeper`` recipe run directory (:meth:`Cascade.from_run`; the Gatekeeper paper
is Rabanser et al., arXiv:2502.19335). Serving it over HTTP is a separate step.

This module is plain torch: Lightning (through :mod:`lit_cascades.runner`) is imported only by
:meth:`Cascade.load` and :meth:`Cascade.from_run`, which rebuild models from ``_target_`` references.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_cascades.functional.confidence import CONFIDENCE_KINDS, confidence_from_logits
from lit_cascades.functional.deferral import calibrate_threshold, deferral_metrics
from lit_cascades.io import atomic_save, atomic_write_json, jsonable, safe_torch_load

FORMAT = "lit_cascades.cascade"
FORMAT_VERSION = 1
METHODS: tuple[str, ...] = ("quantile", "conformal", "clopper_pearson")
ScoreFn = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------------------------------------
# outputs and reports
# --------------------------------------------------------------------------------------------------------
@dataclass
class CascadeOutput:
    """What :meth:`Cascade.predict` returns for a batch of ``B`` rows.

    Attributes:
        predictions: ``[B]`` class ids: the large model's for deferred rows, the small model's for the others.
        deferred: ``[B]`` bool, True where the row was sent to the large model (``score < threshold`` or a NaN
            score).
        scores: ``[B]`` the small model's deferral score (higher = keep).
        calls: ``[B]`` model calls spent on the row: 1 when kept, 2 when deferred.
        seconds: ``[B]`` wall time spent on the row: the small model's call time divided over all ``B`` rows,
            plus, for a deferred row, the large model's call time divided over the deferred rows.
    """

    predictions: Tensor
    deferred: Tensor
    scores: Tensor
    calls: Tensor
    seconds: Tensor

    @property
    def deferral_rate(self) -> float:
        """The share of rows sent to the large model."""
        return float(self.deferred.float().mean()) if self.deferred.numel() else 0.0


@dataclass
class CalibrationReport:
    """What :meth:`Cascade.calibrate` found, stored in ``cascade.json``.

    Attributes:
        method: ``"quantile"``, ``"conformal"`` or ``"clopper_pearson"``.
        n: number of calibration rows.
        target_rate: the deferral rate asked for.
        confidence: the level of the ``"clopper_pearson"`` bound (None for the other methods).
        threshold: ``τ``: a row is deferred iff its score ``< τ`` (``-inf``: never, ``+inf``: always).
        rate: the deferral rate ``τ`` realises on the calibration rows.
        bound: ``"clopper_pearson"``: an upper bound on the true deferral rate holding with probability
            ``≥ confidence`` over the calibration draw; ``"conformal"``: the bound ``rank/(n+1)`` on the
            expected rate on a fresh row; ``"quantile"``: None.
        guarantee: the guarantee in words.
        rank: ``τ`` is the ``rank``-th smallest calibration score (0: ``-inf``, ``n+1``: ``+inf``).
        small_quality, large_quality, cascade_quality: mean correctness of the small model, the large model
            and the cascade at ``τ`` on the calibration rows (when labels or correctness were given).
        cost: expected model calls per row at ``τ`` on the calibration rows (``1 + rate``).
        curve_rates, curve_quality: the deferral curve (cascade quality when the ``k`` least confident rows
            are deferred, ``k = 0..n``), from :func:`lit_cascades.functional.deferral_metrics`.
        deferral: that function's scalar metrics (``auc_df``, ``s_d``, ``auroc``, ...).
    """

    method: str
    n: int
    target_rate: float
    confidence: float | None
    threshold: float
    rate: float
    bound: float | None
    guarantee: str
    rank: int
    small_quality: float | None = None
    large_quality: float | None = None
    cascade_quality: float | None = None
    cost: float | None = None
    curve_rates: list[float] | None = None
    curve_quality: list[float] | None = None
    deferral: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``±inf`` thresholds as ``±1e308``, see :func:`lit_cascades.io.jsonable`)."""
        return jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CalibrationReport:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["threshold"] = _float_from_json(d["threshold"])
        return cls(**d)


def _float_from_json(v: Any) -> float:
    v = float(v)
    return math.copysign(math.inf, v) if abs(v) >= 1e308 else v


# --------------------------------------------------------------------------------------------------------
# calibration: which order statistic of the calibration scores is the threshold
# --------------------------------------------------------------------------------------------------------
def _check_target(target_rate: float) -> float:
    if isinstance(target_rate, bool) or not isinstance(target_rate, int | float) or not 0.0 <= target_rate <= 1.0:
        raise ValueError(f"target_rate: expected a deferral rate in [0, 1]; got {target_rate!r}")
    return float(target_rate)


def quantile_rank(n: int, target_rate: float) -> int:
    """Rank ``j`` (1-based) of the plain-quantile threshold: ``j = ⌊target·n⌋ + 1``, so that at most
    ``⌊target·n⌋`` calibration scores lie strictly below it (``j = n + 1`` means ``+inf``)."""
    return min(math.floor(target_rate * n + 1e-9), n) + 1


def conformal_rank(n: int, target_rate: float) -> int:
    """Rank ``j = ⌊target·(n+1)⌋`` (1-based; 0 means ``-inf``, never defer) of the split-conformal threshold.

    Why: for exchangeable scores ``S_1..S_n, S_{n+1}`` and ``τ = S_(j)`` (the ``j``-th smallest of the first
    ``n``), the event ``S_{n+1} < S_(j)`` means at least ``n+1−j`` of the other ``n`` scores are strictly
    greater than ``S_{n+1}``; at most ``j`` of the ``n+1`` exchangeable positions can have that property, so
    ``P(S_{n+1} < τ) ≤ j/(n+1)``, with equality when scores have no ties. ``P(S_{n+1} < τ)``, averaged over
    the calibration draw, is the expected true deferral rate; it is ``≤ target`` iff ``j ≤ target·(n+1)``,
    and the largest such ``j`` is ``⌊target·(n+1)⌋``. (This is the usual split-conformal quantile
    ``⌈(1−target)(n+1)⌉`` of the non-conformity ``−score``, read from the other end:
    ``n+1 − ⌈(1−target)(n+1)⌉ = ⌊target·(n+1)⌋``.) It is also tight: without ties the expected rate is
    ``j/(n+1) > target − 1/(n+1)``.
    """
    return min(math.floor(target_rate * (n + 1) + 1e-9), n + 1)


@functools.lru_cache(maxsize=256)
def clopper_pearson_rank(n: int, target_rate: float, confidence: float) -> tuple[int, float]:
    """Largest rank ``j`` whose Clopper–Pearson upper bound is ``≤ target``, and that bound.

    At ``τ = S_(j)`` the calibration data show ``k = j − 1`` deferrals out of ``n`` (no ties). The one-sided
    Clopper–Pearson upper bound at level ``confidence`` for ``k`` successes is
    ``u(k) = Beta.ppf(confidence, k+1, n−k)``; we take the largest ``j`` with ``u(j−1) ≤ target``.

    The bound is exact for this use, not an approximation: the true deferral rate at ``τ = S_(j)`` is
    ``F(S_(j)−) ≤ U_(j)`` (with equality for continuous scores), where ``U_(j) ~ Beta(j, n−j+1)`` is the
    ``j``-th uniform order statistic, and ``P(U_(j) > u) = P(Binomial(n, u) ≤ j−1)``, which equals
    ``1 − confidence`` at ``u = u(j−1)``. So ``P(true rate > target) ≤ P(true rate > u(j−1)) ≤ 1 − confidence``
    over the calibration draw. Returns ``(0, 0.0)`` when even ``j = 1`` is too large (``n`` too small: it
    needs ``(1−target)^n ≤ 1−confidence``), and ``(n+1, 1.0)`` for ``target = 1``.
    """
    if target_rate >= 1.0:
        return n + 1, 1.0
    import numpy as np
    from scipy.stats import beta  # a dependency of scikit-learn, itself a dependency of lit_cascades

    j = np.arange(1, n + 1)
    upper = beta.ppf(confidence, j, n - j + 1)  # increasing in j
    ok = np.flatnonzero(upper <= target_rate)
    if ok.size == 0:
        return 0, 0.0
    best = int(ok[-1])
    return best + 1, float(upper[best])


def _threshold_at_rank(sorted_scores: Tensor, rank: int) -> float:
    if rank <= 0:
        return -math.inf
    if rank > sorted_scores.shape[0]:
        return math.inf
    return float(sorted_scores[rank - 1])


def check_calibration_args(target_rate: float, method: str, confidence: float | None) -> tuple[float, float | None]:
    """Check the arguments of a calibration; returns ``(target_rate, confidence)`` as floats (or None)."""
    target_rate = _check_target(target_rate)
    if method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}; got {method!r}")
    if method == "clopper_pearson":
        if confidence is None or isinstance(confidence, bool) or not isinstance(confidence, int | float) \
                or not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence: method='clopper_pearson' needs a level in (0, 1), e.g. 0.95; "
                             f"got {confidence!r}")
        confidence = float(confidence)
    elif confidence is not None:
        raise ValueError(f"confidence: only method='clopper_pearson' takes a confidence level; method={method!r} "
                         "gives no high-probability bound")
    return target_rate, confidence


def calibrate_scores(
    scores: Tensor,
    target_rate: float,
    method: str = "quantile",
    confidence: float | None = None,
    *,
    small_correct: Tensor | None = None,
    large_correct: Tensor | None = None,
    name: str = "scores",
    stacklevel: int = 2,
) -> CalibrationReport:
    """The threshold of the rule "defer iff score < τ" on calibration scores ``[N]`` (higher = keep), and its
    report; the methods and their guarantees are those of :meth:`Cascade.calibrate`, which calls this (as
    does :meth:`lit_cascades.cascade_lm.GenerationCascade.calibrate`).

    Args:
        scores: ``[N]`` deferral scores of the calibration rows.
        target_rate, method, confidence: as in :meth:`Cascade.calibrate`.
        small_correct, large_correct: ``[N]`` quality of each model on the rows (both or neither): the report
            then has qualities and the deferral curve.
        name: how errors name ``scores``.
        stacklevel: of the warning when ``"clopper_pearson"`` cannot defer anything.
    """
    target_rate, confidence = check_calibration_args(target_rate, method, confidence)
    if (small_correct is None) != (large_correct is None):
        missing = "large_correct" if large_correct is None else "small_correct"
        raise ValueError(f"{missing}: small_correct and large_correct go together; pass both or neither")
    if not isinstance(scores, Tensor) or scores.ndim != 1:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"{name}: expected deferral scores of shape [N]; got {got}")
    scores = scores.detach().float().cpu()
    n = scores.shape[0]
    if n == 0:
        raise ValueError(f"{name}: no calibration rows (shape [0])")
    if bool(torch.isnan(scores).any()):
        raise ValueError(f"{name}: {int(torch.isnan(scores).sum())} NaN scores; calibration needs "
                         "real-valued scores")
    for key, t in (("small_correct", small_correct), ("large_correct", large_correct)):
        if t is not None and (not isinstance(t, Tensor) or t.shape != (n,)):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{key}: expected a tensor of shape [N] = [{n}]; got {got}")

    srt = torch.sort(scores.double()).values
    bound: float | None
    if method == "quantile":
        rank, bound = quantile_rank(n, target_rate), None
        threshold = calibrate_threshold(scores, target_rate)
        guarantee = (f"the realised deferral rate on these {n} calibration rows is <= {target_rate:g}; "
                     "no guarantee on new rows")
    elif method == "conformal":
        rank = conformal_rank(n, target_rate)
        bound = min(rank / (n + 1), 1.0)
        threshold = _threshold_at_rank(srt, rank)
        guarantee = (f"E[deferral rate on a new exchangeable row] <= {bound:.6g} <= {target_rate:g}, "
                     f"over the draw of the {n} calibration rows")
    else:
        assert confidence is not None
        rank, bound = clopper_pearson_rank(n, target_rate, confidence)
        threshold = _threshold_at_rank(srt, rank)
        guarantee = (f"with probability >= {confidence:g} over the draw of the {n} calibration rows, the true "
                     f"deferral rate is <= {bound:.6g} <= {target_rate:g}")
        if rank == 0 and target_rate > 0:
            need = math.ceil(math.log(1 - confidence) / math.log(1 - target_rate))
            warnings.warn(f"clopper_pearson: {n} calibration rows are too few to defer anything at target "
                          f"{target_rate:g} with confidence {confidence:g} (needs n >= {need}); the threshold "
                          "is -inf (never defer)", stacklevel=stacklevel)
    deferred = scores.double() < threshold
    rate = float(deferred.double().mean())
    report = CalibrationReport(method=method, n=n, target_rate=target_rate, confidence=confidence,
                               threshold=float(threshold), rate=rate, bound=bound, guarantee=guarantee,
                               rank=rank, cost=1.0 + rate)
    if small_correct is not None and large_correct is not None:
        sq, lq = small_correct.detach().double().cpu(), large_correct.detach().double().cpu()
        dm = deferral_metrics(scores, sq, lq, rate=target_rate)
        report.small_quality = float(sq.mean())
        report.large_quality = float(lq.mean())
        report.cascade_quality = float(torch.where(deferred, lq, sq).mean())
        report.curve_rates = dm.curve.rates.tolist()
        report.curve_quality = dm.curve.quality.tolist()
        report.deferral = dm.scalars
    return report


# --------------------------------------------------------------------------------------------------------
# the cascade
# --------------------------------------------------------------------------------------------------------
def _import_path(fn: Callable) -> str | None:
    """``module.qualname`` if importing it gives back ``fn`` (module-level functions), else None."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return f"{module}.{qualname}" if obj is fn else None


def _check_spec(name: str, spec: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or not isinstance(spec.get("_target_"), str):
        raise ValueError(f"{name}: expected a mapping with '_target_: package.module.Name' and the constructor's "
                         f"keyword arguments; got {spec!r}")
    out = json.loads(json.dumps(jsonable(dict(spec))))
    if out != jsonable(dict(spec)):
        raise ValueError(f"{name}: constructor arguments must be JSON values (numbers, strings, lists, dicts)")
    return out


def check_save_directory(directory: str | Path, overwrite: bool) -> Path:
    """``directory`` as a Path, if a cascade may be saved there (missing, empty, or ``overwrite``)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"directory: {directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"directory: {directory} is not empty; pass overwrite=True to replace it")
    return directory


@contextlib.contextmanager
def atomic_directory(directory: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``directory``; on success it replaces ``directory`` (whose old content
    is removed only after the swap), on error it is deleted and ``directory`` is left as it was."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    old: Path | None = None
    try:
        yield tmp
        if directory.is_dir() and any(directory.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
            os.replace(directory, old)  # onto an empty directory: allowed
        try:
            os.replace(tmp, directory)  # a missing or empty target directory is replaced
        except BaseException:
            if old is not None:
                os.replace(old, directory)
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class Cascade(nn.Module):
    """A two-model classification cascade for inference: keep the small model's answer when its score is
    ``≥ threshold``, otherwise ask the large model.

    Args:
        small: ``nn.Module`` mapping ``x [B, ...]`` to logits ``[B, C]`` (run on every row).
        large: ``nn.Module`` mapping ``x [B, ...]`` to logits ``[B, C]`` (run on the deferred rows only).
        score: the deferral score of the small model's logits, higher = keep: ``"max_prob"``, ``"margin"``,
            ``"neg_entropy"`` (see :func:`lit_cascades.functional.confidence_from_logits`) or a callable
            ``logits [B, C] -> scores [B]`` (a module-level function, if the cascade is to be saved).
        threshold: ``τ``; None until :meth:`calibrate` sets it.
        small_spec, large_spec: how to rebuild each model, ``{"_target_": "pkg.mod.Class", **kwargs}``
            (needed by :meth:`save`; :meth:`from_run` fills them in).
        batch_size: run each model on at most this many rows at a time (None: all rows in one call).

    Both models are put in eval mode; :meth:`predict` and :meth:`calibrate` run under ``torch.inference_mode``.
    """

    def __init__(
        self,
        small: nn.Module,
        large: nn.Module,
        score: str | ScoreFn = "max_prob",
        threshold: float | None = None,
        *,
        small_spec: Mapping[str, Any] | None = None,
        large_spec: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        for name, model in (("small", small), ("large", large)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"{name}: expected a torch.nn.Module mapping x [B, ...] to logits [B, C]; "
                                f"got {type(model).__name__}")
        if isinstance(score, str):
            if score not in CONFIDENCE_KINDS:
                raise ValueError(f"score: expected one of {list(CONFIDENCE_KINDS)} or a callable logits -> scores; "
                                 f"got {score!r}")
        elif not callable(score):
            raise TypeError(f"score: expected one of {list(CONFIDENCE_KINDS)} or a callable logits -> scores; "
                            f"got {type(score).__name__}")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                                      or math.isnan(threshold)):
            raise ValueError(f"threshold: expected a number (or None until calibrate()); got {threshold!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size: expected an integer >= 1 or None; got {batch_size!r}")
        self.small = small.eval()
        self.large = large.eval()
        self.score = score
        self.threshold: float | None = None if threshold is None else float(threshold)
        self.small_spec = _check_spec("small_spec", small_spec)
        self.large_spec = _check_spec("large_spec", large_spec)
        self.batch_size = batch_size
        self.calibration: CalibrationReport | None = None
        self.source: dict[str, Any] = {}

    def train(self, mode: bool = True) -> Cascade:  # an inference object: the models stay in eval mode
        """Kept in eval mode whatever ``mode`` is: a cascade is for inference (fine-tune the parts instead)."""
        return super().train(False)

    # ----------------------------------------------------------------------------------------------------
    # scoring
    # ----------------------------------------------------------------------------------------------------
    def scores_from_logits(self, logits: Tensor) -> Tensor:
        """The deferral score ``[B]`` of small-model logits ``[B, C]`` (higher = keep)."""
        if isinstance(self.score, str):
            return confidence_from_logits(logits, self.score)  # type: ignore[arg-type]
        s = self.score(logits)
        if not isinstance(s, Tensor) or s.shape != logits.shape[:1]:
            got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(f"score: the callable must return a tensor of shape [B] = [{logits.shape[0]}]; got {got}")
        return s.float()

    def _logits(self, name: str, x: Tensor) -> tuple[Tensor, float]:
        """``model(x)`` in chunks of ``batch_size`` on the model's device; returns ``(logits, seconds)``."""
        model = self.small if name == "small" else self.large
        device = _device_of(model)
        step = self.batch_size or max(x.shape[0], 1)
        outs = []
        start = time.perf_counter()
        for i in range(0, x.shape[0], step):
            out = model(x[i: i + step].to(device))
            if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != min(step, x.shape[0] - i):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"{name}: expected the model to return logits of shape [B, C] with "
                                 f"B = {min(step, x.shape[0] - i)}; got {got}")
            outs.append(out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return torch.cat(outs).to(x.device), seconds

    @staticmethod
    def _check_x(x: Any) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a tensor of shape [B, ...]; got {type(x).__name__}")
        if x.ndim < 1:
            raise ValueError(f"x: expected a tensor of shape [B, ...]; got shape {tuple(x.shape)}")
        return x

    # ----------------------------------------------------------------------------------------------------
    # inference
    # ----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, x: Tensor) -> CascadeOutput:
        """Run the cascade on a batch ``x [B, ...]``.

        The small model runs on all rows; the large model runs once (in chunks of ``batch_size``) on the rows
        whose score is ``< threshold`` (or NaN: a row the small model cannot score is deferred).

        Raises:
            TypeError / ValueError: ``x`` is not a tensor of shape ``[B, ...]``, or a model / the score returns
                the wrong shape.
            RuntimeError: the threshold is not set (``threshold: not calibrated; call calibrate() first``).
        """
        x = self._check_x(x)
        if self.threshold is None:
            raise RuntimeError("threshold: not calibrated; call calibrate() first (or pass threshold=)")
        b = x.shape[0]
        if b == 0:
            empty = torch.zeros(0, device=x.device)
            return CascadeOutput(empty.long(), empty.bool(), empty, empty.long(), empty.double())
        small_logits, t_small = self._logits("small", x)
        scores = self.scores_from_logits(small_logits)
        deferred = ~(scores >= self.threshold)  # NaN scores are deferred
        predictions = small_logits.argmax(-1)
        seconds = torch.full((b,), t_small / b, dtype=torch.float64, device=x.device)
        idx = deferred.nonzero().squeeze(1)
        if idx.numel():
            large_logits, t_large = self._logits("large", x[idx])
            predictions[idx] = large_logits.argmax(-1)
            seconds[idx] += t_large / idx.numel()
        return CascadeOutput(predictions=predictions, deferred=deferred, scores=scores,
                             calls=1 + deferred.long(), seconds=seconds)

    def forward(self, x: Tensor) -> CascadeOutput:
        """Same as :meth:`predict`."""
        return self.predict(x)

    # ----------------------------------------------------------------------------------------------------
    # calibration
    # ----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _evaluate(self, data: Any, labels: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Scores (and small/large correctness when labels are known) of calibration inputs."""
        batches: Iterable[Any]
        if isinstance(data, Tensor):
            batches = [(data, labels)]
        elif isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
            if labels is not None:
                raise ValueError("labels: given twice (the data is an (x, y) pair)")
            batches = [tuple(data)]
        elif isinstance(data, Iterable):
            if labels is not None:
                raise ValueError("labels: pass labels inside the batches ('y') when the data is an iterable")
            batches = data
        else:
            raise TypeError("scores_or_data: expected scores [N], inputs x [N, ...], an (x, y) pair or an iterable "
                            f"of batches (dicts with 'x' and 'y', or (x, y) pairs); got {type(data).__name__}")
        scores, small_ok, large_ok = [], [], []
        for batch in batches:
            if isinstance(batch, Mapping):
                x, y = batch.get("x"), batch.get("y")
            elif isinstance(batch, tuple | list) and len(batch) == 2:
                x, y = batch
            else:
                x, y = batch, None
            x = self._check_x(x)
            if y is not None and (not isinstance(y, Tensor) or y.shape != x.shape[:1]):
                got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
                raise ValueError(f"labels: expected a tensor of shape [N] = [{x.shape[0]}]; got {got}")
            logits, _ = self._logits("small", x)
            scores.append(self.scores_from_logits(logits).cpu())
            if y is not None:
                small_ok.append((logits.argmax(-1) == y.to(logits.device)).float().cpu())
                large_logits, _ = self._logits("large", x)
                large_ok.append((large_logits.argmax(-1) == y.to(large_logits.device)).float().cpu())
            elif small_ok:
                raise ValueError("labels: some batches have labels ('y') and others do not")
        if not scores:
            raise ValueError("scores_or_data: no calibration rows")
        if small_ok and len(small_ok) != len(scores):
            raise ValueError("labels: some batches have labels ('y') and others do not")
        cat = torch.cat
        return cat(scores), (cat(small_ok) if small_ok else None), (cat(large_ok) if large_ok else None)

    def calibrate(
        self,
        scores_or_data: Any,
        target_rate: float,
        confidence: float | None = None,
        method: str = "quantile",
        *,
        small_correct: Tensor | None = None,
        large_correct: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> CalibrationReport:
        """Set ``threshold`` on held-out data so that the deferral rate is ``≤ target_rate``; returns a report.

        The threshold is always one of the calibration scores (its ``rank``-th smallest), or ``±inf``. Methods
        and what each guarantees (``n`` calibration rows, exchangeable with the rows served later):

        * ``"quantile"``: ``rank = ⌊target·n⌋ + 1``. The realised rate on the calibration rows is ``≤ target``;
          nothing is promised about new rows: the true rate is ``Beta(rank, n−rank+1)``-distributed for
          continuous scores, slightly *above* ``target`` on average, and above it in about half of the draws.
        * ``"conformal"``: ``rank = ⌊target·(n+1)⌋`` (split conformal; see :func:`conformal_rank`). Guarantees
          ``E[true rate] = P(a fresh row is deferred) ≤ rank/(n+1) ≤ target``, the expectation over the
          calibration draw and the fresh row. A single calibration can still land above ``target``.
        * ``"clopper_pearson"``: the largest rank whose one-sided Clopper–Pearson upper bound at level
          ``confidence`` is ``≤ target`` (see :func:`clopper_pearson_rank`). Guarantees
          ``P(true rate > target) ≤ 1 − confidence`` over the calibration draw: a high-probability guarantee
          for the threshold actually deployed. Defers less than the other two, and nothing when ``n`` is
          too small (a warning says so).

        Args:
            scores_or_data: the calibration rows: deferral scores ``[N]`` (1-D), inputs ``x [N, ...]`` (with
                ``labels=`` for quality), an ``(x, y)`` pair, or an iterable of batches (dicts with ``"x"``
                and ``"y"`` such as a datamodule's dataloader, or ``(x, y)`` pairs).
            target_rate: the deferral rate not to exceed, in ``[0, 1]``.
            confidence: the level of the ``"clopper_pearson"`` bound, in ``(0, 1)`` (e.g. 0.95); only that
                method takes it.
            method: ``"quantile"`` (default), ``"conformal"`` or ``"clopper_pearson"``.
            small_correct, large_correct: ``[N]`` correctness (or any quality) of each model on the rows, with
                scores given directly; both or neither.
            labels: ``[N]`` class ids for inputs ``x`` (both models are run on all rows to measure quality).

        Returns:
            :class:`CalibrationReport` (also kept as ``self.calibration`` and saved with the cascade).
        """
        target_rate, confidence = check_calibration_args(target_rate, method, confidence)
        if (small_correct is None) != (large_correct is None):
            missing = "large_correct" if large_correct is None else "small_correct"
            raise ValueError(f"{missing}: small_correct and large_correct go together; pass both or neither")

        if isinstance(scores_or_data, Tensor) and scores_or_data.ndim == 1:
            if labels is not None:
                raise ValueError("labels: given with scores; pass small_correct and large_correct instead")
            scores = scores_or_data.detach().float().cpu()
        else:
            if small_correct is not None:
                raise ValueError("small_correct: given with input data; pass labels instead (both models are run)")
            scores, small_correct, large_correct = self._evaluate(scores_or_data, labels)
        report = calibrate_scores(scores, target_rate, method, confidence, small_correct=small_correct,
                                  large_correct=large_correct, name="scores_or_data", stacklevel=3)
        self.threshold = report.threshold
        self.calibration = report
        return report

    # ----------------------------------------------------------------------------------------------------
    # save / load
    # ----------------------------------------------------------------------------------------------------
    def _score_json(self) -> dict[str, str]:
        if isinstance(self.score, str):
            return {"kind": self.score}
        path = _import_path(self.score)
        if path is None:
            raise ValueError(f"score: a callable score must be a module-level function to be saved (it is stored by "
                             f"import path); got {self.score!r}")
        return {"callable": path}

    def metadata(self) -> dict[str, Any]:
        """The content of ``cascade.json``."""
        from lit_cascades import __version__

        for name, spec in (("small_spec", self.small_spec), ("large_spec", self.large_spec)):
            if spec is None:
                raise ValueError(f"{name}: unknown, so the model cannot be rebuilt on load; pass "
                                 f"{name}={{'_target_': 'pkg.module.Class', **constructor_kwargs}} to Cascade()")
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "task": "classification",
            "score": self._score_json(),
            "threshold": self.threshold,
            "batch_size": self.batch_size,
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "models": {"small": self.small_spec, "large": self.large_spec},
            "weights": {"small": "small.pt", "large": "large.pt"},
            "source": self.source,
            "lit_cascades_version": __version__,
        }

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the cascade to ``directory``: ``cascade.json``, ``small.pt``, ``large.pt``.

        Everything is written into a temporary directory beside ``directory`` and renamed into place, so a
        failure leaves nothing half-written (and, with ``overwrite=True``, the previous content intact).

        Raises:
            FileExistsError: ``directory`` is not empty and ``overwrite`` is False.
            ValueError: a model's spec is unknown, or the score is a callable that cannot be imported by name.
        """
        directory = check_save_directory(directory, overwrite)
        meta = self.metadata()  # fails before anything is written
        with atomic_directory(directory) as tmp:
            atomic_save({k: v.detach().cpu() for k, v in self.small.state_dict().items()}, tmp / "small.pt")
            atomic_save({k: v.detach().cpu() for k, v in self.large.state_dict().items()}, tmp / "large.pt")
            atomic_write_json(tmp / "cascade.json", meta)
        return directory

    @classmethod
    def load(cls, directory: str | Path, map_location: Any = "cpu") -> Cascade:
        """Rebuild a cascade written by :meth:`save` (models via :func:`lit_cascades.runner.build`, weights
        with :func:`lit_cascades.io.safe_torch_load`, i.e. ``weights_only=True``)."""
        from lit_cascades.runner import build

        directory = Path(directory)
        path = directory / "cascade.json"
        if not path.is_file():
            raise FileNotFoundError(f"directory: no cascade.json in {directory}")
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"directory: {path} is not a saved cascade (format {meta.get('format')!r})")
        if meta.get("task") == "generation":  # a saved lit_cascades.cascade_lm.GenerationCascade
            from lit_cascades.cascade_lm import GenerationCascade

            return GenerationCascade.load(directory, map_location=map_location)  # type: ignore[return-value]
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"directory: {path} has format version {meta['format_version']}; this lit_cascades "
                             f"reads up to {FORMAT_VERSION}")
        models = {}
        for name in ("small", "large"):
            model = build(meta["models"][name], f"models.{name}")
            state = safe_torch_load(directory / meta["weights"][name], map_location=map_location)
            model.load_state_dict(state)
            models[name] = model
        score_meta = meta["score"]
        score: str | ScoreFn
        if "kind" in score_meta:
            score = score_meta["kind"]
        else:
            from lit_cascades.runner import locate

            score = locate(score_meta["callable"], key="score")
        threshold = meta.get("threshold")
        cascade = cls(models["small"], models["large"], score=score,
                      threshold=None if threshold is None else _float_from_json(threshold),
                      small_spec=meta["models"]["small"], large_spec=meta["models"]["large"],
                      batch_size=meta.get("batch_size"))
        if meta.get("calibration"):
            cascade.calibration = CalibrationReport.from_dict(meta["calibration"])
        cascade.source = meta.get("source") or {}
        return cascade

    # ----------------------------------------------------------------------------------------------------
    # from a recipe run
    # ----------------------------------------------------------------------------------------------------
    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        small_stage: str = "gatekeeper",
        large_stage: str = "large",
        *,
        score: str | ScoreFn | None = None,
        datamodule: Any = None,
        batch_size: int | None = None,
        **lm_kwargs: Any,
    ) -> Cascade:
        """The cascade of a ``gatekeeper`` recipe run (Gatekeeper, arXiv:2502.19335): its fine-tuned small
        model and its large model, uncalibrated (call :meth:`calibrate`).

        A ``gatekeeper_lm``, ``lm_cascade`` or ``speculative_cascade`` run (``recipe`` in its ``run.json``) gives
        a :class:`lit_cascades.cascade_lm.GenerationCascade` instead
        (:meth:`~lit_cascades.cascade_lm.GenerationCascade.from_run`, which takes ``batch_size`` and the
        ``lm_kwargs``: ``variant``, ``rule``, ``alpha``, ``method``).

        Reads ``<run>/config.yaml``: the nets are rebuilt from its ``small.model`` / ``large.model`` sections
        with ``in_shape`` and ``num_classes`` from the datamodule of ``config.data`` (built and set up here
        unless ``datamodule`` is given), and loaded from ``<run>/<stage>/model.pt`` (the LightningModule's state
        dict, whose ``model.`` entries are the net's).

        Args:
            run_dir: the run directory (``output_dir`` of the run). A run over several seeds (``seed<k>/``
                subdirectories, the recipe's default) gives the cascade of its first seed, with a warning naming
                the stages used; pass ``small_stage="seed1/gatekeeper"``, ``large_stage="seed1/large"`` for another.
            small_stage: the stage holding the small model's weights (``gatekeeper``, ``small``,
                ``ce_finetune``, ``seed0/gatekeeper_a0.3`` in a sweep, ...).
            large_stage: the stage holding the large model's weights.
            score: the deferral score; default: the confidence kind of ``small_stage``'s module
                (``gatekeeper.module.confidence`` for a Gatekeeper stage).
            datamodule: an already set-up datamodule with ``input_shape`` and ``num_classes``.
            batch_size: as in :class:`Cascade`.
        """
        from omegaconf import OmegaConf

        from lit_cascades.cascade_lm import LM_RECIPES, recipe_of_run

        if recipe_of_run(run_dir) in LM_RECIPES:
            from lit_cascades.cascade_lm import GenerationCascade

            return GenerationCascade.from_run(run_dir, batch_size=batch_size, **lm_kwargs)  # type: ignore[return-value]
        if lm_kwargs:
            raise TypeError(f"from_run: {sorted(lm_kwargs)} apply to LM recipe runs ({list(LM_RECIPES)}) only")
        from lit_cascades.runner import build

        run_dir = Path(run_dir)
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"run_dir: no config.yaml in {run_dir}; expected a recipe run directory")
        cfg = OmegaConf.load(cfg_path)
        for key in ("small.model", "large.model", "data"):
            if OmegaConf.select(cfg, key) is None:
                raise ValueError(f"run_dir: {cfg_path} has no '{key}' section; expected a gatekeeper recipe run")
        small_stage, large_stage = _first_seed_stages(run_dir, small_stage, large_stage)
        weights = {}
        for arg, stage in (("small_stage", small_stage), ("large_stage", large_stage)):
            path = run_dir / stage / "model.pt"
            if not path.is_file():
                found = sorted(str(p.parent.relative_to(run_dir)) for p in run_dir.glob("**/model.pt"))
                raise FileNotFoundError(f"{arg}: no weights at {path}; is the stage name right and the run finished? "
                                        f"Stages with weights in this run: {found or 'none'}")
            weights[arg] = path
        if datamodule is None:
            datamodule = build(cfg.data, "data", seed=int(cfg.get("seed", 0)))
            datamodule.setup()
        shapes = {"in_shape": [int(v) for v in datamodule.input_shape], "num_classes": int(datamodule.num_classes)}
        if score is None:
            score = _stage_confidence(cfg, small_stage)
        nets, specs = {}, {}
        for name, arg in (("small", "small_stage"), ("large", "large_stage")):
            section = OmegaConf.to_container(OmegaConf.select(cfg, f"{name}.model"), resolve=True)
            specs[name] = {**section, **shapes}  # type: ignore[dict-item]
            net = build(copy.deepcopy(specs[name]), f"{name}.model")
            state = safe_torch_load(weights[arg])
            state = state.get("state_dict", state)
            sub = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
            if not sub:
                raise ValueError(f"{arg}: {weights[arg]} has no 'model.' entries; expected a LightningModule state "
                                 "dict whose net is `self.model`")
            net.load_state_dict(sub)
            nets[name] = net
        cascade = cls(nets["small"], nets["large"], score=score, small_spec=specs["small"],
                      large_spec=specs["large"], batch_size=batch_size)
        run_info: dict[str, Any] = {}
        if (run_dir / "run.json").is_file():
            try:
                run_info = json.loads((run_dir / "run.json").read_text())
            except json.JSONDecodeError:
                run_info = {}
        cascade.source = {"run_dir": str(run_dir.resolve()), "small_stage": small_stage, "large_stage": large_stage,
                          **{k: run_info[k] for k in ("run_id", "recipe", "preset", "config_hash", "git_commit")
                             if k in run_info}}
        return cascade


def _first_seed_stages(run_dir: Path, small_stage: str, large_stage: str) -> tuple[str, str]:
    """``(small_stage, large_stage)`` of ``run_dir``, or, when neither is at the top level and the run has
    ``seed<k>/`` directories holding both, those of its lowest seed (with a warning naming them)."""
    if (run_dir / small_stage / "model.pt").is_file() or (run_dir / large_stage / "model.pt").is_file():
        return small_stage, large_stage
    seeds = sorted((int(d.name[4:]), d.name) for d in run_dir.glob("seed*") if d.is_dir() and d.name[4:].isdigit()
                   and (d / small_stage / "model.pt").is_file() and (d / large_stage / "model.pt").is_file())
    if not seeds:
        return small_stage, large_stage
    first = seeds[0][1]
    warnings.warn(f"{run_dir} is a run over {len(seeds)} seeds; using {first}: small_stage='{first}/{small_stage}', "
                  f"large_stage='{first}/{large_stage}' (pass them explicitly for another seed)", stacklevel=3)
    return f"{first}/{small_stage}", f"{first}/{large_stage}"


def _stage_confidence(cfg: Any, stage: str) -> str:
    """The confidence kind of the module trained in ``stage`` (``max_prob`` when the config does not say)."""
    from omegaconf import OmegaConf

    base = stage.rstrip("/").rsplit("/", 1)[-1]
    if base.startswith("gatekeeper"):
        key = "gatekeeper.module.confidence"
    elif base == "ce_finetune":
        key = "baseline.module.confidence"
    else:
        key = f"{'large' if base == 'large' else 'small'}.module.confidence"
    return str(OmegaConf.select(cfg, key, default="max_prob") or "max_prob")
