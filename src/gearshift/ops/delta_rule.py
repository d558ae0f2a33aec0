"""Gated delta rule in pure PyTorch: the chunked (parallel) form and the recurrent form.

One recurrence covers both linear mixers (mixers.md):

    S_t = D_t S_{t-1} + beta_t k_t (v_t - (D_t S_{t-1})^T k_t)^T,   o_t = S_t^T (scale * q_t)

with D_t = exp(g_t) a scalar per head (GDN, ``g`` of shape [B, T, HV]) or a diagonal over the key channels
(KDA, ``g`` of shape [B, T, HV, K]). Layout follows fla: q, k [B, T, H, K]; v [B, T, HV, V] with HV a multiple of
H (value head h reads key head h // (HV // H)); beta [B, T, HV]; state [B, HV, K, V] kept in fp32.

Chunked form (used for prefill and training): inside a chunk with start state S0 and cumulative log decay
G_i = sum_{j<=i} g_j, the "pseudo values" u solve a unit lower-triangular system

    (I + A) u = beta * v - beta * (exp(G) * k) S0,   A_ij = beta_i <k_i, exp(G_i - G_j) k_j>  (j < i)

and then o_i = (exp(G_i) q_i)^T S0 + sum_{j<=i} <q_i, exp(G_i - G_j) k_j> u_j and
S_C = exp(G_C) S0 + sum_j (exp(G_C - G_j) k_j) u_j^T. Decay ratios are only formed for j <= i, so nothing
overflows however strong the decay.

Packed rows (``starts`` [B, T] bool marks the first token of each document): the state restarts at every start.
The recurrence zeroes it there; the chunked form keeps, inside each chunk, only pairs of tokens of one document,
lets only the tokens before the chunk's first start read the state carried in, and lets only the chunk's last
document write the state carried out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from .compiled import compiled as compiled_fn


def wants_grad(*tensors: Tensor) -> bool:
    """Whether this call is part of training: autograd is on and some input needs a gradient."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in tensors)


