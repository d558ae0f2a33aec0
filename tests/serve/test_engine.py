"""The serving engine: mixed-placement batches, continuous batching, speculative decoding, admission."""

import pytest
import torch

from gearshift.config import SupernetConfig
from gearshift.model import Supernet
from gearshift.serve.engine import Engine, QueueFullError, RequestError, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [20, 21, 22], [30, 31, 32, 33, 34, 35], [40], [3, 1, 4, 1, 5, 9]]
PLACEMENTS = ["FFFF", "SSSS", "GGGG", "KKKK", "FSGK"]


@pytest.fixture(scope="module")
def model():
    cfg = SupernetConfig.tiny(num_layers=4, vocab_size=97, window=6, eos_token_id=None)
    return Supernet.random(cfg, seed=0, std=0.2).eval()


def alone(model, prompt, placement, n):
    return model.generate([prompt], placement, max_new_tokens=n, eos_token_id=[])[0, len(prompt) :].tolist()


@pytest.mark.parametrize("chunk,contiguous,overlap", [(256, True, False), (3, True, False), (3, False, False),
                                                     (3, True, True)])  # fmt: skip
def test_mixed_batch_equals_each_request_alone(model, chunk, contiguous, overlap):
    # contiguous_reads: slices of consecutive slots (views) or always gathers; overlap: decoding one step ahead (on
    # by default on CUDA)
    engine = Engine(model, max_batch=8, prefill_chunk=chunk, contiguous_reads=contiguous, overlap=overlap)
    params = SamplingParams(max_tokens=12, stop_token_ids=())
    outs = engine.generate(PROMPTS, PLACEMENTS, params)
    for prompt, placement, out in zip(PROMPTS, PLACEMENTS, outs, strict=True):
        assert out == alone(model, prompt, placement, 12), placement


