"""Matplotlib figures shared by metrics, callbacks and recipes (headless: the Agg backend)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from torch import Tensor

    from lit_cascades.functional.deferral import DeferralReport


def new_axes(ax: Axes | None = None, figsize: tuple[float, float] = (5.5, 4.0)) -> tuple[Figure, Axes]:
    """Return ``(figure, axes)``: ``ax``'s figure, or a new headless figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax


def plot_deferral_curves(
    reports: dict[str, DeferralReport], ax: Axes | None = None, title: str | None = None
) -> tuple[Figure, Axes]:
    """Plot the realised deferral curve of each named score with the small-only, large-only, random and
    ideal references (the references come from the first report; all reports must share the same data).

    Args:
        reports: ``{score name: DeferralReport}``.
        ax: axes to draw on (a new figure when ``None``).
        title: optional title.
    """
    if not reports:
        raise ValueError("`reports` is empty; expected at least one named DeferralReport")
    fig, ax = new_axes(ax)
    first_name, first = next(iter(reports.items()))
    rates = first.curve.rates.cpu().numpy()
    qs, ql = first.scalars["small_quality"], first.scalars["large_quality"]
    ref = f", {first_name}" if len(reports) > 1 else ""  # small-model references belong to the first score
    ax.axhline(qs, color="tab:gray", ls=":", lw=1, label=f"small only ({qs:.3f}{ref})")
    ax.axhline(ql, color="black", ls=":", lw=1, label=f"large only ({ql:.3f})")
    ax.plot(rates, first.random.cpu().numpy(), color="tab:gray", ls="--", lw=1, label=f"random{ref}")
    ax.plot(rates, first.ideal.cpu().numpy(), color="tab:green", ls="--", lw=1, label=f"ideal{ref}")
    for name, rep in reports.items():
        label = f"{name} (s_d={rep.scalars['s_d']:.3f})" if len(reports) > 1 else f"realised (s_d={rep.scalars['s_d']:.3f})"
        ax.plot(rep.curve.rates.cpu().numpy(), rep.curve.quality.cpu().numpy(), lw=1.5, label=label)
    ax.set_xlabel("deferral rate")
    ax.set_ylabel("cascade quality")
    ax.set_xlim(0, 1)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig, ax


def plot_sweep(
    summary: dict[str, dict[str, tuple[float, float]]],
    x_of: dict[str, float],
    x_label: str,
    y_keys: tuple[str, ...],
    swept_label: str = "swept",
) -> Figure:
    """One panel per metric: methods in ``x_of`` as a line with ±std error bars against their x value, the
    other methods as horizontal reference lines (mean) with a ±std band.

    Args:
        summary: ``{method: {metric: (mean, std)}}`` (see :func:`lit_cascades.runner.summarize_runs`).
        x_of: ``{method: x}`` for the swept methods.
        x_label: label of the swept parameter.
        y_keys: metrics to plot, one panel each.
        swept_label: legend label of the swept line.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(y_keys), figsize=(4.2 * len(y_keys), 3.4), squeeze=False)
    swept = sorted((x, m) for m, x in x_of.items() if m in summary)
    for ax, key in zip(axes[0], y_keys):
        xs = [x for x, _ in swept]
        means = [summary[m][key][0] for _, m in swept]
        stds = [summary[m][key][1] for _, m in swept]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=swept_label)
        for i, (method, stats) in enumerate((m, v) for m, v in summary.items() if m not in x_of):
            color = f"C{i + 1}"
            mean, std = stats[key]
            ax.axhline(mean, color=color, ls="--", lw=1, label=method)
            ax.axhspan(mean - std, mean + std, color=color, alpha=0.12)
        ax.set_xlabel(x_label)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_retrieval_examples(
    gallery: Tensor,
    ranked: Tensor,
    targets: Tensor | None = None,
    captions: Sequence[str] | None = None,
    sketches: Tensor | None = None,
    row_titles: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Image-retrieval examples: one row per query with its sketch and caption, then its top-``k`` images.

    Args:
        gallery: ``[N, 3, H, W]`` gallery images in ``[0, 1]``.
        ranked: ``[Q, k]`` gallery rows retrieved for each query, best first.
        targets: optional ``[Q]`` gallery row of each query's relevant image (framed green when retrieved).
        captions: optional ``Q`` query captions; sketches: optional ``[Q, 1, H, W]`` query sketch ink.
        row_titles: optional ``Q`` labels shown left of each row (e.g. the query type).
        title: figure title.
    """
    import matplotlib
    import numpy as np

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    q, k = ranked.shape
    cols = k + 1
    fig, axes = plt.subplots(q, cols, figsize=(1.6 * cols, 1.9 * q), squeeze=False)
    for i in range(q):
        ax = axes[i, 0]
        if sketches is not None:
            ax.imshow(1.0 - sketches[i, 0].cpu().float().numpy(), cmap="gray", vmin=0, vmax=1)
        else:  # a text-only query: blank paper
            ax.imshow(np.ones((gallery.shape[2], gallery.shape[3], 3)))
        label = "\n".join(textwrap.wrap(captions[i], 24)) if captions is not None else ""
        ax.set_title(label, fontsize=6)
        if row_titles is not None:
            ax.set_ylabel(row_titles[i], fontsize=7)
        for j in range(k):
            ax = axes[i, j + 1]
            row = int(ranked[i, j])
            ax.imshow(gallery[row].permute(1, 2, 0).cpu().float().clamp(0, 1).numpy())
            hit = targets is not None and row == int(targets[i])
            for side in ax.spines.values():
                side.set_color("tab:green" if hit else "lightgray")
                side.set_linewidth(3 if hit else 1)
            ax.set_title(f"#{j + 1}", fontsize=6, color="tab:green" if hit else "black")
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig

