"""Image <-> patch sequence: patchify, cluster partition, the six scan orders, input masking.

A grid of h x w patches is tiled into clusters of k x k adjacent patches (edge clusters are smaller
when k does not divide the grid). Cluster (u, v) sits in cluster row u and cluster column v; inside a
cluster, patch (a, b) is local row a, local column b. A *scan order* is a permutation `perm` of the
h*w raster patch indices: `perm[t]` is the raster index of the patch at sequence position t.
Permutations are built once per (grid, k, order) and cached; they are applied with `gather`.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

# Inner patterns: how the patches inside one cluster are visited.
INNER_PATTERNS = ("row", "col", "row_rev", "col_rev")
# The four fixed orders of DESIGN §2 / paper Fig. 4: (cluster direction along a cluster row, inner pattern).
FIXED_ORDERS = {
    "row_fwd": ("fwd", "row"),      # (a)
    "col_fwd": ("fwd", "col"),      # (b)
    "row_bwd": ("bwd", "row_rev"),  # (c)
    "col_bwd": ("bwd", "col_rev"),  # (d)
}
SCAN_ORDERS = (*FIXED_ORDERS, "random", "alternating")
MASK_UNITS = ("none", "pixel", "patch", "cluster")


# ----------------------------------------------------------------------------- validation
def grid_size(img_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Patch grid (h, w) of an image; ValueError when the image is not a multiple of the patch."""
    H, W = (img_size, img_size) if isinstance(img_size, int) else img_size
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {patch_size}; "
                         f"resize/crop to a multiple of {patch_size} (e.g. {H // patch_size * patch_size}) "
                         f"or change patch_size")
    return H // patch_size, W // patch_size


def check_scan_order(order: str) -> str:
    if order not in SCAN_ORDERS:
        raise ValueError(f"unknown scan order {order!r}; choose one of {list(SCAN_ORDERS)}")
    return order


def check_divides(h: int, w: int, k: int) -> None:
    """Pretraining needs whole clusters: k must divide both grid sides."""
    if k < 1 or h % k or w % k:
        ok = [d for d in range(1, min(h, w) + 1) if h % d == 0 and w % d == 0]
        raise ValueError(f"cluster size {k} does not divide the {h}x{w} patch grid; pretraining needs whole "
                         f"clusters: use cluster_size in {ok} or change img_size/patch_size")


# ----------------------------------------------------------------------------- patches
def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, p*p*C), raster order, pixels inside a patch as (row, col, channel)."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)                                      # (B, C, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)                                         # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)                                   # (B, hw, p*p*C)


