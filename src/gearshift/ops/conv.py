"""Causal depthwise short convolution with a carried tail, as used by GDN and KDA before the recurrence."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused import fusible


def causal_conv1d(
    x: Tensor, weight: Tensor, tail: Tensor | None = None, starts: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """y_t = sum_k weight[c, 0, k] * x_{t - (K-1) + k}, with the K-1 inputs before x taken from ``tail``.

    x [B, T, C], weight [C, 1, K], tail [B, K-1, C] (zeros when None). Returns (y [B, T, C], the new tail: the
    last K-1 inputs, i.e. what the next call needs). No activation here; callers apply it. ``starts`` [B, T] bool
    marks tokens that begin a document of a packed row: inputs of earlier documents are then unseen
    (``document_conv1d``), and there is no carried tail.
    """
    b, t, c = x.shape
    kernel = weight.shape[-1]
    if starts is not None:
        if tail is not None:
            raise ValueError("a packed row (document starts) carries no conv tail")
        return document_conv1d(x, weight, starts), _last_document_tail(x, starts, kernel)
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


def document_conv1d(x: Tensor, weight: Tensor, starts: Tensor) -> Tensor:
    """``causal_conv1d`` restarted at every document start of a packed row: y_t sums only inputs of t's document.

    Written as K shifted products (tap s reads x_{t-s}, seen unless a document starts in (t-s, t]), summed in
    fp32: one fused kernel under torch.compile, and the reference that compiled code is checked against.
    """
    t = x.shape[1]
    kernel = weight.shape[-1]
    w = weight[:, 0, :].float()  # [C, K]; tap s uses w[:, K-1-s]
    xf = x.float()
    y = xf * w[:, kernel - 1]
    blocked = torch.zeros_like(starts)
    for s in range(1, min(kernel, t)):
        # a document starting at t-s+1 hides x_{t-s} and everything before it from t
        blocked = blocked | F.pad(starts[:, : t - s + 1], (s - 1, 0), value=True)
        shifted = F.pad(xf[:, : t - s], (0, 0, s, 0))
        y = y + shifted * w[:, kernel - 1 - s] * (~blocked)[..., None]
    return y.to(x.dtype)


def _last_document_tail(x: Tensor, starts: Tensor, kernel: int) -> Tensor:
    """The last K-1 inputs of each row that belong to its last document (zeros for earlier ones): the tail that
    would continue that document."""
    xx = F.pad(x, (0, 0, kernel - 1, 0))[:, -(kernel - 1) :] if kernel > 1 else x[:, :0]
    after = starts.flip(1).cumsum(1).flip(1) - starts.long()  # document starts after each token
    mine = F.pad(after == 0, (kernel - 1, 0), value=False)[:, -(kernel - 1) :] if kernel > 1 else after[:, :0] == 0
    return xx * mine[..., None].to(x.dtype)
