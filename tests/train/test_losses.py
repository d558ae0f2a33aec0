"""Distillation losses against literal per-token formulas, and the training device resolution."""

import pytest
import torch

from gearshift.train.losses import kl_terms
from gearshift.train.trainer import resolve_device


def literal_kl(student, teacher, mask, temperature):
    """sum_v p log(p/q) per token, written out with softmax probabilities (no log_softmax)."""
    p_s = torch.softmax(student.double() / temperature, -1)
    p_t = torch.softmax(teacher.double() / temperature, -1)
    fwd = (p_t * (p_t.log() - p_s.log())).sum(-1)
    rev = (p_s * (p_s.log() - p_t.log())).sum(-1)
    m = mask.double()
    return (fwd * m).sum() / m.sum() * temperature**2, (rev * m).sum() / m.sum() * temperature**2


@pytest.mark.parametrize("chunk", [1, 5, 4096])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_kl_matches_the_literal_formula_in_value_and_gradient(chunk, temperature):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 7, 11, generator=g, requires_grad=True)
    teacher = torch.randn(3, 7, 11, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.3
    fkl, rkl = kl_terms(student, teacher, mask, temperature, chunk_tokens=chunk)
    ref_f, ref_r = literal_kl(student, teacher, mask, temperature)
    torch.testing.assert_close(fkl.double(), ref_f, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rkl.double(), ref_r, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(fkl + 0.5 * rkl, student)
    (ref_grad,) = torch.autograd.grad(ref_f + 0.5 * ref_r, student)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert grad[~mask].abs().max() == 0  # masked positions get no gradient


def test_kl_without_grad_and_with_an_empty_mask():
    x = torch.randn(2, 3, 5)
    f, r = kl_terms(x, x.clone(), torch.ones(2, 3, dtype=torch.bool), chunk_tokens=2)
    assert abs(float(f)) < 1e-6 and abs(float(r)) < 1e-6
    f, r = kl_terms(x, torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.bool))
    assert float(f) == 0 and float(r) == 0


def test_training_device_always_has_an_index():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda", 0)  # torch.cuda.set_device refuses bare 'cuda'
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 3)
    assert resolve_device("cuda:1", local_rank=3) == torch.device("cuda", 1)
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("chunk", [1, 5, None])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_linear_losses_equal_the_plain_ones(chunk, temperature):
    """The chunked losses fused with the output projection equal KL and cross-entropy on materialised logits, in
    value and in the gradients of the hidden states and of the projection, whatever the chunking."""
    from gearshift.train.losses import agreement, cross_entropy, linear_losses

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 6, generator=g, requires_grad=True)
    weight = torch.randn(11, 6, generator=g, requires_grad=True)
    t_hidden, t_weight = torch.randn(3, 7, 6, generator=g), torch.randn(11, 6, generator=g)
    targets = torch.randint(0, 11, (3, 7), generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.3
    weights = dict(forward_kl=0.5, reverse_kl=1.0, cross_entropy=0.3, temperature=temperature)
    loss, terms = linear_losses(hidden, weight, t_hidden, t_weight, targets, mask, **weights, chunk_tokens=chunk)
    logits, t_logits = hidden @ weight.T, t_hidden @ t_weight.T
    fkl, rkl = literal_kl(logits, t_logits, mask, temperature)
    ce = cross_entropy(logits, targets, mask)
    ref = 0.5 * fkl + rkl + 0.3 * ce
    torch.testing.assert_close(loss.double(), ref.double(), rtol=1e-5, atol=1e-6)
    want = torch.stack([fkl.float(), rkl.float(), ce, agreement(logits, t_logits, mask)])
    torch.testing.assert_close(terms, want.detach(), rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # evaluation: the same terms, no gradients kept
        _, again = linear_losses(hidden, weight, t_hidden, t_weight, targets, mask, **weights, chunk_tokens=chunk)
    torch.testing.assert_close(again, terms)


def test_fused_linear_losses_without_a_teacher_and_under_autocast():
    from gearshift.train.losses import cross_entropy, linear_losses

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(13, 8, generator=g)  # a frozen head: no gradient asked for it
    targets, mask = torch.randint(0, 13, (2, 5), generator=g), torch.ones(2, 5, dtype=torch.bool)
    loss, terms = linear_losses(hidden, weight, None, None, targets, mask, cross_entropy=1.0, chunk_tokens=3)
    ref = cross_entropy(hidden @ weight.T, targets, mask)
    torch.testing.assert_close(loss, ref)
    assert terms[0] == terms[1] == terms[3] == 0  # no teacher terms
    (grad,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(grad, torch.autograd.grad(ref, hidden)[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # logits in bf16 as F.linear would make them
        loss, _ = linear_losses(hidden, weight, None, None, targets, mask, cross_entropy=1.0, chunk_tokens=3)
        ref = cross_entropy(torch.nn.functional.linear(hidden, weight), targets, mask)
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
