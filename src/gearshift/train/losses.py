"""Distillation losses: per-layer activation matching, forward / reverse KL on logits, cross-entropy.

All are means over the tokens selected by the loss mask, computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor


def _masked_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1)


def _kl_sums(student: Tensor, teacher: Tensor, mask: Tensor, temperature: float) -> Tensor:
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    forward = (t.exp() * (t - s)).sum(-1)
    reverse = (s.exp() * (s - t)).sum(-1)
    m = mask.to(forward.dtype)
    return torch.stack([(forward * m).sum(), (reverse * m).sum()])


def kl_terms(
    student: Tensor, teacher: Tensor, mask: Tensor, temperature: float = 1.0, chunk_tokens: int = 2048
) -> tuple[Tensor, Tensor]:
    """(forward KL(teacher || student), reverse KL(student || teacher)) per token, scaled by T^2.

    Computed over ``chunk_tokens`` positions at a time, each chunk recomputed in the backward pass: the fp32
    [tokens, vocab] temporaries (log-softmaxes, probabilities, products) of a 16x1024-token batch over a 49k
    vocabulary are ~3 GB each, and autograd would keep several of them alive until the backward pass.
    """
    v = student.shape[-1]
    s_rows, t_rows, m_rows = student.reshape(-1, v), teacher.reshape(-1, v), mask.reshape(-1)
    needs_grad = torch.is_grad_enabled() and student.requires_grad
    sums = student.new_zeros(2, dtype=torch.float32)
    for a in range(0, s_rows.shape[0], chunk_tokens):
        args = (s_rows[a : a + chunk_tokens], t_rows[a : a + chunk_tokens], m_rows[a : a + chunk_tokens], temperature)
        if needs_grad:
            sums = sums + torch.utils.checkpoint.checkpoint(_kl_sums, *args, use_reentrant=False)
        else:
            sums = sums + _kl_sums(*args)
    scale = temperature**2 / mask.sum().clamp(min=1).to(torch.float32)
    return sums[0] * scale, sums[1] * scale


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
