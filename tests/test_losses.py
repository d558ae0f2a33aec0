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
