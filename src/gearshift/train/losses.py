"""Distillation losses: per-layer activation matching, forward / reverse KL on logits, cross-entropy.

All are means over the tokens selected by the loss mask, computed in fp32. Training uses ``linear_losses``: the
logit losses fused with the output projection and chunked over tokens, so no [tokens, vocab] logits exist at once;
``kl_terms`` and ``cross_entropy`` on materialised logits are the references it is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from ..ops.compiled import compiled


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


def activation_terms(student: list[Tensor], teacher: list[Tensor], mask: Tensor, compile: bool = False) -> Tensor:
    """Per-layer mean squared distance between the student's mixer outputs and the teacher's [layers].
    ``compile``: through torch.compile (CUDA training: one fused pass per layer instead of a chain of kernels)."""
    return (_compiled_activation_terms if compile else _activation_terms)(student, teacher, mask)


def _activation_terms(student: list[Tensor], teacher: list[Tensor], mask: Tensor) -> Tensor:
    return torch.stack(
        [_masked_mean((a.float() - b.float()).pow(2).mean(-1), mask) for a, b in zip(student, teacher, strict=True)]
    )


def cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return _masked_mean(per_token.view(targets.shape), mask)


def agreement(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """Fraction of masked positions where the student's top token equals the teacher's."""
    return _masked_mean((student.argmax(-1) == teacher.argmax(-1)).float(), mask)


# ------------------------------------------------------------------------------ losses fused with the output head
# Tokens per chunk of the fused losses: each chunk holds a few fp32 [tokens, vocab] temporaries, ~512 MiB each at
# this size (2,730 tokens of a 49k vocabulary), where whole logits of a 16 x 2k batch would take 6.4 GB apiece.
CHUNK_ELEMENTS = 1 << 27


def linear_losses(
    hidden: Tensor,
    weight: Tensor,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    targets: Tensor | None,
    mask: Tensor,
    *,
    forward_kl: float = 0.0,
    reverse_kl: float = 0.0,
    cross_entropy: float = 0.0,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    compile: bool = False,
) -> tuple[Tensor, Tensor]:
    """The distillation and SFT losses of a student whose logits are ``hidden @ weight.T``, never materialising
    the [tokens, vocab] logits of student or teacher: they are formed ``chunk_tokens`` rows at a time, and each
    chunk's gradient with respect to its logits is computed analytically right there and multiplied back through
    the output projection, so nothing of the chunk is kept for the backward pass.

    Returns (loss, terms). loss = forward_kl * FKL + reverse_kl * RKL + cross_entropy * CE, with gradients for
    ``hidden`` and ``weight``; FKL = KL(teacher || student), RKL = KL(student || teacher) of the softmaxes at
    ``temperature`` (times T^2), CE of the student at temperature 1, each a mean over the tokens ``mask`` selects.
    terms: detached fp32 [FKL, RKL, CE, top-1 agreement with the teacher] (zeros for what is not given: the teacher
    terms without a teacher, CE without targets). The logits are computed in the autocast dtype where autocast is on
    (as ``F.linear`` would), all softmax arithmetic in fp32. ``compile``: each chunk's arithmetic runs through
    torch.compile (CUDA: a handful of fused passes over the chunk instead of ~20). Equal to ``kl_terms`` and
    ``cross_entropy`` on the materialised logits (tests).
    """
    v = weight.shape[0]
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_ELEMENTS // v)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    settings = (forward_kl, reverse_kl, cross_entropy, temperature, chunk_tokens, dtype, compile)
    args = (hidden, weight, teacher_hidden, teacher_weight, targets, mask)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearLosses.apply(*args, settings)
    with torch.no_grad():
        return _linear_losses(*args, settings, grads=False)[:2]


class _LinearLosses(torch.autograd.Function):
    """``linear_losses`` with gradients: they are computed in the forward pass, chunk by chunk, and scaled by the
    incoming gradient in the backward pass (the loss is a scalar)."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, targets, mask, settings):
        loss, terms, ctx.grad_hidden, ctx.grad_weight = _linear_losses(
            hidden, weight, teacher_hidden, teacher_weight, targets, mask, settings, grads=True,
            hidden_grad=ctx.needs_input_grad[0], weight_grad=ctx.needs_input_grad[1],
        )  # fmt: skip
        ctx.mark_non_differentiable(terms)
        return loss, terms

    @staticmethod
    def backward(ctx, grad_loss, _grad_terms):
        grad_hidden = None if ctx.grad_hidden is None else ctx.grad_hidden * grad_loss.to(ctx.grad_hidden.dtype)
        grad_weight = None if ctx.grad_weight is None else ctx.grad_weight * grad_loss
        return grad_hidden, grad_weight, None, None, None, None, None


