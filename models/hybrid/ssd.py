"""Mamba-2's chunked SSD scan for the CPU, in plain torch, with the same arguments and results as
transformers' `mamba2_chunk_scan` (FalconH1's PyTorch path), laid out so that the work is a few large
matmuls instead of einsums over permuted copies:

- B and C are shared by the heads of a group: C B^T is computed once per group and chunk (the library
  repeats B and C to every head first), and the chunk states (X^T B) and the state-to-output term
  (C S^T) are one [Q, N] x [N, heads x head_dim] matmul per chunk, in the input's own layout;
- the in-chunk decay exp(cumsum[l] - cumsum[s]) (l >= s) is built from float64 cumulative sums (as
  exact as the library's segsum, a masked cumsum over an expanded [.., Q, Q] tensor; an fp32
  difference, as in mamba-ssm's kernels, would lose digits when the sums are large);
- decays below e^-60 are set to 0 (see _decay: exp's underflow is some 30-50x slower on x86 CPUs,
  and was a large part of the library's time);
- the states at the chunk boundaries come from a loop over chunks (state = decay * state + chunk's
  state, linear in the length) instead of a [chunks+1, chunks+1] decay matrix and an einsum.

fp32 throughout, like the library. Differentiable (the in-place steps act on fresh tensors whose values
autograd does not keep; tested), though the point is inference. tests/test_hybrid_scan.py holds it to
the library's function and mixer. Measured in bench/RESULTS.md (hybrid section).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


FLOOR = -60.0


def _decay(log_decay: torch.Tensor) -> torch.Tensor:
    """exp(log_decay), exactly 0 below e^FLOOR (~1e-26). exp of an argument below ~-87 (a denormal or
    an underflow) runs some 30-50x slower on x86 CPUs, and denormals slow every matmul they enter;
    a term decayed below 1e-26 weighs that little against the same term undecayed (a token's own term
    has decay 1), far below fp32's 6e-8. Clamped above too, so the masked upper triangle stays finite."""
    keep = log_decay > FLOOR
    return torch.where(keep, log_decay.clamp(min=FLOOR, max=-FLOOR).exp_(), 0.0)


@functools.lru_cache(maxsize=16)
def _above_diagonal(size: int, device: torch.device) -> torch.Tensor:
    return torch.ones(size, size, dtype=torch.bool, device=device).triu(1)


def chunk_scan(hidden_states: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               chunk_size: int, D: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
               initial_states: torch.Tensor | None = None, dt_softplus: bool = False,
               dt_limit: tuple[float, float] = (0.0, float("inf")), return_final_states: bool = False, **_):
    """hidden_states [b, T, H, P], dt [b, T, H], A [H], B and C [b, T, G, N], D and dt_bias [H],
    initial_states [b, H, P, N]. Returns y [b, T, H, P] (fp32), and the final state [b, H, P, N] when
    return_final_states."""
    batch, length, heads, head_dim = hidden_states.shape
    groups, state = B.shape[2], B.shape[3]
    per_group = heads // groups
    Q = chunk_size

    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1]).float()
    x = hidden_states.float()

    pad = (-length) % Q
    chunks = (length + pad) // Q
    a = A.float() * dt                                     # [b, T, H]
    xdt = x * dt[..., None]                                # [b, T, H, P]
    B, C = B.float(), C.float()
    if pad:
        a = F.pad(a, (0, 0, 0, pad))
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))

    # b = batch, c = chunk, l/s = position in the chunk, g = group, r = head in the group, p, n
    cum = torch.cumsum(a.view(batch, chunks, Q, heads), dim=2)                      # [b, c, l, H]
    Bg = B.view(batch, chunks, Q, groups, state).transpose(2, 3)                    # [b, c, g, l, n]
    Cg = C.view(batch, chunks, Q, groups, state).transpose(2, 3)
    xdt = xdt.view(batch, chunks, Q, heads, head_dim)

    # 1. in-chunk (diagonal blocks), per head: (C B^T * decay, causal) @ X
    # the decay from s to l, sum(a[s+1..l]), as a difference of float64 cumulative sums: as exact as the
    # library's segsum (a masked cumsum over an expanded [.., l, s] tensor), at a fraction of its cost
    cum_h = torch.cumsum(a.view(batch, chunks, Q, heads).permute(0, 3, 1, 2).double(), dim=-1)  # [b, H, c, l]
    scores = (Cg @ Bg.transpose(-1, -2)).masked_fill(_above_diagonal(Q, x.device), 0)           # [b, c, g, l, s]
    scores = scores.transpose(1, 2).contiguous()                                                 # [b, g, c, l, s]
    decay = _decay((cum_h[..., :, None] - cum_h[..., None, :]).float())             # [b, H, c, l, s]
    scores = decay.view(batch, groups, per_group, chunks, Q, Q) * scores[:, :, None]
    x_h = xdt.permute(0, 3, 1, 2, 4).reshape(-1, Q, head_dim)                       # [b H c, l, p]
    y_diag = torch.bmm(scores.view(-1, Q, Q), x_h).view(batch, heads, chunks, Q, head_dim)

    # 2. each chunk's own end state, as [n, r p] per group: sum_l B[l]^T decay-to-end[l] X[l]
    xd = xdt.mul_(_decay(cum[:, :, -1:] - cum)[..., None]).view(batch, chunks, Q, groups, per_group * head_dim)
    chunk_states = Bg.transpose(-1, -2) @ xd.transpose(2, 3)                        # [b, c, g, n, r p]

    # 3. the states at the chunk starts: s_0 = initial, s_{k+1} = exp(sum of a over chunk k) s_k + chunk state k
    decay_from_start = _decay(cum)                                                  # [b, c, l, H]
    chunk_decay = decay_from_start[:, :, -1].reshape(batch, chunks, groups, 1, per_group, 1)
    chunk_states = chunk_states.view(batch, chunks, groups, state, per_group, head_dim)
    if initial_states is None:
        start = torch.zeros_like(chunk_states[:, 0])
    else:  # [b, H, p, n] -> [b, g, n, r, p]
        start = initial_states.float().view(batch, groups, per_group, head_dim, state).permute(0, 1, 4, 2, 3)
    starts = [start]
    for k in range(chunks):
        start = torch.addcmul(chunk_states[:, k], start, chunk_decay[:, k])
        starts.append(start)
    final_state = starts[-1].permute(0, 1, 3, 4, 2).contiguous().view(batch, heads, head_dim, state)
    starts = torch.stack(starts[:-1], dim=1).view(batch, chunks, groups, state, per_group * head_dim)

    # 4. the start state's contribution, exp(cum[l]) C[l] s, one [l, n] x [n, r p] matmul per chunk and group
    y_off = (Cg @ starts).transpose(2, 3).reshape(batch, chunks, Q, heads, head_dim)
    y = torch.addcmul(y_diag.permute(0, 2, 3, 1, 4), y_off, decay_from_start[..., None])
    y = y.view(batch, chunks * Q, heads, head_dim)
    if pad:
        y = y[:, :length]
    if D is not None:
        y = y.addcmul_(x, D.float()[:, None])
    if return_final_states:
        return y, final_state
    return y
