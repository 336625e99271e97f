"""A callback that logs per-label ranking AUROCs and, across a sweep of trained scorers, their Pareto front.

Contract: the module's ``validation_step`` / ``test_step`` returns a mapping with key ``"ranking"``::

    {"ranking": {"scores": Tensor[B],          # higher = ranked first
                 "labels": Tensor[B, K],       # binary labels
                 "ids":    Tensor[B]}}         # optional example ids (DDP padding is then counted once)

At epoch end the callback computes :class:`~lit_cascades.metrics.MultiLabelAUROC` (synced over processes)
and, with ``<split>`` = ``val`` or ``test`` and ``<prefix>`` = ``rank`` by default, logs
``<split>/rank/auc_<label>``, ``<split>/rank/auc_mean``, ``<split>/rank/auc_min`` (worst label),
``<split>/rank/auc_diff``, ``<split>/rank/auc_laa_uniform``, ``<split>/rank/auc_laa_difference`` and
``<split>/rank/prior_<label>`` (e.g. ``test/rank/auc_min``); it writes ``ranking_[<tag>_]<split>.csv`` (one
row per label) into ``output_dir`` (on global rank zero only, atomically).

Sweeps: reuse one callback for the test runs of several scorers (e.g. a sweep of label weights for both
aggregations). Each finished test epoch adds a point (the module's ``aggregation`` and ``weights``
hyperparameters, the callback's ``tag`` and every scalar) to ``callback.sweep``; from two points on, the
callback rewrites ``pareto_<x>_vs_<y>.csv`` and ``.png``: the AUROC of one label against another's, one
line per aggregation, with the non-dominated points marked. Attached W&B loggers get the figure as an image
under ``<sweep_stage>/rank/pareto_plot`` and the points as a table under ``<sweep_stage>/rank/pareto_table``
(an image and a table never share a key).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch

from lit_cascades.callbacks._stage import StageMetricsCallback
from lit_cascades.io import atomic_path, atomic_write_text
from lit_cascades.metrics.ranking import MultiLabelAUROC, RankingAUCReport

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def pareto_mask(x: Sequence[float], y: Sequence[float]) -> list[bool]:
    """``True`` for the points not dominated by another (higher or equal on both axes, higher on one)."""
    pts = list(zip(x, y))
    return [
        not any((a >= px and b >= py) and (a > px or b > py) for a, b in pts)
        for px, py in pts
    ]


def plot_auc_pareto(
    points: Sequence[Mapping[str, Any]],
    x_label: str,
    y_label: str,
    reference: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> tuple[Figure, Axes]:
    """AUROC of label ``y_label`` against ``x_label`` for every point of a sweep, one line per group.

    Args:
        points: dicts with ``"group"`` (e.g. ``"loss"``/``"label"``), ``"weight"`` (the weight on
            ``x_label``, used to order the line and annotate) and ``"auc_<label>"`` for both labels.
        x_label, y_label: label names.
        reference: optional named curves ``[(auc_x, auc_y), ...]`` (e.g. the Bayes-optimal front).
        ax: axes to draw on (a new figure when ``None``).
        title: optional title.
    """
    from lit_cascades.plotting import new_axes

    if not points:
        raise ValueError("`points` is empty; expected at least one sweep point")
    fig, ax = new_axes(ax, figsize=(5.5, 4.5))
    kx, ky = f"auc_{x_label}", f"auc_{y_label}"
    for name, curve in (reference or {}).items():
        cx, cy = zip(*curve)
        ax.plot(cx, cy, color="tab:gray", ls="--", lw=1, label=name)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for p in points:
        groups.setdefault(str(p.get("group", "run")), []).append(p)
    markers = iter(["o", "s", "^", "D", "v", "P"])
    for name, pts in groups.items():
        pts = sorted(pts, key=lambda p: float(p.get("weight", 0.0)))
        xs, ys = [float(p[kx]) for p in pts], [float(p[ky]) for p in pts]
        (line,) = ax.plot(xs, ys, marker=next(markers, "o"), lw=1.2, label=f"{name} aggregation")
        for p, x, y in zip(pts, xs, ys):
            if "weight" in p:
                ax.annotate(f"{float(p['weight']):.2g}", (x, y), textcoords="offset points", xytext=(4, 3),
                            fontsize=6, color=line.get_color())
    all_x = [float(p[kx]) for p in points]
    all_y = [float(p[ky]) for p in points]
    front = [(x, y) for x, y, keep in zip(all_x, all_y, pareto_mask(all_x, all_y)) if keep]
    fx, fy = zip(*sorted(front))
    ax.scatter(fx, fy, s=90, facecolors="none", edgecolors="black", lw=1, label="non-dominated", zorder=3)
    ax.set_xlabel(f"AUROC {x_label}")
    ax.set_ylabel(f"AUROC {y_label}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig, ax


def _csv_text(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    w.writerows(rows)
    return buf.getvalue()


class RankingAUCLogger(StageMetricsCallback):
    """Log per-label, mean and worst-label AUROC for any module following the ``"ranking"`` output contract.

    Args:
        label_names: the ``K`` label names; default: the module's ``label_names`` attribute.
        output_dir: where CSV/PNG files go; defaults to the trainer's ``default_root_dir``.
        tag: names this run's files and sweep point (e.g. ``"loss_w0.7"``).
        prefix: namespace of the logged keys after the split (``test/rank/auc_min`` ...).
        key: the key of the step output holding the ranking batch.
        pareto_labels: the two labels of the Pareto plot (default: the first two).
        sweep_stage: the stage whose results become sweep points (``"test"``).
    """

    def __init__(
        self,
        label_names: Sequence[str] | None = None,
        output_dir: str | Path | None = None,
        tag: str = "",
        prefix: str = "rank",
        key: str = "ranking",
        pareto_labels: tuple[str, str] | None = None,
        sweep_stage: str = "test",
    ) -> None:
        super().__init__()
        self.label_names = list(label_names) if label_names is not None else None
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.tag, self.prefix, self.key = tag, prefix, key
        self.pareto_labels = pareto_labels
        self.sweep_stage = sweep_stage
        self._metrics: dict[str, MultiLabelAUROC] = {}
        self.reports: dict[str, RankingAUCReport] = {}
        self.sweep: list[dict[str, Any]] = []
        self.files: dict[str, Path] = {}

    # -- accumulation -----------------------------------------------------------------------------------
    def _names(self, pl_module: pl.LightningModule, k: int) -> list[str]:
        names = self.label_names or getattr(pl_module, "label_names", None) or [f"label{i}" for i in range(k)]
        if len(names) != k:
            raise ValueError(f"{len(names)} label names {list(names)} for {k} label columns")
        return list(names)

    def _update(self, pl_module: pl.LightningModule, outputs: Any, stage: str) -> None:
        batch = self._batch(outputs, ("scores", "labels"))
        if batch is None:
            return
        if stage not in self._metrics:
            names = self._names(pl_module, batch["labels"].shape[-1])
            self._metrics[stage] = MultiLabelAUROC(names).to(pl_module.device)
        self._metrics[stage].update(batch["scores"], batch["labels"], batch.get("ids"))

    # -- epoch end ----------------------------------------------------------------------------------------
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        metric = self._metrics.get(stage)
        if metric is None or not metric.update_count:
            return
        report = metric.compute()  # collective under DDP
        metric.reset()
        self.reports[stage] = report
        for k, v in report.scalars.items():
            if k != "num_examples":
                pl_module.log(f"{stage}/{self.prefix}/{k}", torch.tensor(v, dtype=torch.float32), sync_dist=False)
        if stage == self.sweep_stage:
            self.sweep.append(self.sweep_point(pl_module, report))
        if trainer.is_global_zero:
            self._write(trainer, stage, report)

    def sweep_point(self, pl_module: pl.LightningModule, report: RankingAUCReport) -> dict[str, Any]:
        """One sweep point: the tag, the module's ``aggregation``/``weights``/``cost`` and every scalar."""
        h = getattr(pl_module, "hparams", {})
        weights = h.get("weights")
        point: dict[str, Any] = {"tag": self.tag, "group": h.get("aggregation", self.tag or "run"),
                                 "labels": list(report.per_label)}
        if weights is not None:
            total = sum(float(w) for w in weights)
            point["weights"] = [float(w) / total for w in weights]
            point["weight"] = point["weights"][0]
        else:
            point["weight"] = 1.0 / len(report.per_label)
        if h.get("aggregation") == "label":
            point["cost"] = h.get("cost")
        return {**point, **report.scalars}

    # -- files --------------------------------------------------------------------------------------------
    def _write(self, trainer: pl.Trainer, stage: str, report: RankingAUCReport) -> None:
        out = self.output_dir or Path(trainer.default_root_dir)
        stem = f"ranking_{self.tag + '_' if self.tag else ''}{stage}"
        rows = [[n, a, report.scalars[f"prior_{n}"]] for n, a in report.per_label.items()]
        self.files[stage] = atomic_write_text(out / f"{stem}.csv", _csv_text(["label", "auroc", "prior"], rows))
        if stage == self.sweep_stage and len(self.sweep) >= 2:
            self.save_pareto(out, trainer.loggers)

    def save_pareto(self, directory: str | Path, loggers: Sequence[Any] = (), reference: Mapping[str, Any] | None = None
                    ) -> tuple[Path, Path]:
        """Write ``pareto_<x>_vs_<y>.csv`` / ``.png`` for the sweep so far (and send them to W&B loggers).

        Call it on global rank zero only (the callback does); W&B keys: ``<sweep_stage>/<prefix>/pareto_plot``
        (image) and ``<sweep_stage>/<prefix>/pareto_table`` (table).
        """
        import matplotlib.pyplot as plt

        x_label, y_label = self.pareto_labels or tuple(self.sweep[0]["labels"][:2])
        directory = Path(directory)
        stem = f"pareto_{x_label}_vs_{y_label}"
        columns = ["tag", "group", "weight", f"auc_{x_label}", f"auc_{y_label}", "auc_min", "auc_mean"]
        rows = [[p.get(c) for c in columns] for p in self.sweep]
        csv_path = atomic_write_text(directory / f"{stem}.csv", _csv_text(columns, rows))
        fig, _ = plot_auc_pareto(self.sweep, x_label, y_label, reference=reference,
                                 title=f"Pareto front of per-label AUROC ({self.sweep_stage})")
        png = directory / f"{stem}.png"
        try:
            with atomic_path(png, suffix=".png") as tmp:
                fig.savefig(tmp, dpi=120)
        finally:
            plt.close(fig)
        from lightning.pytorch.loggers import WandbLogger

        key = f"{self.sweep_stage}/{self.prefix}"
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=f"{key}/pareto_plot", images=[str(png)])
                logger.log_table(key=f"{key}/pareto_table", columns=columns, data=rows)
        self.files["pareto"] = png
        return csv_path, png


def ranking_batch(scores: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None = None) -> dict[str, Any]:
    """Build the step output consumed by :class:`RankingAUCLogger`: ``{"ranking": {...}}``."""
    out: dict[str, Any] = {"scores": scores, "labels": labels}
    if ids is not None:
        out["ids"] = ids
    return {"ranking": out}


__all__ = ["RankingAUCLogger", "pareto_mask", "plot_auc_pareto", "ranking_batch"]
