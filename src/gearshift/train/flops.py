"""Model FLOPs of a training step: the arithmetic the step needs, counted from the model (not 6N of everything).

A pass of a batch of documents (lengths l_1 .. l_n, T = sum l tokens) through a student placement P costs

    forward              2 W(P) T + A(P)
    input gradients      2 W_up(P) T + 2 A_up(P)       through every layer from the lowest trained one up
    weight gradients     2 W_train(P) T                only for the weights that train
    teacher forward      2 W(teacher) T + A(teacher)   (distillation; alignment runs it too)

W counts multiply-adds per token of the matrices a token passes through: every linear weight, the short convs
(K per channel) and the output head (vocab x hidden). Embedding lookups, norms, gates and activations are
element-wise and do not count. A is the sequence mixing, per layer:

    attention (FA; SWA with window w)   4 H d pairs,  pairs = sum over documents of sum_i min(i + 1, w)
                                        (QK^T and PV; causal: l(l+1)/2 per document -- the real document lengths)
    GDN (HV heads, dk x dv state)       6 HV dk dv T   (read the state k^T S, write k u^T, output S^T q)
    KDA (H heads, d x d state)          6 H d^2 T

A recurrent mixer counts the recurrence's own work, not the extra intra-chunk products of the chunked form a kernel
may spend. The backward of a matmul is two matmuls of its size: the input gradient, needed wherever a trained
weight lies below (W_up, A_up: the lowest trained layer's mixer input projections are counted though their input
needs no gradient, an excess under 1/L of that term), and the weight gradient, only for trained weights.
Alignment (layer-local): each trained mixer m runs on the teacher's inputs, 2 W_m T + A_m forward,
2 W_m T + 2 A_m + 2 W_m,train T backward, plus the teacher's forward. MFU = FLOPs / (seconds x peak).
A plain LM step with every weight training (the Hugging Face anchor) is 6 W T + 3 A: the familiar 6N + attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..config import AttentionConfig, GDNConfig, KDAConfig, MixerConfig
from ..model import Supernet

BF16_PEAK_FLOPS = 790e12  # measured dense bf16 matmul peak of the H200 (shared/reference/h200.md)


@dataclass
class StepFlops:
    forward: float = 0.0  # student forward
    backward: float = 0.0  # input and weight gradients
    teacher: float = 0.0  # teacher forward

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.teacher

    def __add__(self, other: StepFlops) -> StepFlops:
        return StepFlops(self.forward + other.forward, self.backward + other.backward, self.teacher + other.teacher)


def attention_pairs(lengths: Sequence[int], window: int | None = None) -> int:
    """(query, key) pairs causal attention computes over documents of these lengths (within a window)."""
    total = 0
    for n in lengths:
        if window is None or n <= window:
            total += n * (n + 1) // 2
        else:
            total += window * (window + 1) // 2 + (n - window) * window
    return total


def mixing_flops(cfg: MixerConfig, lengths: Sequence[int]) -> float:
    """A: the sequence-mixing FLOPs of one layer's mixer over these documents (module docstring)."""
    tokens = sum(lengths)
    if isinstance(cfg, AttentionConfig):
        return 4.0 * cfg.heads * cfg.head_size * attention_pairs(lengths, cfg.window_size)
    if isinstance(cfg, GDNConfig):
        return 6.0 * cfg.value_heads * cfg.key_head_dim * cfg.value_head_dim * tokens
    if isinstance(cfg, KDAConfig):
        return 6.0 * cfg.heads * cfg.head_dim**2 * tokens
    raise TypeError(f"unknown mixer config {cfg!r}")


def matmul_weights(module: nn.Module, trained_only: bool = False) -> int:
    """W: multiply-adds per token of ``module``'s matrices (linear weights, conv kernels), or of those that train."""
    return sum(p.numel() for p in module.parameters() if p.dim() >= 2 and (p.requires_grad or not trained_only))


def pass_flops(model: Supernet, placement, lengths: Sequence[int], backward: bool = True) -> StepFlops:
    """One forward (and, with ``backward``, backward) pass of ``model`` under ``placement`` over documents of these
    lengths. What trains is read from ``requires_grad``."""
    placement = model.resolve(placement)
    tokens = sum(lengths)
    head = model.output_weight
    head_w = head.numel()
    forward = 2.0 * head_w * tokens
    up_w, up_a, trained_w = 0.0, 0.0, 0.0
    below = model.model.embed_tokens.weight.requires_grad  # something trained lies below the current layer
    for i, (block, name) in enumerate(zip(model.blocks, placement, strict=True)):
        mixer = block.mixer.mixers[name]
        layer_w = matmul_weights(mixer) + matmul_weights(block.mlp)
        a = mixing_flops(model.config.layers[i].mixers[name], lengths)
        forward += 2.0 * layer_w * tokens + a
        shared = (p for n, p in block.named_parameters() if not n.startswith("mixer."))  # norms, MLP
        below = below or any(p.requires_grad for p in mixer.parameters()) or any(p.requires_grad for p in shared)
        if below:
            up_w += layer_w
            up_a += a
        trained_w += matmul_weights(mixer, True) + matmul_weights(block.mlp, True)
    result = StepFlops(forward=forward)
    if backward and (below or head.requires_grad):
        trained_w += head_w if head.requires_grad else 0
        result.backward = 2.0 * (up_w + head_w) * tokens + 2.0 * up_a + 2.0 * trained_w * tokens
    return result


def distill_flops(student: Supernet, placement, teacher: Supernet | None, lengths: Sequence[int]) -> StepFlops:
    """A distillation (or SFT) pass: the student forward and backward, and the teacher's forward if it runs."""
    result = pass_flops(student, placement, lengths)
    if teacher is not None:
        result.teacher = pass_flops(teacher, "all-attention", lengths, backward=False).forward
    return result


def align_flops(
    student: Supernet, mixers: Sequence[Sequence[str]], teacher: Supernet, lengths: Sequence[int]
) -> StepFlops:
    """A layer-local alignment pass: the teacher's forward, and every aligned mixer's forward and backward on the
    teacher's layer inputs (``mixers``: per layer, the mixer names that align)."""
    tokens = sum(lengths)
    result = StepFlops(teacher=pass_flops(teacher, "all-attention", lengths, backward=False).forward)
    for i, names in enumerate(mixers):
        for name in names:
            mixer = student.blocks[i].mixer.mixers[name]
            w, a = matmul_weights(mixer), mixing_flops(student.config.layers[i].mixers[name], lengths)
            result.forward += 2.0 * w * tokens + a
            result.backward += 2.0 * w * tokens + 2.0 * a + 2.0 * matmul_weights(mixer, True) * tokens
    return result
