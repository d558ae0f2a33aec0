"""Gated DeltaNet (GDN), Qwen3-Next style, with the Apriel2 parameter layout (mixers.md)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..cache import RecurrentStateCache
from ..config import GDNConfig
from ..ops.conv import causal_conv1d
from ..ops.dispatch import delta_rule
from ..ops.fused import activate_qkv, decay_gates, gated_rms_norm
from ..state import RecurrentSpec
from .base import Mixer, NormWeight, ShortConv, StepContext, advance_recurrent_cache, fuse_linears_, linear_outputs


class GatedDeltaNet(Mixer):
    kind = "gdn"

    def __init__(self, hidden_size: int, cfg: GDNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        kd = cfg.key_heads * cfg.key_head_dim
        vd = cfg.value_heads * cfg.value_head_dim
        self.key_dim, self.value_dim = kd, vd
        self.in_proj_qkvz = nn.Linear(hidden_size, 2 * kd + 2 * vd, bias=False)  # flat [q | k | v | z]
        self.in_proj_ba = nn.Linear(hidden_size, 2 * cfg.value_heads, bias=False)  # [b | a]
        self.convolution = ShortConv(2 * kd + vd, cfg.conv_kernel)  # over [q | k | v]
        self.A_log = nn.Parameter(torch.empty(cfg.value_heads).uniform_(0, 16).clamp_(min=1e-4).log())
        self.dt_bias = nn.Parameter(torch.ones(cfg.value_heads))
        self.norm = NormWeight(cfg.value_head_dim)
        self.out_proj = nn.Linear(vd, hidden_size, bias=False)

    def forward(self, x: Tensor, ctx: StepContext, cache: RecurrentStateCache | None = None) -> Tensor:
        b, t, _ = x.shape
        c = self.cfg
        kd, vd = self.key_dim, self.value_dim
        qkvz, ba = linear_outputs(x, self._in_projs)
        mixed, z = qkvz.split([2 * kd + vd, vd], dim=-1)  # [q | k | v] (the conv's input) and the output gate
        beta_logit, a = ba.split([c.value_heads, c.value_heads], dim=-1)
        if ctx.token_mask is not None:  # padding is an exact identity: no conv input, no decay, no write
            mixed = mixed * ctx.token_mask[..., None].to(mixed.dtype)
        tail = None if cache is None else cache.conv[0]
        starts = ctx.document_starts()
        conv_out, new_tail = causal_conv1d(mixed, self.convolution.weight, tail, starts)
        q, k, v = activate_qkv(conv_out, kd, c.key_head_dim, c.value_head_dim, "silu")
        g, beta = decay_gates(a, beta_logit, self.A_log, self.dt_bias)
        if ctx.token_mask is not None:
            g = g * ctx.token_mask[..., None]
            beta = beta * ctx.token_mask[..., None]
        record = 0 if cache is None else cache.rollback
        state0 = None if cache is None else cache.state
        in_place = not record and state0 is not None and cache.in_place  # engine pools: no copy-back
        o, state, states = delta_rule(
            q, k, v, g, beta, c.key_head_dim**-0.5, state0, record, in_place, documents=ctx.documents
        )
        if cache is not None:
            advance_recurrent_cache(cache, state, [new_tail], [(tail, mixed)], states, c.conv_kernel)
        o = gated_rms_norm(o, self.norm.weight, z.view(b, t, c.value_heads, c.value_head_dim), c.norm_eps, "silu")
        return self.out_proj(o.reshape(b, t, vd))

    @property
    def _in_projs(self) -> tuple[nn.Linear, nn.Linear]:
        return self.in_proj_qkvz, self.in_proj_ba

    def fuse_(self) -> None:
        fuse_linears_(self._in_projs)

    def state_spec(self) -> RecurrentSpec:
        c = self.cfg
        return RecurrentSpec(  # one conv tail over [q | k | v]
            heads=c.value_heads,
            key_dim=c.key_head_dim,
            value_dim=c.value_head_dim,
            conv_channels=(2 * self.key_dim + self.value_dim,),
            conv_kernel=c.conv_kernel,
        )
