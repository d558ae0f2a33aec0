"""``gearshift place``: measure placements, fit the surrogate, time mixers, optimise presets, compare rankings.

Sub-commands (each ``--help`` lists its options)::

    gearshift place measure MODEL --data SHARDS --placements stratified:300 --out TABLE.jsonl
    gearshift place fit TABLE.jsonl --metric loglik --r 1 --out FIT.json
    gearshift place loop MODEL --data SHARDS --table TABLE.jsonl --costs COSTS.json --rounds 3 --out FIT.json
    gearshift place cost MODEL --batch 8 --context 32768 --out COSTS.json [--whole-model 24 | --modelled]
    gearshift place optimize MODEL --fit FIT.json --costs COSTS.json --presets 4 --write
    gearshift place stability TABLE_A.jsonl TABLE_B.jsonl --metric loglik

Bad input raises ``PlaceError`` (a ValueError), which the main CLI prints as ``error: ...`` with exit code 2.
Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- shared pieces


def _config(model: str):
    """A checkpoint directory's config, or a built-in shape (tiny, apriel-15b) for costs."""
    from ..checkpoint import read_config
    from ..config import SHAPES

    if model in SHAPES and not Path(model).exists():
        return SHAPES[model]()
    return read_config(model)[0]


def _device_dtype(args: argparse.Namespace):
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def _load_model(args: argparse.Namespace):
    from ..model import Supernet

    device, dtype = _device_dtype(args)
    return Supernet.from_pretrained(args.model, device=device, dtype=dtype)


def _extra_metrics(items: list[str]) -> dict[str, Any]:
    """``NAME=module:callable`` -> {NAME: callable(model, placement) -> float} (the hook for gearshift.evals)."""
    from .space import PlaceError

    out = {}
    for item in items:
        name, eq, target = item.partition("=")
        module, colon, attr = target.partition(":")
        if not (eq and colon and name and module and attr):
            raise PlaceError(f"--extra-metric {item!r}: expected NAME=module:callable")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise PlaceError(f"--extra-metric {item!r}: cannot load {target} ({exc})") from None
        if not callable(fn):
            raise PlaceError(f"--extra-metric {item!r}: {target} is not callable")
        out[name] = fn
    return out


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="default: cuda when available, else cpu")
    from ..config import DTYPES

    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on GPU, else float32")