def _expand_heads(q: Tensor, k: Tensor, hv: int) -> tuple[Tensor, Tensor]:
    h = q.shape[2]
    if hv == h:
        return q, k
    if hv % h:
        raise ValueError(f"value heads ({hv}) must be a multiple of key heads ({h})")
    return q.repeat_interleave(hv // h, dim=2), k.repeat_interleave(hv // h, dim=2)


def _check(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> bool:
    """Validate shapes; return True when the decay is per channel (KDA)."""
    b, t, h, dk = q.shape
    if k.shape != q.shape or v.shape[:2] != (b, t) or beta.shape != v.shape[:3]:
        raise ValueError(
            f"inconsistent shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} beta{tuple(beta.shape)}"
        )
    if g.shape == v.shape[:3]:
        return False
    if g.shape == (*v.shape[:3], dk):
        return True
    raise ValueError(f"g must be [B,T,HV] or [B,T,HV,K], got {tuple(g.shape)}")


def recurrent_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    initial_state: Tensor | None = None,
    return_states: bool = False,
    starts: Tensor | None = None,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Token-by-token recurrence (decoding). Returns (o [B,T,HV,V], final state[, states after each token]).
    ``starts`` [B, T]: document starts of packed rows, where the state restarts from zero."""
    per_channel = _check(q, k, v, g, beta)
    b, t, _, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    q, k = _expand_heads(q, k, hv)
    state = (
        torch.zeros(b, hv, dk, dv, dtype=torch.float32, device=q.device)
        if initial_state is None
        else initial_state.float()
    )
    qf, kf, vf, gf, bf = (x.float() for x in (q, k, v, g, beta))
    outs, states = [], []
    for i in range(t):
        if starts is not None:
            state = state * (~starts[:, i]).to(state.dtype)[:, None, None, None]
        decay = gf[:, i].exp()
        state = state * (decay[..., None] if per_channel else decay[..., None, None])
        ki = kf[:, i]
        u = bf[:, i, :, None] * (vf[:, i] - torch.einsum("bhk,bhkv->bhv", ki, state))
        state = state + ki[..., None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qf[:, i] * scale, state))
        if return_states:
            states.append(state)
    o = torch.stack(outs, 1).to(v.dtype) if outs else v.new_zeros(b, 0, hv, dv)
    if return_states:
        return o, state, torch.stack(states, 1) if states else state.new_zeros(b, 0, hv, dk, dv)
    return o, state


def chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
    starts: Tensor | None = None,
    compiled: bool = False,
) -> tuple[Tensor, Tensor]:
    """Chunked parallel form (prefill and training). Returns (o [B,T,HV,V], final state [B,HV,K,V] fp32).
    ``starts`` [B, T]: document starts of packed rows, where the state restarts from zero. ``compiled``: each block
    of chunks runs through torch.compile (the GPU's fallback when no fla kernel may train)."""
    per_channel = _check(q, k, v, g, beta)
    b, t, _, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    q, k = _expand_heads(q, k, hv)
    c = chunk_size
    n = -(-t // c)
    pad = n * c - t

    def prep(x: Tensor) -> Tensor:
        # [B, T, HV, ...] -> fp32 [B, HV, N, C, ...]; padded tokens have k = 0, beta = 0, g = 0: an exact identity.
        x = x.float().transpose(1, 2)
        if pad:
            x = torch.cat([x, x.new_zeros(*x.shape[:2], pad, *x.shape[3:])], dim=2)
        return x.reshape(b, hv, n, c, *x.shape[3:])

    qc, kc, vc, gc, bc = prep(q * scale), prep(k), prep(v), prep(g), prep(beta)
    # per chunk, how many documents have started so far at each token ([B, 1, N, C]; 0 = still the carried one)
    seg = None
    if starts is not None:
        seg = F.pad(starts.to(torch.int32), (0, pad)).reshape(b, 1, n, c).cumsum(-1)
    state = (
        torch.zeros(b, hv, dk, dv, dtype=torch.float32, device=q.device)
        if initial_state is None
        else initial_state.float()
    )
    incl = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    eye = torch.eye(c, device=q.device)
    # Everything inside a chunk is computed for many chunks at once; only the state recurrence between chunks runs
    # chunk by chunk (a few small products each): on a GPU this path is bound by kernel launches, not FLOPs.
    # Per-channel decay builds [B,HV,M,C,C,K] ratios for M chunks, so KDA takes blocks of chunks sized to
    # PER_CHANNEL_BLOCK_ELEMENTS, and when training recomputes each block in the backward pass instead of keeping
    # its ratios (over a whole sequence they cost T*C*K floats per head: ~14 GB a layer at 16x1024 tokens).
    block = max(1, PER_CHANNEL_BLOCK_ELEMENTS // (b * hv * c * c * dk)) if per_channel else n
    recompute = per_channel and wants_grad(q, k, v, g, beta)
    step = _compiled_chunk_block if compiled else _chunk_block
    outs = []
    for s in range(0, n, block):
        part = slice(s, s + block)
        seg_part = None if seg is None else seg[:, :, part]
        args = (qc[:, :, part], kc[:, :, part], vc[:, :, part], gc[:, :, part], bc[:, :, part], state, incl, eye)
        args = (*args, seg_part)
        if recompute:
            o_i, state = torch.utils.checkpoint.checkpoint(step, *args, use_reentrant=False)
        else:
            o_i, state = step(*args)
        outs.append(o_i)
    o = torch.cat(outs, dim=2).reshape(b, hv, n * c, dv)[:, :, :t].transpose(1, 2)
    return o.to(v.dtype), state


def _restart_cumsum(gi: Tensor, seg: Tensor) -> Tensor:
    """The chunks' cumulative log decays restarted at every document start (``seg`` [B,1,M,C]): only differences
    within a document are used, which restarting leaves as they are, but a packed chunk's longer run of strong
    decays would cost them fp32 precision (up to 1e-4 relative) that a document of its own keeps. Summed in fp64."""
    g64 = gi.double()
    cum = g64.cumsum(dim=3)
    pos = torch.arange(seg.shape[-1], device=seg.device)
    begins = torch.ones_like(seg, dtype=torch.bool)
    begins[..., 1:] = seg[..., 1:] != seg[..., :-1]
    first = torch.where(begins, pos, 0).cummax(dim=-1).values  # each token's document start in the chunk (or 0)
    if cum.dim() == 5:
        first = first[..., None]
    before = (cum - g64).gather(3, first.expand_as(cum))  # the decay summed up to that start
    return (cum - before).to(gi.dtype)


PER_CHANNEL_BLOCK_ELEMENTS = 1 << 27  # [B,HV,M,C,C,K] decay ratios of one block of KDA chunks (512 MiB in fp32)


def _chunk_block(
    qi: Tensor,
    ki: Tensor,
    vi: Tensor,
    gi: Tensor,
    bi: Tensor,
    state: Tensor,
    incl: Tensor,
    eye: Tensor,
    seg: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """M consecutive chunks ([B,HV,M,C,...]): their outputs and the state after the last (module docstring).
    ``seg`` [B,1,M,C]: documents started within the chunk up to each token (packed rows), else None."""
    dv = vi.shape[-1]
    cum = gi.cumsum(dim=3)  # [B,HV,M,C] or [B,HV,M,C,K]
    if seg is not None:
        incl = incl & (seg[..., :, None] == seg[..., None, :])  # [B,1,M,C,C]: pairs within one document
        cum = _restart_cumsum(gi, seg)
    if cum.dim() == 5:  # per-channel decay (KDA)
        diff = (cum[..., :, None, :] - cum[..., None, :, :]).masked_fill(~incl[..., None], float("-inf"))
        ratio = diff.exp()  # [B,HV,M,C,C,K], exp(G_i - G_j) for j <= i, else 0
        # sum_k x_ik k_jk ratio_ijk as a product and a reduction over the contiguous K axis: the same sum written
        # as a three-operand einsum becomes a batched matmul of 1xK by Kx1 per (i, j), i.e. millions of GEMVs
        kr = ki[..., None, :, :] * ratio  # [B,HV,M,C,C,K]: k_jk ratio_ijk
        kk = (ki[..., :, None, :] * kr).sum(-1)
        qk = (qi[..., :, None, :] * kr).sum(-1)
        k_start = cum.exp() * ki
        q_start = cum.exp() * qi
        k_end = (cum[..., -1:, :] - cum).exp() * ki
        chunk_decay = cum[..., -1, :].exp()[..., None]  # [B,HV,M,K,1]
    else:
        ratio = (cum[..., :, None] - cum[..., None, :]).masked_fill(~incl, float("-inf")).exp()
        kk = (ki @ ki.transpose(-1, -2)) * ratio
        qk = (qi @ ki.transpose(-1, -2)) * ratio
        k_start = cum.exp()[..., None] * ki
        q_start = cum.exp()[..., None] * qi
        k_end = (cum[..., -1:] - cum).exp()[..., None] * ki
        chunk_decay = cum[..., -1].exp()[..., None, None]  # [B,HV,M,1,1]
    if seg is not None:
        carried = (seg == 0)[..., None].to(ki.dtype)  # tokens of the document the chunk's start state belongs to
        k_start, q_start = k_start * carried, q_start * carried
        k_end = k_end * (seg == seg[..., -1:])[..., None].to(ki.dtype)  # only the last document writes the state
        chunk_decay = chunk_decay * (seg[..., -1] == 0)[..., None, None].to(ki.dtype)  # a start inside: no carry
    a = (bi[..., None] * kk).tril(-1)
    rhs = torch.cat([bi[..., None] * vi, bi[..., None] * k_start], dim=-1)
    sol = torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True)
    sol_v, sol_k = sol[..., :dv], sol[..., dv:]
    outs = []
    for m in range(qi.shape[2]):
        u = sol_v[:, :, m] - sol_k[:, :, m] @ state
        outs.append(q_start[:, :, m] @ state + qk[:, :, m] @ u)
        state = chunk_decay[:, :, m] * state + k_end[:, :, m].transpose(-1, -2) @ u
    return torch.stack(outs, dim=2), state


_compiled_chunk_block = compiled_fn(_chunk_block, name="delta-rule chunk block")
