"""Scan orders, cluster partitions, patchify, masking, and the scan plans that apply the orders."""
import pytest
import torch

from mal.scan import RandomScanPlan, ScanPlan
from mal.serialization import (FIXED_ORDERS, SCAN_ORDERS, _order_list, cluster_grid, cluster_patch_table,
                               cluster_sequence, gather_tokens, inverse, layer_orders, masked_count, order_from_clusters, patchify,
                               pretrain_cluster_orders, sample_mask, scan_order, unpatchify)


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 48, 32)
    p = patchify(x, 4)
    assert p.shape == (2, 12 * 8, 48)
    assert torch.equal(p[0, 1], x[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))  # patch (0, 1)
    assert torch.equal(unpatchify(p, 4, 12, 8), x)


@pytest.mark.parametrize("grid", [(12, 12), (14, 14), (13, 9)])
@pytest.mark.parametrize("order", list(FIXED_ORDERS))
def test_orders_are_permutations_with_inverse(grid, order):
    h, w = grid
    perm = scan_order(h, w, 4, order)
    assert torch.equal(perm.sort().values, torch.arange(h * w))
    assert torch.equal(perm[inverse(perm)], torch.arange(h * w))
    x = torch.randn(2, h * w, 5)
    assert torch.equal(gather_tokens(gather_tokens(x, perm), inverse(perm)), x)


def test_orders_a_to_d_on_12x12_k4():
    # cluster (0,0) covers rows 0-3, cols 0-3; cluster (0,2) covers rows 0-3, cols 8-11.
    a = scan_order(12, 12, 4, "row_fwd").tolist()
    assert a[:16] == [0, 1, 2, 3, 12, 13, 14, 15, 24, 25, 26, 27, 36, 37, 38, 39]
    assert a[16:32] == [4, 5, 6, 7, 16, 17, 18, 19, 28, 29, 30, 31, 40, 41, 42, 43]
    b = scan_order(12, 12, 4, "col_fwd").tolist()
    assert b[:16] == [0, 12, 24, 36, 1, 13, 25, 37, 2, 14, 26, 38, 3, 15, 27, 39]
    assert b[16:32] == [4, 16, 28, 40, 5, 17, 29, 41, 6, 18, 30, 42, 7, 19, 31, 43]
    c = scan_order(12, 12, 4, "row_bwd").tolist()   # clusters right to left, reversed row-major inside
    assert c[:16] == [47, 46, 45, 44, 35, 34, 33, 32, 23, 22, 21, 20, 11, 10, 9, 8]
    assert c[16:32] == [43, 42, 41, 40, 31, 30, 29, 28, 19, 18, 17, 16, 7, 6, 5, 4]
    d = scan_order(12, 12, 4, "col_bwd").tolist()   # reversed column-major inside
    assert d[:16] == [47, 35, 23, 11, 46, 34, 22, 10, 45, 33, 21, 9, 44, 32, 20, 8]
    assert d[16:32] == [43, 31, 19, 7, 42, 30, 18, 6, 41, 29, 17, 5, 40, 28, 16, 4]
    # second cluster row starts at patch row 4
    assert a[48:52] == [48, 49, 50, 51]


def test_ragged_clusters_14x14():
    perm = scan_order(14, 14, 4, "row_fwd").tolist()
    # last cluster of the first cluster row is 4 rows x 2 cols: cols 12, 13
    assert perm[48:56] == [12, 13, 26, 27, 40, 41, 54, 55]
    # the very last cluster is 2 x 2
    assert perm[-4:] == [180, 181, 194, 195]
    x = torch.randn(3, 196, 4)
    for order in FIXED_ORDERS:
        p = scan_order(14, 14, 4, order)
        assert torch.equal(gather_tokens(gather_tokens(x, p), inverse(p)), x)


def test_random_order_per_sample_and_seeded():
    torch.manual_seed(3)
    a = RandomScanPlan(2, 12, 12, 4, False).gathers("cpu", 4)[0][0]
    torch.manual_seed(3)
    b = RandomScanPlan(2, 12, 12, 4, False).gathers("cpu", 4)[0][0]
    assert a.shape == (4, 144) and torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in a}) > 1
    for row in a:
        assert torch.equal(row.sort().values, torch.arange(144))
    with pytest.raises(ValueError, match="RandomScanPlan"):
        layer_orders("random", 2, 12, 12, 4, False)
    c = pretrain_cluster_orders("random", 8, 12, 12, 4, torch.Generator().manual_seed(4))
    assert len({tuple(r.tolist()) for r in c}) > 1


