"""Serving a supernet distilled from SmolLM2-135M-Instruct: self-speculative decoding and trace throughput.

(1) spec: greedy chat completions through the serving engine, plain vs self-speculative (the target placement
verifies, a cheaper placement of the same supernet drafts), one request at a time (batch 1: latency) and all
prompts at once (batch N); ``Supernet.generate`` one prompt at a time as a reference. Per draft and k (the draft
length the engine starts at and never exceeds; it lowers it per request while acceptance is poor): tokens/s and
speed-up, acceptance (accepted / proposed), accepted draft tokens and emitted tokens per verify round, and the
fraction of requests whose output equals the plain one token for token (exact in fp32; in bf16 a near-tie can
flip a greedy argmax, so it is reported, not asserted).
(2) traces: sampled generation (temperature 0.7, top-p 0.95, no stop tokens: every row emits exactly
--trace-tokens) with Hugging Face ``generate`` on the teacher (or, when it does not load, a Llama of the same
shape rebuilt from the checkpoint), the engine, and ``Supernet.generate`` (the path of ``gearshift traces``, CUDA
graphs on GPU), same prompts and device.
Every measurement is warmed up first; a failing one is recorded as an error and the run goes on. The JSON is
rewritten after every measurement, so a run killed at a time limit keeps what it finished. The whole default
run can exceed 10 minutes on a GPU: split it with --skip-traces / --skip-spec / --ks.

    python benchmarks/serve_smollm2.py runs/pipeline/run/final --out benchmarks/results/serve_smollm2_h200.json
    python benchmarks/serve_smollm2.py runs/pipeline/run/final --skip-traces --ks 4 --out spec_k4.json
    python benchmarks/serve_smollm2.py runs/pipeline/run/final --skip-spec --out traces.json
    python benchmarks/serve_smollm2.py /tmp/smol-supernet --device cpu --prompts 2 --max-tokens 8 --ks 2 \\
        --trace-batches 2 --trace-tokens 8 --out /tmp/serve_smoke.json   # smoke run
"""

from __future__ import annotations

import argparse
import os
import time
import traceback
from functools import partial
from itertools import cycle, islice

import torch

from gearshift import envs
from gearshift.checkpoint import load_tokenizer
from gearshift.generation import pad_left
from gearshift.model import Supernet
from gearshift.ops.fused import fusion
from gearshift.placement import placement_letters
from gearshift.serve.engine import Engine, SamplingParams
from gearshift.train.teacher import load_teacher
from gearshift.train.traces import Prompt, encode_prompt, read_prompts

from common import device_name, profile_cuda, sync, write_json

PROMPTS = [
    "Write a short paragraph about photosynthesis.",
    "Explain black holes to a ten-year-old.",
    "List three interesting facts about honey bees.",
    "What are the advantages and disadvantages of electric cars?",
    "Give a brief history of the printing press.",
    "Write a short story about a robot who learns to paint.",
    "How do I make a cup of green tea?",
    "Write a Python function that checks whether a number is prime.",
    "What is the capital of Australia, and why was it chosen?",
    "Summarize the causes of the French Revolution in a few sentences.",
    "Translate 'Good morning, how are you?' into French and Spanish.",
    "Write a haiku about the ocean and explain it.",
    "What should a beginner know before running a marathon?",
    "Compare cats and dogs as pets.",
    "Explain what inflation is in simple words.",
    "Give step-by-step instructions for planting tomatoes.",
]


def save(out: str, report: dict) -> None:
    """write_json through a temporary file: a run killed mid-write keeps the previous complete JSON."""
    write_json(out + ".tmp", report)
    os.replace(out + ".tmp", out)


def measure(report: dict, rows: list, row: dict, out: str, fn, *args) -> dict:
    """Append ``row`` updated with fn(*args)'s stats or the error, and rewrite the JSON (unattended runs: a failure
    must not stop the next measurement, a kill must not lose the finished ones)."""
    rows.append(row)
    try:
        row |= fn(*args)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        row["error"] = f"{type(exc).__name__}: {exc}"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    save(out, report)
    return row


