"""PartitionReport: what a partition gave each client, as numbers, a table and a heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class PartitionReport:
    """Per-client statistics of a ``[clients, classes]`` label-count matrix.

    * ``sizes``: samples per client.
    * ``entropy``: entropy (bits) of each client's label distribution (``log2(C)`` = uniform).
    * ``tv``: total-variation distance of each client's label distribution to the global one,
      ``0.5 * sum_c |p_kc - p_c|`` (0: IID-like, 1: disjoint).
    * ``emd``: earth mover's distance to the global distribution with ``|i - j|`` ground cost
      over class indices, i.e. the L1 distance of the CDFs (meaningful for ordered classes;
      ``tv`` is the order-free measure).
    """

    def __init__(self, counts: np.ndarray) -> None:
        counts = np.asarray(counts, dtype=np.float64)
        if counts.ndim != 2 or (counts < 0).any():
            raise ValueError("`counts` must be a non-negative [clients, classes] matrix.")
        self.counts = counts
        self.sizes = counts.sum(axis=1)
        p = counts / np.maximum(self.sizes[:, None], 1)
        g = counts.sum(axis=0) / max(counts.sum(), 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            self.entropy = -np.nansum(np.where(p > 0, p * np.log2(p), 0.0), axis=1)
        self.tv = 0.5 * np.abs(p - g).sum(axis=1)
        self.emd = np.abs(np.cumsum(p, axis=1) - np.cumsum(g)).sum(axis=1)

    @classmethod
    def from_datamodule(cls, dm) -> PartitionReport:
        """The report of a (set-up) FederatedDataModule's partition."""
        dm.setup()
        return cls(dm.split.counts)

    def rows(self) -> list[list[float]]:
        """One row per client: client, size, entropy, tv, emd, then the class counts."""
        return [
            [k, int(self.sizes[k]), self.entropy[k], self.tv[k], self.emd[k], *self.counts[k]]
            for k in range(len(self.sizes))
        ]

    def table(self, max_rows: int = 50) -> str:
        """A plain-text table (first ``max_rows`` clients) plus a summary line."""
        c = self.counts.shape[1]
        head = ["client", "size", "entropy", "tv", "emd"] + [f"c{j}" for j in range(c)]
        lines = [" ".join(f"{h:>7}" for h in head)]
        for row in self.rows()[:max_rows]:
            cells = [f"{row[0]:>7}", f"{row[1]:>7}"] + [f"{v:>7.3f}" for v in row[2:5]]
            cells += [f"{int(v):>7}" for v in row[5:]]
            lines.append(" ".join(cells))
        if len(self.sizes) > max_rows:
            lines.append(f"... {len(self.sizes) - max_rows} more clients")
        lines.append(
            f"{len(self.sizes)} clients, {int(self.sizes.sum())} samples, size min/mean/max "
            f"{int(self.sizes.min())}/{self.sizes.mean():.1f}/{int(self.sizes.max())}, mean "
            f"entropy {self.entropy.mean():.3f} bits (uniform {np.log2(c):.3f}), mean TV "
            f"{self.tv.mean():.3f}"
        )
        return "\n".join(lines)

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        c = self.counts.shape[1]
        header = ",".join(["client", "size", "entropy", "tv", "emd"] + [f"c{j}" for j in range(c)])
        lines = [header] + [",".join(f"{v:.6g}" for v in row) for row in self.rows()]
        path.write_text("\n".join(lines) + "\n")
        return path

    def heatmap_figure(self, title: str = "label counts per client") -> Figure:
        """A clients x classes heatmap of the label counts, integer ticks on both axes (at most
        ``MAX_CLIENT_TICKS`` labels: readable from 20 to 1,000 clients, each client one row)."""
        from pl_federated.figures import integer_ticks, new_figure

        k, c = self.counts.shape
        fig, ax = new_figure(max(4.0, 0.45 * c + 2), max(3.0, min(0.25 * k + 1.5, 9.0)))
        im = ax.imshow(self.counts, aspect="auto", cmap="viridis", interpolation="nearest")
        integer_ticks(ax.xaxis, c)
        integer_ticks(ax.yaxis, k)
        ax.set_xlabel("class")
        ax.set_ylabel("client")
        ax.set_title(title if k <= 20 else f"{title} ({k} clients)")
        fig.colorbar(im, ax=ax, label="samples")
        return fig

    def heatmap(self, path: str | Path, title: str = "label counts per client") -> Path:
        """Save the heatmap as PNG and PDF next to it; return the PNG's path."""
        from pl_federated.figures import save

        return save(self.heatmap_figure(title), path)
