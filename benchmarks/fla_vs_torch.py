"""Verify the CUDA fast paths against the pure-PyTorch path: fla kernels (GDN, KDA) and CUDA-graph decoding.

For realistic shapes (head dim 128, 4k-32k tokens) it prints and saves the max abs difference between the two
paths, for one layer's output (prefill, then decode steps through the cache) and for the final logits of a
small multi-layer supernet, in bf16 and fp32; plus the time of each path.

    python benchmarks/fla_vs_torch.py --out benchmarks/results/fla_vs_torch.json
"""

from __future__ import annotations

import argparse
import copy

import torch

from gearshift.config import SupernetConfig
from gearshift.layers.base import StepContext
from gearshift.model import Supernet
from gearshift.ops.dispatch import use_backend

from common import device_name, time_it, write_json


def layer_check(kind: str, t: int, dtype: torch.dtype, device: torch.device, decode_steps: int = 8) -> dict:
    cfg = SupernetConfig.uniform(
        num_layers=1,
        hidden_size=4096,
        vocab_size=128,
        heads=32,
        kv_heads=8,
        head_dim=128,
        intermediate_size=128,
        mixers=(kind,),
        main_mixer=kind,
    )
    model = Supernet.random(cfg, seed=0, device=device, dtype=dtype)
    layer = model.blocks[0].mixer.mixers[kind]
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, t + decode_steps, cfg.hidden_size, device=device, dtype=dtype, generator=gen)
    outs, times = {}, {}
    for backend in ("torch", "fla"):
        with use_backend(backend), torch.no_grad():
            cache = layer.new_cache()
            idx = torch.arange(t, device=device)
            ctx = StepContext(idx, idx[None])
            prefill = layer(x[:, :t], ctx, cache)
            steps = []
            for i in range(decode_steps):
                j = torch.tensor([t + i], device=device)
                steps.append(layer(x[:, t + i : t + i + 1], StepContext(j, j[None]), cache))
            outs[backend] = (prefill.float(), torch.cat(steps, 1).float())

            def run(ctx=ctx):
                with torch.no_grad():
                    layer(x[:, :t], ctx, layer.new_cache())

            times[backend] = time_it(run, device, iters=3, warmup=1)
    (tp, td), (fp, fd) = outs["torch"], outs["fla"]
    scale = tp.abs().max().item()
    return {
        "kind": kind,
        "tokens": t,
        "dtype": str(dtype).removeprefix("torch."),
        "prefill_max_abs_diff": (tp - fp).abs().max().item(),
        "decode_max_abs_diff": (td - fd).abs().max().item(),
        "output_max_abs": scale,
        "torch_prefill_ms": times["torch"] * 1e3,
        "fla_prefill_ms": times["fla"] * 1e3,
    }


def logits_check(placement: str, t: int, dtype: torch.dtype, device: torch.device) -> dict:
    cfg = SupernetConfig.uniform(
        num_layers=4,
        hidden_size=2048,
        vocab_size=32000,
        heads=16,
        kv_heads=4,
        head_dim=128,
        intermediate_size=5632,
        window=1024,
        max_position_embeddings=65536,
    )
    model = Supernet.random(cfg, seed=0, device=device, dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, t), device=device, generator=torch.Generator(device).manual_seed(2))
    out = {}
    for backend in ("torch", "fla"):
        with use_backend(backend), torch.no_grad():
            out[backend] = model(ids, placement).float()
    a, b = out["torch"], out["fla"]
    return {
        "placement": placement,
        "tokens": t,
        "dtype": str(dtype).removeprefix("torch."),
        "logits_max_abs_diff": (a - b).abs().max().item(),
        "logits_max_abs": a.abs().max().item(),
        "argmax_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
    }


def graph_check(device: torch.device, dtype: torch.dtype) -> dict:
    """CUDA-graph decode vs eager decode from the same prefilled cache: logits of 16 steps."""
    from gearshift.cuda_graphs import GraphDecoder

    cfg = SupernetConfig.uniform(
        num_layers=4,
        hidden_size=1024,
        vocab_size=4096,
        heads=8,
        kv_heads=2,
        head_dim=128,
        intermediate_size=2048,
        window=64,
        max_position_embeddings=4096,
    )
    model = Supernet.random(cfg, seed=0, device=device, dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 200), device=device)
    nxt = torch.randint(0, cfg.vocab_size, (3, 16), device=device)
    results = {}
    for placement in ("FFFF", "SSSS", "GGGG", "KKKK", "FSGK"):
        with torch.no_grad():
            cache = model.new_cache(3, placement)
            model(ids, cache=cache)
            twin = copy.deepcopy(cache)
            eager = torch.cat([model(nxt[:, i : i + 1], cache=cache)[:, -1:] for i in range(16)], 1)
            runner = GraphDecoder(model, twin, capacity=200 + 16)
            graph = torch.stack([runner.step(nxt[:, i]).clone() for i in range(16)], 1)
        results[placement] = (eager.float() - graph.float()).abs().max().item()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--logit-tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--out", default="benchmarks/results/fla_vs_torch.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    layers, logits = [], []
    for dtype in (torch.bfloat16, torch.float32):
        for kind in ("gdn", "kda"):
            for t in args.tokens:
                try:
                    r = layer_check(kind, t, dtype, device)
                except Exception as exc:  # noqa: BLE001 - record, e.g. an fp32 kernel that fla lacks
                    r = {"kind": kind, "tokens": t, "dtype": str(dtype), "error": repr(exc)[:300]}
                layers.append(r)
                print(r, flush=True)
        for placement in ("GGGG", "KKKK", "FSGK"):
            for t in args.logit_tokens:
                try:
                    r = logits_check(placement, t, dtype, device)
                except Exception as exc:  # noqa: BLE001
                    r = {"placement": placement, "tokens": t, "dtype": str(dtype), "error": repr(exc)[:300]}
                logits.append(r)
                print(r, flush=True)
    graphs = {str(d): graph_check(device, d) for d in (torch.float32, torch.bfloat16)}
    print("graph vs eager max abs diff:", graphs)
    write_json(args.out, {"device": device_name(device), "layers": layers, "logits": logits, "graph_vs_eager": graphs})


if __name__ == "__main__":
    main()
