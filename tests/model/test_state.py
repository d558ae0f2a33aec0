"""Each mixer describes its decoding state once (``state_spec()``); caches, pools, synthetic caches and the cost
report derive from that description and agree with what decoding really allocates."""

import copy

import pytest
import torch
from torch import Tensor

from gearshift.cache import (
    AttentionCache,
    FullKVCache,
    LayerCache,
    RecurrentCache,
    RecurrentStateCache,
    WindowKVCache,
    synthetic_cache,
)
from gearshift.layers.base import Mixer, StepContext
from gearshift.roofline import placement_report
from gearshift.serve.engine import Engine
from gearshift.serve.pools import AttentionPool, RecurrentPool, pool_for
from gearshift.state import KVSpec, RecurrentSpec

SINGLE = ("FFFF", "SSSS", "GGGG", "KKKK")


def ids(model, b, t, seed=0):
    return torch.randint(0, model.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def state_tensors(layer) -> list[Tensor]:
    """The tensors of a layer cache that hold decoding state (not a ring's slot indices)."""
    if isinstance(layer, RecurrentCache):
        return [layer.state, *layer.conv]
    return [layer.k, layer.v]


def nbytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("placement", SINGLE)
def test_spec_bytes_equal_what_a_prefill_allocates_and_the_report(tiny_model, placement, dtype):
    """After a prefill of n tokens (one chunk, at least the window and the cache's minimum of 16 positions), the
    state tensors of every layer hold exactly the spec's bytes; the report sums the same figures."""
    model = copy.deepcopy(tiny_model).to(dtype)
    b, n = 3, 20
    elem = torch.empty((), dtype=dtype).element_size()
    cache = model.new_cache(b, placement)
    with torch.no_grad():
        model(ids(model, b, n), cache=cache)
    mixers = [blk.mixer.mixers[name] for blk, name in zip(model.blocks, model.resolve(placement), strict=True)]
    for mixer, layer in zip(mixers, cache.layers, strict=True):
        spec = mixer.state_spec()
        assert b * spec.nbytes(n, elem) == nbytes(state_tensors(layer)), mixer.kind
        assert mixer.state_bytes(n, elem) == spec.nbytes(n, elem)
        assert type(layer) is type(mixer.new_cache())
    report = placement_report(model, placement, context=n, batch=b, dtype_bytes=elem)
    assert report.state_bytes_per_seq == sum(m.state_spec().nbytes(n, elem) for m in mixers)


def test_recurrent_state_stays_fp32_under_a_bf16_model(tiny_model):
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    cache = model.new_cache(1, "GGKK")
    with torch.no_grad():
        model(ids(model, 1, 5), cache=cache)
    for layer in cache.layers:
        assert layer.state.dtype == torch.float32 and all(c.dtype == torch.bfloat16 for c in layer.conv)


@pytest.mark.parametrize("placement", [*SINGLE, "FSGK"])
def test_synthetic_cache_has_the_shapes_decoding_allocates(tiny_model, placement):
    """The benchmarks' random caches (from each spec) have the shapes and dtypes of a real prefilled cache, and a
    decode step runs on them."""
    b, n = 2, 20
    real = tiny_model.new_cache(b, placement)
    with torch.no_grad():
        tiny_model(ids(tiny_model, b, n), cache=real)
    fake = synthetic_cache(tiny_model, placement, b, n, extra=0)
    assert fake.length == real.length == n
    for mine, theirs in zip(fake.layers, real.layers, strict=True):
        assert type(mine) is type(theirs) and mine.length == theirs.length
        assert [(t.shape, t.dtype) for t in state_tensors(mine)] == [(t.shape, t.dtype) for t in state_tensors(theirs)]
        if isinstance(mine, WindowKVCache):
            assert torch.equal(mine.index, theirs.index)
    with torch.no_grad():
        out = tiny_model(ids(tiny_model, b, 1, seed=1), cache=synthetic_cache(tiny_model, placement, b, n))
    assert out.shape == (b, 1, tiny_model.config.vocab_size) and torch.isfinite(out).all()


def test_pool_for_gives_each_mixer_its_pool(tiny_model):
    """``pool_for(mixer.state_spec(), ...)`` (what the engine's runner calls) gives every mixer kind the pool and
    settings written out here from the mixer's own config: KV heads and window for attention, the recurrent
    state's heads and sizes and the conv tails (KDA: one tail for its three convs) for GDN and KDA."""
    engine = Engine(copy.deepcopy(tiny_model), max_batch=2, max_context=48, spec_k_max=3)
    kinds = set()
    for i, block in enumerate(engine.model.blocks):
        for name, mixer in block.mixer.mixers.items():
            c = mixer.cfg
            if mixer.kind in ("attention", "sliding_window"):
                want = (AttentionPool, dict(heads=c.head_groups, head_size=c.head_size, capacity=48,
                                            window=c.window_size, spare=4))  # fmt: skip
            elif mixer.kind == "gdn":
                want = (RecurrentPool, dict(heads=c.value_heads, dk=c.key_head_dim, dv=c.value_head_dim,
                                            conv_channels=[2 * mixer.key_dim + mixer.value_dim],
                                            kernel=c.conv_kernel))  # fmt: skip
            else:
                tail = [3 * c.heads * c.head_dim]
                want = (RecurrentPool, dict(heads=c.heads, dk=c.head_dim, dv=c.head_dim, conv_channels=tail,
                                            kernel=c.conv_kernel))  # fmt: skip
            got = pool_for(mixer.state_spec(), max_context=engine.max_context, spare=engine.spec_k_max + 1)
            assert got == want, (i, name)
            assert isinstance(engine.pools[i][name], want[0])
            kinds.add(mixer.kind)
    assert kinds == {"attention", "sliding_window", "gdn", "kda"}


def test_caches_and_pool_views_speak_the_cache_protocols(tiny_model):
    for layer in (FullKVCache(), WindowKVCache(4), RecurrentCache(1)):
        assert isinstance(layer, LayerCache)
    assert isinstance(FullKVCache(), AttentionCache) and isinstance(WindowKVCache(4), AttentionCache)
    assert isinstance(RecurrentCache(1), RecurrentStateCache)
    slots = torch.arange(2)
    kv = AttentionPool(2, heads=1, head_size=4, capacity=8, window=None, spare=1, device="cpu", dtype=torch.float32)
    rec = RecurrentPool(2, heads=1, dk=4, dv=4, conv_channels=[6], kernel=3, device="cpu", dtype=torch.float32)
    assert isinstance(kv.view(slots), AttentionCache)
    assert isinstance(rec.view(slots), RecurrentStateCache)


class ScratchMixer(Mixer):
    """A new mixer: a recurrent state and two conv tails, described by its state_spec() alone."""

    kind = "scratch"

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: Tensor, ctx: StepContext, cache: RecurrentStateCache | None = None) -> Tensor:
        return self.proj(x)

    def state_spec(self) -> RecurrentSpec:
        return RecurrentSpec(heads=2, key_dim=3, value_dim=5, conv_channels=(6, 7), conv_kernel=4)


