"""The short-context build pipeline, end to end on the offline teacher: SmolLM2-135M-Instruct -> supernet -> teacher
traces -> layer-local alignment -> stochastic distillation -> held-out KL to the teacher and next-token agreement
per placement: before training, after alignment and after distillation. Superseded by ``gearshift build smollm2
RUN`` (long-context data, placements, presets, evaluations and goals in one command); kept for ``gpu_session.sh``.

Also times trace generation through gearshift's decoding against Hugging Face ``generate`` on the same device.
Prompts are built from templates x topics (no dataset download). One command, small JSON results:

    python benchmarks/pipeline_smollm2.py --teacher smollm2 --out results/pipeline --minutes 15
    python benchmarks/pipeline_smollm2.py --teacher smollm2 --device cpu --tiny     # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from gearshift import envs
from gearshift.data.tokens import TokenShards
from gearshift.model import Supernet
from gearshift.ops.dispatch import kernel_gradient_checks
from gearshift.pipeline.prompts import template_prompts
from gearshift.roofline import paper_placement
from gearshift.search.presets import write_presets
from gearshift.train.config import config_from_dict
from gearshift.train.convert import convert_teacher
from gearshift.train.rows import PackedRows
from gearshift.train.teacher import load_teacher
from gearshift.train.traces import Prompt, generate_traces
from gearshift.train.trainer import Trainer

from common import device_name, profile_cuda, release, sync, write_json


def prompts() -> list[Prompt]:
    return template_prompts()


def preflight(model: Supernet, device: torch.device) -> dict:
    """A forward and backward pass of every mixer on the device before any long work, so a kernel that cannot
    train here fails in seconds instead of after the traces. When one fails on the kernels, training switches to
    the PyTorch path (GEARSHIFT_TRAIN_BACKEND=torch; inference keeps the kernels) and the check runs again."""
    probe = copy.deepcopy(model).to(device).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 256), device=device)
    result: dict = {"seconds": {}}
    for name in ("attention", "sliding_window", "gdn", "kda"):
        for attempt in range(2):
            t0 = time.perf_counter()
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss = probe(ids, f"all-{name}").float().logsumexp(-1).mean()
                loss.backward()
                sync(device)
                break
            except Exception as exc:  # noqa: BLE001 - retried once on the reference path, then raised
                if attempt or envs.TRAIN_BACKEND == "torch" or device.type != "cuda":
                    raise
                result["kernel_error"] = f"{name}: {type(exc).__name__}: {exc}"
                print(f"preflight: {result['kernel_error']}; training on the PyTorch path", flush=True)
                envs.assign(TRAIN_BACKEND="torch")
                probe.zero_grad(set_to_none=True)
        result["seconds"][name] = time.perf_counter() - t0
    result["train_backend"] = envs.TRAIN_BACKEND
    result["kernel_gradient_cosines"] = kernel_gradient_checks()  # fla vs the reference, checked on first use
    del probe
    release(device)
    return result


def hf_generate_speed(teacher, tokenizer, texts, batch, new_tokens, device) -> float:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(texts[:batch], return_tensors="pt", padding=True).to(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = teacher.generate(
            **enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=0.7, top_p=0.95
        )
    sync(device)
    return (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="smollm2")
    ap.add_argument("--out", default="runs/pipeline")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--minutes", type=float, default=15.0, help="training time budget (alignment + distillation)")
    ap.add_argument("--align-share", type=float, default=0.5, help="share of the minutes spent on alignment (0: none)")
    ap.add_argument("--align-lr", type=float, default=3e-3)
    ap.add_argument("--align-batch-size", type=int, default=16)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step (global batch)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (activation memory / N)")
    ap.add_argument("--new-tokens", type=int, default=384)
    ap.add_argument("--lr", type=float, default=3e-4, help="distillation peak learning rate (after alignment)")
    ap.add_argument("--trace-rounds", type=int, default=3, help="teacher samples per training prompt")
    ap.add_argument("--tiny", action="store_true", help="a few prompts and steps (CPU smoke run)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    report: dict = {"device": device_name(device), "args": vars(args)}

    t0 = time.perf_counter()
    teacher, tokenizer = load_teacher(args.teacher, device=device)
    report["teacher_load_s"] = time.perf_counter() - t0
    model = convert_teacher(teacher.float().cpu(), window=args.window)
    model.save_pretrained(out / "supernet")
    report["preflight"] = preflight(model, device)
    tokenizer.save_pretrained(out / "supernet")
    teacher.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)

    all_prompts = prompts()
    if args.tiny:
        all_prompts, args.new_tokens, args.seq_len, args.batch_size = all_prompts[:24], 24, 64, 2
        args.align_batch_size = 2
    held_out = all_prompts[::20]  # every 20th prompt: evaluation traces only
    train_prompts = [p for i, p in enumerate(all_prompts) if i % 20]
    gen = Supernet.from_pretrained(
        out / "supernet", device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    batch = 512 if device.type == "cuda" else 8
    trace_dirs = [out / f"traces_{r}" for r in range(args.trace_rounds)]
    report["traces"] = [  # one sample per prompt and round: rounds differ by seed
        generate_traces(
            gen,
            tokenizer,
            train_prompts,
            d,
            max_new_tokens=args.new_tokens,
            batch_size=batch,
            temperature=0.7,
            top_p=0.95,
            seed=1000 * (r + 1),
        )
        for r, d in enumerate(trace_dirs)
    ]
    report["eval_traces"] = generate_traces(
        gen, tokenizer, held_out, out / "eval_traces", max_new_tokens=args.new_tokens, batch_size=batch, seed=1
    )
    texts = [
        tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)
        for p in train_prompts[:batch]
    ]
    hf_tokens = min(args.new_tokens, 128)
    report["hf_generate_tokens_per_s"] = hf_generate_speed(teacher, tokenizer, texts, batch, hf_tokens, device)
    ours = generate_traces(
        gen, tokenizer, train_prompts[:batch], out / "speed", max_new_tokens=hf_tokens, batch_size=batch, seed=5
    )
    report["ours_same_batch_tokens_per_s"] = ours["tokens_per_s"]
    del gen, teacher
    print(json.dumps({k: v for k, v in report.items() if k != "args"}, indent=2, default=str), flush=True)

    n_layers = model.config.num_layers
    placements = [
        "all-attention",
        "all-sliding_window",
        "all-gdn",
        "all-kda",
        paper_placement("Reg|Lklhd-26", n_layers),
        paper_placement("Reg|Lklhd-18", n_layers),
        paper_placement("Reg|Lklhd-10", n_layers),
        "GK" * (n_layers // 2) + "G" * (n_layers % 2),
        "FS" * (n_layers // 2) + "F" * (n_layers % 2),
    ]

    def make_config(output: Path, steps: int, mode: str, model: Path, minutes: float) -> dict:
        align = mode == "align"
        return {
            "model": str(model),
            "teacher": str(out / "supernet"),
            "output": str(output),
            "mode": mode,
            "data": {
                "train": [str(d) for d in trace_dirs],
                "eval": [str(out / "eval_traces")],
                "seq_len": args.seq_len,
                "eval_sequences": 64,
            },
            "optim": {
                "steps": steps,
                "max_minutes": minutes,
                "batch_size": (args.align_batch_size if align else args.batch_size) // args.grad_accum,
                "grad_accum": args.grad_accum,
                "lr": args.align_lr if align else args.lr,
                "warmup_steps": 10 if not args.tiny else 1,
                "min_lr_ratio": 0.1,
            },
            "sampler": {"kind": "uniform"},
            "loss": {"activation": 0.5, "reverse_kl": 1.0, "forward_kl": 0.5},
            "eval": {"every": 0, "placements": placements},
            "checkpoint": {"every": 1000, "keep": 1},
            "log_every": 10,
        }

    def planned_steps(mode: str, model: Path, minutes: float) -> int:
        """The cosine schedule needs a step count: time a few steps (this also compiles the kernels), then fit the
        number of steps to the time budget (max_minutes stays as a guard)."""
        if args.tiny:
            return 3
        probe = Trainer(
            config_from_dict(make_config(out / f"calibrate_{mode}", 10**6, mode, model, 0)), device=str(device)
        )
        for _ in range(3):
            probe.train_step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(5):
            probe.train_step()
        sync(device)
        step_s = (time.perf_counter() - t0) / 5
        report[mode]["calibrated_step_seconds"] = step_s
        if device.type == "cuda":  # where a training step's time goes: kernels, launches, host ops
            report[mode]["train_step_profile"] = profile_cuda(probe.train_step)
        del probe
        release(device)
        return max(20, int(0.97 * 60 * minutes / step_s))

    def train(mode: str, model: Path, output: Path, minutes: float, before_key: str | None) -> Trainer:
        report[mode] = {"minutes": minutes}
        steps = planned_steps(mode, model, minutes)
        report[mode]["planned_steps"] = steps
        trainer = Trainer(config_from_dict(make_config(output, steps, mode, model, minutes)), device=str(device))
        rows = PackedRows(trainer.eval_rows.tokens, trainer.eval_rows.mask)
        if before_key:
            report[before_key] = trainer.evaluate(placements, rows)
            print(json.dumps(report[before_key], indent=1), flush=True)
        # layer-local error per mixer kind; after alignment, distillation starts from the weights just measured
        previous = report.get("align", {}).get("error_after")
        report[mode]["error_before"] = previous if previous is not None else trainer.align_error(rows)
        t0 = time.perf_counter()
        last = trainer.run()
        report[mode].update(seconds=time.perf_counter() - t0, steps=trainer.step, last_step=last)
        report[mode]["error_after"] = trainer.align_error(rows)
        report[f"after_{mode}"] = trainer.evaluate(placements, rows)
        print(json.dumps({k: report[mode][k] for k in ("steps", "seconds", "error_after")}, indent=1), flush=True)
        print(json.dumps(report[f"after_{mode}"], indent=1), flush=True)
        return trainer

    align_minutes = args.minutes * args.align_share
    start = out / "supernet"
    if args.align_share > 0:
        trainer = train("align", start, out / "align", align_minutes, "before")
        del trainer
        release(device)
        start = out / "align" / "final"
    trainer = train("distill", start, out / "run", args.minutes - align_minutes, None if args.align_share else "before")
    report["after"] = report["after_distill"]
    report["train_seconds"] = report["distill"]["seconds"] + report.get("align", {}).get("seconds", 0.0)
    report["steps"] = trainer.step
    report["last_step"] = report["distill"]["last_step"]

    def closed(after: dict) -> dict:
        b = report["before"]
        return {p: 1 - after[p]["kl"] / b[p]["kl"] if b[p]["kl"] > 1e-9 else None for p in placements}

    # the paper's three mixed presets, scaled to this depth, stored with the distilled weights for later stages
    presets = {f"reg-{n}": f"Reg|Lklhd-{n}" for n in (26, 18, 10)}
    write_presets(
        out / "run" / "final",
        {k: {"placement": paper_placement(v, n_layers), "source": "paper"} for k, v in presets.items()},
    )
    report["gap_closed"] = closed(report["after"])
    if "after_align" in report:
        report["gap_closed_after_align"] = closed(report["after_align"])
    report["placements"] = placements
    report["train_tokens"] = sum(TokenShards(d).num_tokens for d in trace_dirs)
    write_json(out / "report.json", report)
    keys = ("gap_closed_after_align", "gap_closed", "after", "steps", "train_seconds")
    print(json.dumps({k: report[k] for k in keys if k in report}, indent=1))


if __name__ == "__main__":
    main()
