"""The ``gearshift`` command line.

Modules load lazily: ``gearshift --help``, ``--version`` and ``info`` import neither torch nor a stage's extra
(benchmarks/cli_startup.py times them). Each stage's commands need only that stage's extra; a missing one is
reported in one line with the pip command that installs it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from . import __version__
from .checkpoint import CheckpointError, read_config, read_presets
from .clitools import CliError, Parser, add_overwrite, check_output_dir, missing_extra_message, positive_int
from .config import DTYPES, KIND_LETTERS, SHAPES, ConfigError, SupernetConfig
from .placement import PlacementError, composition, placement_letters

# Stage modules that add their own sub-commands through ``register(subparsers)``; none imports its extra up front.
EXTENSIONS = (
    "gearshift.train.cli",
    "gearshift.search.cli",
    "gearshift.serve.cli",
    "gearshift.evals.cli",
    "gearshift.pipeline.cli",
)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def torch_dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(path: str, device: str | None = "cpu", dtype: str | None = None):
    from .model import Supernet

    return Supernet.from_pretrained(path, device=device or default_device(), dtype=torch_dtype(dtype))


def cmd_demo(args: argparse.Namespace) -> int:
    """The product end to end on an embedded tiny teacher (see ``gearshift.demo``)."""
    from .demo import run

    return 0 if run(args.out, steps=args.steps, align_steps=args.align_steps) else 1


def cmd_init(args: argparse.Namespace) -> int:
    import shutil

    import torch

    from .memory import available_bytes, human_bytes
    from .model import Supernet

    check_output_dir(args.out, args.overwrite)
    cfg = SHAPES[args.shape]()
    dtype_name = args.dtype or ("float32" if args.shape == "tiny" else "bfloat16")
    dtype = torch_dtype(dtype_name)
    device = args.device or "cpu"
    with torch.device("meta"):
        n_params = Supernet(cfg).num_parameters(all_mixers=True)
    need = n_params * dtype.itemsize
    free = available_bytes(device)
    if free is not None and need > free:
        raise CliError(
            f"a random {args.shape} supernet ({n_params / 1e9:.2f}B parameters) takes {human_bytes(need)} in "
            f"{dtype_name}, more than the {human_bytes(free)} of memory available on {device}; use a smaller "
            "--shape or a machine with more memory"
        )
    out = Path(args.out)
    disk = shutil.disk_usage(next(p for p in (out, *out.absolute().parents) if p.exists())).free
    if need > disk:
        raise CliError(
            f"{out}: the checkpoint takes {human_bytes(need)}, more than the {human_bytes(disk)} free on disk"
        )
    model = Supernet.random(cfg, seed=args.seed, device=device, dtype=dtype)
    model.save_pretrained(out)
    print(
        f"wrote a random {args.shape} supernet ({n_params / 1e6:.1f}M parameters, {dtype_name}, "
        f"{human_bytes(need)}) to {out}"
    )
    return 0


def preset_table(config: SupernetConfig, presets: dict[str, dict]) -> list[str]:
    """Presets as an aligned table: name, letters, layers per mixer (F/S/G/K), and what search stored."""
    header = ["preset", "placement", "/".join(KIND_LETTERS.values()), "speed-up", "quality", "note"]
    rows = []
    for name, entry in presets.items():
        counts = composition(entry["placement"], config)
        speedup = entry.get("speedup")
        quality = entry.get("measured_quality", entry.get("predicted_quality"))
        metric = entry.get("quality_metric", "")
        note = entry.get("note") or ("extrapolated" if entry.get("extrapolated") else "")
        rows.append(
            [
                name,
                entry.get("letters") or placement_letters(entry["placement"], config),
                "/".join(str(counts[k]) for k in KIND_LETTERS),
                "-" if speedup is None else f"{speedup:.2f}x",
                "-" if quality is None else f"{quality:.4g} {metric}".strip(),
                str(note),
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]


def cmd_info(args: argparse.Namespace) -> int:
    cfg, _ = read_config(args.model)
    kinds: dict[str, int] = {}
    for layer in cfg.layers:
        key = ", ".join(f"{n} ({KIND_LETTERS[m.kind]})" for n, m in layer.mixers.items())
        kinds[key] = kinds.get(key, 0) + 1
    print(
        f"{args.model}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
        f"context {cfg.max_position_embeddings}, tied embeddings: {cfg.tie_word_embeddings}"
    )
    for key, n in kinds.items():
        print(f"  {n} layer(s) holding {key}")
    print(f"  default placement: {placement_letters(cfg.default_placement, cfg)}")
    presets = read_presets(args.model)
    if not presets:
        print("  no presets (add some with 'gearshift preset add' or 'gearshift place optimize --write')")
        return 0
    print()
    for line in preset_table(cfg, presets):
        print("  " + line)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import torch

    from .roofline import format_reports, placement_report

    if args.model in SHAPES and not Path(args.model).exists():
        model_or_cfg = SHAPES[args.model]()
    else:
        with torch.device("meta"):
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


def _token_ids(text: str, vocab: int) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise CliError(f"--ids {text!r}: expected comma-separated whole numbers, e.g. 1,2,3") from None
    if not ids:
        raise CliError("--ids: give at least one token id")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise CliError(f"--ids: token id(s) {bad} outside the model's vocabulary (0..{vocab - 1})")
    return ids


def cmd_generate(args: argparse.Namespace) -> int:
    if args.prompt is None and not args.ids:
        raise CliError("give --prompt TEXT or --ids 1,2,3")
    from .checkpoint import load_tokenizer

    cfg, _ = read_config(args.model)
    tokenizer = load_tokenizer(args.model) if args.prompt is not None else None
    if args.prompt is not None:
        if tokenizer is None:
            raise CliError(f"--prompt needs a tokenizer in {args.model}; pass --ids instead")
        ids = [tokenizer(args.prompt)["input_ids"]]
    else:
        ids = [_token_ids(args.ids, cfg.vocab_size)]
    model = _load(args.model, args.device, args.dtype)
    new: list[int] = []
    shown = ""

    def stream(tokens) -> None:  # print each token as it is decoded
        nonlocal shown
        new.append(int(tokens[0]))
        if tokenizer is None:  # ids as a JSON list, one at a time
            print(("[" if len(new) == 1 else ", ") + str(new[-1]), end="", flush=True)
            return
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(shown) :], end="", flush=True)
            shown = text

    # the serving engine's decode path (pools for this placement only, CUDA graphs, split-KV attention): one
    # decode implementation for the command line, a server and the benchmarks
    from .serve.engine import Engine, SamplingParams

    placement = model.resolve(args.placement)
    prompt = ids[0]
    context = model.config.max_position_embeddings
    if len(prompt) + args.max_new_tokens > context:
        raise CliError(
            f"a prompt of {len(prompt)} tokens and --max-new-tokens {args.max_new_tokens} exceed the model's context "
            f"of {context} tokens"
        )
    engine = Engine(model, max_batch=1, max_context=len(prompt) + args.max_new_tokens + 1, placements=[placement])
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    start = time.perf_counter()
    req = engine.submit(prompt, placement, params)
    while engine.has_work():
        engine.step()
        for token in req.output[len(new) :]:
            stream([token])
    if req.error:
        raise CliError(f"generation failed: {req.error}")
    elapsed = time.perf_counter() - start
    if tokenizer is not None and len(shown) < len(text := tokenizer.decode(new)):
        print(text[len(shown) :], end="")
    print("]" if tokenizer is None and new else "", flush=True)
    letters = placement_letters(placement, model.config)
    how = "greedy" if args.temperature == 0 else f"temperature {args.temperature}"
    print(f"[{len(new)} tokens in {elapsed:.2f}s, placement {letters}, {how}]", file=sys.stderr)
    return 0


def cmd_thin(args: argparse.Namespace) -> int:
    from .model import thin

    check_output_dir(args.out, args.overwrite, source=args.model)
    model = _load(args.model)
    thinned = thin(model, args.placement, args.out, copy_from=args.model)
    kept = [placement_letters(model.resolve(p), model.config) for p in args.placement]
    print(f"wrote {args.out} keeping the mixers of {len(kept)} placement(s): {', '.join(kept)}")
    dropped: dict[str, int] = {}
    for before, after in zip(model.config.layers, thinned.config.layers, strict=True):
        for name in before.mixers.keys() - after.mixers.keys():
            dropped[name] = dropped.get(name, 0) + 1
    if dropped:
        print("  dropped mixers: " + ", ".join(f"{name} in {n} layer(s)" for name, n in sorted(dropped.items())))
    lost = [name for name in model.presets if name not in thinned.presets]
    if lost:
        print(f"  dropped presets (they use a dropped mixer): {', '.join(lost)}")
    print(f"  default placement: {placement_letters(thinned.config.default_placement, thinned.config)}")
    return 0


def cmd_preset(args: argparse.Namespace) -> int:
    from .search.presets import remove_presets, write_presets

    if args.action == "add":
        if not args.placement:
            raise CliError("'preset add' needs a placement")
        write_presets(args.model, {args.name: {"placement": args.placement}})
    else:
        remove_presets(args.model, [args.name])
    print(f"{args.action} preset {args.name} in {args.model} (presets.json only; the weights are untouched)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="gearshift", description="Supernet LLMs: one checkpoint, many speed presets.")
    p.add_argument("--version", action="version", version=f"gearshift {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("demo", help="end-to-end run on an embedded tiny teacher (no downloads, ~1 min on a CPU)")
    s.add_argument("--out", default="demo-out", help="output directory, cleared first (only a demo's own output)")
    s.add_argument("--steps", type=positive_int, default=120, help="distillation steps")
    s.add_argument("--align-steps", type=positive_int, default=60, help="alignment steps (before distillation)")
    s.set_defaults(fn=cmd_demo, extra="train")

    s = sub.add_parser("init", help="write a randomly initialised supernet checkpoint")
    s.add_argument("out", help="output checkpoint directory")
    s.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="model shape")
    s.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    s.add_argument("--device", default="cpu", help="device the weights are built on")
    s.add_argument(
        "--dtype", choices=DTYPES, help="weight dtype (default: float32 for tiny, bfloat16 for the larger shapes)"
    )
    add_overwrite(s)
    s.set_defaults(fn=cmd_init)

    s = sub.add_parser("info", help="describe a checkpoint: layers, mixers, presets")
    s.add_argument("model", help="checkpoint directory")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("report", help="modelled parameters, state and bytes per decode step of placements")
    s.add_argument("model", help="checkpoint directory or a built-in shape: " + ", ".join(SHAPES))
    s.add_argument(
        "--placement",
        action="append",
        help="preset name, letter string (F/S/G/K) or all-<mixer>; repeatable (default: the default placement)",
    )
    s.add_argument("--context", type=positive_int, nargs="+", default=[4096], help="context lengths in tokens")
    s.add_argument("--batch", type=positive_int, default=1, help="sequences decoded together")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("generate", help="generate from a checkpoint with a chosen placement (greedy by default)")
    s.add_argument("model", help="checkpoint directory")
    s.add_argument("--placement", help="preset, letters or all-<mixer> (default: the checkpoint's default placement)")
    s.add_argument("--prompt", help="text prompt (needs the checkpoint's tokenizer)")
    s.add_argument("--ids", help="comma-separated token ids (when the checkpoint has no tokenizer)")
    s.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate at most")
    s.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy decoding")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    s.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    s.add_argument("--seed", type=int, help="random seed of sampling (default: unseeded)")
    s.add_argument("--device", help="default: cuda when available, else cpu")
    s.add_argument("--dtype", choices=DTYPES, help="weight dtype (default: as stored)")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("thin", help="keep only the mixers that given placements use")
    s.add_argument("model", help="checkpoint directory to read")
    s.add_argument("out", help="output checkpoint directory")
    s.add_argument("--placement", action="append", required=True, help="placement or preset to keep (repeatable)")
    add_overwrite(s)
    s.set_defaults(fn=cmd_thin)

    s = sub.add_parser("preset", help="add or remove a named placement stored with a checkpoint")
    s.add_argument("action", choices=["add", "remove"], help="what to do")
    s.add_argument("model", help="checkpoint directory")
    s.add_argument("name", help="preset name (may not look like a placement: all-kda, FSGK, auto)")
    s.add_argument("placement", nargs="?", help="letters, all-<mixer> or another preset (for add)")
    s.set_defaults(fn=cmd_preset)
    for name in EXTENSIONS:
        importlib.import_module(name).register(sub)
    return p


def _command(args: argparse.Namespace) -> str:
    parts = [args.command] + [
        getattr(args, k) for k in ("place_command", "eval_command") if getattr(args, k, None) is not None
    ]
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    from .clitools import sigterm_as_interrupt

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error argparse has printed: its exit code
        return stop.code if isinstance(stop.code, int) else 2
    try:
        with sigterm_as_interrupt():
            return args.fn(args)
    except KeyboardInterrupt:
        hint = getattr(args, "on_interrupt", None)
        more = hint(args) if callable(hint) else ""
        print(f"\ninterrupted: gearshift {_command(args)} stopped{'; ' + more if more else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as exc:
        message = missing_extra_message(exc, _command(args), getattr(args, "extra", None))
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except (CheckpointError, ConfigError, PlacementError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