def test_split_kv_decode_equals_each_request_alone(model, monkeypatch):
    """Engine decode through split-KV attention (chunks of 4 keys) gives the tokens of the fused path."""
    from gearshift.ops import attention as ops

    calls = []
    real = ops.split_kv_attention
    monkeypatch.setattr(ops, "split_kv_attention", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("GEARSHIFT_SPLIT_KV", "4")
    engine = Engine(model, max_batch=8, max_context=64)
    outs = engine.generate(PROMPTS, PLACEMENTS, SamplingParams(max_tokens=12, stop_token_ids=()))
    for prompt, placement, out in zip(PROMPTS, PLACEMENTS, outs, strict=True):
        assert out == alone(model, prompt, placement, 12), placement
    assert calls


@pytest.mark.parametrize("overlap", [False, True])
def test_continuous_batching_with_a_small_batch(model, overlap):
    engine = Engine(model, max_batch=2, prefill_chunk=4, overlap=overlap)
    reqs = [
        engine.submit(p, pl, SamplingParams(max_tokens=6 + i, stop_token_ids=()))
        for i, (p, pl) in enumerate(zip(PROMPTS, PLACEMENTS, strict=True))
    ]
    steps = 0
    while engine.has_work():
        engine.step()
        assert len(engine.running) <= 2
        steps += 1
    for i, r in enumerate(reqs):
        assert r.finished and r.finish_reason == "length"
        assert r.output == alone(model, r.prompt, PLACEMENTS[i], 6 + i)
    # every slot went back to its pool
    assert all(p.alloc.available == p.alloc.n for layer in engine.pools for p in layer.values())


def test_pools_hold_only_the_mixers_in_use(model):
    engine = Engine(model, max_batch=2)
    req = engine.submit([1, 2, 3], "GGGG", SamplingParams(max_tokens=10, stop_token_ids=()))
    engine.step()
    assert set(req.slots) == {(i, "gdn") for i in range(4)}
    assert engine.pools[0]["attention"].alloc.available == 2


@pytest.mark.parametrize("draft", ["GGGG", "KKKK", "SSSS", "GKGS"])
@pytest.mark.parametrize("target", ["FFFF", "FSGK"])
def test_speculative_greedy_is_lossless(model, draft, target):
    engine = Engine(model, max_batch=4, spec_k_max=4)
    params = SamplingParams(max_tokens=20, stop_token_ids=())
    reqs = [engine.submit(p, target, params, draft=draft, spec_k=3) for p in PROMPTS[:3]]
    engine.run()
    for r in reqs:
        assert r.output == alone(model, r.prompt, target, 20)
        assert r.proposed > 0 and r.accepted < r.proposed  # rejections happened: roll-back was exercised


def test_speculative_requests_of_different_placements_share_a_round(model):
    """Speculative requests with different targets and drafts in one round: each recurrent view restores only its
    own group's rows (the target's and the draft's), and every output equals its run alone."""
    params = SamplingParams(max_tokens=8, stop_token_ids=())
    pairs = [("GGGG", "SSSS"), ("FFFF", "SSSS"), ("FFFF", "GGGG"), ("FSGK", "KKKK"), ("FFFF", "GKGS")]
    engine = Engine(model, max_batch=5)
    reqs = [engine.submit(p, t, params, draft=d, spec_k=3) for p, (t, d) in zip(PROMPTS, pairs, strict=True)]
    engine.run()
    for r, (target, _) in zip(reqs, pairs, strict=True):
        assert r.output == alone(model, r.prompt, target, 8), target
    assert sum(r.accepted for r in reqs) < sum(r.proposed for r in reqs)


def test_speculative_request_in_a_shared_round_accepts_as_alone(model):
    """Drafts whose recurrent layers form different row groups in one round: each draft's state must roll back to
    its own row's kept step, which greedy outputs cannot show (they are the target's whatever the draft does), so
    each request's proposals and acceptances are compared with the same request run alone."""
    params = SamplingParams(max_tokens=16, stop_token_ids=())
    pairs = [("FFFF", "FFFG"), ("FFFF", "FFGG"), ("GGGG", "GGGK"), ("FSGK", "FSGG"), ("SSSS", "SSKG")]
    engine = Engine(model, max_batch=5, pool_slots=10, spec_k_max=4)  # all five in every round
    reqs = [engine.submit(p, t, params, draft=d, spec_k=3) for p, (t, d) in zip(PROMPTS, pairs, strict=True)]
    engine.run()
    assert 0 < sum(r.accepted for r in reqs) < sum(r.proposed for r in reqs)
    for r, (target, draft) in zip(reqs, pairs, strict=True):
        single = Engine(model, max_batch=1, pool_slots=2, spec_k_max=4)
        alone_req = single.submit(r.prompt, target, params, draft=draft, spec_k=3)
        single.run()
        assert r.output == alone_req.output
        assert (r.accepted, r.proposed, r.rounds) == (alone_req.accepted, alone_req.proposed, alone_req.rounds), draft


def test_speculative_rounds_replay_graphs(model, stand_in_graphs):
    """With CUDA graphs, a round's draft steps replay the graph of the draft's batch composition (keyed by the rows'
    draft codes; their recurrent state is snapshot from the plan's groups) and its verify pass a graph of the
    target's composition over k + 1 tokens, whose views carry the roll-back snapshots. With stand-in graphs on the
    CPU: outputs equal each target run alone, and the drafts propose what they propose in eager rounds (the same
    acceptances: their state rolls back alike)."""
    params = SamplingParams(max_tokens=16, stop_token_ids=())
    pairs = [("FFFF", "FFFG"), ("GGGG", "GGGK"), ("FSGK", "FSGG")]  # drafts near their targets: acceptances

    def run(graphs):
        engine = Engine(model, max_batch=4, spec_k_max=4)
        engine.runner.cuda_graphs = graphs  # forced on a CPU engine: only the stand-in graph is used
        reqs = [engine.submit(p, t, params, draft=d, spec_k=3) for p, (t, d) in zip(PROMPTS[:3], pairs, strict=True)]
        engine.run()
        return reqs

    eager, graphed = run(False), run(True)
    for r, (target, _) in zip(graphed, pairs, strict=True):
        assert r.output == alone(model, r.prompt, target, 16), target
    assert 0 < sum(r.accepted for r in graphed) < sum(r.proposed for r in graphed)  # acceptances and roll-backs
    assert [(r.accepted, r.proposed) for r in graphed] == [(r.accepted, r.proposed) for r in eager]
    assert len({r.draft_code for r in graphed} | {r.code for r in graphed}) == 6
    shapes = set(stand_in_graphs.shapes)
    assert (1, 0) in shapes and any(t > 1 and rollback == t for t, rollback in shapes)  # draft steps, verify passes
    assert stand_in_graphs.replays > 2 * stand_in_graphs.captured


def test_speculative_with_itself_accepts_everything(model):
    engine = Engine(model, max_batch=2, spec_k_max=4)
    r = engine.submit(PROMPTS[0], "FSGK", SamplingParams(max_tokens=16, stop_token_ids=()), draft="FSGK", spec_k=2)
    engine.run()
    assert r.accepted == r.proposed and r.spec_k > 2  # k grew with perfect acceptance
    assert r.output == alone(model, PROMPTS[0], "FSGK", 16)
    # each verify round emits its accepted tokens + 1 (the first token comes from the prefill; max_tokens may cut
    # the last round short)
    assert r.rounds >= 1 and r.accepted + r.rounds - r.spec_k <= len(r.output) - 1 <= r.accepted + r.rounds


@pytest.mark.parametrize("seeded", [True, False])
def test_speculative_sampling_preserves_the_target_distribution(seeded):
    """The first token of a speculative round follows the target's law, whether requests draw from their own
    generators (seeded) or together; unseeded, greedy requests share the rounds and stay lossless."""
    cfg = SupernetConfig.tiny(num_layers=2, vocab_size=6, window=4, eos_token_id=None)
    model = Supernet.random(cfg, seed=2, std=0.3).eval()
    prompt, target, draft, temp = [1, 2, 3, 4, 5], "FG", "GG", 1.0
    with torch.no_grad():
        p1 = model(torch.tensor([prompt]), target)[0, -1].softmax(-1)
        joint, broken = torch.zeros(6, 6), torch.zeros(6, 6)
        for a in range(6):
            p2 = model(torch.tensor([prompt + [a]]), target)[0, -1].softmax(-1)
            q2 = model(torch.tensor([prompt + [a]]), draft)[0, -1].softmax(-1)
            joint[a] = p1[a] * p2
            overlap = torch.minimum(p2, q2)  # a rejection redrawn from p2 itself instead of the residual
            broken[a] = p1[a] * (overlap + (1 - overlap.sum()) * p2)
        q1 = model(torch.tensor([prompt]), draft)[0, -1].softmax(-1)
    n = 3000
    torch.manual_seed(0)
    engine = Engine(model, max_batch=128, spec_k_max=3, max_queue=n + n // 10)
    reqs, greedy = [], []
    for s in range(n):
        params = SamplingParams(temperature=temp, max_tokens=2, stop_token_ids=(), seed=s if seeded else None)
        reqs.append(engine.submit(prompt, target, params, draft=draft, spec_k=2))
        if not seeded and s % 10 == 0:
            params = SamplingParams(max_tokens=4, stop_token_ids=())
            greedy.append(engine.submit([1 + s % 5, 2, 3], target, params, draft=draft, spec_k=2))
    engine.run()
    for r in greedy:
        assert r.output == alone(model, r.prompt, target, 4)
    counts = torch.zeros(6, 6)
    for r in reqs:
        counts[r.output[0], r.output[1]] += 1
    empirical = counts / n
    tv = 0.5 * (empirical - joint).abs().sum()
    assert tv < 0.06, tv
    # the test has power: the draft alone is far from the target, and so is a broken residual's law
    assert 0.5 * (p1 - q1).abs().sum() > 0.15 and 0.5 * (broken - joint).abs().sum() > 0.15
    assert sum(r.accepted for r in reqs) < sum(r.proposed for r in reqs)


def test_request_errors_and_queue_bound(model):
    engine = Engine(model, max_batch=1, max_queue=2)
    with pytest.raises(RequestError, match="unknown preset"):
        engine.submit([1], "turbo")
    with pytest.raises(RequestError, match="context"):
        engine.submit([1] * model.config.max_position_embeddings, "FFFF")
    with pytest.raises(RequestError, match="empty"):
        engine.submit([], "FFFF")
    with pytest.raises(RequestError, match="token ids"):
        engine.submit([1000], "FFFF")
    with pytest.raises(RequestError, match="temperature"):
        engine.submit([1], "FFFF", SamplingParams(temperature=-1))
    with pytest.raises(RequestError, match="spec_k"):
        engine.submit([1], "FFFF", draft="GGGG", spec_k=engine.spec_k_max + 1)
    small = Engine(model, max_batch=1, spec_k_max=2)
    small.submit([1], "FFFF")  # the default spec_k (4) is not checked without a draft
    a = engine.submit([1, 2], "FFFF", SamplingParams(max_tokens=50, stop_token_ids=()))
    engine.submit([1, 2], "FFFF")
    with pytest.raises(QueueFullError):
        engine.submit([1, 2], "FFFF")
    engine.step()  # a is admitted, the queue has room again
    engine.submit([3], "GGGG")
    engine.cancel(a)
    engine.step()
    assert a.finished and a.finish_reason == "cancelled"
    engine.run()
    assert all(p.alloc.available == p.alloc.n for layer in engine.pools for p in layer.values())


@pytest.mark.parametrize("overlap", [False, True])
def test_stop_tokens_and_context_limit(model, overlap):
    engine = Engine(model, max_batch=2, max_context=20, overlap=overlap)
    first = alone(model, PROMPTS[0], "FSGK", 3)
    r = engine.submit(PROMPTS[0], "FSGK", SamplingParams(max_tokens=10, stop_token_ids=(first[2],)))
    long = engine.submit(PROMPTS[0], "GGGG", SamplingParams(max_tokens=100, stop_token_ids=()))
    engine.run()
    assert r.output == first and r.finish_reason == "stop"
    assert long.finish_reason == "context" and len(long.tokens) == 20


def test_engine_benchmark_smoke_with_sized_pools(tmp_path):
    """engine_mixed.py with an engine per run whose pools hold exactly its rows, on thinned weights."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "engine_mixed.py"
    out = tmp_path / "e.json"
    args = ["--shape", "tiny", "--device", "cpu", "--context", "24", "--batch", "0", "--batch-limit", "9"]
    args += ["--steps", "2", "--pools", "sized", "--thin", "--out", str(out)]
    subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True)
    report = json.loads(out.read_text())
    assert report["batch"] == 8 and report["pools"] == "sized" and report["thin"]  # 4 presets: 8 of at most 9
    rows = report["rows"]
    assert rows[-1]["batch"] == "mixed" and all(r["tokens_per_s"] > 0 for r in rows)


def test_reads_are_views_only_for_consecutive_slots():
    from gearshift.serve.pools import consecutive_span as _span

    assert _span([3, 4, 5]) == slice(3, 6)
    assert _span([2]) == slice(2, 3)
    assert _span([0, 2]) is None and _span([1, 0]) is None


def test_churn_leaves_holes_and_stays_exact(model):
    """Requests finishing at different times free slots in the middle: later groups mix views and gathers."""
    engine = Engine(model, max_batch=3, prefill_chunk=5)
    lengths = [3, 9, 4, 7, 5]
    reqs = [
        engine.submit(p, pl, SamplingParams(max_tokens=n, stop_token_ids=()))
        for p, pl, n in zip(PROMPTS, PLACEMENTS[::-1], lengths, strict=True)
    ]
    engine.run()
    for r, pl, n in zip(reqs, PLACEMENTS[::-1], lengths, strict=True):
        assert r.output == alone(model, r.prompt, pl, n)


def test_positions_bounded_on_the_host(model):
    """The engine bounds positions itself (no device sync per layer); a position past the context is refused."""
    from gearshift.serve.pools import PoolFullError

    engine = Engine(model, max_batch=1, max_context=16)
    req = engine.submit([1, 2, 3], "FFFF", SamplingParams(max_tokens=4, stop_token_ids=()))
    engine.scheduler._admit()
    tokens, positions = torch.tensor([[5]]), torch.tensor([[16]])
    with pytest.raises(PoolFullError, match="beyond the engine's context"):
        engine.runner.mixed_forward(tokens, positions, [req.placement], [req.slots], max_position=16)
    with pytest.raises(PoolFullError, match="KV capacity"):  # without the host bound the pool still checks
        engine.runner.mixed_forward(tokens, positions, [req.placement], [req.slots])


def test_batched_sampling_by_groups(model):
    """Greedy rows take the argmax, seeded rows their own generator's draw, the rest one shared draw per group."""
    engine = Engine(model, max_batch=4)
    greedy = engine.submit([1], "FFFF", SamplingParams(temperature=0.0))
    seeded = engine.submit([1], "FFFF", SamplingParams(temperature=1.0, seed=7))
    hot = [engine.submit([1], "FFFF", SamplingParams(temperature=0.5, top_k=1)) for _ in range(2)]  # top_k=1: argmax
    logits = torch.randn(4, 97, generator=torch.Generator().manual_seed(0))
    out = engine.sampler.sample_rows([greedy, seeded, *hot], logits)
    ref = torch.multinomial(logits[1].softmax(-1), 1, generator=torch.Generator().manual_seed(7))
    assert out[0] == int(logits[0].argmax()) and out[1] == int(ref)
    assert out[2:] == [int(logits[2].argmax()), int(logits[3].argmax())]


class _StandInGraph:
    """A CUDA graph stand-in for CPU tests: 'capture' records the call, 'replay' runs it eagerly on the static
    inputs (the engine's control flow around graphs, without CUDA)."""

    captured = replays = 0
    shapes: list = []  # (tokens per row, roll-back) of each capture

    def __init__(self, runner, key, placements, slots, codes=None, tokens=1, rollback=0):
        import types

        self.key, self.codes, self.slots = key, codes, list(slots)
        self.decode = tokens == 1 and rollback == 0
        b = len(placements)
        self.tokens = torch.zeros(b, tokens, dtype=torch.long)
        self.positions = torch.zeros(b, tokens, dtype=torch.long)
        self.plan = runner.plan(placements, slots, codes)
        self.logits = torch.empty(b, tokens, runner.config.vocab_size)
        self.views = []  # refreshed by each replay, as a graph's buffers are

        def replay():
            _StandInGraph.replays += 1
            out, views = runner.mixed_forward(
                self.tokens, self.positions, placements, slots, rollback=rollback, max_position=0
            )
            self.logits.copy_(out)
            self.views[:] = views

        self.graph = types.SimpleNamespace(replay=replay)
        _StandInGraph.captured += 1
        _StandInGraph.shapes.append((tokens, rollback))


@pytest.fixture
def stand_in_graphs(monkeypatch):
    from gearshift.serve import graphs

    monkeypatch.setattr(graphs, "DecodeGraph", _StandInGraph)
    _StandInGraph.captured = _StandInGraph.replays = 0
    _StandInGraph.shapes = []
    return _StandInGraph


def test_graph_decode_bookkeeping(model, stand_in_graphs):
    """The CUDA-graph decode path's control flow on CPU, with a stand-in graph: first sight of a batch composition
    runs eagerly, the next captures, later steps replay with fresh tokens/positions, and every output equals the
    plain engine's (compositions change as requests finish, so capture, replay and eviction all happen)."""
    lengths = [5, 12, 7, 9, 3]
    params = [SamplingParams(max_tokens=n, stop_token_ids=()) for n in lengths]
    plain = Engine(model, max_batch=3, prefill_chunk=4)
    expected = [plain.submit(p, pl, sp) for p, pl, sp in zip(PROMPTS, PLACEMENTS, params, strict=True)]
    plain.run()
    graphed = Engine(model, max_batch=3, prefill_chunk=4)
    assert not graphed.cuda_graphs  # on by default, but only where CUDA is
    graphed.runner.cuda_graphs = True  # forced on a CPU engine: only the stand-in graph is used
    got = [graphed.submit(p, pl, sp) for p, pl, sp in zip(PROMPTS, PLACEMENTS, params, strict=True)]
    graphed.run()
    assert [r.output for r in got] == [r.output for r in expected]
    assert stand_in_graphs.captured >= 2 and stand_in_graphs.replays > 2 * stand_in_graphs.captured


def test_padded_replays_use_decode_graphs_only(model, stand_in_graphs):
    """A verify pass's graph holds codes of the same kind as a decode step's (a request's placement and slots), but
    k + 1 tokens with roll-back: plain requests that later take the same slots must never replay it padded (their
    recurrent state would advance k + 1 times)."""
    engine = Engine(model, max_batch=3, spec_k_max=1)
    engine.runner.cuda_graphs = True
    spec = SamplingParams(max_tokens=12, stop_token_ids=())
    # drafts in pools of their own, k = 1 throughout: the three rows verify 2 tokens together
    first = [engine.submit(p, "GGSG", spec, draft="KKKK", spec_k=1) for p in PROMPTS[:3]]
    engine.run()
    verify = [g for g in engine.runner.graphs.captured.values() if not g.decode and len(g.codes) == 3]
    assert verify and verify[0].codes == tuple(r.code for r in first)
    plain = [SamplingParams(max_tokens=n, stop_token_ids=()) for n in (2, 6, 9)]
    reqs = [engine.submit(p, "GGSG", sp) for p, sp in zip(PROMPTS[:3], plain, strict=True)]
    engine.run()
    assert [r.code for r in reqs] == [r.code for r in first]  # the same placement and slots: the same codes
    for r, sp in zip(reqs, plain, strict=True):
        assert r.output == alone(model, r.prompt, "GGSG", sp.max_tokens)


def test_interleaved_placements_read_every_pool_as_a_view(model):
    """Requests of several placements admitted together, interleaved: every (layer, mixer) group of the batch has
    consecutive ascending slots, so its state is read as a view of the pool, not gathered (a copy of all its KV
    per layer and step). Rows ordered by placement would interleave the slots of pools that placements share."""
    engine = Engine(model, max_batch=6, prefill_chunk=64)
    placements = ["FFSS", "SFFS", "FSFS"] * 2
    for i, placement in enumerate(placements):
        engine.submit([1 + i, 2, 3], placement, SamplingParams(max_tokens=4, stop_token_ids=()))
    engine.step()
    rows = engine.running
    plan = engine.runner.plan([r.placement for r in rows], [r.slots for r in rows], tuple(r.code for r in rows))
    assert all(group.span is not None for layer in plan for group in layer)


def test_replacements_restore_the_cached_composition(model, stand_in_graphs):
    """Continuous batching of one preset: a request that takes a finished one's slots takes its row too (its rank,
    see Scheduler._admit), so the batch returns to a composition whose CUDA graph is cached. 24 requests of different
    lengths through 4 rows: 3 captures for 59 steps (appended at the end instead, it was 12)."""
    params = [SamplingParams(max_tokens=5 + (7 * i) % 11, stop_token_ids=()) for i in range(24)]
    prompts = [[1 + i, 2, 3] for i in range(24)]
    engine = Engine(model, max_batch=4, prefill_chunk=64)
    engine.runner.cuda_graphs = True
    reqs = [engine.submit(p, "GGGG", sp) for p, sp in zip(prompts, params, strict=True)]
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    assert stand_in_graphs.captured <= 4 and stand_in_graphs.replays >= steps - 5
    for req, prompt, sp in zip(reqs, prompts, params, strict=True):
        assert req.output == alone(model, prompt, "GGGG", sp.max_tokens)


def test_first_chunk_attends_to_its_own_keys(model):
    """A prompt's first chunk attends to its own keys only (no pool read, no mask: causal, or windowed when it is
    longer than the window, the sliding-window ring then keeping its last positions). Reused slots hold the last
    requests' KV, which must never be seen."""
    engine = Engine(model, max_batch=2, prefill_chunk=64)
    fresh = []
    forward = engine.runner.mixed_forward
    engine.runner.mixed_forward = lambda *a, **k: fresh.append(k.get("fresh", False)) or forward(*a, **k)
    long = [(7 * i) % 90 + 1 for i in range(29)]  # longer than the window (6) and the ring (window + spare room)
    params = SamplingParams(max_tokens=6, stop_token_ids=())
    for placement in ("SSSS", "FFFF", "FSGK"):
        engine.generate([[7, 8, 9, 10] * 5, long[5:]], [placement] * 2, params)  # fills slots 0 and 1
        again = engine.generate([long[:12], long], [placement] * 2, params)  # the same slots again
        assert again == [alone(model, long[:12], placement, 6), alone(model, long, placement, 6)], placement
    assert True in fresh and False in fresh  # prefill forwards fresh, decode steps not


def test_prompts_of_different_lengths_prefill_in_one_padded_forward(model):
    """First chunks of different lengths share one left-padded forward (every mixer: padding masked out of
    attention, an identity for GDN/KDA, written where no real token goes); chunks under half the longest start
    another forward. Every request still equals its run alone, speculative ones (whose drafts read the prompt in
    the same padded forward) too."""
    engine = Engine(model, max_batch=8, prefill_chunk=32, prefill_tokens=64)
    calls = []
    forward = engine.runner.mixed_forward
    engine.runner.mixed_forward = lambda tokens, *a, **k: calls.append(tuple(tokens.shape)) or forward(tokens, *a, **k)
    prompts = PROMPTS + [[9, 8, 7, 6, 5, 4, 3, 2, 1, 2], [11, 12]]
    placements = PLACEMENTS + ["SGSG", "KFKF"]
    params = SamplingParams(max_tokens=6, stop_token_ids=())
    reqs = [engine.submit(p, pl, params) for p, pl in zip(prompts, placements, strict=True)]
    spec = [engine.submit(p, "FFFF", params, draft=d, spec_k=2) for p, d in (([5, 6, 7, 8, 9, 10, 11], "GGGG"),
                                                                              ([7, 7, 1], "SSSS"))]  # fmt: skip
    engine.step()  # 8 of the 9 start
    # first chunks of 11, 10, 7 (speculative), 6, 6 tokens in one forward (5 x 11 <= 64); the speculative row's
    # draft reads its 7 tokens padded to 11; 3 and 2 (under half of 11) in another; the 1-token prompt decodes
    assert calls[:3] == [(5, 11), (1, 11), (2, 3)]
    engine.run()
    for r, p, pl in zip(reqs, prompts, placements, strict=True):
        assert r.output == alone(model, p, pl, 6), pl
    for r in spec:
        assert r.output == alone(model, r.prompt, "FFFF", 6)


def test_prompts_of_equal_length_prefill_in_one_forward(model):
    engine = Engine(model, max_batch=4, prefill_chunk=8, prefill_tokens=16)
    prompts = [[3, 4, 5, 6, 7, 8], [9, 8, 7, 6, 5, 4], [1, 1, 2, 3, 5, 8], [2, 7, 1, 8, 2, 8], [5, 5, 5]]
    params = SamplingParams(max_tokens=5, stop_token_ids=())
    reqs = [engine.submit(p, pl, params) for p, pl in zip(prompts, PLACEMENTS, strict=True)]
    calls = []
    forward = engine.runner.mixed_forward
    engine.runner.mixed_forward = lambda tokens, *a, **k: calls.append(tuple(tokens.shape)) or forward(tokens, *a, **k)
    engine.step()  # 4 admitted; their 6-token prompts go 2 per forward (prefill_tokens=16), then all 4 decode
    assert calls == [(2, 6), (2, 6), (4, 1)]
    engine.run()
    for r, p, pl in zip(reqs, prompts, PLACEMENTS, strict=True):
        assert r.output == alone(model, p, pl, 5)


def test_composition_codes_follow_contents(model):
    """Requests get the same code exactly when placement and slots are equal, so a request that replaces another
    in the same slots reuses the batch's plan (and CUDA graph); touched requests are reported once per step."""
    engine = Engine(model, max_batch=2)
    params = SamplingParams(max_tokens=3, stop_token_ids=())
    a, b = engine.submit([1, 2], "all-attention", params), engine.submit([3, 4], "all-gdn", params)
    engine.scheduler._admit()
    assert a.code != b.code
    engine.cancel(a)
    touched = engine.step()  # a's slots are freed, b decodes
    assert touched == [b]
    c = engine.submit([5, 6, 7], "all-attention", params)
    engine.scheduler._admit()
    assert c.code == a.code  # the slots a freed (lowest free first), the same placement
    d = engine.submit([5], "all-kda", params)
    engine.run()
    assert d.code not in (a.code, b.code) and all(r.finished for r in (b, c, d))


def test_composition_codes_start_over_without_collisions(model, monkeypatch):
    """When the code table is cleared (bounded memory), running requests are re-coded, so no new request can
    share a code (and a plan) with a running one of different placement or slots; outputs stay exact."""
    engine = Engine(model, max_batch=2)
    params = SamplingParams(max_tokens=6, stop_token_ids=())
    a = engine.submit([1, 2, 3], "all-gdn", params)
    engine.step()
    engine.scheduler._codes.update({("filler", i): 1000 + i for i in range(100_001)})  # as if many compositions came by
    b = engine.submit([4, 5], "all-attention", params)
    engine.run()
    assert len(engine.scheduler._codes) == 2 and a.code != b.code
    assert a.output == alone(model, [1, 2, 3], "all-gdn", 6) and b.output == alone(model, [4, 5], "all-attention", 6)


def test_state_budget_shrinks_only_the_full_attention_pools(model):
    """Pools sized to a memory budget: FA pools (which grow with the context) get 2 slots of 4, the others 4.
    A third all-FA request waits while all-GDN requests behind it start; a mix that needs FA does not pass the
    waiting one (no starvation). Every output equals the request run alone."""
    full = Engine(model, max_batch=4, max_context=40)
    per_fa = sum(pool.nbytes_per_slot() for layer in full.pools for name, pool in layer.items() if name == "attention")
    budget = full.memory_bytes() - 2 * per_fa  # room for 2 of the 4 FA slots
    engine = Engine(model, max_batch=4, max_context=40, state_memory=budget)
    assert engine.full_attention_slots == 2 and engine.memory_bytes() <= budget
    specs = [{n: engine.runner._pool_spec(m) for n, m in block.mixer.mixers.items()} for block in model.blocks]
    for layer, spec in zip(engine.pools, specs, strict=True):  # the budget's planned sizes are the real ones
        for name, (cls, kw) in spec.items():
            assert layer[name].nbytes_per_slot() == cls.slot_bytes(**kw, dtype=engine.dtype)
    assert all(layer["gdn"].alloc.n == 4 and layer["sliding_window"].alloc.n == 4 for layer in engine.pools)
    order = ["FFFF", "FFFF", "FFFF", "FSGK", "GGGG", "GGGG"]
    params = SamplingParams(max_tokens=8, stop_token_ids=())
    reqs = [engine.submit(PROMPTS[i % len(PROMPTS)], pl, params) for i, pl in enumerate(order)]
    engine.step()
    assert [r.label for r in engine.running] == ["FFFF", "FFFF", "GGGG", "GGGG"]
    started, step = {}, 1
    while engine.has_work():
        engine.step()
        step += 1
        started.update({r.id: step for r in engine.running if r.id not in started})
    assert started[reqs[2].id] <= started[reqs[3].id]  # the waiting all-FA request is not passed by the mix
    for i, (pl, r) in enumerate(zip(order, reqs, strict=True)):
        assert r.output == alone(model, PROMPTS[i % len(PROMPTS)], pl, 8), pl


def test_state_budget_errors(model):
    with pytest.raises(ValueError, match="decoding state does not fit"):
        Engine(model, max_batch=4, max_context=40, state_memory=1000)
    full = Engine(model, max_batch=2, max_context=40)
    per_fa = sum(pool.nbytes_per_slot() for layer in full.pools for name, pool in layer.items() if name == "attention")
    engine = Engine(model, max_batch=2, max_context=40, state_memory=full.memory_bytes() - per_fa)
    assert engine.full_attention_slots == 1
    with pytest.raises(RequestError, match="needs 2 slots"):  # target and draft both FA: can never start
        engine.submit([1, 2], "FFFF", SamplingParams(max_tokens=2), draft="FFGG")


def test_engine_for_some_placements_holds_only_their_state(model):
    """Engine(placements=...) allocates pools only for the (layer, mixer) pairs those placements use: under the
    same budget, more requests may hold full-attention KV at once. Requests outside are refused; the served ones
    decode exactly as alone."""
    served = ["FSGK", "GGGG", "FSGG"]
    full = Engine(model, max_batch=4, max_context=40)
    per_fa = sum(pool.nbytes_per_slot() for layer in full.pools for name, pool in layer.items() if name == "attention")
    budget = full.memory_bytes() - 3 * per_fa  # every mixer of every layer: room for 1 request with FA layers
    assert Engine(model, max_batch=4, max_context=40, state_memory=budget).full_attention_slots == 1
    engine = Engine(model, max_batch=4, max_context=40, state_memory=budget, placements=served)
    assert engine.full_attention_slots == 4  # the same memory holds 4: FA KV only in layer 0, no KDA in layer 0, ...
    assert {(i, n) for i, layer in enumerate(engine.pools) for n in layer} == {
        (0, "attention"), (0, "gdn"), (1, "sliding_window"), (1, "gdn"), (2, "gdn"), (3, "gdn"), (3, "kda")
    }  # fmt: skip
    with pytest.raises(RequestError, match="no attention state in layer 1: it serves only the placements FSGK"):
        engine.submit([1, 2], "FFFF")
    with pytest.raises(RequestError, match="no kda state in layer 2"):
        engine.submit([1, 2], "FSGK", draft="GGKK")
    with pytest.raises(ValueError, match="at least one"):
        Engine(model, placements=[])
    params = SamplingParams(max_tokens=6, stop_token_ids=())
    reqs = [engine.submit(PROMPTS[i % len(PROMPTS)], pl, params) for i, pl in enumerate(served * 2)]
    reqs.append(engine.submit(PROMPTS[0], "FSGK", params, draft="GGGG", spec_k=2))
    while engine.has_work():
        engine.step()
    for i, r in enumerate(reqs[:-1]):
        assert r.output == alone(model, PROMPTS[i % len(PROMPTS)], served[i % 3], 6)
    assert reqs[-1].output == alone(model, PROMPTS[0], "FSGK", 6)


def test_window_longer_than_the_context_is_not_a_ring(model):
    """A sliding window (6) plus spare room longer than the engine's context (9) gets a pool of the context's
    length that never wraps: prompts read in chunks, plain and speculative decoding stay exact."""
    engine = Engine(model, max_batch=4, max_context=9, prefill_chunk=2, spec_k_max=3)
    ring = engine.pools[1]["sliding_window"]
    assert ring.k.shape[2] == 9 and not ring.wraps
    assert Engine(model, max_context=40, spec_k_max=3).pools[1]["sliding_window"].wraps  # 6 + 4 < 40
    params = SamplingParams(max_tokens=5, stop_token_ids=())
    plain = [engine.submit(PROMPTS[1], pl, params) for pl in ("SSSS", "FSGK")]
    spec = engine.submit(PROMPTS[1], "SSSS", params, draft="GGGG", spec_k=3)
    engine.run()
    for r, pl in zip(plain + [spec], ("SSSS", "FSGK", "SSSS"), strict=True):
        assert r.output == alone(model, PROMPTS[1], pl, 5), pl


def test_pools_sized_per_placement(model):
    """Engine(placement_slots=...) gives each pool the requests of the placements that use it, so a mix holds
    per request only its own state: less memory than pools of max_batch slots each for the same batch. A request
    beyond its placement's count runs in slots that others share with it and leave free, or waits; every output
    equals the request run alone."""
    sized = Engine(model, max_batch=4, max_context=40, placement_slots={"FSGK": 2, "GGGG": 1, "FSGG": 1})
    assert [{n: pool.alloc.n for n, pool in layer.items()} for layer in sized.pools] == [
        {"attention": 3, "gdn": 1}, {"sliding_window": 3, "gdn": 1}, {"gdn": 4}, {"kda": 2, "gdn": 2}
    ]  # fmt: skip
    union = Engine(model, max_batch=4, max_context=40, placements=["FSGK", "GGGG", "FSGG"])
    assert sized.memory_bytes() < union.memory_bytes()
    assert sized.full_attention_slots == 3 and sized.placement_slots is not None
    params = SamplingParams(max_tokens=6, stop_token_ids=())
    order = ["GGGG", "GGGG", "FSGK", "FSGG", "FSGK"]
    reqs = [sized.submit(PROMPTS[i], pl, params) for i, pl in enumerate(order)]
    sized.step()
    # the second all-GDN request finds layer 0's one GDN slot taken and waits; the rest fit
    assert [r.label for r in sized.running] == ["GGGG", "FSGK", "FSGG", "FSGK"]
    while sized.has_work():
        sized.step()
    for i, (pl, r) in enumerate(zip(order, reqs, strict=True)):
        assert r.output == alone(model, PROMPTS[i], pl, 6), pl
    assert all(pool.alloc.available == pool.alloc.n for layer in sized.pools for pool in layer.values())
    with pytest.raises(RequestError, match="no kda state in layer 0"):
        sized.submit([1, 2], "KKKK")


def test_has_room_counts_free_slots_and_the_waiting(model):
    """``has_room``: a free row and, in every pool of the placement, a slot beyond what waiting requests need."""
    engine = Engine(model, max_batch=3, max_context=40, placement_slots={"FSGK": 1, "GGGG": 1})
    assert engine.has_room("GGGG") and engine.has_room("FSGK")
    params = SamplingParams(max_tokens=4, stop_token_ids=())
    engine.submit([1, 2], "GGGG", params)  # waiting: it will take layer 0's only GDN slot
    assert not engine.has_room("GGGG") and engine.has_room("FSGK")
    engine.step()  # running now: the same
    assert not engine.has_room("GGGG") and engine.has_room("FSGK")
    assert not engine.has_room("KKKK") and not engine.has_room("nonsense")  # not served, unknown
    engine.submit([3], "FSGK", params)
    assert not engine.has_room("FSGK")
    engine.run()
    assert engine.has_room("GGGG") and engine.has_room("FSGK")
    busy = Engine(model, max_batch=1, max_context=40)
    busy.submit([1], "FFFF", params)
    assert not busy.has_room("GGGG")  # no free row


def test_pools_sized_per_placement_errors(model):
    with pytest.raises(ValueError, match="give it alone"):
        Engine(model, placements=["GGGG"], placement_slots={"GGGG": 1})
    with pytest.raises(ValueError, match="whole number of requests"):
        Engine(model, placement_slots={"GGGG": 0})
    with pytest.raises(ValueError, match="not a valid|unknown|placement"):
        Engine(model, placement_slots={"nonsense": 1})
    with pytest.raises(ValueError, match="reserved requests' pools need .* over the state budget"):
        Engine(model, max_context=40, state_memory=1000, placement_slots={"FFFF": 2})


def test_decoding_one_step_ahead(model):
    """With overlap, a steady decode batch launches step t+1 from the sampled tokens on the device before the host
    books step t's: tokens arrive one call later, requests that stop, are cancelled or join meanwhile stay exact,
    seeded requests fall back to the synchronous step, and every slot goes back to its pool."""
    params = SamplingParams(max_tokens=8, stop_token_ids=())
    engine = Engine(model, max_batch=3, overlap=True)
    a = engine.submit(PROMPTS[0], "FSGK", params)
    b = engine.submit(PROMPTS[1], "GGGG", params)
    engine.step()  # prefill: first tokens, then the first decode step is launched, its tokens pending
    assert engine.scheduler._pending is not None and [len(r.output) for r in (a, b)] == [1, 1]
    touched = engine.step()  # the next step launched, the pending tokens booked
    assert touched == [a, b] and [len(r.output) for r in (a, b)] == [2, 2] and engine.scheduler._pending is not None
    free = alone(model, PROMPTS[2], "SSSS", 8)
    at = next(i for i in range(2, 8) if free[i] not in free[:i])  # a stop token first drawn at step `at`
    c = engine.submit(PROMPTS[2], "SSSS", SamplingParams(max_tokens=8, stop_token_ids=(free[at],)))  # joins
    engine.step()
    engine.cancel(b)  # cancelled with a step in flight
    seeded = engine.submit(PROMPTS[3], "KKKK", SamplingParams(max_tokens=5, temperature=0.8, seed=3))
    engine.run()
    assert a.output == alone(model, PROMPTS[0], "FSGK", 8) and a.finish_reason == "length"
    assert b.finish_reason == "cancelled" and b.output == alone(model, PROMPTS[1], "GGGG", len(b.output))
    assert c.finish_reason == "stop" and c.output == free[: at + 1]
    plain = Engine(model, max_batch=3)
    again = plain.submit(PROMPTS[3], "KKKK", SamplingParams(max_tokens=5, temperature=0.8, seed=3))
    plain.run()
    assert seeded.output == again.output
    assert all(p.alloc.available == p.alloc.n for layer in engine.pools for p in layer.values())


def test_deferred_nucleus_redraw_matches_the_filtered_distribution(model, monkeypatch):
    """Decoding one step ahead samples without a host sync (sampling.sample_candidates) and redraws rows whose
    nucleus is wider than the candidates later (Sampler.settle): the settled tokens follow filter_logits' law,
    for two groups of sampling settings in one batch."""
    from types import SimpleNamespace

    from gearshift import sampling
    from gearshift.sampling import filter_logits
    from gearshift.serve.sampler import Pending

    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", 3)
    dists = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.05, 0.03, 0.02], [0.2, 0.18, 0.17, 0.16, 0.15, 0.14]]))
    settings = [SamplingParams(temperature=1.0, top_p=0.85), SamplingParams(temperature=0.7, top_p=0.95)]
    n = 8000
    reqs = [SimpleNamespace(params=settings[i % 2]) for i in range(2 * n)]  # rows alternate settings
    logits = dists.repeat(n, 1)  # and distributions: row i has distribution i % 2
    engine = Engine(model, max_batch=2)
    torch.manual_seed(0)
    tokens, redraws = engine.sampler.sample_on_device(reqs, logits, tuple(range(2 * n)))
    assert [bool(wide.any()) for _, _, wide in redraws] == [False, True]  # the second's nucleus has 6 tokens
    assert int(tokens.max()) < 3  # before settling: candidates only
    pending = Pending(reqs, tokens, torch.zeros(2 * n, 1), tokens, None, logits, redraws)
    engine.sampler.settle(pending)
    assert not pending.redraws and pending.logits is None
    for r in range(2):
        got = torch.bincount(pending.tokens[r::2], minlength=6).float() / n
        want = filter_logits(dists[r : r + 1], settings[r].temperature, 0, settings[r].top_p).softmax(-1)[0]
        torch.testing.assert_close(got, want, atol=0.02, rtol=0)


