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


def mlstm_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                    eps: float = EPS) -> torch.Tensor:
    """Step-by-step stabilized mLSTM recurrence (the oracle). Matrix memory C_t = f C_{t-1} + i k_t v_t^T."""
    B, NH, S, DH = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, i, f = (t.to(acc) for t in (q, k, v, i, f))
    k = k / math.sqrt(DH)
    c_state = q.new_zeros(B, NH, DH, DH)                                    # (B, NH, DH, DH)
    n_state = q.new_zeros(B, NH, DH)                                        # (B, NH, DH)
    m_state = q.new_full((B, NH), float("-inf"))                            # (B, NH)
    out = []
    for t in range(S):
        log_f = F.logsigmoid(f[..., t])                                     # (B, NH)
        m_new = torch.maximum(log_f + m_state, i[..., t])                   # (B, NH)
        f_act = torch.exp(log_f + m_state - m_new)                          # (B, NH)
        i_act = torch.exp(i[..., t] - m_new)                                # (B, NH)
        kt, vt, qt = k[..., t, :], v[..., t, :], q[..., t, :]               # (B, NH, DH)
        c_state = f_act[..., None, None] * c_state + i_act[..., None, None] * (kt.unsqueeze(-1) * vt.unsqueeze(-2))
        n_state = f_act[..., None] * n_state + i_act[..., None] * kt        # (B, NH, DH)
        num = (qt.unsqueeze(-2) @ c_state).squeeze(-2)                      # (B, NH, DH)
        den = torch.maximum((qt * n_state).sum(-1).abs(), torch.exp(-m_new))  # (B, NH)
        out.append(num / (den[..., None] + eps))
        m_state = m_new
    return torch.stack(out, dim=-2)                                         # (B, NH, S, DH)
