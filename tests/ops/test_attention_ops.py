"""Split-KV decode attention against the masked SDPA path it replaces (GQA, windows, empty slots, padding)."""

import pytest
import torch

from gearshift import envs
from gearshift.ops import attention as ops


@pytest.mark.parametrize(
    "tq,window,chunk,tk", [(1, None, 16, 100), (3, None, 7, 100), (1, 20, 16, 100), (4, 9, 32, 100), (1, None, 16, 97)]
)
def test_split_kv_attention_equals_masked_sdpa(tq, window, chunk, tk):
    """100 keys are split by a view into chunks that divide them; 97 (prime) needs the padded copy."""
    gen = torch.Generator().manual_seed(tq + chunk)
    b, h, hkv, d = 3, 6, 2, 8
    q, k, v = (torch.randn(*shape, generator=gen) for shape in ((b, h, tq, d), (b, hkv, tk, d), (b, hkv, tk, d)))
    # rows at different positions; empty slots (-1) and a row whose keys are mostly empty
    q_index = torch.tensor([[start + i for i in range(tq)] for start in (60, 100 - tq, 5)])
    k_index = torch.arange(tk).repeat(b, 1)
    k_index[0, 70:] = -1
    k_index[1, 95:] = torch.arange(95, tk)
    k_index[2, 5 + tq :] = -1
    valid = torch.ones(b, tk, dtype=torch.bool)
    valid[1, :30] = False  # left padding of row 1
    mask = ops.attention_mask(q_index, k_index, valid, window)
    ref = ops._masked_sdpa(q, k, v, mask, 0.3)
    out = ops.split_kv_attention(q, k, v, mask, 0.3, chunk)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_every_decode_takes_the_split_path(monkeypatch):
    """The engine's rows (per-row positions) and generate's caches (shared positions, exact or masked keys) take
    the same split-KV kernel for a few queries over many keys; a prefill and a short context do not."""
    calls = []
    real = ops.split_kv_attention
    monkeypatch.setattr(ops, "split_kv_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setenv("GEARSHIFT_SPLIT_KV", "8")
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 32, 8), torch.randn(2, 2, 32, 8)
    idx = torch.arange(32).repeat(2, 1)
    out = ops.attend(q, k, v, torch.tensor([[31], [20]]), idx, None, None, 0.5)  # per-row positions
    ref = ops._masked_sdpa(q, k, v, ops.attention_mask(torch.tensor([[31], [20]]), idx, None, None), 0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # shared positions over a static cache longer than what is held (generate's CUDA-graph cache): masked
    out = ops.attend(q, k, v, torch.tensor([20]), torch.arange(32), None, None, 0.5)
    ref = ops._masked_sdpa(q, k, v, ops.attention_mask(torch.tensor([20]), torch.arange(32), None, None), 0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # shared positions over an exact cache (every key a past token), with padding rows (k_valid)
    out = ops.attend(q, k, v, torch.tensor([31]), torch.arange(32), None, None, 0.5, keys_exact=True)
    torch.testing.assert_close(out, ops._masked_sdpa(q, k, v, None, 0.5), atol=1e-5, rtol=1e-5)
    valid = torch.ones(2, 32, dtype=torch.bool)
    valid[1, :5] = False
    out = ops.attend(q, k, v, torch.tensor([31]), torch.arange(32), valid, None, 0.5)
    ref = ops._masked_sdpa(q, k, v, ops.attention_mask(torch.tensor([31]), torch.arange(32), valid, None), 0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert calls == [q.shape] * 4
    ops.attend(q, k[:, :, :12], v[:, :, :12], torch.tensor([[11], [5]]), idx[:, :12], None, None, 0.5)  # < 2 chunks
    qp = torch.randn(2, 4, 32, 8)
    ops.attend(qp, k, v, torch.arange(32), torch.arange(32), None, None, 0.5)  # a prefill: causal SDPA
    assert len(calls) == 4


def test_chunks_divide_the_keys_when_they_can():
    assert ops._dividing_chunk(16640, 1024) == 832  # 20 chunks of a 16k pool (a multiple of 256 long)
    assert ops._dividing_chunk(100, 16) == 10
    assert ops._dividing_chunk(97, 16) == 16  # prime: padded


def test_auto_split_only_where_the_fused_kernel_leaves_the_gpu_idle(monkeypatch):
    assert ops.auto_split_chunk(4 * 8, 16384, 132) == ops.SPLIT_KV_AUTO_CHUNK  # 4 rows x 8 KV heads
    assert ops.auto_split_chunk(8 * 8, 16384, 132) == ops.SPLIT_KV_AUTO_CHUNK
    assert ops.auto_split_chunk(16 * 8, 16384, 132) == 0  # fills the GPU: the fused kernel
    assert ops.auto_split_chunk(8, 1024, 132) == 0  # short context
    monkeypatch.setenv("GEARSHIFT_SPLIT_KV", "auto")
    assert ops._split_kv_chunk(torch.zeros(1, 8, 8192, 4)) == 0  # auto: never on CPU


def test_cudnn_rule():
    """cuDNN's kernels from CUDNN_MIN_KEYS keys (the 15B shape's 4,352-key sliding-window rings take them, short
    trace calls do not); cudnn_sdpa(True / False) forces either way."""
    from gearshift.ops import attention as ops

    assert ops.cudnn_allowed(4352) and ops.cudnn_allowed(16640) and not ops.cudnn_allowed(256)
    with ops.cudnn_sdpa(False):
        assert not ops.cudnn_allowed(16640)
    with ops.cudnn_sdpa(True):
        assert ops.cudnn_allowed(256)
    assert envs.CUDNN_SDPA is None  # restored: auto
