"""Summary histograms drawn with matplotlib (Agg) into one deterministic PNG."""

from __future__ import annotations

from pipeline.report.collect import Histogram, LabelStats
from pmu.io import png_bytes


def _panel(ax, hist: Histogram, title: str, xlabel: str, colour: str) -> None:
    edges = hist.edges()
    ax.bar(
        edges[:-1],
        hist.counts,
        width=edges[1] - edges[0],
        align="edge",
        color=colour,
        edgecolor="white",
        linewidth=0.5,
    )
    ax.set_xlim(edges[0], edges[-1])
    mean = f"mean {hist.mean:.3f}" if hist.n else "no values"
    ax.set_title(f"{title}\n(n={hist.n}, {mean})", fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("count", fontsize=9)
    ax.tick_params(labelsize=8)


def histograms_png(stats: LabelStats) -> bytes:
    """2x2 panel: entropy and kept probability mass of q_ent (per object) and q_rel (per image)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(9, 6), dpi=80, layout="constrained")
    axes = fig.subplots(2, 2)
    _panel(axes[0, 0], stats.ent_entropy, "q_ent entropy per object", "nats (max ln M)", "#3b6ea8")
    _panel(axes[0, 1], stats.rel_entropy, "q_rel entropy per image", "nats (max ln L)", "#a8553b")
    _panel(
        axes[1, 0], stats.ent_mass, "q_ent kept mass per object", "sum of stored top-k", "#3b6ea8"
    )
    _panel(
        axes[1, 1], stats.rel_mass, "q_rel kept mass per image", "sum of stored top-k", "#a8553b"
    )
    return png_bytes(fig)
