"""Model FLOPs of a training step (train/flops.py) against hand counts on tiny models."""

import torch

from gearshift.config import SupernetConfig
from gearshift.model import Supernet
from gearshift.train.flops import align_flops, attention_pairs, distill_flops, matmul_weights, pass_flops


def test_attention_pairs_count_what_a_causal_window_sees():
    for lengths, window in (([5, 1, 9], None), ([5, 1, 9], 3), ([40], 7), ([7], 7)):
        brute = sum(1 for n in lengths for i in range(n) for j in range(i + 1) if window is None or i - j < window)
        assert attention_pairs(lengths, window) == brute


def model(mixers=("attention",)):
    cfg = SupernetConfig.uniform(
        num_layers=3, hidden_size=16, vocab_size=50, heads=4, kv_heads=2, head_dim=4, intermediate_size=24,
        window=4, mixers=mixers, max_position_embeddings=64,
    )  # fmt: skip
    with torch.device("meta"):
        return Supernet(cfg), cfg


def test_a_plain_step_with_everything_training_is_6_w_t_plus_3_a():
    """The Hugging Face anchor's count: forward 2WT + A, backward 4WT + 2A, W the linear weights and the head."""
    m, cfg = model()
    lengths = [6, 10]
    t = sum(lengths)
    w = 3 * (16 * 16 + 2 * 16 * 8 + 16 * 16 + 3 * 16 * 24) + 50 * 16  # q, k, v, o, gate/up/down; head
    a = 3 * 4 * 4 * 4 * attention_pairs(lengths)  # layers x 4 x heads x head dim x pairs
    f = pass_flops(m, "all-attention", lengths)
    assert f.forward == 2 * w * t + a
    assert f.backward == 4 * w * t + 2 * a


def test_only_trained_weights_get_weight_gradients_and_input_gradients_stop_below_them():
    m, cfg = model(("attention", "gdn"))
    m.requires_grad_(False)
    m.blocks[1].mixer.mixers["gdn"].requires_grad_(True)  # only layer 1's GDN trains
    lengths = [12, 4]
    t = sum(lengths)
    layer = [matmul_weights(m.blocks[i].mixer.mixers[n]) + matmul_weights(m.blocks[i].mlp)
             for i, n in enumerate(["attention", "gdn", "attention"])]  # fmt: skip
    head = 50 * 16
    a_attn = 4 * 4 * 4 * attention_pairs(lengths)
    a_gdn = 6 * 4 * 4 * 4 * t  # value heads x dk x dv
    f = pass_flops(m, ["attention", "gdn", "attention"], lengths)
    assert f.forward == 2 * (sum(layer) + head) * t + 2 * a_attn + a_gdn
    gdn_w = matmul_weights(m.blocks[1].mixer.mixers["gdn"])
    # input gradients through layers 1 and 2 and the head; weight gradients for the GDN only
    assert f.backward == 2 * (layer[1] + layer[2] + head) * t + 2 * (a_gdn + a_attn) + 2 * gdn_w * t
    teacher, _ = model()
    teacher.requires_grad_(False)
    d = distill_flops(m, ["attention", "gdn", "attention"], teacher, lengths)
    assert d.teacher == pass_flops(teacher, "all-attention", lengths, backward=False).forward
    assert d.total == f.forward + f.backward + d.teacher
    frozen = pass_flops(teacher, "all-attention", lengths)
    assert frozen.backward == 0  # nothing trains: no backward pass at all
    al = align_flops(m, [[], ["gdn"], []], teacher, lengths)
    assert al.forward == 2 * gdn_w * t + a_gdn and al.backward == 4 * gdn_w * t + 2 * a_gdn
