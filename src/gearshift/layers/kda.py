"""Kimi Delta Attention (KDA): per-channel decay, three short convs, low-rank decay and gate projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import RecurrentCache
from ..config import KDAConfig
from ..ops.conv import causal_conv1d
from ..ops.dispatch import delta_rule
from ..ops.fused import decay_gates, gated_rms_norm, l2norm
from .base import Mixer, NormWeight, ShortConv, StepContext, advance_recurrent_cache


class KimiDeltaAttention(Mixer):
    kind = "kda"

    def __init__(self, hidden_size: int, cfg: KDAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, d = cfg.heads, cfg.head_dim
        p = h * d
        self.q_proj = nn.Linear(hidden_size, p, bias=False)
        self.k_proj = nn.Linear(hidden_size, p, bias=False)
        self.v_proj = nn.Linear(hidden_size, p, bias=False)
        self.q_conv = ShortConv(p, cfg.conv_kernel)
        self.k_conv = ShortConv(p, cfg.conv_kernel)
        self.v_conv = ShortConv(p, cfg.conv_kernel)
        self.f_a_proj = nn.Linear(hidden_size, d, bias=False)  # low-rank decay: hidden -> d -> H*d
        self.f_b_proj = nn.Linear(d, p, bias=False)
        self.g_a_proj = nn.Linear(hidden_size, d, bias=False)  # low-rank output gate
        self.g_b_proj = nn.Linear(d, p, bias=False)
        self.beta_proj = nn.Linear(hidden_size, h, bias=False)
        self.A_log = nn.Parameter(torch.empty(h).uniform_(1, 16).log())
        self.dt_bias = nn.Parameter(torch.ones(p))
        self.norm = NormWeight(d)
        self.o_proj = nn.Linear(p, hidden_size, bias=False)

    def forward(self, x: Tensor, ctx: StepContext, cache: RecurrentCache | None = None) -> Tensor:
        b, t, _ = x.shape
        c = self.cfg
        h, d = c.heads, c.head_dim
        act = F.silu if c.conv_activation == "silu" else torch.sigmoid
        mask = None if ctx.token_mask is None else ctx.token_mask[..., None]
        inputs, outputs, tails = [], [], []
        for i, (proj, conv) in enumerate(
            ((self.q_proj, self.q_conv), (self.k_proj, self.k_conv), (self.v_proj, self.v_conv))
        ):
            y = proj(x)
            if mask is not None:  # padding is an exact identity: no conv input, no decay, no write
                y = y * mask.to(y.dtype)
            tail = None if cache is None else cache.conv[i]
            out, new_tail = causal_conv1d(y, conv.weight, tail)
            inputs.append((tail, y))
            outputs.append(act(out).view(b, t, h, d))
            tails.append(new_tail)
        q, k, v = l2norm(outputs[0]), l2norm(outputs[1]), outputs[2]
        g_raw = self.f_b_proj(self.f_a_proj(x)).view(b, t, h, d).float()
        g, beta = decay_gates(g_raw, self.beta_proj(x), self.A_log[:, None], self.dt_bias.view(h, d))
        if mask is not None:
            g = g * mask[..., None]
            beta = beta * mask
        record = 0 if cache is None else cache.rollback
        state0 = None if cache is None else cache.state
        in_place = not record and state0 is not None and cache.in_place  # engine pools: no copy-back
        o, state, states = delta_rule(q, k, v, g, beta, d**-0.5, state0, record_last=record, in_place=in_place)
        if cache is not None:
            advance_recurrent_cache(cache, state, tails, inputs, states, c.conv_kernel)
        gate = self.g_b_proj(self.g_a_proj(x)).view(b, t, h, d)
        o = gated_rms_norm(o, self.norm.weight, gate, c.norm_eps, c.gate_activation)
        return self.o_proj(o.reshape(b, t, h * d))

    def new_cache(self, rollback: int = 0, capacity: int = 0) -> RecurrentCache:
        return RecurrentCache(n_convs=3, rollback=rollback)

    def state_bytes(self, context: int, dtype_bytes: int = 2) -> int:
        c = self.cfg
        state = c.heads * c.head_dim * c.head_dim * 4
        conv = 3 * (c.conv_kernel - 1) * c.heads * c.head_dim * dtype_bytes
        return state + conv