def test_draining_batch_replays_its_graph_padded(model, stand_in_graphs):
    """Requests that end at different times with none waiting: the shrinking batch replays its earlier graph with
    the ended rows decoding dummy tokens into their free slots, instead of an eager step and a capture at every
    size (8 rows of mixed presets: 3 captures in 26 steps, against 8), and every output is the one it has alone."""
    presets = ["GGGG", "FSGK", "KKKK", "SSSS"]
    engine = Engine(model, max_batch=8, prefill_chunk=64)
    engine.runner.cuda_graphs = True
    reqs = [
        engine.submit([1 + i, 2, 3], presets[i % 4], SamplingParams(max_tokens=6 + 3 * i, stop_token_ids=()))
        for i in range(8)
    ]
    engine.run()
    assert stand_in_graphs.captured <= 3 and stand_in_graphs.replays >= 20
    for i, req in enumerate(reqs):
        assert req.output == alone(model, [1 + i, 2, 3], presets[i % 4], 6 + 3 * i), i


def test_padded_replay_never_writes_a_taken_slot(model, stand_in_graphs):
    """A slot freed by an ended request and taken by a new one (still reading its prompt) must not receive a padded
    row's dummy write: the batch then captures its new size instead, and the newcomer's output is its own."""
    engine = Engine(model, max_batch=3, prefill_chunk=2)  # a 7-token prompt reads over 4 steps
    engine.runner.cuda_graphs = True
    prompts = [[5, 6, 7], [8, 9, 10], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26]]
    lengths = [4, 12, 12, 6]
    reqs = [
        engine.submit(p, "GGGG", SamplingParams(max_tokens=n, stop_token_ids=()))
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
    ]
    engine.run()
    for req, prompt, n in zip(reqs, prompts, lengths, strict=True):
        assert req.output == alone(model, prompt, "GGGG", n)


