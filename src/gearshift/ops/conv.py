"""Causal depthwise short convolution with a carried tail, as used by GDN and KDA before the recurrence."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused import fusible


def causal_conv1d(x: Tensor, weight: Tensor, tail: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """y_t = sum_k weight[c, 0, k] * x_{t - (K-1) + k}, with the K-1 inputs before x taken from ``tail``.

    x [B, T, C], weight [C, 1, K], tail [B, K-1, C] (zeros when None). Returns (y [B, T, C], the new tail: the
    last K-1 inputs, i.e. what the next call needs). No activation here; callers apply it.
    """
    b, t, c = x.shape
    kernel = weight.shape[-1]
    if tail is None:
        tail = x.new_zeros(b, kernel - 1, c)
    if t == 1:  # decoding: one dot product per channel, cheaper than a conv launch
        return conv_step(x, weight, tail)
    xx = torch.cat([tail.to(x.dtype), x], dim=1)
    y = F.conv1d(xx.transpose(1, 2), weight.to(x.dtype), groups=c).transpose(1, 2)
    return y, xx[:, xx.shape[1] - (kernel - 1) :]


@fusible
def conv_step(x: Tensor, weight: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
    """``causal_conv1d`` of one token x [B, 1, C]: the K products per channel summed in fp32."""
    xx = torch.cat([tail.to(x.dtype), x], dim=1)  # [B, K, C]
    y = (xx.float() * weight[:, 0, :].t().float()).sum(1, keepdim=True).to(x.dtype)
    return y, xx[:, 1:]
