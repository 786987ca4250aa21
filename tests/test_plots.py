"""The shared plotting module: the one count formatter, and a figure saved as a PNG."""

import numpy as np

from linglab import plots


def test_si_writes_counts_with_k_m_b_t():
    assert plots.si(1.5e9) == "1.5B"  # billions are "B", as parameters are written, not SI's "G"
    assert plots.si(2e12) == "2T"
    assert plots.si(520e3, ".2f") == "520.00K" and plots.si(512) == "512"


def test_figure_saves_a_png_with_log_axes(tmp_path):
    fig, ax = plots.figure("loss vs compute", "C", "loss", grid="both")
    ax.plot([1e10, 1e12], [2.0, 0.5])
    plots.log_axes(ax)
    plots.log_y_if_wide(ax, np.array([0.5, 20.0]))
    plots.save(fig, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
