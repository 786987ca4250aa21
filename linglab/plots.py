"""The one plotting module: matplotlib's file-only backend, figure size and resolution, axes, saving, log axes with
readable labels, and `si`, the count formatter of the reports and the scaling tables.

    from linglab.plots import figure, log_y_if_wide, plt, save, si
    fig, ax = figure("training loss", "step", "loss")     # FIGSIZE, constrained layout, a light grid
    ax.plot(steps, loss); log_y_if_wide(ax, loss)
    save(fig, "plots/loss.png")                          # DPI, and the figure closed
    si(16.26e9, ".2f")                                   # "16.26B"

Take pyplot from here (`from linglab.plots import plt`) so the Agg backend is chosen before pyplot loads.

`si` writes counts with the suffixes this field writes them with, K, M, B, T (1e3, 1e6, 1e9, 1e12): parameters and
tokens are "16B" and "20T" in the Ling reports, and the counts linglab formats (parameters, tokens, FLOPs per
token) are read beside those. So 1e9 is "B", never SI's "G"; totals of FLOPs are written in e-notation (3e+11)
and do not go through `si`. `linglab params` keeps its own `_fmt` (cli.py), which puts a whole table in one unit
(0.79B beside 16.26B) with the same suffixes, and does not import matplotlib for it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: training machines have no display and tests must not open windows

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

FIGSIZE = (6.0, 3.5)  # inches; small enough to read side by side with the text of a report
DPI = 110
COUNT_UNITS = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3))


def si(n: float, spec: str = ".3g") -> str:
    """n in its largest unit of COUNT_UNITS, formatted by `spec`: si(1.5e9) == "1.5B", si(2e12) == "2T",
    si(520e3, ".2f") == "520.00K"; below 1000 as it is (512, 0.5)."""
    for unit, scale in COUNT_UNITS:
        if abs(n) >= scale:
            return f"{n / scale:{spec}}{unit}"
    return f"{n:g}"


def figure(title: str = "", xlabel: str = "", ylabel: str = "", grid: str | None = "major", figsize=FIGSIZE):
    """(fig, ax) of one plot: FIGSIZE, constrained layout, the title and labels, and a light grid at the `grid`
    ticks ("major", or "both" for log axes; None for none)."""
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if grid is not None:
        ax.grid(alpha=0.3, which=grid)
    return fig, ax


def save(fig, path: str | Path) -> None:
    """Write the figure at DPI and close it: pyplot keeps every open figure alive otherwise."""
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _count_label(value, _) -> str:
    """2e10, 5e9: a count (FLOPs, parameters, tokens) on a log axis."""
    return f"{value:.0e}".replace("e+0", "e").replace("e+", "e")


def _plain_label(value, _) -> str:
    """0.2, 5: a loss or ratio on a log axis; reads faster than the default 2x10^-1."""
    return f"{value:g}"


def _log_ticks(axis, label, subs=(1.0, 2.0, 5.0)) -> None:
    """Major ticks at subs x powers of ten, labelled by `label`; no minor labels (matplotlib's 3x10^9 ones collide)."""
    axis.set_major_locator(LogLocator(subs=subs))
    axis.set_major_formatter(FuncFormatter(label))
    axis.set_minor_formatter(NullFormatter())


def log_axes(ax, y_counts: bool = False) -> None:
    """Log x and y with plain labels at 1-2-5. x is a count, written 2e10; y too when y_counts, else a loss or
    ratio, written 0.5."""
    ax.set(xscale="log", yscale="log")
    _log_ticks(ax.xaxis, _count_label)
    _log_ticks(ax.yaxis, _count_label if y_counts else _plain_label)


def log_y_if_wide(ax, values) -> None:
    """Log y when the data spans a decade or more (grad-norm spikes), where linear y hides the rest.

    Plain-number labels at 1-2-5 while that is not crowded (two decades or less), else at powers of ten.
    """
    if len(values) and values.min() > 0 and values.max() >= 10 * values.min():
        ax.set_yscale("log")
        _log_ticks(ax.yaxis, _plain_label, subs=(1.0, 2.0, 5.0) if values.max() <= 100 * values.min() else (1.0,))
