"""The fused (torch.compile) inference paths: each body traces as one graph, and compiled decoding equals eager."""

import pytest
import torch

from gearshift.config import SupernetConfig
from gearshift.model import Supernet
from gearshift.ops import fused
from gearshift.ops.attention import chunk_softmax, merge_chunks
from gearshift.ops.conv import conv_step
from gearshift.serve.engine import Engine, SamplingParams


def _cases():
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    bf = torch.bfloat16
    return [
        (fused.rms_norm, (r(3, 1, 16, dtype=bf), r(16, dtype=bf), 1e-5)),
        (fused.l2norm, (r(3, 1, 2, 8, dtype=bf),)),
        (fused.gated_rms_norm, (r(3, 1, 2, 8, dtype=bf), r(8, dtype=bf), r(3, 1, 2, 8, dtype=bf), 1e-6, "silu")),
        (fused.gated_rms_norm, (r(3, 1, 2, 8), r(8), r(3, 1, 2, 8), 1e-6, "sigmoid")),
        (fused.gated_activation, (r(3, 1, 16, dtype=bf), r(3, 1, 16, dtype=bf), "silu")),
        (fused.decay_gates, (r(3, 1, 4, dtype=bf), r(3, 1, 4, dtype=bf), r(4), r(4))),
        (fused.decay_gates, (r(3, 1, 2, 8), r(3, 1, 2), r(2, 1), r(2, 8))),
        (fused.apply_rope, (r(3, 2, 1, 8, dtype=bf), r(3, 1, 1, 8, dtype=bf), r(3, 1, 1, 8, dtype=bf))),
        (conv_step, (r(3, 1, 12, dtype=bf), r(12, 1, 4), r(3, 3, 12, dtype=bf))),
        (chunk_softmax, (r(2, 2, 3, 4, 8), r(2, 1, 3, 4, 8) > 0, 0.25, bf)),
        (merge_chunks, (r(2, 2, 3, 4, 8), r(2, 2, 3, 4, 1), r(2, 2, 3, 4, 1).abs())),
    ]


@pytest.mark.parametrize("fn,args", _cases(), ids=lambda v: getattr(v, "__name__", ""))
def test_fused_bodies_trace_as_one_graph(fn, args):
    """fullgraph=True fails on any graph break: the compiled path is one piece (dynamo only, no code generation)."""
    traced = torch.compile(fn.eager, backend="eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        got, want = traced(*args), fn.eager(*args)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fusion_runs_only_for_inference_where_enabled(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("GEARSHIFT_COMPILE", "auto")
    with torch.no_grad():
        assert not fused.fusion_active(cuda)  # eager calls on CUDA: only graph captures and their warm-ups fuse
        with fused.fusion(True):
            assert fused.fusion_active(cuda) and not fused.fusion_active(cpu)
            with fused.fusion(False):
                assert not fused.fusion_active(cuda)
        with fused.fusion(False), fused.fusion(True):  # an outer "off" (a benchmark) wins over an engine's "on"
            assert not fused.fusion_active(cuda)
    with fused.fusion(True):
        assert not fused.fusion_active(cuda)  # gradients on: training keeps the eager bodies
    monkeypatch.setenv("GEARSHIFT_COMPILE", "0")
    with torch.no_grad():
        assert not fused.fusion_active(cuda)
    monkeypatch.setenv("GEARSHIFT_COMPILE", "1")
    with torch.no_grad():
        assert fused.fusion_active(cpu)


def test_compiled_decoding_equals_eager(monkeypatch, recwarn):
    """Every fused body compiled by inductor (on the CPU here; on CUDA in benchmarks/engine_graphs.py): a batch that
    mixes all four mixers decodes the eager tokens (greedy, and sampled with a seed), and a forward's logits equal
    the eager ones to rounding."""
    cfg = SupernetConfig.tiny(num_layers=4, vocab_size=97, window=6, eos_token_id=None)
    model = Supernet.random(cfg, seed=0, std=0.2).eval()
    prompts = [[5, 6, 7, 8, 9], [20, 21, 22], [30, 31, 32, 33], [40], [3, 1, 4]]
    placements = ["FFFF", "SSSS", "GGGG", "KKKK", "FSGK"]
    params = SamplingParams(max_tokens=6, stop_token_ids=())
    ids = torch.tensor([prompts[0] * 2])

    def run():
        with torch.no_grad():
            logits = [model(ids, p) for p in placements]
        engine = Engine(model, max_batch=8, max_context=32)
        greedy = engine.generate(prompts, placements, params)
        sampled = SamplingParams(max_tokens=6, stop_token_ids=(), temperature=0.8, top_p=0.9, seed=3)
        return greedy + engine.generate(prompts, placements, sampled), logits

    eager, eager_logits = run()
    monkeypatch.setenv("GEARSHIFT_COMPILE", "1")
    compiled, compiled_logits = run()
    assert not [w for w in recwarn if "torch.compile of" in str(w.message)]  # no body fell back to eager
    assert compiled == eager
    for a, b in zip(compiled_logits, eager_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
