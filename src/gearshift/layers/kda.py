"""Kimi Delta Attention (KDA): per-channel decay, three short convs, low-rank decay and gate projections."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..cache import RecurrentStateCache
from ..config import KDAConfig
from ..ops.conv import causal_conv1d
from ..ops.dispatch import delta_rule
from ..ops.fused import activate_qkv, decay_gates, gated_rms_norm
from ..state import RecurrentSpec
from .base import (
    Mixer,
    NormWeight,
    ShortConv,
    StepContext,
    advance_recurrent_cache,
    fuse_linears_,
    fuse_parameters_,
    fused_linear,
    fused_view,
)


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

    def forward(self, x: Tensor, ctx: StepContext, cache: RecurrentStateCache | None = None) -> Tensor:
        b, t, _ = x.shape
        c = self.cfg
        h, d = c.heads, c.head_dim
        p = h * d
        mask = None if ctx.token_mask is None else ctx.token_mask[..., None]
        # every projection of x at once: [q | k | v] (the three convs' input, side by side), the low-rank decay's
        # and gate's first halves, beta's logit
        y = fused_linear(x, self._in_projs)
        if y is None:
            y = torch.cat([proj(x) for proj in self._in_projs], dim=-1)
        qkv, low_rank, beta_logit = y.split([3 * p, 2 * d, h], dim=-1)
        if mask is not None:  # padding is an exact identity: no conv input, no decay, no write
            qkv = qkv * mask.to(qkv.dtype)
        tail = None if cache is None else cache.conv[0]
        # the three depthwise convs are one over the 3p channels (their weights side by side)
        conv = fused_view(self._convs)
        if conv is None:
            conv = torch.cat(self._convs)
        out, new_tail = causal_conv1d(qkv, conv, tail, ctx.document_starts())
        q, k, v = activate_qkv(out, p, d, d, c.conv_activation)
        g_raw, gate = self._low_rank(low_rank)
        g, beta = decay_gates(g_raw.view(b, t, h, d).float(), beta_logit, self.A_log[:, None], self.dt_bias.view(h, d))
        if mask is not None:
            g = g * mask[..., None]
            beta = beta * mask
        record = 0 if cache is None else cache.rollback
        state0 = None if cache is None else cache.state
        in_place = not record and state0 is not None and cache.in_place  # engine pools: no copy-back
        o, state, states = delta_rule(q, k, v, g, beta, d**-0.5, state0, record, in_place, documents=ctx.documents)
        if cache is not None:
            advance_recurrent_cache(cache, state, [new_tail], [(tail, qkv)], states, c.conv_kernel)
        o = gated_rms_norm(o, self.norm.weight, gate.view(b, t, h, d), c.norm_eps, c.gate_activation)
        return self.o_proj(o.reshape(b, t, p))

    def _low_rank(self, low_rank: Tensor) -> tuple[Tensor, Tensor]:
        """The decay's and the output gate's second (up) projections, [..., 2d] -> two [..., p]: one batched
        matmul where ``fuse_`` stacked their weights."""
        d = self.cfg.head_dim
        stacked = fused_view([self.f_b_proj.weight, self.g_b_proj.weight], stack=True)
        if stacked is None:
            f_a, g_a = low_rank.split([d, d], dim=-1)
            return self.f_b_proj(f_a), self.g_b_proj(g_a)
        lead = low_rank.shape[:-1]
        pair = low_rank.reshape(-1, 2, d).transpose(0, 1)  # [2, N, d], a view
        up = torch.bmm(pair, stacked.transpose(1, 2))  # [2, N, p]
        return up[0].view(*lead, -1), up[1].view(*lead, -1)

    @property
    def _in_projs(self) -> tuple[nn.Linear, ...]:
        return self.q_proj, self.k_proj, self.v_proj, self.f_a_proj, self.g_a_proj, self.beta_proj

    @property
    def _convs(self) -> list[Tensor]:
        return [self.q_conv.weight, self.k_conv.weight, self.v_conv.weight]

    def fuse_(self) -> None:
        fuse_linears_(self._in_projs)
        fuse_parameters_([self.f_b_proj.weight, self.g_b_proj.weight], stack=True)
        fuse_parameters_(self._convs)

    def state_spec(self) -> RecurrentSpec:
        c = self.cfg
        return RecurrentSpec(  # one conv tail for the three convs side by side, [K-1, 3p]
            heads=c.heads,
            key_dim=c.head_dim,
            value_dim=c.head_dim,
            conv_channels=(3 * c.heads * c.head_dim,),
            conv_kernel=c.conv_kernel,
        )