def _linear_losses(
    hidden, weight, teacher_hidden, teacher_weight, targets, mask, settings, grads, hidden_grad=True, weight_grad=True
):
    forward_kl, reverse_kl, cross_entropy, temperature, chunk, dtype, compile = settings
    h = hidden.reshape(-1, hidden.shape[-1])
    ht = None if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    tg = None if targets is None else targets.reshape(-1)
    m = mask.reshape(-1).float()
    inv_n = 1.0 / m.sum().clamp(min=1)
    terms_fn = _compiled_chunk_terms if compile else _chunk_terms
    with torch.autocast(h.device.type, enabled=False):
        w, hc = weight.detach().to(dtype), h.detach().to(dtype)
        wt = None if teacher_weight is None else teacher_weight.detach().to(dtype)
        grad_h = torch.empty_like(h) if grads and hidden_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads and weight_grad else None
        sums = torch.zeros(4, dtype=torch.float32, device=h.device)
        for a in range(0, h.shape[0], chunk):
            rows = slice(a, a + chunk)
            z = hc[rows] @ w.T
            zt = None if ht is None else ht[rows].to(dtype) @ wt.T
            part, dz = terms_fn(
                z, zt, None if tg is None else tg[rows], m[rows], inv_n, temperature,
                forward_kl, reverse_kl, cross_entropy, grads,
            )  # fmt: skip
            sums = sums + part
            if dz is not None:
                dz = dz.to(dtype)
                if grad_h is not None:
                    grad_h[rows] = (dz @ w).to(h.dtype)
                if grad_w is not None:
                    grad_w += (dz.T @ hc[rows]).float()
    terms = sums * inv_n
    loss = forward_kl * terms[0] + reverse_kl * terms[1] + cross_entropy * terms[2]
    if grad_h is not None:
        grad_h = grad_h.view_as(hidden)
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    return loss, terms.detach(), grad_h, grad_w


def _chunk_terms(
    z: Tensor,
    zt: Tensor | None,
    targets: Tensor | None,
    m: Tensor,
    inv_n: Tensor,
    temperature: float,
    forward_kl: float,
    reverse_kl: float,
    cross_entropy: float,
    grads: bool,
) -> tuple[Tensor, Tensor | None]:
    """One chunk of logits z [n, V] (teacher's zt): the masked sums of FKL, RKL (times T^2), CE and agreement, and
    d(loss)/dz (the loss being ``linear_losses``'s, whose means divide by the whole batch's count: ``inv_n``).

    With s, t the log-softmaxes at temperature T: d FKL/dz = T (p_s - p_t), d RKL/dz = T p_s (s - t - RKL) (both
    after the T^2 scaling), d CE/dz = softmax(z) - onehot(target)."""
    zs = z.float()
    zero = zs.new_zeros(zs.shape[0])
    fkl = rkl = ce = agree = zero
    dz = None
    if zt is not None:
        s = torch.log_softmax(zs / temperature, -1)
        t = torch.log_softmax(zt.float() / temperature, -1)
        ps = s.exp()
        diff = s - t
        fkl = (t.exp() * -diff).sum(-1)
        rkl = (ps * diff).sum(-1)
        agree = (zs.argmax(-1) == zt.argmax(-1)).float()
        if grads and (forward_kl or reverse_kl):
            dz = temperature * (forward_kl * (ps - t.exp()) + reverse_kl * ps * (diff - rkl[:, None]))
    if targets is not None:
        lse = torch.logsumexp(zs, -1)
        ce = lse - zs.gather(-1, targets[:, None]).squeeze(-1)
        if grads and cross_entropy:
            p = (zs - lse[:, None]).exp().scatter_add(-1, targets[:, None], -zs.new_ones(zs.shape[0], 1))
            dz = cross_entropy * p if dz is None else dz + cross_entropy * p
    t2 = temperature**2
    sums = torch.stack([(fkl * m).sum() * t2, (rkl * m).sum() * t2, (ce * m).sum(), (agree * m).sum()])
    if dz is not None:
        dz = dz * (m * inv_n)[:, None]
    return sums, dz


_compiled_chunk_terms = compiled(_chunk_terms, name="fused loss chunk")
_compiled_activation_terms = compiled(_activation_terms, name="activation loss")
