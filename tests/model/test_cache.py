"""Sliding-window behaviour, cache bounds, cloning, roll-back and memory reports."""

import copy

import pytest
import torch

from gearshift.cache import CacheError


def ids(model, b, t, seed=0):
    return torch.randint(0, model.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def test_swa_equals_fa_below_window_and_differs_beyond(tiny_model):
    model = copy.deepcopy(tiny_model)
    for block in model.blocks:  # same weights: SWA and FA then differ only by the window
        block.mixer.mixers["sliding_window"].load_state_dict(block.mixer.mixers["attention"].state_dict())
    w = model.config.layers[0].mixers["sliding_window"].window_size
    x = ids(model, 2, 3 * w)
    with torch.no_grad():
        swa, fa = model(x, "SSSS"), model(x, "FFFF")
    torch.testing.assert_close(swa[:, :w], fa[:, :w], atol=1e-5, rtol=1e-5)
    assert (swa[:, w:] - fa[:, w:]).abs().amax(-1).min() > 1e-3  # every later position differs


def test_swa_cache_never_holds_more_than_window(tiny_model):
    w = tiny_model.config.layers[0].mixers["sliding_window"].window_size
    cache = tiny_model.new_cache(1, "SSSS")
    x = ids(tiny_model, 1, 4 * w)
    with torch.no_grad():
        tiny_model(x[:, : 2 * w], cache=cache)  # prefill longer than the window
        for i in range(2 * w, 4 * w):
            tiny_model(x[:, i : i + 1], cache=cache)
            assert all(0 < layer.positions_held() <= w for layer in cache.layers)
    assert all(layer.k.shape[2] <= w for layer in cache.layers)


def test_cache_memory_report(tiny_model):
    t = 20
    x = ids(tiny_model, 3, t)
    for placement, expect_growth in (("FFFF", True), ("SSSS", False), ("GGGG", False), ("KKKK", False)):
        cache = tiny_model.new_cache(3, placement)
        with torch.no_grad():
            tiny_model(x[:, :10], cache=cache)
            first = cache.nbytes()
            tiny_model(x[:, 10:], cache=cache)
        assert (cache.nbytes() > first) == expect_growth
        modeled = 3 * sum(  # per-sequence bytes x 3 rows
            blk.mixer.mixers[name].state_bytes(t, dtype_bytes=4)
            for blk, name in zip(tiny_model.blocks, tiny_model.resolve(placement), strict=True)
        )
        held = cache.nbytes() - cache.start.numel() * 8
        if placement == "FFFF":
            assert held >= modeled  # capacity grows in steps
        elif placement == "SSSS":
            assert held == modeled + 4 * tiny_model.config.layers[0].mixers["sliding_window"].window_size * 8
        else:
            assert held == modeled


def test_clone_is_independent(tiny_model):
    x = ids(tiny_model, 1, 12)
    with torch.no_grad():
        cache = tiny_model.new_cache(1, "FSGK")
        tiny_model(x[:, :8], cache=cache)
        twin = cache.clone()
        a = tiny_model(x[:, 8:], cache=cache)
        b = tiny_model(x[:, 8:], cache=twin)
        c = tiny_model(x[:, 8:9], cache=cache)  # advances only the original
    torch.testing.assert_close(a, b)
    assert cache.length == 13 and twin.length == 12
    assert c.shape == (1, 1, tiny_model.config.vocab_size)


@pytest.mark.parametrize("placement", ["FFFF", "SSSS", "GGGG", "KKKK", "GSKF"])
def test_rollback_returns_to_exact_state(tiny_model, placement):
    x = ids(tiny_model, 2, 16)
    y = ids(tiny_model, 2, 5, seed=1)
    with torch.no_grad():
        cache = tiny_model.new_cache(2, placement, rollback=4)
        tiny_model(x[:, :12], cache=cache)
        tiny_model(x[:, 12:16], cache=cache)  # 4 "draft" tokens, then reject 3 of them
        cache.truncate(13)
        tiny_model(x[:, 13:14], cache=cache)  # draft again one by one, reject 2
        tiny_model(y[:, :1], cache=cache)
        cache.truncate(14)
        got = tiny_model(y, cache=cache)
        ref = tiny_model(torch.cat([x[:, :14], y], 1), placement)[:, 14:]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("placement", ["SSSS", "GGGG"])
def test_rollback_beyond_budget_is_refused(tiny_model, placement):
    x = ids(tiny_model, 1, 20)
    with torch.no_grad():
        cache = tiny_model.new_cache(1, placement, rollback=2)
        tiny_model(x, cache=cache)
    with pytest.raises(CacheError, match="roll"):
        cache.truncate(15)
    plain = tiny_model.new_cache(1, placement)
    with torch.no_grad():
        tiny_model(x, cache=plain)
    with pytest.raises(CacheError):
        plain.truncate(18)


def test_full_attention_can_always_roll_back(tiny_model):
    x = ids(tiny_model, 1, 10)
    with torch.no_grad():
        cache = tiny_model.new_cache(1, "FFFF")
        tiny_model(x, cache=cache)
        cache.truncate(4)
        got = tiny_model(x[:, 4:], cache=cache)
        ref = tiny_model(x, "FFFF")[:, 4:]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_select_rows(tiny_model):
    x = ids(tiny_model, 3, 9)
    with torch.no_grad():
        cache = tiny_model.new_cache(3, "FSGK")
        tiny_model(x[:, :8], cache=cache)
        cache.select([2, 0])
        got = tiny_model(x[[2, 0], 8:], cache=cache)
        ref = tiny_model(x[[2, 0]], "FSGK")[:, 8:]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_cache_placement_mismatch(tiny_model):
    cache = tiny_model.new_cache(1, "FFFF")
    with pytest.raises(ValueError, match="another placement"):
        tiny_model(torch.tensor([[1]]), "GGGG", cache=cache)
    with pytest.raises(ValueError, match="rows"):
        tiny_model(torch.tensor([[1], [2]]), cache=cache)


@pytest.mark.parametrize("placement", ["FFFF", "SSSS", "GGGG", "KKKK", "FSGK"])
def test_static_cache_decoding_matches(tiny_model, placement):
    """The static (CUDA-graph-ready) cache path: fixed buffers, device-side positions, same logits."""
    from gearshift.generation import pad_left

    x, mask = pad_left([[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]], pad_id=0)
    nxt = ids(tiny_model, 2, 9, seed=3)
    with torch.no_grad():
        ref_cache = tiny_model.new_cache(2, placement)
        tiny_model(x, attention_mask=mask, cache=ref_cache)
        ref = torch.cat([tiny_model(nxt[:, i : i + 1], cache=ref_cache) for i in range(9)], 1)
        cache = tiny_model.new_cache(2, placement)
        tiny_model(x, attention_mask=mask, cache=cache)
        cache.make_static(capacity=cache.length + 9)
        saved = cache.clone()
        first = tiny_model(nxt[:, :1], cache=cache)
        cache.copy_(saved)  # undo one step in place, as the graph runner does after warm-up
        got = torch.cat([tiny_model(nxt[:, i : i + 1], cache=cache) for i in range(9)], 1)
    torch.testing.assert_close(first, ref[:, :1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert int(cache.static_index) == cache.length
    if placement == "FFFF":
        with pytest.raises(CacheError, match="full"), torch.no_grad():
            tiny_model(nxt[:, :1], cache=cache)
