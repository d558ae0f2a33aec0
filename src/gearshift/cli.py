"""The ``gearshift`` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

import torch

from .checkpoint import CheckpointError, load_tokenizer, read_presets, save, thin
from .config import ConfigError, SupernetConfig
from .placement import PlacementError, placement_letters

SHAPES = {"tiny": SupernetConfig.tiny, "small-1b": SupernetConfig.small_1b, "apriel-15b": SupernetConfig.apriel_15b}
# Stage modules that add their own sub-commands through ``register(subparsers)``.
EXTENSIONS = (
    "gearshift.train.cli",
    "gearshift.place.cli",
    "gearshift.serve.cli",
    "gearshift.evals.cli",
    "gearshift.pipeline.cli",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load(path: str, device: str = "cpu", dtype: str | None = None):
    from .model import Supernet

    return Supernet.from_pretrained(path, device=device, dtype=DTYPES[dtype] if dtype else None)


def cmd_demo(args: argparse.Namespace) -> int:
    """The product end to end on an embedded tiny teacher (see ``gearshift.demo``)."""
    from .demo import run

    return 0 if run(args.out, steps=args.steps, align_steps=args.align_steps) else 1


def cmd_init(args: argparse.Namespace) -> int:
    from .model import Supernet

    cfg = SHAPES[args.shape]()
    model = Supernet.random(cfg, seed=args.seed, device=args.device, dtype=DTYPES[args.dtype])
    save(model, args.out)
    print(f"wrote a random {args.shape} supernet ({model.num_parameters(all_mixers=True) / 1e6:.1f}M) to {args.out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import read_config

    cfg, _ = read_config(args.model)
    kinds = {}
    for layer in cfg.layers:
        key = ",".join(f"{n}:{m.kind}" for n, m in layer.mixers.items())
        kinds[key] = kinds.get(key, 0) + 1
    print(
        f"{args.model}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
        f"context {cfg.max_position_embeddings}, tied embeddings: {cfg.tie_word_embeddings}"
    )
    for key, n in kinds.items():
        print(f"  {n} layer(s) holding {key}")
    print(f"  default placement: {placement_letters(cfg.default_placement, cfg)}")
    for name, entry in read_presets(args.model).items():
        extra = {k: v for k, v in entry.items() if k not in ("placement", "letters")}
        print(f"  preset {name}: {entry.get('letters')} {json.dumps(extra) if extra else ''}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import format_reports, placement_report

    if args.model in SHAPES:
        model_or_cfg = SHAPES[args.model]()
    else:
        with torch.device("meta"):
            from .checkpoint import read_config
            from .model import Supernet

            cfg, _ = read_config(args.model)
            model_or_cfg = Supernet(cfg)
            for name, entry in read_presets(args.model).items():
                model_or_cfg.add_preset(name, entry["placement"])
    placements = args.placement or [None]
    reports = [placement_report(model_or_cfg, p, context=c, batch=args.batch) for p in placements for c in args.context]
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        print(format_reports(reports))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    model = _load(args.model, args.device, args.dtype)
    tokenizer = load_tokenizer(args.model) if args.prompt is not None else None
    if args.prompt is not None:
        if tokenizer is None:
            print(f"error: --prompt needs a tokenizer in {args.model}; pass --ids instead", file=sys.stderr)
            return 2
        ids = [tokenizer(args.prompt)["input_ids"]]
    elif args.ids:
        ids = [[int(x) for x in args.ids.split(",")]]
    else:
        print("error: give --prompt TEXT or --ids 1,2,3", file=sys.stderr)
        return 2
    start = time.perf_counter()
    out = model.generate(
        ids,
        args.placement,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    elapsed = time.perf_counter() - start
    new = out[0, len(ids[0]) :].tolist()
    print(tokenizer.decode(new) if tokenizer else new)
    letters = placement_letters(model.resolve(args.placement), model.config)
    print(f"[{len(new)} tokens in {elapsed:.2f}s, placement {letters}]", file=sys.stderr)
    return 0


def cmd_thin(args: argparse.Namespace) -> int:
    model = _load(args.model)
    thin(model, args.placement, args.out, copy_from=args.model)
    print(f"wrote {args.out} keeping the mixers of {len(args.placement)} placement(s)")
    return 0


def cmd_preset(args: argparse.Namespace) -> int:
    model = _load(args.model)
    if args.action == "add":
        model.add_preset(args.name, args.placement)
    elif args.name not in model.presets:
        raise PlacementError(f"no preset named {args.name!r}")
    else:
        model.presets.pop(args.name)
        model.preset_meta.pop(args.name, None)
    save(model, args.model)
    print(f"{args.action} preset {args.name} in {args.model}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gearshift", description="Supernet LLMs: one checkpoint, many speed presets.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo", help="end-to-end run on an embedded tiny teacher (no downloads, ~1 min on a CPU)")
    s.add_argument("--out", default="demo-out")
    s.add_argument("--steps", type=int, default=120, help="distillation steps")
    s.add_argument("--align-steps", type=int, default=60, help="alignment steps (before distillation)")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("init", help="write a randomly initialised supernet checkpoint")
    s.add_argument("out")
    s.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    s.set_defaults(fn=cmd_init)

    s = sub.add_parser("info", help="describe a checkpoint: layers, mixers, presets")
    s.add_argument("model")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("report", help="modelled parameters, state and bytes per decode step of placements")
    s.add_argument("model", help="checkpoint directory or a built-in shape: " + ", ".join(SHAPES))
    s.add_argument("--placement", action="append", help="preset name, letter string (F/S/K/G) or all-<mixer>")
    s.add_argument("--context", type=int, nargs="+", default=[4096])
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("generate", help="generate from a checkpoint with a chosen placement")
    s.add_argument("model")
    s.add_argument("--placement")
    s.add_argument("--prompt")
    s.add_argument("--ids", help="comma-separated token ids (when the checkpoint has no tokenizer)")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int)
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--dtype", choices=sorted(DTYPES))
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("thin", help="keep only the mixers that given placements use")
    s.add_argument("model")
    s.add_argument("out")
    s.add_argument("--placement", action="append", required=True)
    s.set_defaults(fn=cmd_thin)

    s = sub.add_parser("preset", help="add or remove a named placement stored with a checkpoint")
    s.add_argument("action", choices=["add", "remove"])
    s.add_argument("model")
    s.add_argument("name")
    s.add_argument("placement", nargs="?")
    s.set_defaults(fn=cmd_preset)
    for name in EXTENSIONS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name in (name, name.rsplit(".", 1)[0]):
                continue  # that stage is not part of this installation
            raise
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "action", None) == "add" and not args.placement:
        print("error: 'preset add' needs a placement", file=sys.stderr)
        return 2
    try:
        return args.fn(args)
    except (CheckpointError, ConfigError, PlacementError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
