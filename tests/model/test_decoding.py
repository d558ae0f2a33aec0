"""Incremental decoding, batching with padding, generation and sampling."""

import random

import pytest
import torch

from gearshift import sampling
from gearshift.generation import pad_left
from gearshift.sampling import filter_logits, sample_next

PLACEMENTS = ["FFFF", "SSSS", "GGGG", "KKKK"]


def random_placements(n, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice("FSGK") for _ in range(4)) for _ in range(n)]


def ids(model, b, t, seed=0):
    return torch.randint(0, model.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("placement", PLACEMENTS + random_placements(4))
@pytest.mark.parametrize("chunks", [[1] * 17, [5, 1, 3, 7, 1]], ids=["token-by-token", "uneven-chunks"])
def test_incremental_equals_full_forward(tiny_model, placement, chunks):
    x = ids(tiny_model, 2, sum(chunks))
    with torch.no_grad():
        full = tiny_model(x, placement)
        cache = tiny_model.new_cache(2, placement)
        parts, pos = [], 0
        for n in chunks:
            parts.append(tiny_model(x[:, pos : pos + n], cache=cache))
            pos += n
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)
    assert cache.length == sum(chunks)


@pytest.mark.parametrize("placement", ["FFFF", "SSSS", "GGGG", "KKKK", "FSGK"])
def test_left_padded_batch_equals_one_by_one(tiny_model, placement):
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34, 35]]
    x, mask = pad_left(prompts, pad_id=0)
    with torch.no_grad():
        batched = tiny_model(x, placement, attention_mask=mask)  # no cache: masked full forward
        cache = tiny_model.new_cache(3, placement)
        cached = tiny_model(x, attention_mask=mask, cache=cache)
        step = tiny_model(torch.tensor([[40], [41], [42]]), cache=cache)
        for i, p in enumerate(prompts):
            alone = tiny_model(torch.tensor([p + [40 + i]]), placement)[0]
            n = len(p)
            torch.testing.assert_close(batched[i, -n:], alone[:n], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(cached[i, -n:], alone[:n], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(step[i, 0], alone[n], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("placement", ["FFFF", "GGGG", "KSFG"])
def test_right_padding_without_cache(tiny_model, placement):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]
    x = torch.tensor([prompts[0], prompts[1] + [0] * 4])
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4])
    with torch.no_grad():
        out = tiny_model(x, placement, attention_mask=mask)
        for i, p in enumerate(prompts):
            torch.testing.assert_close(
                out[i, : len(p)], tiny_model(torch.tensor([p]), placement)[0], atol=1e-4, rtol=1e-4
            )


@pytest.mark.parametrize("placement", ["FSGK", "KKKK"])
def test_greedy_generate_matches_full_forward_argmax(tiny_model, placement):
    prompts = [[1, 2, 3, 4, 5], [9, 8]]
    out = tiny_model.generate(prompts, placement, max_new_tokens=12, eos_token_id=[])
    assert out.shape == (2, 5 + 12)
    for i, p in enumerate(prompts):
        seq = list(p)
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(tiny_model(torch.tensor([seq]), placement)[0, -1].argmax()))
        assert out[i, 5 - len(p) :].tolist() == seq


@pytest.mark.parametrize("placement", ["FFFF", "FSGK"])
def test_generate_takes_split_kv_decode_attention(tiny_model, placement, monkeypatch):
    """generate decodes through the same split-KV attention as the engine (forced here: on the CPU ``auto`` never
    splits), and greedy tokens and logits equal the fused path's; a left-padded batch keeps its padding mask."""
    from gearshift.ops import attention as ops

    calls = []
    real = ops.split_kv_attention
    monkeypatch.setattr(ops, "split_kv_attention", lambda *a: calls.append(1) or real(*a))
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [9, 8, 7]]
    monkeypatch.setenv("GEARSHIFT_SPLIT_KV", "0")
    fused = tiny_model.generate(prompts, placement, max_new_tokens=8, eos_token_id=[])
    assert not calls
    monkeypatch.setenv("GEARSHIFT_SPLIT_KV", "4")
    split = tiny_model.generate(prompts, placement, max_new_tokens=8, eos_token_id=[])
    assert calls and split.tolist() == fused.tolist()


