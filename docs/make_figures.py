"""Draw docs/scan_orders.png: the scan orders of MAL on a 12x12 patch grid with 4x4 clusters.

    python docs/make_figures.py
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mal.serialization import layer_orders, order_from_clusters, scan_order  # noqa: E402

H = W = 12
K = 4
PANELS = [("(a) row_fwd", scan_order(H, W, K, "row_fwd")), ("(b) col_fwd", scan_order(H, W, K, "col_fwd")),
          ("(c) row_bwd", scan_order(H, W, K, "row_bwd")), ("(d) col_bwd", scan_order(H, W, K, "col_bwd")),
          ("(e) random (one sample)",
           order_from_clusters(H, W, K, torch.randperm(9, generator=torch.Generator().manual_seed(0))[None])[0]),
          ("(f) alternating, layer 2 (reversed)", layer_orders("alternating", 2, H, W, K, True)[1])]


def draw(ax, title, perm):
    rows, cols = perm // W, perm % W
    ax.scatter(cols, rows, c=range(len(perm)), cmap="viridis", s=14, zorder=3)
    ax.plot(cols, rows, color="0.45", lw=0.8, zorder=2)
    ax.annotate("start", (cols[0], rows[0]), xytext=(0, -9), textcoords="offset points", ha="center", fontsize=7)
    for b in range(0, W + 1, K):
        ax.axvline(b - 0.5, color="k", lw=1.5)
        ax.axhline(b - 0.5, color="k", lw=1.5)
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def main():
    fig, axes = plt.subplots(1, len(PANELS), figsize=(2.3 * len(PANELS), 2.6))
    for ax, (title, perm) in zip(axes, PANELS):
        draw(ax, title, perm)
    fig.suptitle("Cluster scan orders, 12x12 patches, clusters of 4x4 (colour = position in the sequence)", fontsize=10)
    fig.tight_layout()
    out = Path(__file__).with_name("scan_orders.png")
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