@pytest.mark.parametrize("grid,k", [((12, 12), 4), ((14, 14), 4), ((7, 5), 3), ((6, 6), 1)])
def test_order_from_clusters_equals_the_listed_orders(grid, k):
    """The tensor form (sort by cluster position, then rank inside the cluster) against the list-built orders:
    the fixed orders (both directions, row and column patterns) and random sequences."""
    h, w = grid
    for order, (direction, pattern) in FIXED_ORDERS.items():
        seq = torch.tensor([cluster_sequence(h, w, k, direction)])
        assert torch.equal(order_from_clusters(h, w, k, seq, pattern)[0], scan_order(h, w, k, order)), order
    n = cluster_grid(h, w, k)[0] * cluster_grid(h, w, k)[1]
    clusters = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    want = torch.tensor([_order_list(h, w, k, tuple(c.tolist()), "row") for c in clusters])
    assert torch.equal(order_from_clusters(h, w, k, clusters), want)


@pytest.mark.parametrize("grid,k", [((12, 12), 4), ((14, 14), 4), ((7, 5), 3), ((6, 6), 1)])
@pytest.mark.parametrize("bidirectional,depth", [(True, 5), (True, 4), (False, 3)])
def test_random_plan_scans_each_samples_cluster_sequence(grid, k, bidirectional, depth):
    """The on-device plan makes every layer scan the sample's cluster sequence (row-major inside, reversed on
    every other layer when bidirectional) and gathers back to raster order at the end."""
    h, w = grid
    B, n = 3, cluster_grid(h, w, k)[0] * cluster_grid(h, w, k)[1]
    clusters = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(i)) for i in range(B)])
    steps, back = RandomScanPlan(depth, h, w, k, bidirectional).gathers("cpu", B, clusters=clusters)
    base = torch.tensor([_order_list(h, w, k, tuple(c.tolist()), "row") for c in clusters])  # (B, hw) reference
    x = torch.arange(h * w).expand(B, -1).unsqueeze(-1)                      # (B, hw, 1) raster ids
    for layer, idx in enumerate(steps):
        if idx is not None:
            x = gather_tokens(x, idx)
        want = base.flip(-1) if bidirectional and layer % 2 == 1 else base
        assert torch.equal(x[..., 0], want), layer
    assert torch.equal(gather_tokens(x, back)[..., 0], torch.arange(h * w).expand(B, -1))


