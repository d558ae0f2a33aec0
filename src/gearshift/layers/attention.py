"""Full attention (FA) and sliding-window attention (SWA): one module, SWA when a window is configured."""

from __future__ import annotations

from torch import Tensor, nn

from ..cache import AttentionCache
from ..config import AttentionConfig
from ..ops.attention import attend, document_attention
from ..ops.fused import apply_rope
from ..state import KVSpec
from .base import Mixer, StepContext, fuse_linears_, linear_outputs


class Attention(Mixer):
    def __init__(self, hidden_size: int, cfg: AttentionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.kind
        h, g, d = cfg.heads, cfg.head_groups, cfg.head_size
        self.q_proj = nn.Linear(hidden_size, h * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(hidden_size, g * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(hidden_size, g * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h * d, hidden_size, bias=cfg.o_bias)

    def forward(self, x: Tensor, ctx: StepContext, cache: AttentionCache | None = None) -> Tensor:
        b, t, _ = x.shape
        c = self.cfg
        q, k, v = linear_outputs(x, self._qkv)
        q = q.view(b, t, c.heads, c.head_size).transpose(1, 2)
        k = k.view(b, t, c.head_groups, c.head_size).transpose(1, 2)
        v = v.view(b, t, c.head_groups, c.head_size).transpose(1, 2)
        cos, sin = ctx.rope(c.head_size, c.rope, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if ctx.documents is not None and cache is None:  # packed rows: attention within each document
            o = document_attention(q, k, v, ctx.documents, c.window_size, c.head_size**-0.5)
            return self.o_proj(o.transpose(1, 2).reshape(b, t, c.heads * c.head_size))
        if cache is None:
            keys, values, k_index, exact = k, v, ctx.q_index, True
        else:
            keys, values, k_index = cache.update(k, v, ctx.q_index)
            exact = cache.exact
        valid = ctx.key_valid(k_index)
        o = attend(q, keys, values, ctx.q_index, k_index, valid, c.window_size, c.head_size**-0.5, exact)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, c.heads * c.head_size))

    @property
    def _qkv(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return self.q_proj, self.k_proj, self.v_proj

    def fuse_(self) -> None:
        fuse_linears_(self._qkv)

    def state_spec(self) -> KVSpec:
        return KVSpec(heads=self.cfg.head_groups, head_size=self.cfg.head_size, window=self.cfg.window_size)
