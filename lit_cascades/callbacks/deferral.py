"""A callback that turns any cascade module's validation/test outputs into deferral curves and metrics.

Contract: the module's ``validation_step`` / ``test_step`` returns a mapping with key ``"deferral"``::

    {"deferral": {"scores": Tensor[B] | {name: Tensor[B]},   # higher = keep the small model's answer
                  "small_quality": Tensor[B],                 # 0/1 correctness or a real-valued quality
                  "large_quality": Tensor[B],
                  "ids": Tensor[B] (optional example ids; duplicates from DDP padding are dropped)}}

At epoch end the callback computes :class:`~lit_cascades.metrics.DeferralMetrics` (synced over processes)
and, with ``<split>`` = ``val`` or ``test`` and ``<prefix>`` = ``defer`` by default:

* logs every scalar as ``<split>/<prefix>/<metric>`` (``val/defer/s_d``, ``test/defer/auroc``), or
  ``<split>/<prefix>/<name>/<metric>`` for named scores (``test/defer/conf/s_d``);
* writes ``deferral_[<tag>_]<split>.csv`` and ``.png`` into ``output_dir`` (on global rank zero only,
  atomically);
* for each attached :class:`~lightning.pytorch.loggers.WandbLogger`, logs the plot as an image under
  ``<split>/<prefix>/[<tag>/]curve_plot`` and the curve as a table under ``<split>/<prefix>/[<tag>/]curve_table``
  (an image and a table never share a key); a TensorBoard logger gets the figure under the ``curve_plot`` key.
  Other loggers get the scalars only.

The reports stay available in ``callback.reports[split][name]``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lit_cascades.callbacks._stage import StageMetricsCallback
from lit_cascades.functional.deferral import DeferralReport, IdealVariant
from lit_cascades.io import atomic_path, atomic_write_text
from lit_cascades.metrics.deferral import DeferralMetrics

UNNAMED = "score"


def deferral_table(reports: Mapping[str, DeferralReport]) -> tuple[list[str], list[list[float]]]:
    """Columns and rows of the curve table: rate, small_only, large_only, random, ideal, one column per score."""
    first = next(iter(reports.values()))
    columns = ["rate", "small_only", "large_only", "random", "ideal", *reports.keys()]
    qs, ql = first.scalars["small_quality"], first.scalars["large_quality"]
    cols = [first.curve.rates, None, None, first.random, first.ideal, *(r.curve.quality for r in reports.values())]
    n = first.curve.rates.shape[0]
    data = [c.tolist() if c is not None else None for c in cols]
    rows = [
        [data[0][i], qs, ql, data[3][i], data[4][i], *(d[i] for d in data[5:])] for i in range(n)
    ]
    return columns, rows


def save_deferral_curves(
    reports: Mapping[str, DeferralReport], directory: str | Path, stem: str, title: str | None = None
) -> tuple[Path, Path]:
    """Write the curves of ``reports`` (sharing one dataset) as ``<stem>.csv`` and ``<stem>.png``.

    Files are written atomically (temporary file, then rename). Returns ``(csv_path, png_path)``.
    """
    from lit_cascades.plotting import plot_deferral_curves

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    columns, rows = deferral_table(reports)
    csv_path, png_path = directory / f"{stem}.csv", directory / f"{stem}.png"

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    w.writerows(rows)
    atomic_write_text(csv_path, buf.getvalue())
    import matplotlib.pyplot as plt

    fig, _ = plot_deferral_curves(dict(reports), title=title)
    try:
        with atomic_path(png_path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return csv_path, png_path


class DeferralCurveLogger(StageMetricsCallback):
    """Log deferral curves and scalars for any module following the ``"deferral"`` output contract.

    Args:
        ideal: reference curve for ``s_d`` (see :func:`~lit_cascades.functional.ideal_deferral_curve`).
        rate: deferral rate at which ``quality_at_rate`` is reported.
        output_dir: where CSV/PNG files go; defaults to the trainer's ``default_root_dir``.
        tag: names the files (``deferral_<tag>_<split>.csv``) and the W&B media keys
            (``<split>/<prefix>/<tag>/curve_plot``), to tell apart several trainers sharing one logger.
            Scalar keys do not carry it.
        prefix: namespace of the logged keys after the split (``val/defer/s_d`` ...).
        key: the key of the step output holding the deferral batch.
        max_table_rows: W&B tables are subsampled to at most this many rows (the CSV keeps all).
    """

    def __init__(
        self,
        ideal: IdealVariant = "oracle",
        rate: float = 0.2,
        output_dir: str | Path | None = None,
        tag: str = "",
        prefix: str = "defer",
        key: str = "deferral",
        max_table_rows: int = 1001,
    ) -> None:
        super().__init__()
        self.ideal, self.rate = ideal, rate
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.tag, self.prefix, self.key, self.max_table_rows = tag, prefix, key, max_table_rows
        self._metrics: dict[str, dict[str, DeferralMetrics]] = {}
        self._named: dict[str, bool] = {}
        self.reports: dict[str, dict[str, DeferralReport]] = {}
        self.files: dict[str, tuple[Path, Path]] = {}

    # -- accumulation -----------------------------------------------------------------------------------
    def _update(self, pl_module: pl.LightningModule, outputs: Any, stage: str) -> None:
        batch = self._batch(outputs, ("scores", "small_quality", "large_quality"))
        if batch is None:
            return
        scores = batch["scores"]
        named = isinstance(scores, Mapping)
        if not named:
            scores = {UNNAMED: scores}
        self._named[stage] = named
        metrics = self._metrics.setdefault(stage, {})
        for name, s in scores.items():
            if name not in metrics:
                metrics[name] = DeferralMetrics(ideal=self.ideal, rate=self.rate).to(pl_module.device)
            metrics[name].update(s, batch["small_quality"], batch["large_quality"], batch.get("ids"))

    # -- epoch end ----------------------------------------------------------------------------------------
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        metrics = self._metrics.get(stage)
        if not metrics:
            return
        reports = {name: m.compute() for name, m in metrics.items()}  # collective under DDP
        for m in metrics.values():
            m.reset()
        self.reports[stage] = reports
        named = self._named.get(stage, False)
        for name, rep in reports.items():
            base = f"{stage}/{self.prefix}/{name}" if named else f"{stage}/{self.prefix}"
            for k, v in rep.scalars.items():
                if k != "rate":
                    pl_module.log(f"{base}/{k}", torch.tensor(v, dtype=torch.float32), sync_dist=False)
        if trainer.is_global_zero:
            self._write(trainer, stage, reports)

    def _write(self, trainer: pl.Trainer, stage: str, reports: dict[str, DeferralReport]) -> None:
        out = self.output_dir or Path(trainer.default_root_dir)
        stem = f"deferral_{self.tag + '_' if self.tag else ''}{stage}".replace("/", "_")
        what = f"{self.tag}, " if self.tag else ""
        title = (f"Deferral curve ({what}{stage} split, epoch {trainer.current_epoch})\n"
                 "cascade quality when the lowest-score share goes to the large model")
        csv_path, png_path = save_deferral_curves(reports, out, stem, title=title)
        self.files[stage] = (csv_path, png_path)
        key = f"{stage}/{self.prefix}" + (f"/{self.tag}" if self.tag else "")
        for logger in trainer.loggers:
            _log_media(logger, key, reports, png_path, self.max_table_rows, trainer.global_step)


def _log_media(logger: Any, key: str, reports: dict[str, DeferralReport], png: Path, max_rows: int,
               step: int) -> None:
    """Send the curve figure (``<key>/curve_plot``) and table (``<key>/curve_table``) to loggers that show them."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    if isinstance(logger, WandbLogger):
        columns, rows = deferral_table(reports)
        if len(rows) > max_rows:
            idx = torch.linspace(0, len(rows) - 1, max_rows).round().long().unique().tolist()
            rows = [rows[i] for i in idx]
        logger.log_image(key=f"{key}/curve_plot", images=[str(png)])
        logger.log_table(key=f"{key}/curve_table", columns=columns, data=rows)
    elif isinstance(logger, TensorBoardLogger):
        from lit_cascades.plotting import plot_deferral_curves

        fig, _ = plot_deferral_curves(reports)
        logger.experiment.add_figure(f"{key}/curve_plot", fig, global_step=step)  # closes the figure


def deferral_batch(scores: Tensor | Mapping[str, Tensor], small_quality: Tensor, large_quality: Tensor,
                   ids: Tensor | None = None) -> dict[str, Any]:
    """Build the step output consumed by :class:`DeferralCurveLogger`: ``{"deferral": {...}}``."""
    out: dict[str, Any] = {"scores": scores, "small_quality": small_quality, "large_quality": large_quality}
    if ids is not None:
        out["ids"] = ids
    return {"deferral": out}