def test_random_plan_draws_new_uniform_sequences():
    torch.manual_seed(0)
    plan = RandomScanPlan(2, 12, 12, 4, True)
    firsts = torch.stack([plan.gathers("cpu", 64)[0][0][:, 0] for _ in range(20)])  # (20, 64)
    # the first patch scanned is the top-left patch of a uniformly drawn cluster: 9 clusters, all seen
    tops = torch.tensor([(c // 3) * 48 + (c % 3) * 4 for c in range(9)])
    assert torch.isin(firsts, tops).all()
    counts = torch.stack([(firsts == t).sum() for t in tops]).float()
    assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean()   # 1280 draws, ~142 each


def test_alternating_layers_cycle_and_reverse():
    orders = layer_orders("alternating", 8, 12, 12, 4, bidirectional=True)
    assert torch.equal(orders[0], scan_order(12, 12, 4, "row_fwd"))
    assert torch.equal(orders[1], scan_order(12, 12, 4, "col_fwd").flip(0))
    assert torch.equal(orders[2], scan_order(12, 12, 4, "row_bwd"))
    assert torch.equal(orders[4], orders[0])
    seqs = pretrain_cluster_orders("alternating", 64, 12, 12, 4, torch.Generator().manual_seed(0))
    assert {tuple(r.tolist()) for r in seqs} == {(0, 1, 2, 3, 4, 5, 6, 7, 8), (2, 1, 0, 5, 4, 3, 8, 7, 6)}


def test_cluster_table_and_divisibility_error():
    t = cluster_patch_table(12, 12, 4)
    assert t.shape == (9, 16) and t[1, :4].tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="does not divide"):
        cluster_patch_table(14, 14, 4)


@pytest.mark.parametrize("ratio,patches,clusters", [(0.01, 1, 1), (0.1, 14, 1), (0.2, 28, 2), (0.3, 43, 3),
                                                    (0.5, 72, 4)])
def test_mask_counts_follow_the_papers_ratios_of_144_tokens(ratio, patches, clusters):
    """The paper masks 1/14/28/43/72 of 144 tokens for 1/10/20/30/50 %; clusters are rounded to whole 4x4 units;
    the 8 input clusters (128 patches) are the positions that can be masked."""
    assert masked_count("patch", ratio, 12, 12, 4, 4) == (patches, 128)
    assert masked_count("cluster", ratio, 12, 12, 4, 4) == (clusters, 8)
    assert masked_count("pixel", ratio, 12, 12, 4, 4) == (int(ratio * 48 * 48), 2048)
    assert masked_count("cluster", 0.9, 12, 12, 4, 4) == (8, 8)              # at most every input cluster


@pytest.mark.parametrize("unit", ["patch", "cluster", "pixel"])
@pytest.mark.parametrize("order", ["alternating", "random", "row_fwd"])
def test_masks_hit_only_input_clusters_with_exact_counts(unit, order):
    g = torch.Generator().manual_seed(0)
    clusters = pretrain_cluster_orders(order, 64, 12, 12, 4, g)
    m = sample_mask(unit, 0.3, clusters, 12, 12, 4, 4, g)
    table = cluster_patch_table(12, 12, 4)
    count, _ = masked_count(unit, 0.3, 12, 12, 4, 4)
    if unit == "pixel":
        assert m.shape == (64, 48, 48) and (m.sum((1, 2)) == count).all()
        m = patchify(m.unsqueeze(1).float(), 4).amax(-1).bool()            # (64, 144) patches with a masked pixel
    else:
        assert m.shape == (64, 144) and (m.sum(1) == count * (16 if unit == "cluster" else 1)).all()
    last = table[clusters[:, -1]]                                          # (64, 16) the target-only cluster
    assert not torch.gather(m, 1, last).any()                              # never masked
    if unit == "cluster":                                                  # whole clusters
        assert set(m[:, table].float().mean(-1).unique().tolist()) <= {0.0, 1.0}
    inputs = table[clusters[:, :-1]].flatten(1)
    assert torch.gather(m, 1, inputs).float().mean(0).min() > 0            # every input patch gets masked sometimes


def _cluster_mask_by_sorting(ratio, clusters, h, w, k, p, g):
    """Oracle: rank (B, n-1) uniform scores by a full sort, mask the `count` lowest-ranked input positions'
    clusters, patch by patch."""
    count, _ = masked_count("cluster", ratio, h, w, k, p)
    table = cluster_patch_table(h, w, k)
    pick = torch.rand(clusters.shape[0], clusters.shape[1] - 1, generator=g).argsort(1)[:, :count]
    m = torch.zeros(clusters.shape[0], h * w, dtype=torch.bool)
    for b in range(clusters.shape[0]):
        for pos in pick[b].tolist():
            m[b, table[clusters[b, pos]]] = True
    return m


@pytest.mark.parametrize("k,h", [(1, 12), (2, 12), (4, 12), (3, 9)])
def test_cluster_mask_matches_a_sorting_draw_from_the_same_generator(k, h):
    """The partial-selection draw masks exactly the clusters a full sort of the same scores picks, and leaves
    the generator where that draw leaves it (so the data order after it is unchanged)."""
    clusters = pretrain_cluster_orders("alternating", 16, h, h, k, torch.Generator().manual_seed(1))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(3):
        assert torch.equal(sample_mask("cluster", 0.3, clusters, h, h, k, 4, g1),
                           _cluster_mask_by_sorting(0.3, clusters, h, h, k, 4, g2))
    assert torch.equal(g1.get_state(), g2.get_state())


def test_pixel_mask_and_errors():
    clusters = pretrain_cluster_orders("alternating", 2, 12, 12, 4)
    m = sample_mask("pixel", 0.1, clusters, 12, 12, 4, 4)
    assert m.shape == (2, 48, 48) and (m.sum((1, 2)) == int(0.1 * 48 * 48)).all()
    assert sample_mask("none", 0.5, clusters, 12, 12, 4, 4) is None
    with pytest.raises(ValueError, match="unknown masking unit"):
        sample_mask("token", 0.2, clusters, 12, 12, 4, 4)
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        sample_mask("patch", 1.0, clusters, 12, 12, 4, 4)
    assert set(SCAN_ORDERS) == {"row_fwd", "col_fwd", "row_bwd", "col_bwd", "random", "alternating"}


class _Tag(torch.nn.Module):
    """A stand-in block: records the token order it is handed (x holds token ids) and passes x on."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def forward(self, x, order=None):
        x = x if order is None else gather_tokens(x, order)
        self.seen.append(x[..., 0].clone())
        return x


@pytest.mark.parametrize("bidirectional", [True, False])
def test_scan_plan_runs_each_layer_on_its_order_and_returns_to_the_canonical_layout(bidirectional):
    orders = layer_orders("alternating", 6, 12, 12, 4, bidirectional)
    plan, seen = ScanPlan(orders), []
    blocks = torch.nn.ModuleList([_Tag(seen) for _ in orders])
    x = torch.arange(144).expand(2, -1).unsqueeze(-1)                      # (2, 144, 1) raster ids
    out = plan.run(blocks, x)
    for layer, order in enumerate(orders):
        assert torch.equal(seen[layer], order.expand(2, -1)), layer       # layer l scans orders[l]
    assert torch.equal(out, x)                                             # back in raster order
    assert torch.equal(plan.run(blocks, x, canonical=False)[..., 0], orders[-1].expand(2, -1))
    steps, _ = plan.gathers("cpu")
    assert plan.gathers("cpu")[0] is steps                                 # built once per device
    with pytest.raises(ValueError, match="the plan has 6 layers"):
        plan.run(blocks[:3], x)
