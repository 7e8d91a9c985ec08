"""mLSTM cell in plain PyTorch: the stabilized parallel form and the recurrent (step) form.

Shapes: q, k, v are (B, NH, S, DH); i, f are the input/forget gate pre-activations (B, NH, S).
The parallel form is what the model runs; the recurrent form is the test oracle. Both compute

    logF[t, j] = sum_{s=j+1..t} logsigmoid(f_s)      (j <= t, else -inf)
    logD[t, j] = logF[t, j] + i_j,   m_t = max_j logD[t, j]
    C[t, j]    = (q_t . k_j / sqrt(DH)) * exp(logD[t, j] - m_t)
    h_t        = sum_j C[t, j] v_j / (max(|sum_j C[t, j]|, exp(-m_t)) + eps)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-6


def mlstm_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                   eps: float = EPS) -> torch.Tensor:
    """Stabilized parallel mLSTM. Gates and the S x S decay matrix are computed in float32 (or float64)."""
    S, DH = q.shape[-2], q.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    log_f = F.logsigmoid(f.to(acc))                                         # (B, NH, S)
    cum = torch.cumsum(log_f, dim=-1)                                       # (B, NH, S)
    log_d = cum.unsqueeze(-1) - cum.unsqueeze(-2) + i.to(acc).unsqueeze(-2)  # (B, NH, S, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()     # (S, S)
    log_d = log_d.masked_fill(~causal, float("-inf"))                       # (B, NH, S, S)
    m = log_d.amax(dim=-1, keepdim=True)                                    # (B, NH, S, 1)
    decay = torch.exp(log_d - m)                                            # (B, NH, S, S)
    qk = (q @ k.transpose(-2, -1)).to(acc) * (1.0 / math.sqrt(DH))          # (B, NH, S, S)
    c = qk * decay                                                          # (B, NH, S, S)
    norm = torch.maximum(c.sum(dim=-1, keepdim=True).abs(), torch.exp(-m))  # (B, NH, S, 1)
    h = (c / (norm + eps)).to(v.dtype) @ v                                  # (B, NH, S, DH)
    return h.to(q.dtype)


State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]      # C (B, NH, DH, DH), n (B, NH, DH), m (B, NH)


def empty_state(B: int, NH: int, DH: int, dtype: torch.dtype, device) -> State:
    """The state before the first token: C = 0, n = 0, m = -inf."""
    return (torch.zeros(B, NH, DH, DH, dtype=dtype, device=device), torch.zeros(B, NH, DH, dtype=dtype, device=device),
            torch.full((B, NH), float("-inf"), dtype=dtype, device=device))


def mlstm_recurrent_state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                          eps: float = EPS, initial_state: State | None = None) -> tuple[torch.Tensor, State]:
    """Step-by-step stabilized mLSTM recurrence (the oracle), C_t = f C_{t-1} + i k_t v_t^T, from a state (default:
    empty) -> (h (B, NH, S, DH), the state (C, n, m) after the last token)."""
    B, NH, S, DH = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, i, f = (t.to(acc) for t in (q, k, v, i, f))
    k = k / math.sqrt(DH)
    C, n, m = empty_state(B, NH, DH, acc, q.device) if initial_state is None else (t.to(acc) for t in initial_state)
    out = []
    for t in range(S):
        log_f = F.logsigmoid(f[..., t])                                     # (B, NH)
        m_new = torch.maximum(log_f + m, i[..., t])                         # (B, NH)
        f_act, i_act = torch.exp(log_f + m - m_new), torch.exp(i[..., t] - m_new)  # (B, NH)
        kt, vt, qt = k[..., t, :], v[..., t, :], q[..., t, :]               # (B, NH, DH)
        C = f_act[..., None, None] * C + i_act[..., None, None] * (kt.unsqueeze(-1) * vt.unsqueeze(-2))
        n = f_act[..., None] * n + i_act[..., None] * kt                    # (B, NH, DH)
        num = (qt.unsqueeze(-2) @ C).squeeze(-2)                            # (B, NH, DH)
        den = torch.maximum((qt * n).sum(-1).abs(), torch.exp(-m_new))      # (B, NH)
        out.append(num / (den[..., None] + eps))
        m = m_new
    h = torch.stack(out, dim=-2) if out else q.new_zeros(B, NH, 0, DH)      # (B, NH, S, DH)
    return h, (C, n, m)


def mlstm_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                    eps: float = EPS) -> torch.Tensor:
    """The recurrent oracle from the empty state: h (B, NH, S, DH)."""
    return mlstm_recurrent_state(q, k, v, i, f, eps)[0]
