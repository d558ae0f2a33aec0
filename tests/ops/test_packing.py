"""Packed rows: documents laid end to end are kept apart by every mixer, so a packed row computes what its documents
compute as separate sequences -- per-document losses and gradients -- for every mixer and for placements mixing
them. Checked layer by layer (conv, delta rule, attention masks) and on the whole model."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gearshift.ops.attention import document_attention
from gearshift.ops.conv import causal_conv1d
from gearshift.ops.delta_rule import chunk_delta_rule, recurrent_delta_rule
from gearshift.ops.documents import Documents
from gearshift.train.rows import pack

LENGTHS = [[5, 9, 1, 9], [24], [13, 11]]  # a one-token document, documents across chunk edges, a whole row


def packed_documents(lengths=LENGTHS) -> Documents:
    labels = [np.repeat(np.arange(len(row)) + 7 * i, row) for i, row in enumerate(lengths)]  # any labels work
    return Documents.from_segments(torch.from_numpy(np.stack(labels)))


def per_document(documents: Documents):
    """(row, start, end) of every document."""
    t = documents.shape[1]
    cu = documents.cu_seqlens_cpu.tolist()
    return [(a // t, a % t, a % t + b - a) for a, b in zip(cu[:-1], cu[1:], strict=True)]


def test_documents_layout():
    docs = packed_documents()
    assert docs.lengths == [5, 9, 1, 9, 24, 13, 11] and not docs.single
    assert docs.cu_seqlens.tolist() == [0, 5, 14, 15, 24, 48, 61, 72]
    assert docs.segments[0].tolist() == [0] * 5 + [1] * 9 + [2] + [3] * 9  # renumbered from 0 per row
    assert docs.positions[0, :16].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0]
    assert docs.positions[1].tolist() == list(range(24))
    assert Documents.from_segments(torch.tensor([[0, 0, 1, 1, 0, 0]])).segments.tolist() == [[0, 0, 1, 1, 2, 2]]
    assert Documents.whole_rows(2, 5).single and Documents.whole_rows(2, 5).lengths == [5, 5]
    mask = docs.dense_mask(window=3)
    for b, i, j in np.ndindex(3, 24, 24):
        same = docs.segments[b, i] == docs.segments[b, j]
        assert bool(mask[b, 0, i, j]) == bool(same and j <= i and i - j < 3)
    with pytest.raises(ValueError, match="integer"):
        Documents.from_segments(torch.zeros(2, 3))


def test_pack_keeps_documents_and_masks_targets_across_them():
    docs = [(np.arange(10, 10 + n), np.ones(n, bool)) for n in (3, 4, 6)]
    docs[1][1][0] = False  # a prompt token: not a target
    rows = pack(docs, seq_len=6)
    assert rows.tokens.tolist() == [[10, 11, 12, 10, 11, 12, 13], [13, 10, 11, 12, 13, 14, 15]]
    assert rows.documents.tolist() == [[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]]
    # a token never learns to predict the first token of the next document
    assert rows.mask.tolist() == [[True, True, False, True, True, True], [False, True, True, True, True, True]]
    assert rows.input_documents([1], torch.device("cpu")).tolist() == [[0, 1, 1, 1, 1, 1]]
    assert rows[1:].documents.tolist() == rows.documents[1:].tolist()


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
def test_delta_rule_restarts_at_every_document(per_channel):
    """Both PyTorch forms over packed rows equal the recurrence run on each document alone (outputs and
    gradients), for chunks that split documents, hold several, or fall on their edges."""
    docs = packed_documents()
    gen = torch.Generator().manual_seed(0)
    b, t, h, hv, dk, dv = 3, 24, 2, 4, 8, 6
    q = torch.randn(b, t, h, dk, generator=gen)
    k = F.normalize(torch.randn(b, t, h, dk, generator=gen), dim=-1)
    v = torch.randn(b, t, hv, dv, generator=gen)
    g = -torch.rand((b, t, hv, dk) if per_channel else (b, t, hv), generator=gen) * 2
    beta = torch.rand(b, t, hv, generator=gen)
    w = torch.randn(b, t, hv, dv, generator=gen)

    def grads(fn):
        xs = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
        o = fn(*xs)
        (o * w).sum().backward()
        return [o.detach()] + [x.grad for x in xs]

    def separately(*xs):
        out = torch.zeros(b, t, hv, dv)
        for row, a, e in per_document(docs):
            out[row, a:e] = recurrent_delta_rule(*(x[row : row + 1, a:e] for x in xs), 0.4)[0][0]
        return out

    ref = grads(separately)
    forms = [lambda *xs: recurrent_delta_rule(*xs, 0.4, starts=docs.starts)[0]]
    forms += [lambda *xs, c=c: chunk_delta_rule(*xs, 0.4, chunk_size=c, starts=docs.starts)[0] for c in (1, 4, 8, 64)]
    for form in forms:
        for got, want in zip(grads(form), ref, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_short_conv_restarts_at_every_document():
    docs = packed_documents()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 24, 5, generator=gen)
    weight = torch.randn(5, 1, 4, generator=gen)
    y, tail = causal_conv1d(x, weight, starts=docs.starts)
    for row, a, e in per_document(docs):
        torch.testing.assert_close(y[row, a:e], causal_conv1d(x[row : row + 1, a:e], weight)[0][0])
    # the tail continues each row's last document: its last K-1 inputs, zeros for those of an earlier document
    torch.testing.assert_close(tail[0], x[0, -3:])
    starts = torch.tensor([[True, False, False, False, False, True]])
    _, tail = causal_conv1d(x[:1, :6], weight, starts=starts)
    assert tail[0, :2].abs().sum() == 0 and torch.equal(tail[0, 2], x[0, 5])


@pytest.mark.parametrize("window", [None, 3, 100])
def test_attention_sees_only_its_document(window):
    """The CPU path (dense masks, tiled) and flex attention's block mask (the CUDA path, run here eagerly) against
    plain causal attention over each document alone."""
    docs = packed_documents()
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(3, 4, 24, 8, generator=gen)
    k, v = torch.randn(3, 2, 24, 8, generator=gen), torch.randn(3, 2, 24, 8, generator=gen)
    out = document_attention(q, k, v, docs, window, 0.3)
    for row, a, e in per_document(docs):
        qq, kk, vv = q[row : row + 1, :, a:e], k[row : row + 1, :, a:e], v[row : row + 1, :, a:e]
        n = e - a
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        if window is not None:
            mask = mask & ~torch.ones(n, n, dtype=torch.bool).tril(-window)
        ref = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=0.3, enable_gqa=True)
        torch.testing.assert_close(out[row : row + 1, :, a:e], ref, atol=1e-5, rtol=1e-5)
    from torch.nn.attention.flex_attention import flex_attention

    whole = Documents.whole_rows(3, 24)  # rows of one document each: one mask broadcast over the rows
    for layout, want in ((docs, out), (whole, document_attention(q, k, v, whole, window, 0.3))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager flex attention on CPU is its slow reference form
            flex = flex_attention(q, k, v, block_mask=layout.block_mask(window), scale=0.3, enable_gqa=True)
        torch.testing.assert_close(flex, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("placement", ["FFFF", "SSSS", "GGGG", "KKKK", "FSGK", "KGSF"])
def test_packed_rows_give_each_documents_loss_and_gradients(tiny_config, placement):
    """The whole model on packed rows: every document's loss (the data path's mask: no target across a boundary)
    and the gradients of their sum equal those of the documents run one by one."""
    from gearshift.model import Supernet

    model = Supernet.random(tiny_config, seed=0, std=0.1)  # the delta rule works in fp32: moderate weights
    gen = np.random.default_rng(3)
    docs = [(gen.integers(0, tiny_config.vocab_size, n), np.ones(n, bool)) for n in (6, 2, 11, 9, 13, 7)]
    rows = pack(docs, seq_len=24)
    tokens, mask = rows.batch(range(len(rows)), torch.device("cpu"))
    labels = rows.input_documents(range(len(rows)), torch.device("cpu"))
    documents = Documents.from_segments(labels)
    assert not documents.single and len(documents.lengths) > len(rows)

    def loss_sums(logits, targets, m):  # per-token CE summed over the loss mask
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
        return ce * m

    model.zero_grad()
    per_token = loss_sums(model(tokens[:, :-1], placement, documents=documents), tokens[:, 1:], mask)
    per_token.sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = 0.0
    for row, a, e in per_document(documents):
        seq = tokens[row : row + 1, a : e + 1]  # the document's inputs and its in-document targets
        doc_loss = loss_sums(model(seq[:, :-1], placement), seq[:, 1:], mask[row : row + 1, a:e]).sum()
        torch.testing.assert_close(per_token[row, a:e].sum(), doc_loss.detach(), rtol=1e-4, atol=1e-4)
        total = total + doc_loss
    total.backward()
    for n, p in model.named_parameters():
        if n in packed_grads:
            want = packed_grads[n]
            torch.testing.assert_close(p.grad, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()), msg=n)