def test_generate_chunked_prefill_and_eos(tiny_model):
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6]]
    a = tiny_model.generate(prompt, "FSGK", max_new_tokens=6, eos_token_id=[])
    b = tiny_model.generate(prompt, "FSGK", max_new_tokens=6, eos_token_id=[], prefill_chunk=3)
    assert a.tolist() == b.tolist()
    first = int(a[0, 8])
    c = tiny_model.generate(prompt, "FSGK", max_new_tokens=6, eos_token_id=first)
    assert c.shape[1] == 9  # stops right after emitting EOS


def test_sampling_is_seeded_and_varies(tiny_model):
    kw = dict(max_new_tokens=10, temperature=1.5, top_p=0.95, top_k=20, eos_token_id=[])
    a = tiny_model.generate([[1, 2, 3]], "FSGK", seed=7, **kw)
    b = tiny_model.generate([[1, 2, 3]], "FSGK", seed=7, **kw)
    c = tiny_model.generate([[1, 2, 3]], "FSGK", seed=8, **kw)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, 1.0, top_k=2).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, 1.0, top_p=0.8).isfinite()  # 0.5 + 0.3 reaches 0.8: drop the rest
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, 1.0, top_p=0.81).isfinite()
    assert kept.tolist() == [[True, True, True, False]]
    probs = filter_logits(logits, 2.0).softmax(-1)
    torch.testing.assert_close(
        probs, torch.tensor([[0.5, 0.3, 0.15, 0.05]]).sqrt() / torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt().sum()
    )
    assert sample_next(logits).tolist() == [0]
    with pytest.raises(ValueError):
        sample_next(logits, temperature=-1)


def test_sampling_distribution(tiny_model):
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))[None].expand(20000, 3)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, 1.0, generator=gen), minlength=3).float() / 20000
    torch.testing.assert_close(counts, torch.tensor([0.6, 0.3, 0.1]), atol=0.015, rtol=0)


@pytest.mark.parametrize("candidates", [3, 1024], ids=["nucleus_wider_than_candidates", "all_candidates"])
def test_sampling_matches_the_filtered_distribution(monkeypatch, candidates):
    """sample_next draws from filter_logits' distribution for every top-k / top-p / temperature setting, also
    when a row's nucleus is wider than the candidates it selects first (those rows are redrawn from the sort)."""
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", candidates)
    rows = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.05, 0.03, 0.02], [0.2, 0.18, 0.17, 0.16, 0.15, 0.14]]))
    n = 20000
    logits = rows.repeat_interleave(n, 0)
    for temperature, top_k, top_p in [(1.0, 0, 0.85), (0.7, 0, 0.9), (1.0, 3, 1.0), (1.3, 4, 0.6), (1.0, 0, 1.0)]:
        gen = torch.Generator().manual_seed(1)
        drawn = sample_next(logits, temperature, top_k, top_p, gen).view(2, n)
        expected = filter_logits(rows, temperature, top_k, top_p).softmax(-1)
        for r in range(2):
            freq = torch.bincount(drawn[r], minlength=6).float() / n
            assert set(drawn[r].unique().tolist()) <= set(expected[r].nonzero().squeeze(1).tolist())
            torch.testing.assert_close(freq, expected[r], atol=0.012, rtol=0)


def test_context_limit_errors(tiny_model):
    limit = tiny_model.config.max_position_embeddings
    with pytest.raises(ValueError, match="context"):
        tiny_model.generate([[1] * (limit - 2)], "FFFF", max_new_tokens=5)
    with pytest.raises(ValueError, match="context"):
        tiny_model(torch.ones(1, limit + 1, dtype=torch.long), "GGGG")
    with pytest.raises(ValueError, match="left"):
        cache = tiny_model.new_cache(1, "FFFF")
        tiny_model(torch.tensor([[1, 2, 0]]), attention_mask=torch.tensor([[1, 1, 0]]), cache=cache)