def unpatchify(x: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p); the inverse of `patchify`."""
    B, N, D = x.shape
    C = D // (p * p)
    x = x.reshape(B, h, w, p, p, C)                                         # (B, h, w, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)                                         # (B, C, h, p, w, p)
    return x.reshape(B, C, h * p, w * p)                                    # (B, C, H, W)


# ----------------------------------------------------------------------------- clusters
def cluster_grid(h: int, w: int, k: int) -> tuple[int, int]:
    """Number of cluster rows and columns (R, C); edge clusters are smaller if k does not divide."""
    if k < 1:
        raise ValueError(f"cluster size must be >= 1, got {k}")
    return math.ceil(h / k), math.ceil(w / k)


def _inner(rows: range, cols: range, pattern: str) -> list[tuple[int, int]]:
    """Visit order of the (row, col) patches of one cluster."""
    if pattern == "row":
        return [(a, b) for a in rows for b in cols]
    if pattern == "col":
        return [(a, b) for b in cols for a in rows]
    if pattern == "row_rev":
        return _inner(rows, cols, "row")[::-1]
    if pattern == "col_rev":
        return _inner(rows, cols, "col")[::-1]
    raise ValueError(f"unknown inner pattern {pattern!r}; choose one of {list(INNER_PATTERNS)}")


def _cluster_patches(h: int, w: int, k: int, u: int, v: int, pattern: str) -> list[int]:
    rows = range(u * k, min((u + 1) * k, h))
    cols = range(v * k, min((v + 1) * k, w))
    return [a * w + b for a, b in _inner(rows, cols, pattern)]


def cluster_sequence(h: int, w: int, k: int, direction: str) -> list[int]:
    """Cluster ids u*C+v in visiting order: rows top to bottom, columns left->right ('fwd') or right->left ('bwd')."""
    R, C = cluster_grid(h, w, k)
    if direction not in ("fwd", "bwd"):
        raise ValueError(f"unknown cluster direction {direction!r}; use 'fwd' or 'bwd'")
    cols = range(C) if direction == "fwd" else range(C - 1, -1, -1)
    return [u * C + v for u in range(R) for v in cols]


@lru_cache(maxsize=None)
def _order_list(h: int, w: int, k: int, clusters: tuple[int, ...], pattern: str) -> tuple[int, ...]:
    R, C = cluster_grid(h, w, k)
    out: list[int] = []
    for c in clusters:
        out += _cluster_patches(h, w, k, c // C, c % C, pattern)
    return tuple(out)


@lru_cache(maxsize=None)
def scan_order(h: int, w: int, k: int, order: str) -> torch.Tensor:
    """Permutation (h*w,) of a fixed scan order (a)-(d) on any grid; cached (CPU, int64)."""
    if order not in FIXED_ORDERS:
        raise ValueError(f"{order!r} is not a fixed scan order; choose one of {list(FIXED_ORDERS)}")
    direction, pattern = FIXED_ORDERS[order]
    clusters = tuple(cluster_sequence(h, w, k, direction))
    return torch.tensor(_order_list(h, w, k, clusters, pattern), dtype=torch.long)


@lru_cache(maxsize=None)
def _patch_cluster_keys(h: int, w: int, k: int, pattern: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per raster patch, on `device`: its cluster id (h*w,) and its rank inside the cluster's visit (h*w,)."""
    R, C = cluster_grid(h, w, k)
    cluster, within = torch.empty(h * w, dtype=torch.long), torch.empty(h * w, dtype=torch.long)
    for c in range(R * C):
        patches = torch.tensor(_cluster_patches(h, w, k, c // C, c % C, pattern))
        cluster[patches] = c
        within[patches] = torch.arange(len(patches))
    return cluster.to(device), within.to(device)


def order_from_clusters(h: int, w: int, k: int, clusters: torch.Tensor, pattern: str = "row") -> torch.Tensor:
    """Patch permutations from cluster sequences: clusters (B, n) of cluster ids -> (B, h*w), on their device.

    Patches are sorted by (position of their cluster in the sequence, rank inside the cluster): a few tensor
    ops, no host round trip, and right for the smaller edge clusters of a grid k does not divide.
    """
    cluster, within = _patch_cluster_keys(h, w, k, pattern, str(clusters.device))
    rank = inverse(clusters)                                                # (B, n) sequence position per cluster
    return (rank[:, cluster] * (k * k) + within).argsort(-1)               # (B, hw) raster patch per position


def inverse(perm: torch.Tensor) -> torch.Tensor:
    """Inverse permutation along the last dim: inv[..., perm[..., t]] = t."""
    inv = torch.empty_like(perm)
    ar = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    return inv.scatter_(-1, perm, ar)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) gathered along tokens by idx (M,) shared or (B, M) per sample -> (B, M, D)."""
    if idx.dim() == 1:
        return x[:, idx]
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))




# ----------------------------------------------------------------------------- pretraining layout
@lru_cache(maxsize=None)
def cluster_patch_table(h: int, w: int, k: int) -> torch.Tensor:
    """(n, k*k): raster indices of each cluster's patches in row-major order; needs k | h and k | w."""
    check_divides(h, w, k)
    R, C = cluster_grid(h, w, k)
    return torch.tensor([_cluster_patches(h, w, k, c // C, c % C, "row") for c in range(R * C)], dtype=torch.long)


@lru_cache(maxsize=None)
def inner_perm(k: int, pattern: str) -> torch.Tensor:
    """(k*k,): row-major local positions of a k x k cluster in the visiting order of `pattern`."""
    return torch.tensor([a * k + b for a, b in _inner(range(k), range(k), pattern)], dtype=torch.long)


@lru_cache(maxsize=None)
def slot_perm(num_slots: int, k: int, pattern: str) -> torch.Tensor:
    """Sequence of a layer over the slot layout (slot s, local row-major j): s*k*k + inner_perm[j]."""
    base = torch.arange(num_slots).unsqueeze(1) * (k * k)                   # (S, 1)
    return (base + inner_perm(k, pattern).unsqueeze(0)).reshape(-1)         # (S*k*k,)


# ----------------------------------------------------------------------------- masking
def masked_count(unit: str, ratio: float, h: int, w: int, k: int, p: int) -> tuple[int, int]:
    """(units masked per sample, input units) for an input mask (docs/method.md, "Input masking").

    The ratio is of all h*w patch positions, as in the paper (1/14/28/43/72 of 144 tokens for 1/10/20/30/50 %):
    patch: floor(ratio*h*w) patches; cluster: that many patches rounded to whole k x k clusters (at least one);
    pixel: floor(ratio*H*W) pixels. Units are drawn among the encoder's input only, clusters 0..n-2 of the
    sample's sequence (the last cluster is a target, never an input), so at most all input units are masked.
    """
    check_mask(unit, ratio)
    n_inputs = math.prod(cluster_grid(h, w, k)) - 1
    if unit == "none" or ratio == 0:
        return 0, n_inputs * k * k
    if unit == "pixel":
        return min(math.floor(ratio * h * w * p * p), n_inputs * k * k * p * p), n_inputs * k * k * p * p
    if unit == "patch":
        return max(1, min(math.floor(ratio * h * w), n_inputs * k * k)), n_inputs * k * k
    return max(1, min(n_inputs, round(math.floor(ratio * h * w) / (k * k)))), n_inputs


def check_mask(unit: str, ratio: float) -> None:
    if unit not in MASK_UNITS:
        raise ValueError(f"unknown masking unit {unit!r}; choose one of {list(MASK_UNITS)}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"masking ratio {ratio} is outside [0, 1); use e.g. 0.2 for 20 %")


def _smallest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """(B, total) scores -> (B, count) column indices of each row's `count` smallest, in no particular order: the
    set of `scores.argsort(1)[:, :count]` without the full sort."""
    return scores.topk(count, dim=1, largest=False, sorted=False).indices


def _random_subset(eligible: torch.Tensor, count: int, generator) -> torch.Tensor:
    """(B, total) bool with exactly `count` True per row, drawn uniformly among the `eligible` entries."""
    scores = torch.rand(eligible.shape, generator=generator, device=eligible.device)
    scores = scores.masked_fill(~eligible, 2.0)                              # never drawn before an eligible one
    return torch.zeros_like(eligible).scatter_(1, _smallest(scores, count), True)


def sample_mask(unit: str, ratio: float, clusters: torch.Tensor, h: int, w: int, k: int, p: int,
                generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Input mask for the cluster sequences `clusters` (B, n), on their device. pixel: (B, h*p, w*p); patch and
    cluster: (B, h*w) over raster patches; none or ratio 0: None. Counts: `masked_count`.

    cluster: `count` of the input positions 0..n-2 of each sequence, drawn uniformly (the `count` smallest of
    (B, n-1) uniform scores); only the chosen clusters' patches are indexed, so at k = 1 (n = 144) the host draw
    stays a few small ops."""
    count, _ = masked_count(unit, ratio, h, w, k, p)
    if count == 0:
        return None
    B, dev = clusters.shape[0], clusters.device
    table = cluster_patch_table(h, w, k).to(dev)                            # (n, k*k)
    if unit == "cluster":
        scores = torch.rand(B, table.shape[0] - 1, generator=generator, device=dev)   # (B, n-1) input positions
        chosen = clusters.gather(1, _smallest(scores, count))                # (B, count) masked cluster ids
        ids = table.index_select(0, chosen.flatten()).view(B, -1)            # (B, count*k²) masked patches
        return torch.zeros(B, h * w, dtype=torch.bool, device=dev).scatter_(1, ids, True)
    eligible = torch.ones(B, h * w, dtype=torch.bool, device=dev)
    eligible.scatter_(1, table[clusters[:, -1]], False)                     # (B, hw) the target-only cluster out
    if unit == "patch":
        return _random_subset(eligible, count, generator)
    pixels = eligible.view(B, h, 1, w, 1).expand(B, h, p, w, p).reshape(B, -1)   # (B, H*W)
    return _random_subset(pixels, count, generator).view(B, h * p, w * p)


# ----------------------------------------------------------------------------- per-layer schedules
def layer_orders(order: str, depth: int, h: int, w: int, k: int, bidirectional: bool) -> list[torch.Tensor]:
    """Fine-tuning/inference: the raster permutation (h*w,) each encoder layer scans, for a fixed order.

    alternating: layers cycle (a), (b), (c), (d). bidirectional: every other layer runs its sequence reversed
    (ViL style). The random order draws per sample on the device: `mal.scan.RandomScanPlan`.
    """
    check_scan_order(order)
    if order == "random":
        raise ValueError("the random scan order has no fixed layer orders; use mal.scan.RandomScanPlan")
    fixed = list(FIXED_ORDERS)
    out = []
    for layer in range(depth):
        perm = scan_order(h, w, k, fixed[layer % len(fixed)] if order == "alternating" else order)
        out.append(perm.flip(-1) if bidirectional and layer % 2 == 1 else perm)
    return out



def pretrain_cluster_orders(order: str, batch: int, h: int, w: int, k: int,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """Pretraining: each sample's cluster sequence, (B, n) cluster ids.

    alternating: drawn per sample from the (a)/(c) sequences; random: a random permutation per sample;
    (a)-(d): that order's sequence.
    """
    check_scan_order(order)
    check_divides(h, w, k)
    n = math.prod(cluster_grid(h, w, k))
    if order == "random":
        return torch.stack([torch.randperm(n, generator=generator) for _ in range(batch)])
    if order == "alternating":
        seqs = torch.tensor([cluster_sequence(h, w, k, "fwd"), cluster_sequence(h, w, k, "bwd")])  # (2, n)
        pick = torch.randint(0, 2, (batch,), generator=generator)                                 # (B,)
        return seqs[pick]
    return torch.tensor(cluster_sequence(h, w, k, FIXED_ORDERS[order][0])).expand(batch, n).clone()


def pretrain_layer_patterns(order: str, depth: int) -> list[str]:
    """Pretraining: the inner pattern each layer uses (alternating cycles the patterns of (a)-(d))."""
    check_scan_order(order)
    if order == "alternating":
        return [INNER_PATTERNS[layer % len(INNER_PATTERNS)] for layer in range(depth)]
    pattern = "row" if order == "random" else FIXED_ORDERS[order][1]
    return [pattern] * depth


def unseen_input_patches(order: str, h: int, w: int, k: int) -> list[int]:
    """Raster patches a pretraining with `order` never feeds to the encoder: the last cluster of a fixed order's
    sequence (a target only). Alternating draws (a) or (c) per sample and random draws any order, so every
    patch is an input sometimes: none."""
    check_scan_order(order)
    if order not in FIXED_ORDERS:
        return []
    last = cluster_sequence(h, w, k, FIXED_ORDERS[order][0])[-1]
    return sorted(cluster_patch_table(h, w, k)[last].tolist())