def test_a_new_mixer_needs_only_its_state_spec():
    """Cache, state bytes, pool and synthetic state of a new mixer all follow from its state_spec()."""
    mixer = ScratchMixer()
    cache = mixer.new_cache(rollback=2)
    assert isinstance(cache, RecurrentCache) and len(cache.conv) == 2 and cache.rollback == 2
    assert mixer.state_bytes(100, dtype_bytes=2) == 2 * 3 * 5 * 4 + (6 + 7) * 3 * 2
    cls, kw = pool_for(mixer.state_spec(), max_context=64, spare=1)
    pool = cls(4, **kw, device="cpu", dtype=torch.bfloat16)
    assert pool.nbytes_per_slot() == mixer.state_bytes(64, dtype_bytes=2)
    fake = mixer.state_spec().random_cache(batch=3, context=10, extra=0, device="cpu", dtype=torch.bfloat16)
    assert nbytes(state_tensors(fake)) == 3 * mixer.state_bytes(10, dtype_bytes=2) and fake.length == 10


def test_kv_spec_window_bounds_the_bytes():
    full, window = KVSpec(heads=2, head_size=8), KVSpec(heads=2, head_size=8, window=16)
    assert full.nbytes(100) == 2 * 2 * 8 * 100 * 2 and window.nbytes(100) == window.nbytes(16) < full.nbytes(100)
    assert window.step_bytes(100) == window.nbytes(100) + 2 * 2 * 8 * 2
    assert isinstance(full.new_cache(), FullKVCache) and isinstance(window.new_cache(rollback=3), WindowKVCache)
    assert window.new_cache(rollback=3).capacity == 19
