"""The demo's picture: a few series' actual values, the daemon's published one-step forecasts and the
naive last-value forecast over the unseen tail, with the MAE figures in the legend (matplotlib, the
`demo` extra). The PNG's Description names the series drawn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import optional_import
from .tourism import TailMAE, TourismFiles

SERIES = 4  # drawn, one panel each
HISTORY = 24  # in-sample quarters shown before the tail


def drawn_series(files: TourismFiles) -> list[str]:
    """A fixed choice: the series with the most quarters (the longest histories), then by name."""
    return sorted(files.values, key=lambda k: (-len(files.values[k]), k))[:SERIES]


def write_picture(path: Path, files: TourismFiles, forecasts: Mapping[str, Sequence[float]], score: TailMAE) -> Path:
    """`forecasts[key]`: the key's published predictions in step order (the t-th forecasts quarter t+1)."""
    matplotlib = optional_import("matplotlib", "matplotlib", "demo", "the demo's picture")
    matplotlib.use("Agg")  # files only, no display
    pyplot = optional_import("matplotlib.pyplot", "matplotlib", "demo", "the demo's picture")
    keys = drawn_series(files)
    figure, axes = pyplot.subplots(len(keys), 1, figsize=(9, 2.6 * len(keys)), sharex=False, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        values, n = np.asarray(files.values[key]), files.in_sample[key]
        start, tail = max(n - HISTORY, 0), range(n, len(values))
        ax.plot(range(start, len(values)), values[start:], color="black", lw=1.5, label="actual")
        ax.plot(tail, [forecasts[key][t - 1] for t in tail], "o-", color="tab:blue", label="streamlstm one-step forecast")
        ax.plot(tail, values[n - 1:-1], "s--", color="tab:orange", label="naive (last value)")
        ax.axvline(n - 0.5, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{key}: the last {HISTORY} in-sample quarters, then the unseen tail", fontsize=9)
        ax.set_ylabel("log(1 + visitors)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncol=3, fontsize=9, title_fontsize=9,
                  title=f"tail MAE over all {len(files.values)} series: streamlstm {score.model:.3f}, "
                        f"naive {score.naive:.3f}")
    axes[-1, 0].set_xlabel("quarter")
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    figure.savefig(path, dpi=100, metadata={"Title": "streamlstm demo: Tourism quarterly",
                                            "Description": "series: " + ", ".join(keys)})
    pyplot.close(figure)
    return path
