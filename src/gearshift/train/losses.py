"""Distillation losses: per-layer activation matching, forward / reverse KL on logits, cross-entropy.

All are means over the tokens selected by the loss mask, computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _masked_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1)


def kl_terms(student: Tensor, teacher: Tensor, mask: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(forward KL(teacher || student), reverse KL(student || teacher)) per token, scaled by T^2."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    forward = (t.exp() * (t - s)).sum(-1)
    reverse = (s.exp() * (s - t)).sum(-1)
    scale = temperature**2
    return _masked_mean(forward, mask) * scale, _masked_mean(reverse, mask) * scale


def activation_terms(student: list[Tensor], teacher: list[Tensor], mask: Tensor) -> Tensor:
    """Per-layer mean squared distance between the student's mixer outputs and the teacher's [layers]."""
    return torch.stack(
        [_masked_mean((a.float() - b.float()).pow(2).mean(-1), mask) for a, b in zip(student, teacher, strict=True)]
    )


def cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return _masked_mean(per_token.view(targets.shape), mask)


def agreement(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """Fraction of masked positions where the student's top token equals the teacher's."""
    return _masked_mean((student.argmax(-1) == teacher.argmax(-1)).float(), mask)