def _add_scoring(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scoring")
    g.add_argument("--sequences", type=int, help="score the first N sequences of the shards (after --offset)")
    g.add_argument("--offset", type=int, default=0, help="skip this many sequences (e.g. the training part)")
    g.add_argument("--max-len", type=int, help="truncate sequences to this many tokens")
    g.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per forward")
    g.add_argument("--max-batch", type=int, default=64, help="sequences per forward")
    g.add_argument("--reference", help="placement the KL/agreement compare to (default: all-attention)")
    g.add_argument("--reference-topk", type=int, help="keep only the reference's top-k log-probs (KL lower bound)")
    g.add_argument("--reference-memory-gb", type=float, default=8.0, help="refuse exact references larger than this")
    g.add_argument("--no-kl", action="store_true", help="skip KL to the reference")
    g.add_argument("--no-agreement", action="store_true", help="skip next-token agreement with the reference")
    g.add_argument(
        "--extra-metric",
        action="append",
        default=[],
        metavar="NAME=MODULE:CALLABLE",
        help="also record CALLABLE(model, placement) -> float under NAME (e.g. multiple-choice accuracy)",
    )
    _add_device(p)


def _scorer(args: argparse.Namespace, model):
    from ..checkpoint import fingerprint
    from .measure import PlacementScorer, load_sequences

    max_len = args.max_len or model.config.max_position_embeddings
    sequences = load_sequences(args.data, limit=args.sequences, offset=args.offset, max_len=max_len)
    return PlacementScorer(
        model,
        sequences,
        reference=args.reference,
        kl=not args.no_kl,
        agreement=not args.no_agreement,
        reference_topk=args.reference_topk,
        batch_tokens=args.batch_tokens,
        max_batch=args.max_batch,
        extra_metrics=_extra_metrics(args.extra_metric),
        reference_memory_gb=args.reference_memory_gb,
        model_fingerprint=fingerprint(args.model),  # a table never mixes two checkpoints' numbers
    )


def _add_costs(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_argument_group("cost model")
    g.add_argument("--costs", required=required, help="cost file from 'place cost' (default: modelled bytes/step)")
    g.add_argument("--batch", type=int, default=1, help="batch of the modelled cost (without --costs)")
    g.add_argument("--context", type=int, default=4096, help="context of the modelled cost (without --costs)")


def _cost_terms(args: argparse.Namespace, config, space):
    from .cost_sources import CostTerms, modelled_costs

    if args.costs:
        return CostTerms.load(args.costs, space)
    context = min(args.context, config.max_position_embeddings)
    return CostTerms.from_model(modelled_costs(config, batch=args.batch, context=context), space)


def _add_constraints(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("constraints")
    g.add_argument("--fixed", nargs="+", default=[], metavar="LAYER:MIXER", help="pin layers, e.g. 0:F 47:attention")
    g.add_argument(
        "--allowed", nargs="+", default=[], metavar="[LAYERS:]LETTERS", help="restrict mixers, e.g. FSG or 0-3,7:FS"
    )
    g.add_argument("--min-count", nargs="+", default=[], metavar="MIXER=N", help="e.g. gdn=2")
    g.add_argument("--max-count", nargs="+", default=[], metavar="MIXER=N", help="e.g. attention=12")
    g.add_argument("--memory-budget-gb", type=float, help="decoding state of the cost model's batch, in GB")


def _constraints(args: argparse.Namespace, space):
    from .optimize import parse_constraints

    return parse_constraints(
        space,
        fixed=args.fixed,
        allowed=args.allowed,
        min_count=args.min_count,
        max_count=args.max_count,
        memory_budget_gb=args.memory_budget_gb,
    )


def _add_fit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metric", default="loglik", help="table field to fit (loglik, kl, agreement or an extra metric)")
    p.add_argument("--r", type=int, default=1, choices=[1, 2, 3], help="pair-interaction range in layers")
    p.add_argument(
        "--estimator",
        default="auto",
        choices=["auto", "bayes_ridge", "ard", "lasso", "ridge"],
        help="regression of the surrogate (auto: the lowest cross-validated error)",
    )
    p.add_argument("--cv", type=int, default=5, help="cross-validation folds")
    p.add_argument("--minimize", action="store_true", help="lower values of an extra metric are better")


def _minimize(args: argparse.Namespace) -> bool | None:
    return True if args.minimize else None


def _sibling(path: str | Path, suffix: str) -> Path:
    path = Path(path)
    return path.with_name(path.stem + suffix)


# ---------------------------------------------------------------------------------------------- commands


def cmd_measure(args: argparse.Namespace) -> int:
    from .measure import measure_placements
    from .selection import parse_selection
    from .space import PlacementSpace
    from .table import MeasurementTable

    config = _config(args.model)
    space = PlacementSpace.from_config(config)
    costs = _cost_terms(args, config, space) if args.costs else None
    done = _done(args.out)
    placements: list[tuple[str, str]] = []
    for spec in args.placements:  # validated before the model is loaded
        chosen, source = parse_selection(
            spec, space, seed=args.seed, n_proposals=args.n_proposals, costs=costs, exclude=sorted(done)
        )
        placements += [(p, source) for p in chosen]
    if args.shard:
        index, count = _parse_shard(args.shard)
        placements = placements[index::count]  # the same list in every process: each takes every count-th
    model = _load_model(args)
    scorer = _scorer(args, model)
    table = MeasurementTable.open(args.out, scorer.header())
    _log(f"scoring {len(placements)} placements on {scorer.n_sequences} sequences ({scorer.n_tokens} scored tokens)")
    by_source: dict[str, list[str]] = {}
    for p, source in placements:
        by_source.setdefault(source, []).append(p)
    new = []
    for source, ps in by_source.items():
        new += measure_placements(scorer, ps, table, source=source, log=_log, show_progress=True)
    print(f"measured {len(new)} new placements; {args.out} now holds {len(table.done)}")
    return 0


def _parse_shard(spec: str) -> tuple[int, int]:
    from .space import PlaceError

    index, slash, count = spec.partition("/")
    if not (slash and index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
        raise PlaceError(f"--shard {spec!r}: expected K/N with 0 <= K < N, e.g. 0/2")
    return int(index), int(count)


def cmd_merge(args: argparse.Namespace) -> int:
    """Tables measured in parts (``measure --shard K/N`` on several GPUs or machines) into one."""
    from .table import _MUST_MATCH, MeasurementTable, TableError

    parts = [MeasurementTable.read(p) for p in args.tables]
    first = parts[0]
    for part in parts[1:]:
        for key in _MUST_MATCH:
            if part.header.get(key) != first.header.get(key):
                raise TableError(
                    f"{part.path} was measured with {key}={part.header.get(key)!r}, {first.path} with "
                    f"{first.header.get(key)!r}: they cannot be merged"
                )
    out = MeasurementTable.open(args.out, {k: v for k, v in first.header.items() if k != "format"})
    added = 0
    for part in parts:
        for record in part.records:
            if record["placement"] not in out.done:
                out.append(record)
                added += 1
    print(f"merged {len(parts)} tables: {added} new placements; {args.out} now holds {len(out.done)}")
    return 0


def _done(path: str | Path) -> set[str]:
    """Placements already in a table (none when it does not exist yet or is empty)."""
    from .table import MeasurementTable, TableError

    try:
        return MeasurementTable.read(path).done
    except TableError:
        return set()


def cmd_fit(args: argparse.Namespace) -> int:
    from .fit import fit_table, write_effects
    from .space import PlacementSpace

    space = PlacementSpace.from_config(_config(args.model)) if args.model else None
    fit = fit_table(
        args.table,
        metric=args.metric,
        space=space,
        r=args.r,
        estimator=args.estimator,
        cv=args.cv,
        minimize=_minimize(args),
    )
    fit.save(args.out)
    effects = Path(args.effects) if args.effects else _sibling(args.out, ".effects.md")
    heatmap = None if args.no_plots else (Path(args.heatmap) if args.heatmap else _sibling(args.out, ".effects.png"))
    write_effects(fit, effects, heatmap)
    print(fit.summary())
    if fit.cv_results:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(fit.cv_results.items(), key=lambda kv: kv[1]))
        print(f"estimator CV RMSE: {shown}")
    print(f"wrote {args.out}, {effects}" + (f", {heatmap}" if heatmap else ""))
    return 0


def cmd_loop(args: argparse.Namespace) -> int:
    from .loop import active_learning
    from .space import PlacementSpace
    from .table import MeasurementTable

    config = _config(args.model)
    space = PlacementSpace.from_config(config)
    costs = _cost_terms(args, config, space)
    constraints = _constraints(args, space)
    model = _load_model(args)
    scorer = _scorer(args, model)
    table = MeasurementTable.open(args.table, scorer.header())
    fit, history = active_learning(
        scorer,
        table,
        costs,
        metric=args.metric,
        rounds=args.rounds,
        n_uncertain=args.uncertain,
        n_frontier=args.frontier,
        initial=args.initial,
        constraints=constraints,
        r=args.r,
        estimator=args.estimator,
        cv=args.cv,
        minimize=_minimize(args),
        seed=args.seed,
        log=_log,
    )
    fit.save(args.out)
    hist = _sibling(args.out, ".history.json")
    hist.write_text(json.dumps(history, indent=2))
    print(fit.summary())
    print(f"wrote {args.out} and {hist}; {args.table} holds {len(table.done)} placements")
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    from .cost_sources import device_name, fit_regression, modelled_costs, timed_costs, whole_model_times
    from .sampling import stratified
    from .space import PlacementSpace

    config = _config(args.model)
    space = PlacementSpace.from_config(config)
    if args.modelled:
        additive = modelled_costs(config, batch=args.batch, context=args.context, bandwidth=args.bandwidth)
    else:
        device, dtype = _device_dtype(args)
        additive = timed_costs(
            config,
            batch=args.batch,
            context=args.context,
            device=device,
            dtype=dtype,
            steps=args.steps,
            warmup=args.warmup,
            layers=args.layers,
            prefill_tokens=args.prefill_tokens,
            log=_log,
        )
    report = None
    if args.whole_model:
        device, dtype = _device_dtype(args)
        placements = stratified(space, args.whole_model, args.seed)
        done, times = whole_model_times(
            config,
            placements,
            batch=args.batch,
            context=args.context,
            device=device,
            dtype=dtype,
            steps=args.steps,
            warmup=args.warmup,
            log=_log,
        )
        meta = {k: additive.metadata[k] for k in ("batch", "context", "space")}
        meta.update(unit="ms", what="decode step", source="whole-model regression", device=device_name(device))
        meta["dtype"] = str(dtype).removeprefix("torch.")
        meta["measured"] = [{"placement": p, "ms": float(t)} for p, t in zip(done, times, strict=True)]
        overhead = float(additive.metadata["overhead"]) if not args.modelled else None
        regression, report = fit_regression(
            space, done, times, overhead=overhead, additive=additive, seed=args.seed, metadata=meta
        )
        additive.metadata["whole_model"] = report
        reg_path = _sibling(args.out, ".regression.json")
        regression.to_json(reg_path)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    additive.to_json(args.out)
    names = space.kinds
    per = additive.costs.max(axis=0)
    ref = per[space.reference] or 1.0
    print(f"{additive.metadata['device']}: batch {args.batch}, context {args.context}, {additive.metadata['dtype']}")
    for m, name in enumerate(names):
        print(f"  {name:>14}: {per[m]:.5g} ms/layer/step (relative {per[m] / ref:.2f})")
    print(f"  overhead (embeddings, head, launch): {additive.metadata['overhead']:.5g} ms/step")
    if report is not None:
        r2, err = report.get("heldout_r2"), report.get("heldout_mean_abs_rel_error")
        print(
            f"whole model: {report['n']} placements; regression held-out R^2 "
            f"{'n/a' if r2 is None else f'{r2:.3f}'}, mean |rel. error| {'n/a' if err is None else f'{err:.3f}'}; "
            f"additive model mean |rel. error| {report['additive_mean_abs_rel_error']:.3f}"
        )
        print(f"wrote {args.out} and {_sibling(args.out, '.regression.json')}")
    else:
        print(f"wrote {args.out}")
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    from ..checkpoint import read_presets
    from .cost_sources import state_bytes_table
    from .fit import SurrogateFit
    from .optimize import SOURCE, optimize
    from .presets import pareto_regret_of, write_presets
    from .space import PlaceError, PlacementSpace

    config = _config(args.model)
    space = PlacementSpace.from_config(config)
    fit = SurrogateFit.load(args.fit)
    space.require_same(fit.space, f"fit {args.fit}")
    costs = _cost_terms(args, config, space)
    constraints = _constraints(args, space)
    state = None
    if args.memory_budget_gb is not None:
        context = int(costs.metadata.get("context") or args.context)
        state = state_bytes_table(config, space, min(context, config.max_position_embeddings))
    result = optimize(
        fit,
        costs,
        constraints=constraints,
        n_presets=args.presets,
        speedups=args.speedups,
        k_best=args.k_best,
        diverse_layers=args.diverse,
        state_bytes=state,
        cost_resolution=args.cost_resolution,
        prefix=args.name_prefix,
    )
    if not result.presets:
        raise PlaceError("no preset could be chosen (targets unreachable or diversity too strict)")
    for preset, beyond in zip(result.presets, fit.beyond_measured([p.predicted for p in result.presets]), strict=True):
        preset.extrapolated = bool(beyond)
    measured: dict[str, float] = {}
    if args.table:
        measured = _measured_presets(args, space, [p.placement for p in result.presets], fit.metric)
        regrets = pareto_regret_of([p.placement for p in result.presets], measured, costs, space, sign=fit.sign)
        for preset, regret in zip(result.presets, regrets, strict=True):
            preset.measured = measured.get(preset.placement)
            preset.regret = regret
    unit = costs.metadata.get("unit", "")
    print(f"predicted frontier: {len(result.frontier)} points; {len(result.presets)} presets ({fit.metric}):")
    print(f"  {'name':<18} {'placement':<24} {'predicted':>10} {'cost ' + unit:>10} {'speed-up':>8} measured regret")
    for p in result.presets:
        shown = p.placement if len(p.placement) <= 24 else p.placement[:21] + "..."
        up = "n/a" if p.speedup is None else f"{p.speedup:.2f}x"
        meas = "-" if p.measured is None else f"{p.measured:.4g}"
        reg = "-" if p.regret is None else f"{p.regret:+.3g}"
        flag = " (!)" if p.extrapolated else ""
        print(f"  {p.name:<18} {shown:<24} {p.predicted:>10.4g} {p.cost:>10.4g} {up:>8} {meas:>8} {reg}{flag}")
    if any(p.extrapolated for p in result.presets):
        print(
            "  (!) predicted better than every measured placement (beyond the CV error): the surrogate is "
            "extrapolating; measure these (--table/--data) or run 'place loop' to refit around the frontier"
        )
    for note in result.notes:
        print(f"  note: {note}")
    if args.out:
        _optimize_outputs(Path(args.out), result, fit, costs, space, measured if args.table else None, args)
    if args.write:
        entries = {p.name: {"placement": p.placement, **p.meta(fit, costs)} for p in result.presets}
        before = set(read_presets(args.model))
        after = write_presets(args.model, entries, drop_source=None if args.keep_previous else SOURCE)
        dropped = sorted(before - set(after))
        print(f"wrote {len(entries)} presets to {Path(args.model) / 'presets.json'}")
        if dropped:
            print(f"removed presets of an earlier 'place optimize' run: {', '.join(dropped)}")
    return 0


def _measured_presets(args: argparse.Namespace, space, placements: list[str], metric: str) -> dict[str, float]:
    """Table values of ``metric``; with --data, the presets not in the table are measured (and appended) first."""
    from .measure import measure_placements
    from .table import MeasurementTable

    if args.data:
        model = _load_model(args)
        scorer = _scorer(args, model)
        table = MeasurementTable.open(args.table, scorer.header())
        measure_placements(scorer, placements, table, source="presets", log=_log)
    else:
        table = MeasurementTable.read(args.table)
    table.check_space(space)
    return table.as_mapping(metric)


def _optimize_outputs(out: Path, result, fit, costs, space, measured: dict[str, float] | None, args) -> None:
    import numpy as np

    from .plots import frontier_html, plot_frontier

    out.mkdir(parents=True, exist_ok=True)
    ref = result.reference
    scale = float(costs.total(space.encode([ref]))[0]) if ref else 1.0
    xlabel = "cost relative to all-attention" if ref else f"cost ({costs.metadata.get('unit', '')})"
    ylabel = fit.metric + (" (higher is better)" if fit.sign > 0 else " (lower is better)")
    fx = [(costs.overhead + s.cost) / scale for s in result.frontier]
    fy = [fit.sign * s.quality for s in result.frontier]
    flabels = [s.as_string(space.letters) for s in result.frontier]
    meas = None
    if measured:
        names = list(measured)
        mx = costs.total(space.encode(names)) / scale
        meas = (mx, np.array([measured[n] for n in names]), names)
    presets = [(p.name, p.cost / scale, p.predicted) for p in result.presets]
    kw = dict(measured=meas, frontier=(fx, fy, flabels), presets=presets, xlabel=xlabel, ylabel=ylabel)
    plot_frontier(out / "frontier.png", **kw)
    frontier_html(out / "frontier.html", **kw, title=f"gearshift placement frontier ({fit.metric})")
    payload = {
        "fit": str(args.fit),
        "costs": costs.metadata | {"overhead": costs.overhead},
        "reference": ref,
        "presets": [p.__dict__ for p in result.presets],
        "frontier": [
            {"placement": lab, "relative_cost": x, fit.metric: y} for lab, x, y in zip(flabels, fx, fy, strict=True)
        ],
    }
    (out / "optimize.json").write_text(json.dumps(payload, indent=2, default=float))


def cmd_stability(args: argparse.Namespace) -> int:
    from .cost_sources import CostTerms
    from .stability import compare_tables
    from .table import MeasurementTable

    a, b = MeasurementTable.read(args.table_a), MeasurementTable.read(args.table_b)
    costs = None
    if args.costs:
        space = a.space or b.space
        if space is None:
            from .space import PlaceError

            raise PlaceError("--costs needs tables with a header naming the model's mixers")
        costs = CostTerms.load(args.costs, space)
    out = compare_tables(
        a, b, metric=args.metric, costs=costs, budgets=args.budgets, k=args.k, minimize=_minimize(args)
    )
    if args.json:
        print(json.dumps({**out, "topk_overlap": {str(k): v for k, v in out["topk_overlap"].items()}}, indent=2))
        return 0
    print(
        f"{args.metric}: {out['n']} shared placements ({out['only_a']} only in A, {out['only_b']} only in B); "
        f"Spearman {out['spearman']:.4f}, Kendall {out['kendall']:.4f}"
    )
    for budget, overlap in out["topk_overlap"].items():
        where = "all placements" if budget is None else f"cost <= {budget:.4g}"
        print(f"  top-{args.k} overlap, {where}: {overlap:.2f}")
    return 0


# ---------------------------------------------------------------------------------------------- parser


def register(subparsers: Any) -> None:
    """Add ``place`` and its sub-commands to the main ``gearshift`` parser."""
    place = subparsers.add_parser("place", help="placement search: measure, fit, loop, cost, optimize, stability")
    place.set_defaults(extra="place")
    sub = place.add_subparsers(dest="place_command", required=True, metavar="COMMAND")

    s = sub.add_parser("measure", help="score placements on held-out teacher traces (resumable JSONL table)")
    s.add_argument("model", help="checkpoint directory")
    s.add_argument("--data", required=True, help="token-shard directory (teacher traces)")
    s.add_argument(
        "--placements",
        nargs="+",
        required=True,
        metavar="SPEC",
        help="stratified:N, a file of letter placements, or proposals:FIT.json[:N]",
    )
    s.add_argument("--out", required=True, help="measurement table (JSONL); an existing one is resumed")
    s.add_argument("--seed", type=int, default=0, help="seed of the stratified selection")
    s.add_argument("--n-proposals", type=int, default=8, help="uncertain placements per proposals: spec")
    s.add_argument("--costs", help="with proposals: also propose points along the predicted frontier")
    s.add_argument(
        "--shard", metavar="K/N", help="measure only every N-th selected placement from the K-th (one part per GPU)"
    )
    s.set_defaults(
        fn=cmd_measure,
        batch=1,
        context=4096,
        on_interrupt=lambda a: (
            f"the placements measured so far are kept in {a.out}; run the same command to measure the rest"
        ),
    )
    _add_scoring(s)

    s = sub.add_parser("merge", help="merge tables measured in parts (measure --shard) into one")
    s.add_argument("tables", nargs="+", help="measurement tables measured the same way")
    s.add_argument("--out", required=True, help="merged table (created, or appended to)")
    s.set_defaults(fn=cmd_merge)

    s = sub.add_parser("fit", help="fit the cluster-expansion surrogate to a table; effects table and heatmap")
    s.add_argument("table")
    s.add_argument("--out", required=True, help="surrogate file (JSON) for optimize/proposals")
    s.add_argument("--model", help="checkpoint to check the table against")
    s.add_argument("--effects", help="Markdown effect table (default: beside --out)")
    s.add_argument("--heatmap", help="effect heatmap PNG (default: beside --out)")
    s.add_argument("--no-plots", action="store_true", help="skip the heatmap")
    _add_fit_options(s)
    s.set_defaults(fn=cmd_fit)

    s = sub.add_parser("loop", help="active learning: propose (frontier + uncertain), measure, refit, N rounds")
    s.add_argument("model", help="checkpoint directory")
    s.add_argument("--data", required=True, help="token-shard directory (teacher traces)")
    s.add_argument("--table", required=True, help="measurement table (JSONL), created or resumed")
    s.add_argument("--out", required=True, help="final surrogate file (JSON); history beside it")
    s.add_argument("--rounds", type=int, default=3, help="propose-measure-refit rounds")
    s.add_argument("--uncertain", type=int, default=8, help="most uncertain placements per round")
    s.add_argument("--frontier", type=int, default=4, help="predicted-frontier placements per round")
    s.add_argument("--initial", type=int, default=32, help="stratified placements before the first fit")
    s.add_argument("--seed", type=int, default=0, help="seed of the stratified selection")
    _add_fit_options(s)
    _add_costs(s)
    _add_constraints(s)
    _add_scoring(s)
    s.set_defaults(
        fn=cmd_loop,
        on_interrupt=lambda a: f"the placements measured so far are kept in {a.table}; run the same command to go on",
    )

    s = sub.add_parser("cost", help="per-layer mixer costs on this device (or modelled), optional whole-model fit")
    s.add_argument("model", help="checkpoint directory or a built-in shape (tiny, apriel-15b)")
    s.add_argument("--batch", type=int, required=True, help="sequences decoded together")
    s.add_argument("--context", type=int, required=True, help="tokens of context per sequence")
    s.add_argument("--out", required=True, help="AdditiveCost JSON")
    s.add_argument("--modelled", action="store_true", help="bytes per step / bandwidth instead of timing")
    s.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s of the modelled roofline")
    s.add_argument("--whole-model", type=int, default=0, metavar="N", help="also time N stratified placements")
    s.add_argument("--steps", type=int, default=20, help="timed decode steps per measurement")
    s.add_argument("--warmup", type=int, default=3, help="untimed decode steps first")
    s.add_argument("--layers", type=int, default=3, help="k of the 1- vs k-layer difference")
    s.add_argument("--prefill-tokens", type=int, help="prefill length timed (default min(context, 8192))")
    s.add_argument("--seed", type=int, default=0, help="seed of the --whole-model placements")
    _add_device(s)
    s.set_defaults(fn=cmd_cost)

    s = sub.add_parser("optimize", help="exact DP frontier, presets along it, optionally written to the checkpoint")
    s.add_argument("model", help="checkpoint directory")
    s.add_argument("--fit", required=True, help="surrogate file from 'place fit' or 'place loop'")
    s.add_argument("--presets", type=int, default=4, help="presets evenly spaced in cost along the frontier")
    s.add_argument("--speedups", type=float, nargs="+", help="instead: presets at these speed-ups over all-attention")
    s.add_argument("--k-best", type=int, help="keep k runner-ups per frontier point (stand-ins for --diverse)")
    s.add_argument("--diverse", type=int, default=0, metavar="D", help="presets differ in >= D layers")
    s.add_argument("--name-prefix", help="preset names PREFIX-<speed-up>x (default: the metric)")
    s.add_argument("--cost-resolution", type=float, help="DP cost grid step (default: span / ~1000)")
    s.add_argument("--write", action="store_true", help="add the presets to MODEL/presets.json (weights untouched)")
    s.add_argument("--keep-previous", action="store_true", help="keep presets an earlier optimize run wrote")
    s.add_argument("--out", help="directory for frontier.png, frontier.html and optimize.json")
    s.add_argument("--table", help="measured placements: Pareto regret of measured presets, points in the plots")
    s.add_argument("--data", help="with --table: measure the presets not in the table first")
    _add_costs(s)
    _add_constraints(s)
    _add_scoring(s)
    s.set_defaults(fn=cmd_optimize)

    s = sub.add_parser("stability", help="rank agreement of the same placements measured twice")
    s.add_argument("table_a")
    s.add_argument("table_b")
    s.add_argument("--metric", default="loglik", help="table field to compare")
    s.add_argument("--minimize", action="store_true", help="lower values of an extra metric are better")
    s.add_argument("--costs", help="cost file: top-k overlap per cost budget")
    s.add_argument("--budgets", type=float, nargs="+", help="cost budgets (default: quartiles of the costs)")
    s.add_argument("--k", type=int, default=5, help="top-k of the overlap")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.set_defaults(fn=cmd_stability)
