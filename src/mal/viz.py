"""Pictures a user looks at: next-cluster prediction grids and training curves."""
from __future__ import annotations

import csv
from pathlib import Path

import torch
from torchvision.utils import make_grid



def denormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


def save_prediction_grid(path: Path, rows: list[torch.Tensor], mean, std, titles: tuple[str, ...] = ()) -> Path:
    """PNG with one column per image and one row per tensor (e.g. input as seen, prediction, target), each row
    under its title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = [denormalize(r.float().cpu(), mean, std) for r in rows]          # R x (B, C, H, W)
    B = imgs[0].shape[0]
    fig, axes = plt.subplots(len(imgs), 1, figsize=(max(4.0, 1.2 * B), 1.55 * len(imgs)), squeeze=False)
    for r, (ax, batch) in enumerate(zip(axes[:, 0], imgs)):
        strip = make_grid(batch, nrow=B, padding=2, pad_value=1.0)          # (C, H', W')
        ax.imshow(strip.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_axis_off()
        if r < len(titles):
            ax.set_title(titles[r], fontsize=8, loc="left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def plot_curves(csv_path: Path, png_path: Path, keys: tuple[str, ...] = ("loss",)) -> Path | None:
    """Plot columns of a metrics CSV against the step (matplotlib, headless)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(csv_path)))
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_xlabel("optimizer step")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return Path(png_path)
