"""Matplotlib figures shared by metrics, callbacks and recipes (headless: the Agg backend)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

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
    first = next(iter(reports.values()))
    rates = first.curve.rates.cpu().numpy()
    qs, ql = first.scalars["small_quality"], first.scalars["large_quality"]
    ax.axhline(qs, color="tab:gray", ls=":", lw=1, label=f"small only ({qs:.3f})")
    ax.axhline(ql, color="black", ls=":", lw=1, label=f"large only ({ql:.3f})")
    ax.plot(rates, first.random.cpu().numpy(), color="tab:gray", ls="--", lw=1, label="random")
    ax.plot(rates, first.ideal.cpu().numpy(), color="tab:green", ls="--", lw=1, label="ideal")
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