def run_engine(
    model, prompts, placement, params, *, batch, draft=None, k=4, warmup=True, graphs=False
) -> tuple[dict, list]:
    """All prompts through a fresh engine holding ``batch`` requests at a time: (stats row, outputs)."""
    if warmup:  # first calls compile kernels (Triton) and fill the allocator's caches
        short = SamplingParams(**{**vars(params), "max_tokens": min(8, params.max_tokens)})
        run_engine(model, prompts[:batch], placement, short, batch=batch, draft=draft, k=k, warmup=False, graphs=graphs)
    context = min(max(map(len, prompts)) + params.max_tokens + k + 2, model.config.max_position_embeddings)
    slots = 2 * batch if draft is not None else batch  # a draft may use the same (layer, mixer) pools as its target
    engine = Engine(
        model,
        max_batch=batch,
        max_context=context,
        max_queue=len(prompts),
        spec_k_max=k,
        pool_slots=slots,
        cuda_graphs=graphs,
    )
    reqs = [engine.submit(p, placement, params, draft=draft, spec_k=k) for p in prompts]
    sync(model.device)
    t0 = time.perf_counter()
    engine.run()
    sync(model.device)
    seconds = time.perf_counter() - t0
    tokens, rounds = sum(len(r.output) for r in reqs), sum(r.rounds for r in reqs)
    row = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    if draft is not None:
        proposed, accepted = sum(r.proposed for r in reqs), sum(r.accepted for r in reqs)
        row |= {
            "acceptance": accepted / max(proposed, 1),
            "accepted_per_round": accepted / max(rounds, 1),
            "tokens_per_round": (tokens - len(reqs)) / max(rounds, 1),
            "final_k_mean": sum(r.spec_k for r in reqs) / len(reqs),
        }
    return row, [r.output for r in reqs]


def versus(row: dict, outputs: list, base: tuple[dict, list]) -> dict:
    """Speed ratio and fraction of token-for-token identical outputs against a reference run (its row, outputs)."""
    same = [a == b for a, b in zip(outputs, base[1], strict=True)]
    return {"speedup": row["tokens_per_s"] / base[0]["tokens_per_s"], "identical": sum(same) / len(same)}


def spec_run(model, prompts, target, draft, k, batch, max_tokens, plain: dict) -> dict:
    """One engine run; plain (non-speculative) runs are kept in ``plain`` to compare the speculative ones with."""
    if draft is not None and model.resolve(draft) == model.resolve(target):
        return {"skipped": "the draft is the target"}
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)  # greedy; stops at the model's EOS
    row, outputs = run_engine(model, prompts, target, params, batch=batch, draft=draft, k=k or 4)
    if draft is None:  # batch N vs batch 1: the batching gain, and how often batching alone changes a greedy output
        plain[batch] = row, outputs
        base = versus(row, outputs, plain[1]) if batch != 1 and 1 in plain else {}
        return row | {f"{key}_batch_1": value for key, value in base.items()}
    row["draft_letters"] = placement_letters(model.resolve(draft), model.config)
    return row | versus(row, outputs, plain[batch]) if batch in plain else row


def generate_run(model, prompts, target, max_tokens, plain: dict) -> dict:
    """Reference: ``Supernet.generate`` (CUDA graphs on GPU) one prompt at a time, vs the engine's plain batch 1."""
    model.generate([prompts[0]], target, max_new_tokens=8)  # warm-up
    sync(model.device)
    t0 = time.perf_counter()
    outputs = [model.generate([p], target, max_new_tokens=max_tokens)[0, len(p) :].tolist() for p in prompts]
    sync(model.device)
    seconds, tokens = time.perf_counter() - t0, sum(map(len, outputs))
    row = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    return row | versus(row, outputs, plain[1]) if 1 in plain else row


