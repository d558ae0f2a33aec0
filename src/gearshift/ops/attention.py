"""Rotary embeddings and masked causal (optionally windowed) GQA attention through torch SDPA.

Positions live in two spaces: the *index* of a token in the batch timeline (shared by all rows, since batches
are left-padded) and its RoPE *position* (index minus the row's padding). Masks are built from indices:
a query at index i sees a key at index j when j <= i, i - j < window, and j is a real (non-padding) token.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import envs
from ..config import RopeConfig
from .compiled import compiled
from .documents import Documents
from .fused import fusible

# Above this many mask elements per attention call, queries are processed in tiles (bounded memory).
MAX_MASK_ELEMENTS = 1 << 24
# Decode (a few queries over many keys: the engine's rows and generate's caches alike) can use split-KV attention
# (split_kv_attention) over chunks of GEARSHIFT_SPLIT_KV keys (envs.SPLIT_KV: "auto", "0", "512", ...). auto
# (-1, the default): on CUDA, when the fused kernel's work items (rows x KV heads) are at most half the GPU's
# multiprocessors and there are at least SPLIT_KV_AUTO_KEYS keys. On the H200 (15B shape,
# benchmarks/decode_attention.py) the fused kernel takes the same ~365 us at 16k keys for 1 to 16 rows, split-KV
# 110 us for 1 row and 290 us for 8, 480 us for 16. 0 = never, N > 0 = always where it applies (chunks of N).
SPLIT_KV_AUTO_CHUNK = 1024
SPLIT_KV_AUTO_KEYS = 8192
SPLIT_KV_MAX_QUERIES = 16
# Whether SDPA may pick cuDNN's kernels on CUDA (GEARSHIFT_CUDNN_SDPA, envs.CUDNN_SDPA). Measured on the H200 by
# benchmarks/decode_attention.py and benchmarks/engine_mixed.py (BENCHMARKS.md, "Decode attention"): they are the
# fastest decode kernels (about 2x the ones SDPA picks without them at 32k-64k keys), which pays at long context
# (the 15B engine at 16k: 1370 tokens/s with them, 1025 without), but cuDNN builds an execution plan for each new
# shape, paid on the host, and short calls do not earn it back (SmolLM2 traces at batch 512, keys ~200: 45.2k
# tokens/s with cuDNN everywhere, 43.0k with cuDNN only in graph captures, 53.5k without). auto (the default):
# cuDNN for calls over at least CUDNN_MIN_KEYS keys. 4096 takes in the 15B shape's sliding-window rings (4,352
# keys): with cuDNN, a step's attention kernels took 1.3-1.4x less time and three-preset batches at 2k-16k context
# made 8-19% more tokens/s; the traces' calls stay far below it. 1 / 0: always / never.
CUDNN_MIN_KEYS = 4096


def rope_inv_freq(head_size: int, rope: RopeConfig, device: torch.device | None = None) -> Tensor:
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_size, 2, dtype=torch.float64, device=device) / head_size))
    if rope.type == "llama3":
        # Llama 3 frequency scaling: long wavelengths slowed by `factor`, short kept, a smooth ramp between.
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        ramp = (1 - smooth) * inv / rope.factor + smooth * inv
        inv = torch.where(wavelen > low_wavelen, inv / rope.factor, torch.where(wavelen < high_wavelen, inv, ramp))
    return inv.float()


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions [B, T] -> cos, sin [B, 1, T, D] (rotate-half layout: the two halves share frequencies)."""
    angles = positions.float()[..., None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


@fusible
def attention_mask(q_index: Tensor, k_index: Tensor, k_valid: Tensor | None, window: int | None) -> Tensor:
    """Boolean mask [B or 1, 1, Tq, Tk]: key j visible from query i.

    q_index [Tq] or [B, Tq] and k_index [Tk] or [B, Tk] are token indices (-1 marks an empty cache slot); per-row
    indices serve engines whose requests sit at different positions. k_valid [B, Tk] marks real (non-padding)
    keys. Every query also sees itself, so a padding query never has an empty row (SDPA would return NaN there
    and poison later layers). One fused kernel where fusion is active (an engine's decode step builds one mask
    per attention group and layer).
    """
    qi, kj = q_index[..., :, None], k_index[..., None, :]
    visible = (kj <= qi) & (kj >= 0)
    if window is not None:
        visible = visible & (qi - kj < window)
    if k_valid is not None:
        visible = (visible & k_valid[..., None, :]) | (kj == qi)
    return visible[None, None] if visible.dim() == 2 else visible[:, None]


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_index: Tensor,
    k_index: Tensor,
    k_valid: Tensor | None,
    window: int | None,
    scale: float,
    keys_exact: bool = False,
) -> Tensor:
    """Attention of q [B, H, Tq, D] over k, v [B, Hkv, Tk, D]; returns [B, H, Tq, D].

    Uses SDPA's causal kernel when the keys are exactly the queries with no padding and no window shorter than
    them (the common prefill case, and an engine's first prompt chunk), no mask for an unpadded single-token decode
    over an exact cache (``keys_exact``: every key is a real past token), and an explicit mask otherwise, tiled
    over queries so it stays small at long context.
    """
    b, h, tq, _ = q.shape
    # a decode (a few queries over many keys): split-KV where the fused kernel would leave the GPU idle, whoever
    # calls -- the engine (per-row positions) and generate's caches (shared positions) take the same kernel
    chunk = _split_kv_chunk(k) if tq <= SPLIT_KV_MAX_QUERIES else 0
    if k_valid is None:
        # keys exactly the queries, and a window (if any) that covers them all: plain causal attention
        if k.shape[2] == tq and tq > 1 and (window is None or tq <= window) and _same(q_index, k_index):
            if h != k.shape[1]:  # repeat K/V so every backend, flash included, takes the causal fast path
                k, v = k.repeat_interleave(h // k.shape[1], 1), v.repeat_interleave(h // k.shape[1], 1)
            return _sdpa(q, k, v, is_causal=True, scale=scale)
        if tq == 1 and keys_exact and window is None and not chunk:
            return _masked_sdpa(q, k, v, None, scale)
    if chunk:
        mask = attention_mask(q_index, k_index, k_valid, window)
        return split_kv_attention(q, k, v, mask.expand(b, -1, -1, -1), scale, chunk)
    tile = max(1, MAX_MASK_ELEMENTS // max(1, b * k.shape[2]))
    if tq <= tile or q_index.dim() == 2:  # per-row indices come from engines, with short query chunks
        return _masked_sdpa(q, k, v, attention_mask(q_index, k_index, k_valid, window), scale)
    outs = []
    for s in range(0, tq, tile):
        qi = q_index[s : s + tile]
        # only keys that some query of this tile can see: index in [first - window + 1, last]
        lo = 0 if window is None else int(qi[0]) - window + 1
        sel = ((k_index <= qi[-1]) & (k_index >= lo)).nonzero().squeeze(1)
        valid = None if k_valid is None else k_valid[:, sel]
        mask = attention_mask(qi, k_index[sel], valid, window)
        outs.append(_masked_sdpa(q[:, :, s : s + tile], k[:, :, sel], v[:, :, sel], mask, scale))
    return torch.cat(outs, dim=2)


def _split_kv_chunk(k: Tensor) -> int:
    """The split-KV chunk for a decode over keys k [B, Hkv, Tk, D], or 0 for the fused kernel (envs.SPLIT_KV)."""
    chunk, tk = envs.SPLIT_KV, k.shape[2]
    if chunk < 0:
        if not k.is_cuda:
            return 0
        chunk = auto_split_chunk(k.shape[0] * k.shape[1], tk, _multiprocessors(k.device))
    return chunk if chunk and tk >= 2 * chunk else 0


def auto_split_chunk(work_items: int, keys: int, multiprocessors: int) -> int:
    """Split when the fused kernel's (row, KV head) work items fill at most half the GPU's multiprocessors and
    the keys are many (measured crossover on the H200: 8 rows x 8 KV heads split faster, 16 x 8 fused)."""
    return SPLIT_KV_AUTO_CHUNK if 2 * work_items <= multiprocessors and keys >= SPLIT_KV_AUTO_KEYS else 0


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _masked_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """SDPA with grouped KV heads folded into the query axis: query heads that share a KV head become extra
    query rows of that head, so no backend has to repeat K/V in memory (decode is bandwidth-bound)."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    if h == hkv:
        return _sdpa(q, k, v, attn_mask=mask, scale=scale)
    g = h // hkv
    qf = q.reshape(b, hkv, g * t, d)  # head h = kv * g + j (the repeat_interleave convention)
    if mask is not None and t > 1:  # one query per head: its mask row broadcasts over the g folded rows
        mask = _fold_groups(mask, g)
    out = _sdpa(qf, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, h, t, d)


@contextlib.contextmanager
def cudnn_sdpa(allow: bool | None) -> Iterator[None]:
    """Set GEARSHIFT_CUDNN_SDPA (True / False / None = auto) inside a block, e.g. to time both kernel families."""
    with envs.override(CUDNN_SDPA=allow):
        yield


def cudnn_allowed(keys: int) -> bool:
    """Whether a CUDA SDPA call over ``keys`` keys may use cuDNN's kernels (envs.CUDNN_SDPA, else
    CUDNN_MIN_KEYS)."""
    allow = envs.CUDNN_SDPA
    return allow if allow is not None else keys >= CUDNN_MIN_KEYS


def _sdpa(q: Tensor, k: Tensor, v: Tensor, **kw) -> Tensor:
    """torch SDPA, kept off cuDNN's kernels on CUDA where ``cudnn_allowed`` says so."""
    if not q.is_cuda or cudnn_allowed(k.shape[-2]):
        return F.scaled_dot_product_attention(q, k, v, **kw)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def _fold_groups(mask: Tensor, g: int) -> Tensor:
    """mask [B, 1, T, Tk] -> [B, 1, g*T, Tk], the rows of query heads folded onto their shared KV head."""
    n, _, t, tk = mask.shape
    return mask[:, :, None].expand(n, 1, g, t, tk).reshape(n, 1, g * t, tk)


def split_kv_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, chunk: int) -> Tensor:
    """Masked GQA attention of a few queries over many keys, split along the keys ("flash decoding").

    q [B, H, Tq, D], k/v [B, Hkv, Tk, D], mask [B, 1, Tq, Tk] -> [B, H, Tq, D]. A fused attention kernel gives
    each (row, KV head) one work item that scans every key, so a decode step over few rows leaves most of the GPU
    idle and takes as long as one over many rows. Here every chunk of keys is its own small matmul: the work
    spreads over rows x heads x chunks, and each chunk's partial softmax (its max and sum) is merged exactly.
    Scores are accumulated and kept in fp32. The chunk is adjusted to divide Tk when it can (the engine's pools
    have lengths in multiples of 256), so the keys are split by a view; otherwise they are padded (a copy).
    """
    b, h, t, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    r = (h // hkv) * t  # the query heads sharing a KV head become rows of that head (as in _masked_sdpa)
    chunk = _dividing_chunk(tk, chunk)
    n = -(-tk // chunk)
    pad = n * chunk - tk
    m = _fold_groups(mask, h // hkv)
    if pad:
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
        m = F.pad(m, (0, pad), value=False)
    ks = k.reshape(b * hkv * n, chunk, d)
    vs = v.reshape(b * hkv * n, chunk, d)
    qs = q.reshape(b, hkv, 1, r, d).expand(b, hkv, n, r, d).reshape(b * hkv * n, r, d)
    scores = _bmm_fp32(qs, ks.transpose(1, 2)).view(b, hkv, n, r, chunk)  # fp32
    visible = m.reshape(b, 1, r, n, chunk).transpose(2, 3)  # [B, 1, N, R, C], broadcast over KV heads
    p, peak, total = chunk_softmax(scores, visible, scale, v.dtype)
    part = _bmm_fp32(p.view(-1, r, chunk), vs).view(b, hkv, n, r, d)  # unnormalised
    return merge_chunks(part, peak, total).reshape(b, h, t, d).to(q.dtype)


@fusible
def chunk_softmax(scores: Tensor, visible: Tensor, scale: float, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Per chunk of keys: exp(scale * scores - peak) over the visible keys (in ``dtype``, for the value matmul),
    with the chunk's peak and the sum of its weights (fp32). One fused kernel where fusion is active: the fp32
    scores are the largest tensor of a split-KV call, read once instead of by a chain of six passes."""
    s = (scores * scale).masked_fill(~visible, float("-inf"))
    peak = s.amax(-1, keepdim=True)  # -inf where a chunk has no visible key
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    p = (s - peak).exp()
    return p.to(dtype), peak, p.sum(-1, keepdim=True)


@fusible
def merge_chunks(part: Tensor, peak: Tensor, total: Tensor) -> Tensor:
    """Merge the chunks' unnormalised outputs [B, Hkv, N, R, D] exactly: weights exp(peak_n - max_n peak_n), zero
    for chunks with nothing visible. Returns fp32 [B, Hkv, R, D]."""
    peak = peak.masked_fill(total == 0, float("-inf"))
    top = peak.amax(2, keepdim=True)
    w = torch.exp(peak - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
    return (w * part).sum(2) / (w * total).sum(2)


def _dividing_chunk(tk: int, chunk: int) -> int:
    """A chunk length near ``chunk`` (at most 2x smaller) that divides ``tk``, or ``chunk`` if there is none."""
    n = -(-tk // chunk)
    for count in range(n, 2 * n + 1):
        if tk % count == 0:
            return tk // count
    return chunk


def _bmm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """Batched matmul with an fp32 result: half-precision inputs accumulate and return fp32 on CUDA."""
    if a.dtype in (torch.float16, torch.bfloat16) and a.is_cuda:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except TypeError:  # a torch without the out_dtype overload: upcast (raised before any kernel runs)
            pass
    return torch.bmm(a.float(), b.float())


def _same(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.shape == b.shape and bool((a == b).all()))


# ---------------------------------------------------------------------------------------------- packed training rows
def document_attention(
    q: Tensor, k: Tensor, v: Tensor, documents: Documents, window: int | None, scale: float
) -> Tensor:
    """Causal (windowed) GQA attention over packed rows, each query seeing only keys of its own document.

    q [B, H, T, D], k/v [B, Hkv, T, D] (no cache: training and scoring). Rows of one document each with no window
    shorter than them take SDPA's causal kernel. Otherwise, on CUDA: flex attention over the documents' block
    mask (blocks that no query of a tile can see are skipped, so cost follows the documents' own lengths);
    elsewhere: SDPA with a dense mask, tiled over queries.
    """
    b, h, t, _ = q.shape
    if documents.single and (window is None or t <= window):
        if h != k.shape[1]:  # repeat K/V so every backend, flash included, takes the causal fast path
            k, v = k.repeat_interleave(h // k.shape[1], 1), v.repeat_interleave(h // k.shape[1], 1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if q.is_cuda and _flex_attention is not None and envs.FLEX:
        return flex_attention(q, k, v, documents.block_mask(window), scale)
    tile = max(1, MAX_MASK_ELEMENTS // max(1, b * t))
    outs = []
    for s in range(0, t, tile):
        rows = slice(s, s + tile)
        keys = slice(0, s + tile) if window is None else slice(max(0, s - window + 1), s + tile)
        mask = documents.dense_mask(window, rows)[..., keys]
        outs.append(_masked_sdpa(q[:, :, rows], k[:, :, keys], v[:, :, keys], mask, scale))
    return torch.cat(outs, dim=2)


try:
    from torch.nn.attention.flex_attention import flex_attention as _flex_attention
except ImportError:  # torch < 2.5
    _flex_attention = None
# CUDA training uses flex attention for masks other than plain causal where torch has it, unless GEARSHIFT_FLEX=0
# (envs.FLEX: the dense-mask SDPA path everywhere, e.g. to compare).


def flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask, scale: float) -> Tensor:
    """torch's flex attention with GQA, compiled (its eager form is a slow reference); inside compiled code, traced
    into the caller's graph."""
    return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


_compiled_flex = compiled(_flex_attention, name="flex attention") if _flex_attention is not None else None
