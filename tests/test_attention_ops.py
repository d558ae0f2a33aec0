"""Split-KV decode attention against the masked SDPA path it replaces (GQA, windows, empty slots, padding)."""

import pytest
import torch

from gearshift.ops import attention as ops


@pytest.mark.parametrize("tq,window,chunk", [(1, None, 16), (3, None, 7), (1, 20, 16), (4, 9, 32)])
def test_split_kv_attention_equals_masked_sdpa(tq, window, chunk):
    gen = torch.Generator().manual_seed(tq + chunk)
    b, h, hkv, d, tk = 3, 6, 2, 8, 100
    q, k, v = (torch.randn(*shape, generator=gen) for shape in ((b, h, tq, d), (b, hkv, tk, d), (b, hkv, tk, d)))
    # rows at different positions; empty slots (-1) and a row whose keys are mostly empty
    q_index = torch.tensor([[start + i for i in range(tq)] for start in (60, 100 - tq, 5)])
    k_index = torch.arange(tk).repeat(b, 1)
    k_index[0, 70:] = -1
    k_index[2, 5 + tq :] = -1
    valid = torch.ones(b, tk, dtype=torch.bool)
    valid[1, :30] = False  # left padding of row 1
    mask = ops.attention_mask(q_index, k_index, valid, window)
    ref = ops._masked_sdpa(q, k, v, mask, 0.3)
    out = ops.split_kv_attention(q, k, v, mask, 0.3, chunk)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_attend_takes_the_split_path_only_for_engine_decode(monkeypatch):
    calls = []
    real = ops.split_kv_attention
    monkeypatch.setattr(ops, "split_kv_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(ops, "SPLIT_KV_CHUNK", 8)
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 32, 8), torch.randn(2, 2, 32, 8)
    idx = torch.arange(32).repeat(2, 1)
    out = ops.attend(q, k, v, torch.tensor([[31], [20]]), idx, None, None, 0.5)  # per-row positions: split
    ref = ops._masked_sdpa(q, k, v, ops.attention_mask(torch.tensor([[31], [20]]), idx, None, None), 0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    ops.attend(q, k, v, torch.tensor([31]), torch.arange(32), None, None, 0.5)  # shared positions: not split
    ops.attend(q, k[:, :, :12], v[:, :, :12], torch.tensor([[11], [5]]), idx[:, :12], None, None, 0.5)  # < 2 chunks
    assert calls == [q.shape]