LABELS = {  # printed columns; JSON keys: speedup and identical compare with the plain run of the same batch
    "speedup": "speed-up",
    "acceptance": "accept",
    "accepted_per_round": "acc/round",
    "tokens_per_round": "tok/round",
    "identical": "identical",
    "speedup_batch_1": "vs batch 1",
    "identical_batch_1": "identical to batch 1",
}


def spec_section(model, prompts, args, report: dict) -> None:
    half = "".join("G" if i % 2 else "F" for i in range(model.config.num_layers))  # odd layers GDN, even attention
    drafts = args.drafts or ["all-gdn", "all-kda", "all-sliding_window", "half-gdn", *sorted(model.presets)]
    rows = report.setdefault("spec", [])
    for target in args.targets:
        plain: dict = {}
        batches = sorted({1, len(prompts)})
        runs = [(None, None, b) for b in batches] + [("supernet.generate", None, 1)]
        runs += [(name, k, b) for k in args.ks for name in drafts for b in batches]
        for name, k, batch in runs:
            row = {"target": target, "draft": name, "k": k, "batch": batch}
            if name == "supernet.generate":
                measure(report, rows, row, args.out, generate_run, model, prompts, target, args.max_tokens, plain)
            else:
                draft = half if name == "half-gdn" else name
                measure(report, rows, row, args.out, spec_run, model, prompts, target, draft, k, batch,
                        args.max_tokens, plain)  # fmt: skip
            line = f"{target:<14} {name or 'plain':<20} k={k or '-'!s:<2} batch {batch:<3}"
            if "tokens_per_s" in row:
                line += f" {row['tokens_per_s']:9.1f} tok/s"
                line += "".join(f"  {label} {row[key]:.2f}" for key, label in LABELS.items() if key in row)
            line += f" {row['skipped']}" if "skipped" in row else f" ERROR {row['error']}" if "error" in row else ""
            print(line, flush=True)


def hf_generate(teacher, pad, prompts, tokens) -> int:
    ids, mask = pad_left(prompts, pad, teacher.device)
    kw = dict(do_sample=True, temperature=0.7, top_p=0.95, top_k=0, pad_token_id=pad)
    with torch.no_grad():
        out = teacher.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
    return out.shape[1] - ids.shape[1]


def engine_generate(model, prompts, tokens, graphs=False) -> int:
    params = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=tokens, stop_token_ids=())  # () = no stops
    _, outputs = run_engine(model, prompts, "all-attention", params, batch=len(prompts), warmup=False, graphs=graphs)
    return min(map(len, outputs))


def supernet_generate(model, prompts, tokens) -> int:
    out = model.generate(prompts, "all-attention", max_new_tokens=tokens, temperature=0.7, top_p=0.95, eos_token_id=[])
    return out.shape[1] - max(map(len, prompts))


def timed(fn, prompts, tokens, device) -> dict:
    fn(prompts, min(4, tokens))  # warm-up: the same batch, a few tokens
    sync(device)
    t0 = time.perf_counter()
    new = fn(prompts, tokens)
    sync(device)
    seconds = time.perf_counter() - t0
    return {"tokens": new * len(prompts), "seconds": seconds, "tokens_per_s": new * len(prompts) / seconds}


