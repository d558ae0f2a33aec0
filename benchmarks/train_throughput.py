"""Training throughput: tokens/s, MFU, peak memory and kernel launches per step, beside the plain HF step.

Cells: a shape (the SmolLM2 supernet: 30 layers, hidden 576, 9/3 heads of 64, MLP 1536, vocabulary 49152, tied;
or ``small-1b``) x tokens per sequence (2k with 16 rows, 8k with 4: 32k tokens a step) x a variant:

    distill         gearshift's distillation step (teacher forward included), the fast path (what the trainer does
                    by default on CUDA): compiled blocks, fla varlen kernels (GDN through KDA's where GDN's backward
                    is unusable), the fused chunked loss; every row one document, like the HF step
    distill-packed  the same on rows packed with documents (mean length a quarter of a row): flex attention, the
                    kernels' cu_seqlens, per-document positions
    distill-before  the path before these changes: eager blocks, GDN on the PyTorch chunk form, materialised
                    logits, rows without document boundaries (KDA on fla's varlen kernel, the same kernel as before)
    align, align-before   layer-local alignment, fast and before
    hf-eager, hf-compiled  the anchor: transformers' LlamaForCausalLM of the same shape, every weight trainable,
                    bf16 autocast, SDPA, fused AdamW; eager and torch.compile'd

Each cell: warm-up steps (compilation), timed steps (mean and standard error of the step time), one profiled step
(CUDA kernels launched), peak memory. MFU = the step's model FLOPs (gearshift.train.flops: forward of every active
weight, backward through the activations, weight gradients only for what trains, the teacher's forward; attention
by the real document lengths) / step time / 790 TFLOP/s. ``loss_check``: the fast path's losses against the
PyTorch path's (PyTorch delta rule, dense masks, eager, materialised logits) on the same packed batch and placement.
The JSON is rewritten after every cell; cells left when ``--budget-s`` runs out are listed as skipped.

    python benchmarks/train_throughput.py --quick --out results/train_throughput.json   # ~6 min on the H200
    python benchmarks/train_throughput.py --out results/train_throughput_full.json      # every cell
    python benchmarks/train_throughput.py --device cpu --shape tiny --seq 64 --rows 2 --steps 1 --out x.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import statistics
import time

import numpy as np
import torch

from gearshift import envs
from gearshift.config import LayerConfig, SupernetConfig
from gearshift.model import Supernet
from gearshift.ops import dispatch
from gearshift.ops.compiled import compilation
from gearshift.train.config import config_from_dict
from gearshift.train.flops import BF16_PEAK_FLOPS, pass_flops
from gearshift.train.rows import pack
from gearshift.train.trainer import Trainer

from common import device_name, sync, write_json


def shape_config(name: str, window: int) -> SupernetConfig:
    if name == "smollm2":
        return SupernetConfig.uniform(
            num_layers=30, hidden_size=576, vocab_size=49152, heads=9, kv_heads=3, head_dim=64,
            intermediate_size=1536, window=window, tie_word_embeddings=True, max_position_embeddings=8192,
            rope_theta=100000.0,
        )  # fmt: skip
    if name == "small-1b":
        return SupernetConfig.small_1b(window=window)
    if name == "tiny":
        return SupernetConfig.tiny(num_layers=2, vocab_size=256, window=window)
    raise ValueError(f"unknown shape {name!r}")


QUICK = [  # (shape, tokens per sequence, rows, variant), in order of importance: the goals first
    ("smollm2", 2048, 16, "distill"),
    ("smollm2", 2048, 16, "hf-eager"),
    ("smollm2", 2048, 16, "hf-compiled"),
    ("smollm2", 2048, 16, "loss-check"),
    ("smollm2", 8192, 4, "distill"),
    ("smollm2", 8192, 4, "hf-eager"),
    ("small-1b", 8192, 4, "distill"),
    ("small-1b", 8192, 4, "hf-eager"),
    ("smollm2", 2048, 16, "distill-before"),
    ("smollm2", 2048, 16, "align"),
    ("smollm2", 8192, 4, "hf-compiled"),
    ("small-1b", 8192, 4, "hf-compiled"),
    ("smollm2", 2048, 16, "distill-packed"),
    ("smollm2", 8192, 4, "align"),
]
VARIANTS = ["distill", "hf-eager", "hf-compiled", "loss-check", "distill-before", "align", "align-before",
            "distill-packed"]  # fmt: skip
FULL = [
    (shape, seq, rows, v)
    for shape in ("smollm2", "small-1b")
    for seq, rows in ((2048, 16), (8192, 4))
    for v in VARIANTS
    if not (v == "loss-check" and (shape, seq) != ("smollm2", 2048))
]


def random_rows(vocab: int, seq: int, rows: int, doc_len: int, seed: int = 0):
    """Packed rows of random tokens: documents of ``doc_len`` tokens on average (lognormal), or one per row (0)."""
    rng = np.random.default_rng(seed)
    n = rows * seq + 1
    if doc_len <= 0:  # one document cut into rows: each row is one sequence
        return pack([(rng.integers(0, vocab, n), np.ones(n, bool))], seq)
    lengths = []
    while sum(lengths) < n:
        lengths.append(max(1, int(rng.lognormal(math.log(doc_len), 0.75))))
    return pack([(rng.integers(0, vocab, k), np.ones(k, bool)) for k in lengths], seq)


def make_trainer(cfg: SupernetConfig, mode: str, rows, seq: int, batch: int, device, fast: bool) -> Trainer:
    train = config_from_dict({
        "model": "<random>", "output": "/tmp/gearshift-train-throughput", "mode": mode,
        "data": {"train": ["<random>"], "seq_len": seq},
        "optim": {"steps": 10_000, "batch_size": batch, "warmup_steps": 1, "compile": "auto" if fast else "off"},
        "loss": {"activation": 0.5, "reverse_kl": 1.0, "forward_kl": 0.5}, "eval": {"every": 0},
        "checkpoint": {"every": 0},
    })  # fmt: skip
    model = Supernet.random(cfg, seed=0, device=device, dtype=torch.float32)
    trainer = Trainer(train, device=str(device), model=model, rows=rows, eval_rows=rows[:1], log=lambda *a: None)
    if not fast:
        trainer.fused_loss = trainer.packed = False
    return trainer


def hf_step(cfg: SupernetConfig, seq: int, rows: int, device, compiled: bool):
    """The anchor: a plain HF Llama training step of the same shape, and its FLOPs (6WT + 3A)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    attn = cfg.layers[0].mixers["attention"]
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.layers[0].mlp.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=attn.heads, num_key_value_heads=attn.head_groups,
        head_dim=attn.head_size, max_position_embeddings=max(seq, cfg.max_position_embeddings),
        tie_word_embeddings=cfg.tie_word_embeddings, rope_theta=attn.rope.theta, attn_implementation="sdpa",
    )  # fmt: skip
    with torch.device(device):  # initialised where it trains
        model = LlamaForCausalLM(hf_cfg)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    run = torch.compile(model) if compiled else model
    ids = torch.randint(0, cfg.vocab_size, (rows, seq), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    layers = [LayerConfig({"attention": layer.mixers["attention"]}, "attention", layer.mlp) for layer in cfg.layers]
    attention_only = cfg.replace(layers=tuple(layers))
    with torch.device("meta"):
        flops = pass_flops(Supernet(attention_only), "all-attention", [seq] * rows).total  # everything trains
    return step, flops, (model, optimizer, run)


def kernel_launches(step, device) -> int | None:
    """CUDA kernels one step launches (torch.profiler; copies and memsets included)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync(device)
    return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")


def measure(step, flops_of_step, tokens: int, device, warmup: int, steps: int) -> dict:
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, flops = [], []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
        flops.append(flops_of_step())
    mean = statistics.fmean(times)
    se = statistics.stdev(times) / math.sqrt(len(times)) if len(times) > 1 else float("nan")
    row = {
        "warmup_s": warm_s,
        "steps": steps,
        "step_ms": mean * 1e3,
        "step_ms_se": se * 1e3,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / mean,
        "flops_per_step": statistics.fmean(flops),
        "mfu": statistics.fmean(flops) / mean / BF16_PEAK_FLOPS if device.type == "cuda" else None,
    }
    if device.type == "cuda":
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    row["kernel_launches"] = kernel_launches(step, device)
    return row


@contextlib.contextmanager
def before_changes():
    """The training path before this work: GDN on the eager PyTorch chunk form, nothing compiled."""
    with envs.override(GDN_VIA_KDA=False), compilation(False):
        yield


def run_cell(shape: str, seq: int, rows: int, variant: str, args, device) -> dict:
    cfg = shape_config(shape, args.window)
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, seq))
    tokens = seq * rows
    if variant.startswith("hf-"):
        step, flops, keep = hf_step(cfg, seq, rows, device, variant == "hf-compiled")
        return measure(step, lambda: flops, tokens, device, args.warmup, args.steps)
    if variant == "loss-check":
        return loss_check(cfg, seq, rows, device)
    mode = "align" if variant.startswith("align") else "distill"
    before = variant.endswith("-before")
    doc_len = seq // 4 if variant == "distill-packed" else 0
    data = random_rows(cfg.vocab_size, seq, rows * (args.warmup + args.steps + 2), doc_len)
    with before_changes() if before else contextlib.nullcontext():
        trainer = make_trainer(cfg, mode, data, seq, rows, device, fast=not before)
        warmup, steps = (1, max(2, args.steps // 2)) if before else (args.warmup, args.steps)
        row = measure(trainer.train_step, lambda: trainer.step_flops.total, tokens, device, warmup, steps)
        row["compiled"] = trainer.compile
        row["kernels"] = trained_kernels(cfg, device)
        if doc_len:
            row["documents_per_row"] = sum(len(set(r)) for r in data.documents) / len(data)
    row["kernel_checks"] = dispatch.kernel_gradient_checks()
    return row


def trained_kernels(cfg: SupernetConfig, device) -> dict | None:
    """Which fla kernel trained GDN and KDA layers here (None: the PyTorch path)."""
    if device.type != "cuda":
        return None
    gdn, kda = cfg.layers[0].mixers["gdn"], cfg.layers[0].mixers["kda"]
    return {
        "gdn": dispatch.training_kernel(device, False, (gdn.key_heads, gdn.value_heads, gdn.key_head_dim)),
        "kda": dispatch.training_kernel(device, True, (kda.heads, kda.heads, kda.head_dim)),
    }


def loss_check(cfg: SupernetConfig, seq: int, rows: int, device) -> dict:
    """The fast path's losses against the PyTorch path's (eager, PyTorch delta rule, dense masks, materialised
    logits) on one packed batch and a placement using every mixer, gradients on (the training kernels run, the
    compiled graphs of the distill cell are reused) and bf16 autocast on both."""
    data = random_rows(cfg.vocab_size, seq, rows, seq // 4, seed=1)
    trainer = make_trainer(cfg, "distill", data, seq, rows, device, fast=True)
    kinds = ["attention", "sliding_window", "gdn", "kda"]
    placement = [kinds[i % 4] for i in range(cfg.num_layers)]
    tokens, mask, documents, _ = trainer._batch(data, list(range(rows)))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    out = {}
    for name in ("pytorch", "fast"):
        fast = name == "fast"
        trainer.compile = trainer.student.compile_blocks = trainer.teacher.compile_blocks = (
            fast and device.type == "cuda"
        )
        trainer.fused_loss = fast
        with envs.override(FLEX=fast), dispatch.use_backend("auto" if fast else "torch"), compilation(fast):
            t_out, t_acts = trainer.teacher_pass(inputs, documents)
            with trainer.autocast():
                loss, terms, _ = trainer.pass_losses(inputs, targets, mask, documents, placement, t_out, t_acts)
        terms = dict(zip(["act", "fkl", "rkl", "ce"], terms.tolist(), strict=True))
        out[name] = {"loss": float(loss.detach()), **terms}
        del loss, terms, t_out, t_acts
    ref, fast = out["pytorch"], out["fast"]
    out["relative_difference"] = {k: abs(fast[k] - ref[k]) / max(abs(ref[k]), 1e-12) for k in ("loss", "act", "fkl",
                                  "rkl")}  # fmt: skip
    out["within_bf16_noise"] = all(v < 0.02 for v in out["relative_difference"].values())
    out["documents"] = len(documents.lengths)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="the cells of QUICK (the lead's one-call check)")
    ap.add_argument("--shape", nargs="*", help="limit to these shapes (smollm2, small-1b; tiny for a smoke run)")
    ap.add_argument("--seq", type=int, nargs="*", help="limit to these sequence lengths (with --shape tiny: any)")
    ap.add_argument("--rows", type=int, default=None, help="rows per step (default: 16 at 2k, 4 at 8k)")
    ap.add_argument("--variants", nargs="*", default=None, help=f"limit to these of {VARIANTS}")
    ap.add_argument("--window", type=int, default=1024, help="sliding window of the supernet's SWA mixers")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=0, help="skip the remaining cells after this long (0: never)")
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.quick and not args.budget_s:
        args.budget_s = 420
    cells = QUICK if args.quick else FULL
    if args.shape and "tiny" in args.shape:
        cells = [("tiny", s, args.rows or 2, v) for s in (args.seq or [64]) for v in VARIANTS if v != "hf-compiled"]
    cells = [
        (sh, s, args.rows or r, v)
        for sh, s, r, v in cells
        if (not args.shape or sh in args.shape) and (not args.seq or s in args.seq)
        and (args.variants is None or v in args.variants)
    ]  # fmt: skip
    report = {"device": device_name(device), "window": args.window, "peak_flops": BF16_PEAK_FLOPS, "cells": []}
    start = time.perf_counter()
    for shape, seq, rows, variant in cells:
        cell = {"shape": shape, "seq": seq, "rows": rows, "variant": variant}
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            cell["skipped"] = "time budget"
        else:
            t0 = time.perf_counter()
            try:
                cell.update(run_cell(shape, seq, rows, variant, args, device))
            except torch.OutOfMemoryError as exc:
                cell["error"] = f"out of memory: {exc}"[:300]
            except Exception as exc:  # noqa: BLE001 - record it and go on to the next cell
                cell["error"] = f"{type(exc).__name__}: {exc}"[:500]
            cell["cell_s"] = time.perf_counter() - t0
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report["cells"].append(cell)
        print(format_cell(cell), flush=True)
        add_ratios(report["cells"])
        write_json(args.out, report)
    print(table(report["cells"]))
    print(f"wrote {args.out}")


def add_ratios(cells: list[dict]) -> None:
    """Each gearshift cell's tokens/s as a fraction of the eager and compiled HF step at the same shape and length."""
    for cell in cells:
        for hf in ("hf-eager", "hf-compiled"):
            ref = next((c for c in cells if c["variant"] == hf and c["shape"] == cell["shape"] and c["seq"] ==
                        cell["seq"] and "tokens_per_s" in c), None)  # fmt: skip
            if ref and "tokens_per_s" in cell and not cell["variant"].startswith("hf"):
                cell[f"of_{hf.replace('-', '_')}"] = cell["tokens_per_s"] / ref["tokens_per_s"]


def format_cell(cell: dict) -> str:
    head = f"{cell['shape']:>8} {cell['seq']:>5} x {cell['rows']:<3} {cell['variant']:<15}"
    if "skipped" in cell or "error" in cell:
        return f"{head} {cell.get('skipped') or cell.get('error')}"
    if cell["variant"] == "loss-check":
        rel = cell["relative_difference"]
        return (
            f"{head} loss fast {cell['fast']['loss']:.4f} vs PyTorch {cell['pytorch']['loss']:.4f}: "
            + ", ".join(f"{k} {v:.2e}" for k, v in rel.items())
            + f" -> within bf16 noise: {cell['within_bf16_noise']}"
        )
    mfu = "" if cell["mfu"] is None else f" MFU {100 * cell['mfu']:5.1f}%"
    mem = f" peak {cell['peak_memory_gb']:5.1f} GB" if "peak_memory_gb" in cell else ""
    launches = "" if cell["kernel_launches"] is None else f" {cell['kernel_launches']:>7} launches"
    return (
        f"{head} {cell['tokens_per_s']:>9.0f} tok/s ({cell['step_ms']:.0f} +- {cell['step_ms_se']:.0f} ms, "
        f"n={cell['steps']}){mfu}{mem}{launches}"
    )


def table(cells: list[dict]) -> str:
    header = "| shape | seq x rows | variant | tokens/s | MFU | of HF eager | of HF compiled | peak GB | launches |"
    lines = ["", header, "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        if "tokens_per_s" not in c:
            continue
        pct = lambda x: "" if x is None else f"{100 * x:.1f}%"  # noqa: E731
        lines.append(
            f"| {c['shape']} | {c['seq']} x {c['rows']} | {c['variant']} | {c['tokens_per_s']:.0f} | {pct(c['mfu'])} | "
            f"{pct(c.get('of_hf_eager'))} | {pct(c.get('of_hf_compiled'))} | {c.get('peak_memory_gb', 0):.1f} | "
            f"{c['kernel_launches']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
