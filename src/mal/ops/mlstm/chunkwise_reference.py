"""The chunkwise form of the stabilized mLSTM cell, in plain PyTorch: the same function as
`reference.mlstm_parallel`, computed chunk by chunk with a carried state (C, n, m).

Derivation. Per (batch, head), with a_t = sum_{s<=t} logsigmoid(f_s), the parallel form is

    logD[t, j] = (a_t - a_j) + i_j  (j <= t),   m_t = max_j logD[t, j]
    C[t, j] = (q_t . k_j / sqrt(DH)) exp(logD[t, j] - m_t),   s_t = sum_j C[t, j]
    h_t = sum_j C[t, j] v_j / (max(|s_t|, exp(-m_t)) + eps).

Split the sequence into chunks of L tokens; chunk c holds tokens [cL, cL + L). Inside chunk c let
g_t = sum_{cL<=s<=t} logsigmoid(f_s) (the local cumsum, so a_t - a_j = g_t - g_j for j in the chunk) and
k~ = k / sqrt(DH). The state entering chunk c summarizes every earlier key j < cL:

    M_c = m_{cL-1} (the parallel stabilizer of the chunk's previous token; -inf before the first chunk)
    C_c = sum_{j<cL} exp(logD[cL-1, j] - M_c) k~_j v_j^T   (DH x DH),   n_c = sum_{j<cL} exp(logD[cL-1, j] - M_c) k~_j.

For t in chunk c and j < cL, logD[t, j] = g_t + logD[cL-1, j], so max_{j<cL} logD[t, j] = g_t + M_c, and
the per-row stabilizer of the parallel form is reproduced exactly as

    m_t = max(g_t + M_c, max_{cL<=j<=t} (g_t - g_j) + i_j) = g_t + max(M_c, cummax_{j<=t}(i_j - g_j)).

With the inter-chunk weight w_t = exp(g_t + M_c - m_t) <= 1 and the intra-chunk decay
D~[t, j] = exp((g_t - g_j) + i_j - m_t) <= 1:

    sum_j C[t, j] v_j = w_t (q_t C_c) + sum_{cL<=j<=t} (q_t . k~_j) D~[t, j] v_j        (numerator)
    s_t               = w_t (q_t . n_c) + sum_{cL<=j<=t} (q_t . k~_j) D~[t, j]          (normalizer's sum)

and h_t, N_t = max(|s_t|, exp(-m_t)) + eps follow as in the parallel form. The state moves to the next chunk
with G = g at the chunk's last token, M_{c+1} = m of that token, rho = exp(G + M_c - M_{c+1}) <= 1 and key
weights e_j = exp((G - g_j) + i_j - M_{c+1}) <= 1:

    C_{c+1} = rho C_c + sum_j e_j k~_j v_j^T,   n_{c+1} = rho n_c + sum_j e_j k~_j.

Every exponent is <= 0 and |m_t|, |M_c| <= max |i| (m_t lies between i_t and max_j i_j), so nothing
overflows and no exponent is a difference of long cumulative sums: only within-chunk cumsums g appear.
(C_c, n_c, M_c) is also the recurrent form's state after token cL - 1, so the final state (C, n, m) lets a
caller continue a sequence: an initial state stands for every key before the first token. The backward of
this module is autograd; the Triton kernels (`chunkwise.py`) write out the same gradient.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .reference import EPS, State, empty_state, mlstm_recurrent_state

CHUNK_SIZE = 64            # this form's default chunk length (any length >= 1 computes the same function)


def _chunk(q, k, v, lf, ig, state: State, eps: float):
    """One chunk: q, k, v (B, NH, L, DH), lf = logsigmoid(f), ig (B, NH, L), state entering it -> h, state after."""
    C, n, M = state
    L, DH = q.shape[-2], q.shape[-1]
    k = k * (1.0 / math.sqrt(DH))                                           # (B, NH, L, DH) k~
    g = torch.cumsum(lf, dim=-1)                                            # (B, NH, L) local log-forget cumsum
    cm = torch.cummax(ig - g, dim=-1).values                                # (B, NH, L)
    m = g + torch.maximum(M.unsqueeze(-1), cm)                              # (B, NH, L) the parallel stabilizer
    w = torch.exp(g + M.unsqueeze(-1) - m)                                  # (B, NH, L) inter-chunk weight
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()     # (L, L)
    log_d = (g.unsqueeze(-1) - g.unsqueeze(-2)) + ig.unsqueeze(-2)          # (B, NH, L, L)
    decay = torch.exp((log_d - m.unsqueeze(-1)).masked_fill(~causal, float("-inf")))  # (B, NH, L, L)
    c = (q @ k.transpose(-2, -1)) * decay                                   # (B, NH, L, L)
    num = w.unsqueeze(-1) * (q @ C) + c @ v                                 # (B, NH, L, DH)
    s = w * (q * n.unsqueeze(-2)).sum(-1) + c.sum(-1)                       # (B, NH, L)
    norm = torch.maximum(s.abs(), torch.exp(-m)) + eps                      # (B, NH, L)
    h = num / norm.unsqueeze(-1)                                            # (B, NH, L, DH)
    G, M_next = g[..., -1], m[..., -1]                                      # (B, NH)
    rho = torch.exp(G + M - M_next)                                         # (B, NH)
    e = torch.exp((G.unsqueeze(-1) - g) + ig - M_next.unsqueeze(-1))       # (B, NH, L) key weights
    ke = k * e.unsqueeze(-1)                                                # (B, NH, L, DH)
    C = rho[..., None, None] * C + ke.transpose(-2, -1) @ v                 # (B, NH, DH, DH)
    n = rho.unsqueeze(-1) * n + ke.sum(-2)                                  # (B, NH, DH)
    return h, (C, n, M_next)


def mlstm_chunkwise_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                              eps: float = EPS, chunk_size: int | None = None, initial_state: State | None = None,
                              return_state: bool = False):
    """Chunkwise mLSTM (module docstring), the same function as `mlstm_parallel`. q, k, v (B, NH, S, DH); i, f
    (B, NH, S). Arithmetic in float64 for float64 inputs, else float32. initial_state / the returned state:
    (C (B, NH, DH, DH), n (B, NH, DH), m (B, NH)), the recurrent form's state (k scaled by 1/sqrt(DH)).
    Returns h (B, NH, S, DH) in q's dtype, and (h, state) if return_state."""
    B, NH, S, DH = q.shape
    chunk_size = CHUNK_SIZE if chunk_size is None else chunk_size
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    state = empty_state(B, NH, DH, acc, q.device) if initial_state is None else tuple(t.to(acc) for t in initial_state)
    lf, ig = F.logsigmoid(f.to(acc)), i.to(acc)                             # (B, NH, S) each
    outs = []
    for t0 in range(0, S, chunk_size):
        sl = slice(t0, min(t0 + chunk_size, S))
        h, state = _chunk(q[..., sl, :].to(acc), k[..., sl, :].to(acc), v[..., sl, :].to(acc), lf[..., sl],
                          ig[..., sl], state, eps)
        outs.append(h)
    h = (torch.cat(outs, dim=-2) if outs else q.new_zeros(B, NH, 0, DH, dtype=acc)).to(q.dtype)  # (B, NH, S, DH)
    return (h, state) if return_state else h


__all__ = ["mlstm_chunkwise_reference", "mlstm_recurrent_state", "empty_state", "State"]