def llama_from_supernet(model: Supernet):
    """A Hugging Face Llama holding the supernet's all-attention path (the teacher, up to distillation updates):
    the same shape and so the same speed, for machines where the teacher itself cannot be loaded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c, placement = model.config, model.resolve("all-attention")
    attn = c.layers[0].mixers[placement[0]]
    if attn.rope.type != "default" or attn.qkv_bias or attn.o_bias:
        raise ValueError("only bias-free attention with default rotary embeddings maps onto a plain Llama")
    llama = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=c.hidden_size,
            num_attention_heads=attn.heads,
            num_key_value_heads=attn.head_groups,
            head_dim=attn.head_size,
            intermediate_size=c.layers[0].mlp.intermediate_size,
            num_hidden_layers=c.num_layers,
            vocab_size=c.vocab_size,
            max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.norm_eps,
            rope_theta=attn.rope.theta,
            tie_word_embeddings=c.tie_word_embeddings,
        )
    )
    state = {"model.embed_tokens.weight": model.model.embed_tokens.weight, "model.norm.weight": model.model.norm.weight}
    if model.lm_head is not None:
        state["lm_head.weight"] = model.lm_head.weight
    for i, (block, name) in enumerate(zip(model.blocks, placement, strict=True)):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[f"model.layers.{i}.self_attn.{proj}.weight"] = getattr(block.mixer.mixers[name], proj).weight
        for proj in ("gate_proj", "up_proj", "down_proj"):
            state[f"model.layers.{i}.mlp.{proj}.weight"] = getattr(block.mlp, proj).weight
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"model.layers.{i}.{norm}.weight"] = getattr(block, norm).weight
    missing, unexpected = llama.load_state_dict(state, strict=False)
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise ValueError(f"weights do not map onto the Llama: {missing[:3]} {unexpected[:3]}")
    return llama


def load_hf_teacher(model, args, device, dtype, report: dict):
    """The teacher as a transformers model, else a same-shape Llama rebuilt from the supernet, else None."""
    for source in ([] if args.teacher == "supernet" else [args.teacher]) + ["supernet"]:
        try:
            if source != "supernet":
                teacher = load_teacher(source, device=device, dtype=dtype)[0]
            else:
                teacher = llama_from_supernet(model).to(device=device, dtype=dtype).eval()
            report["hf_teacher"] = source
            return teacher
        except Exception as exc:  # noqa: BLE001 - HF timing is one row of three: go on without it
            traceback.print_exc()
            report[f"teacher_error_{source}"] = f"{type(exc).__name__}: {exc}"
    return None


def trace_section(model, prompts, args, device, dtype, report: dict) -> None:
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    teacher = load_hf_teacher(model, args, device, dtype, report)
    methods = {"engine": partial(engine_generate, model), "supernet_generate": partial(supernet_generate, model)}
    if device.type == "cuda":  # the engine's decode steps replayed from CUDA graphs (Engine(cuda_graphs=True))
        methods["engine_graphs"] = partial(engine_generate, model, graphs=True)
        # the same with every element-wise chain eager (ops/fused.py compiles them by default on CUDA)
        methods["engine_graphs_unfused"] = partial(unfused, partial(engine_generate, model, graphs=True))
        # SDPA on cuDNN's kernels never / always (GEARSHIFT_CUDNN_SDPA; by default over long keys only)
        for setting, name in ((False, "no_cudnn"), (True, "cudnn")):
            methods[f"engine_graphs_{name}"] = partial(cudnn, setting, partial(engine_generate, model, graphs=True))
            methods[f"supernet_generate_{name}"] = partial(cudnn, setting, partial(supernet_generate, model))
    if teacher is not None:
        methods = {"hf_generate": partial(hf_generate, teacher, pad), **methods}
    if args.trace_methods:
        methods = {k: v for k, v in methods.items() if k in args.trace_methods or k == "hf_generate"}
    rows = report.setdefault("traces", [])
    for batch in args.trace_batches:
        batch_prompts = list(islice(cycle(prompts), batch))
        hf_rate = None
        for method, fn in methods.items():
            row = {"batch": batch, "new_tokens": args.trace_tokens, "method": method}
            measure(report, rows, row, args.out, timed, fn, batch_prompts, args.trace_tokens, device)
            if method == "hf_generate":
                hf_rate = row.get("tokens_per_s")
            elif hf_rate and "tokens_per_s" in row:
                row["vs_hf"] = row["tokens_per_s"] / hf_rate
            shown = f"{row['tokens_per_s']:9.1f} tok/s" if "error" not in row else f"ERROR {row['error']}"
            ratio = f"  {row['vs_hf']:.2f}x HF" if "vs_hf" in row else ""
            print(f"traces batch {batch:<4} x {args.trace_tokens} tokens  {method:<18} {shown}{ratio}", flush=True)
    if args.profile and device.type == "cuda":  # where a decode step's time goes (top kernels), once
        measure(
            report,
            report.setdefault("profile", []),
            {"batch": max(args.trace_batches)},
            args.out,
            profile,
            methods.get("engine_graphs", methods.get("supernet_generate")),
            list(islice(cycle(prompts), max(args.trace_batches))),
            32,
        )
    save(args.out, report)


def unfused(fn, *args):
    with fusion(False):
        return fn(*args)


def cudnn(setting: bool, fn, *args):
    with envs.override(CUDNN_SDPA=setting):
        return fn(*args)


def profile(fn, prompts, tokens) -> dict:
    """Where one generate call's time goes (top kernels, host ops), after a warm-up call."""
    fn(prompts, 4)
    return {"tokens": tokens, **profile_cuda(lambda: fn(prompts, tokens))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="supernet checkpoint directory (tokenizer files inside)")
    ap.add_argument(
        "--teacher",
        default="smollm2",
        help="'smollm2' (offline GGUF package), a .gguf file, an HF directory, or 'supernet' (a Llama rebuilt from the "
        "checkpoint's all-attention path; also the fallback when the teacher does not load)",
    )
    ap.add_argument("--out", default="benchmarks/results/serve_smollm2.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: bf16 on CUDA, else fp32")
    ap.add_argument("--targets", nargs="+", default=["all-attention"])
    ap.add_argument(
        "--drafts",
        nargs="+",
        help="presets or letter strings; half-gdn = every other layer GDN, the rest attention "
        "(default: all-gdn all-kda all-sliding_window half-gdn and the checkpoint's presets)",
    )
    ap.add_argument("--ks", nargs="+", type=int, default=[4, 2, 8], help="draft lengths (start and cap), in order")
    ap.add_argument("--prompts", type=int, default=16, help="number of spec prompts (the list is cycled)")
    ap.add_argument("--prompts-file", help="text (one per line) or JSONL prompts instead of the inline list")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--trace-batches", nargs="+", type=int, default=[64, 256])
    ap.add_argument("--trace-tokens", type=int, default=128)
    ap.add_argument(
        "--trace-methods",
        nargs="+",
        help="only these of engine, engine_graphs, engine_graphs_unfused, supernet_generate (HF always runs)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="CUDA: top kernels of the engine with graphs (else Supernet.generate) at the largest batch",
    )
    ap.add_argument("--skip-spec", action="store_true")
    ap.add_argument("--skip-traces", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    report: dict = {"device": device_name(device), "dtype": str(dtype), "args": vars(args)}
    model = Supernet.from_pretrained(args.model, device=device, dtype=dtype)
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        raise SystemExit(f"{args.model}: no tokenizer files")
    source = read_prompts([args.prompts_file]) if args.prompts_file else [Prompt(text=p) for p in PROMPTS]
    prompts = [encode_prompt(p, tokenizer, chat=True) for p in source]
    report["presets"] = {name: placement_letters(p, model.config) for name, p in model.presets.items()}
    sections = [
        ("spec", args.skip_spec, lambda: spec_section(model, list(islice(cycle(prompts), args.prompts)), args, report)),
        ("traces", args.skip_traces, lambda: trace_section(model, prompts, args, device, dtype, report)),
    ]
    for name, skip, section in sections:
        if skip:
            continue
        try:
            section()
        except Exception as exc:  # noqa: BLE001 - a failed section must not stop the next one
            traceback.print_exc()
            report[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
        save(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