def test_a_block_change_made_once_reaches_the_model_and_the_engine(model, monkeypatch):
    """The engine runs the model's own block loop (Supernet.forward with a mixer dispatch), so one change to
    Block.forward -- here each block's update scaled by a half -- reaches Supernet.forward and a mixed engine batch
    alike: both move away from the unchanged model's logits, and the engine still equals the model, row by row."""
    from gearshift.model import Block

    prompts, placements = [[5, 6, 7, 8, 9], [3, 1, 4, 1, 5]], ["FSGK", "GKFS"]  # rows of different mixers per layer
    tokens = torch.tensor(prompts)
    positions = torch.arange(tokens.shape[1])[None].expand(2, -1)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            alone = torch.cat([model(tokens[i : i + 1], placements[i]) for i in range(2)])
        engine = Engine(model, max_batch=2)  # fresh pools: the prompts' first chunk
        reqs = [engine.submit(p, pl, SamplingParams(max_tokens=1)) for p, pl in zip(prompts, placements, strict=True)]
        engine.scheduler._admit()
        batched, _ = engine.runner.mixed_forward(
            tokens, positions, [r.placement for r in reqs], [r.slots for r in reqs], fresh=True
        )
        return alone, batched

    before, engine_before = both()
    original = Block.forward

    def half_update(self, h, mixer, ctx=None, cache=None):
        out, m = original(self, h, mixer, ctx, cache)
        return h + 0.5 * (out - h), m

    monkeypatch.setattr(Block, "forward", half_update)
    after, engine_after = both()
    torch.testing.assert_close(engine_before, before, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(engine_after, after, atol=1e-4, rtol=1e-4)
    assert (after - before).abs().max() > 0.1  # the change is visible ...
    torch.testing.assert_close(engine_after - engine_before, after - before, atol=1e-4, rtol=1e-4)  # ... alike


def test_engine_config_is_frozen_and_built_from_keywords(model):
    """Engine options live in a frozen EngineConfig; keyword options build it (and override a given one); the
    group-streams default is the environment's switch, read when the engine is built."""
    import dataclasses

    from gearshift import envs
    from gearshift.serve.engine import EngineConfig

    config = EngineConfig(max_batch=3, prefill_chunk=5, placements=["FSGK", "GGGG"])
    engine = Engine(model, config)
    assert engine.engine_config == config and (engine.max_batch, engine.prefill_chunk) == (3, 5)
    assert Engine(model, max_batch=3, prefill_chunk=5, placements=["FSGK", "GGGG"]).engine_config == config
    assert Engine(model, config, max_batch=2).engine_config == dataclasses.replace(config, max_batch=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_batch = 4
    with pytest.raises(ValueError, match="prefill_chunk"):
        EngineConfig(prefill_chunk=0)
    with pytest.raises(TypeError):
        Engine(model, max_bach=2)
    with envs.override(GROUP_STREAMS=0):
        assert not EngineConfig().streams() and EngineConfig(group_streams=True).streams()
    with envs.override(GROUP_STREAMS="auto"):
        assert EngineConfig().streams() and not EngineConfig(group_streams=False).streams()
    assert not engine.runner.group_streams  # CUDA only


def test_start_synthetic_gives_rows_a_long_context_of_state(model):
    """Benchmarks start rows as if they had read ``context`` tokens: the rows then decode from that position, and
    asking for more rows than the pools hold, or a context beyond the engine's, is an error."""
    engine = Engine(model, max_batch=2, max_context=40, placement_slots={"FSGK": 2})
    params = SamplingParams(max_tokens=3, stop_token_ids=())
    reqs = [engine.submit([1, 2], "FSGK", params) for _ in range(2)]
    engine.start_synthetic(reqs, 30)
    assert all(len(r.prompt) == 30 and r.processed == 29 for r in reqs)
    engine.run()
    assert all(len(r.output) == 3 for r in reqs)
    assert all(len(pool.alloc.free) == 2 for layer in engine.pools for pool in layer.values() if hasattr(pool, "alloc"))
    more = [engine.submit([1, 2], "FSGK", params) for _ in range(3)]
    with pytest.raises(RuntimeError, match="only 2 of 3 requests fit"):
        engine.start_synthetic(more, 30)
    for r in more:
        engine.cancel(r)
    engine.run()
    late = engine.submit([1, 2], "FSGK", params)
    with pytest.raises(ValueError, match="context 41"):
        engine.start_synthetic([late], 41)
