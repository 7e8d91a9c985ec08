"""Pictures a user looks at: next-cluster prediction grids, segmentation overlays and training curves."""
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


def class_colors(num_classes: int) -> torch.Tensor:
    """(num_classes, 3) RGB in [0, 1], one per class: matplotlib's tab20 dark shades (ten distinct hues) first,
    then its light shades, then tab20b, so that few classes get clearly different colours."""
    from matplotlib import colormaps
    tab20 = list(colormaps["tab20"].colors)
    cols = tab20[0::2] + tab20[1::2] + list(colormaps["tab20b"].colors)
    return torch.tensor([cols[c % len(cols)] for c in range(num_classes)], dtype=torch.float32)


def overlay(images: torch.Tensor, labels: torch.Tensor, colors: torch.Tensor, alpha: float = 0.55) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] with each pixel's class colour blended in; pixels whose label is not a class
    (ignored) stay as they are."""
    valid = (labels >= 0) & (labels < len(colors))                           # (B, H, W)
    paint = colors[labels.clamp(0, len(colors) - 1)].permute(0, 3, 1, 2)     # (B, 3, H, W)
    return torch.where(valid.unsqueeze(1), (1 - alpha) * images + alpha * paint, images)


def save_segmentation_grid(path: Path, images: torch.Tensor, masks: torch.Tensor | None, preds: torch.Tensor, mean,
                           std, class_names: list[str]) -> Path:
    """PNG with one column per image and three rows: the image, the ground truth (left out when masks is None) and
    the prediction, each class in its colour over the image (ignored pixels uncoloured), and a legend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    imgs = denormalize(images.float().cpu(), mean, std)                     # (B, 3, H, W)
    colors = class_colors(len(class_names))
    rows = [("image", imgs)] + ([("ground truth", overlay(imgs, masks.cpu(), colors))] if masks is not None else [])
    rows.append(("prediction", overlay(imgs, preds.cpu(), colors)))
    B, (H, W) = imgs.shape[0], imgs.shape[-2:]
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(4.0, 1.6 * B * W / H), 1.9 * len(rows) + 0.6), squeeze=False)
    for ax, (title, batch) in zip(axes[:, 0], rows):
        ax.imshow(make_grid(batch, nrow=B, padding=2, pad_value=1.0).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(title, fontsize=8, loc="left")
    handles = [Patch(color=colors[c].tolist(), label=n) for c, n in enumerate(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 12), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
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
