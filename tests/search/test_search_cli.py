"""The placement pipeline end to end (measure -> fit -> cost -> optimize --write), its pieces against brute force
and hand computations, and its errors."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from gearshift.cli import main
from gearshift.config import SupernetConfig
from gearshift.data.tokens import TokenShardWriter
from gearshift.model import Supernet
from gearshift.placement import PlacementError
from gearshift.roofline import placement_report
from gearshift.search.cost_model import AdditiveCost
from gearshift.search.cost_sources import CostTerms, modelled_costs
from gearshift.search.dp import evaluate
from gearshift.search.fit import SurrogateFit, fit_table
from gearshift.search.loop import active_learning
from gearshift.search.measure import PlacementScorer, load_sequences
from gearshift.search.optimize import SOURCE, optimize, parse_constraints
from gearshift.search.presets import pareto_regret_of, write_presets
from gearshift.search.space import PlaceError, PlacementSpace
from gearshift.search.stability import compare_tables
from gearshift.search.table import MeasurementTable
from search_fixtures import synthetic_fit


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("place")
    tiny_model.save_pretrained(root / "ckpt")
    rng = np.random.default_rng(0)
    with TokenShardWriter(root / "data", vocab_size=97) as w:
        for _ in range(6):
            w.add(rng.integers(0, 97, int(rng.integers(8, 20))), prompt_len=int(rng.integers(0, 3)))
    return root


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_pipeline_measure_fit_cost_optimize_write(workdir, tmp_path, capsys):
    ckpt, table, fit, costs = workdir / "ckpt", tmp_path / "t.jsonl", tmp_path / "fit.json", tmp_path / "costs.json"
    common = ["--device", "cpu", "--batch-tokens", "64"]
    code, out, _ = run(
        ["place", "measure", ckpt, "--data", workdir / "data", "--placements", "stratified:30", "--out", table]
        + common,
        capsys,
    )
    assert code == 0 and "measured 30 new placements" in out
    code, out, _ = run(["place", "measure", ckpt, "--data", workdir / "data", "--placements", "stratified:30",
                        "--out", table] + common, capsys)  # fmt: skip
    assert code == 0 and "measured 0 new placements" in out

    code, out, _ = run(["place", "fit", table, "--metric", "loglik", "--r", "1", "--out", fit, "--model", ckpt], capsys)
    assert code == 0 and "CV RMSE" in out and "5-fold CV Spearman" in out
    effects = (tmp_path / "fit.effects.md").read_text()
    assert "| 3 |" in effects and "sliding_window (S)" in effects
    assert (tmp_path / "fit.effects.png").stat().st_size > 1000
    saved = json.loads(fit.read_text())
    assert saved["metric"] == "loglik" and len(saved["placements"]) == 30 and saved["cv"]["folds"] == 5

    code, out, _ = run(
        ["place", "cost", ckpt, "--batch", 2, "--context", 24, "--out", costs, "--steps", 3, "--warmup", 1]
        + ["--layers", 2, "--whole-model", 6, "--device", "cpu"],
        capsys,
    )
    assert code == 0 and "overhead" in out and "regression" in out
    cost_data = json.loads(costs.read_text())
    assert cost_data["type"] == "AdditiveCost" and cost_data["metadata"]["source"] == "timed"
    meta = cost_data["metadata"]
    assert (meta["batch"], meta["context"], meta["dtype"]) == (2, 24, "float32") and meta["device"].startswith("CPU")
    state = np.array(meta["state_bytes_per_seq"])
    mixers = Supernet.from_pretrained(ckpt).blocks[0].mixer.mixers
    assert state[0].tolist() == [mixers[k].state_bytes(24, 4) for k in ("attention", "sliding_window", "kda", "gdn")]
    assert np.all(np.array(cost_data["costs"]) >= 0)
    regression = json.loads((tmp_path / "costs.regression.json").read_text())
    assert regression["type"] == "RegressionCost" and regression["metadata"]["validation"]["n"] == 6

    weights = (ckpt / "model.safetensors").stat().st_mtime_ns
    code, out, err = run(
        # modelled costs: on a CPU at 24 tokens all-attention is the fastest timed placement, and nothing slower
        # than all-attention is ever proposed
        ["place", "optimize", ckpt, "--fit", fit, "--fixed", "0:F", "--min-count", "gdn=1"]
        + ["--max-count", "attention=2", "--presets", 3, "--write", "--table", table, "--out", tmp_path / "opt"],
        capsys,
    )
    assert code == 0 and "wrote" in out, err
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == weights  # presets.json only
    loaded = Supernet.from_pretrained(ckpt)
    made = {n: m for n, m in loaded.preset_meta.items() if m.get("source") == "gearshift place optimize"}
    assert 1 <= len(made) <= 3
    surrogate = SurrogateFit.load(fit)
    for name, meta in made.items():
        p = loaded.presets[name]
        assert p[0] == "attention" and p.count("gdn") >= 1 and p.count("attention") <= 2
        letters = json.loads((ckpt / "presets.json").read_text())["presets"][name]["letters"]
        assert meta["predicted_quality"] == pytest.approx(float(surrogate.predict([letters])[0]))
        assert meta["speedup"] > 0 and meta["cost"] > 0 and meta["quality_metric"] == "loglik"
    assert (tmp_path / "opt" / "frontier.png").exists() and "frontier-data" in (
        tmp_path / "opt" / "frontier.html"
    ).read_text()
    report = json.loads((tmp_path / "opt" / "optimize.json").read_text())
    assert len(report["presets"]) == len(made)
    # a second run replaces the first run's presets (hand-made ones stay), unless --keep-previous
    code, out, _ = run(["place", "optimize", ckpt, "--fit", fit, "--speedups", 1.0, "--write",
                        "--name-prefix", "again"], capsys)  # fmt: skip
    assert code == 0 and "removed presets of an earlier" in out
    second = Supernet.from_pretrained(ckpt)
    again = [n for n in second.presets if n.startswith("again-")]  # named by the speed-up reached
    assert not set(made) & set(second.presets) and len(again) == 1 and second.preset_meta[again[0]]["speedup"] >= 1.0

    # loop on the same table: one round adds frontier + uncertain placements
    code, out, err = run(
        ["place", "loop", ckpt, "--data", workdir / "data", "--table", table, "--out", tmp_path / "fit2.json"]
        + ["--rounds", 1, "--uncertain", 2, "--frontier", 2, "--estimator", "ridge", "--costs", costs]
        + common,
        capsys,
    )
    assert code == 0 and "round 1" in err
    assert len(MeasurementTable.read(table).done) > 30
    assert json.loads((tmp_path / "fit2.history.json").read_text())[0]["round"] == 1


def test_dp_presets_are_optimal_by_brute_force(tiny_config):
    space = PlacementSpace.from_config(tiny_config)
    fit = synthetic_fit(space)
    costs = CostTerms.from_model(
        AdditiveCost([1.0, 0.5, 0.2, 0.15], mixer_names=space.kinds, metadata={"overhead": 0.5}), space
    )
    cons = parse_constraints(space, fixed=["3:G"], allowed=["0-1:FSK"], max_count=["attention=1"])
    result = optimize(fit, costs, constraints=cons, n_presets=4, cost_resolution=0.05)
    every = ["".join(p) for p in itertools.product(space.letters, repeat=4)]
    ok = [p for p in every if p[3] == "G" and "G" not in p[:2] and p.count("F") <= 1]
    pred, total = fit.predict(ok), costs.total(space.encode(ok))
    assert result.presets and result.frontier
    for preset in result.presets:
        assert preset.placement in ok
        assert preset.predicted == pytest.approx(pred[total <= preset.cost + 1e-9].max(), abs=1e-9)
        assert preset.speedup == pytest.approx(costs.total(space.encode(["FFFF"]))[0] / preset.cost)
    fast = optimize(fit, costs, constraints=cons, speedups=[1.8], cost_resolution=0.05).presets[0]
    assert fast.speedup >= 1.8 and fast.predicted == pytest.approx(pred[total <= 4.5 / 1.8 + 1e-9].max())
    # presets come cheapest first, each labelled with the target it was chosen for (not the order asked); each
    # target gets the best placement within its cap, even when a tighter target chose the same one
    two = optimize(fit, costs, constraints=cons, speedups=[1.2, 1.8], cost_resolution=0.05).presets
    assert sorted(p.target for p in two) == ["1.2x", "1.8x"] and two[0].cost <= two[1].cost
    for p in two:
        cap = 4.5 / float(p.target[:-1])
        assert p.speedup >= float(p.target[:-1]) and p.predicted == pytest.approx(pred[total <= cap + 1e-9].max())
    spread = optimize(fit, costs, n_presets=5, k_best=4, diverse_layers=2, cost_resolution=0.05).presets
    for a, b in itertools.combinations(spread, 2):
        assert sum(x != y for x, y in zip(a.placement, b.placement, strict=True)) >= 2
    with pytest.raises(PlaceError, match="no placement satisfies"):
        optimize(fit, costs, constraints=parse_constraints(space, fixed=["0:F"], max_count=["F=0"]))


def test_fit_sign_save_load_and_proposals(tiny_config, tmp_path):
    space = PlacementSpace.from_config(tiny_config)
    rng = np.random.default_rng(3)
    effect = np.abs(rng.normal(0, 1, (4, 4)))
    effect[:, 0] = 0
    placements = ["".join(p) for p in itertools.product(space.letters, repeat=4)][::3]
    kl = [0.1 + sum(effect[i, space.letters.index(c)] for i, c in enumerate(p)) for p in placements]
    table = MeasurementTable.open(tmp_path / "t.jsonl", {"space": space.to_json()})
    for p, v in zip(placements, kl, strict=True):
        table.append({"placement": p, "kl": v})
    fit = fit_table(tmp_path / "t.jsonl", metric="kl", estimator="bayes_ridge")
    assert fit.sign == -1 and fit.cv["spearman"] > 0.99
    assert np.allclose(
        fit.predict(["FFFF", "GSKF"]), [0.1, 0.1 + effect[0, 3] + effect[1, 1] + effect[2, 2]], atol=1e-2
    )
    quality = evaluate(space.encode(placements), *fit.dp_terms())
    assert np.allclose(quality, -np.array(kl), atol=1e-2)  # the DP maximises quality = -kl
    # lower kl is better: a prediction below every measured kl (by more than the CV error) is an extrapolation
    best = min(kl)
    rmse = fit.cv["rmse"]
    assert fit.beyond_measured([best - rmse - 0.05, best, best + 1.0]).tolist() == [True, False, False]
    fit.save(tmp_path / "fit.json")
    back = SurrogateFit.load(tmp_path / "fit.json")
    assert np.array_equal(back.predict(placements), fit.predict(placements))
    assert "FFFS" not in placements and "FFFF" in placements
    proposals = back.propose(5, frontier=["FFFS", "FFFF"])  # frontier points are added unless measured
    assert len(set(proposals)) == len(proposals) and "FFFS" in proposals and len(proposals) in (5, 6)
    assert not set(proposals) & set(placements)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PlaceError, match="not a gearshift surrogate"):
        SurrogateFit.load(tmp_path / "bad.json")


def test_modelled_costs_reproduce_report(tiny_config):
    costs = modelled_costs(tiny_config, batch=3, context=40)
    space = PlacementSpace.from_config(tiny_config)
    terms = CostTerms.from_model(costs, space)
    for p in ["FFFF", "FSGK", "GGKS", "SSSS"]:
        want = placement_report(tiny_config, p, context=40, batch=3).roofline_ms
        assert terms.total(space.encode([p]))[0] == pytest.approx(want, rel=1e-9)
    with pytest.raises(PlaceError, match="exceeds the model's context"):
        modelled_costs(tiny_config, batch=1, context=10_000)


def test_active_learning_function(tiny_model, workdir, tmp_path):
    scorer = PlacementScorer(tiny_model, load_sequences(workdir / "data"))
    space = scorer.space
    table = MeasurementTable.open(tmp_path / "t.jsonl", scorer.header())
    costs = CostTerms.from_model(modelled_costs(tiny_model.config, batch=1, context=64), space)
    fit, history = active_learning(
        scorer, table, costs, rounds=2, n_uncertain=3, n_frontier=2, initial=8, estimator="ridge"
    )
    assert len(history) == 2 and len(fit.placements) == len(table.done) > 8
    for row in history:
        assert set(row["frontier"]) <= table.done and row["frontier_mean_abs_error"] is not None
    assert {r["source"] for r in table.records} >= {"stratified", "loop:1", "loop:2"}


def test_write_presets_keeps_others_and_validates(tiny_model, tmp_path):
    tiny_model.add_preset("mine", "GGGG", note="hand-made")
    tiny_model.save_pretrained(tmp_path / "c")
    tiny_model.presets.pop("mine")
    tiny_model.preset_meta.pop("mine")
    write_presets(tmp_path / "c", {"fast": {"placement": "gksg", "speedup": 2.5}})
    loaded = Supernet.from_pretrained(tmp_path / "c")
    assert loaded.presets["fast"] == ("gdn", "kda", "sliding_window", "gdn")
    assert loaded.preset_meta["fast"] == {"speedup": 2.5} and loaded.preset_meta["mine"] == {"note": "hand-made"}
    before = (tmp_path / "c" / "presets.json").read_bytes()
    with pytest.raises(PlacementError):
        write_presets(tmp_path / "c", {"bad": {"placement": "GGG"}})
    with pytest.raises(PlacementError, match="without spaces"):
        write_presets(tmp_path / "c", {"two words": {"placement": "GGGG"}})
    with pytest.raises(PlaceError, match="exist already"):
        write_presets(tmp_path / "c", {"fast": {"placement": "FFFF"}}, replace=False)
    assert (tmp_path / "c" / "presets.json").read_bytes() == before
    write_presets(tmp_path / "c", {"old": {"placement": "SSSS", "source": SOURCE}})
    after = write_presets(tmp_path / "c", {"new": {"placement": "KKKK", "source": SOURCE}}, drop_source=SOURCE)
    assert sorted(after) == ["fast", "mine", "new"]  # the earlier run's preset is gone, hand-made ones stay


def test_pareto_regret_by_hand(tiny_config):
    space = PlacementSpace.from_config(tiny_config)
    costs = CostTerms.from_model(AdditiveCost([1.0, 0.5, 0.2, 0.1], mixer_names=space.kinds), space)
    measured = {"FFFF": 1.0, "GGGG": 0.2, "SSSS": 0.8, "SSSG": 0.9}  # costs 4, 0.4, 2, 1.6
    got = pareto_regret_of(["SSSS", "SSSG", "FFFF", "GGGG", "KKKK"], measured, costs, space)
    assert got == pytest.approx([0.1, 0.0, 0.0, 0.0, None])  # SSSG is cheaper and better than SSSS
    lower = pareto_regret_of(["SSSS", "SSSG"], measured, costs, space, sign=-1)  # as if lower were better
    assert lower == pytest.approx([0.6, 0.7])  # GGGG (0.2) costs less than both


def test_stability(tiny_model, workdir, tmp_path, capsys):
    noisy = Supernet.random(tiny_model.config, std=0.2).eval()
    with torch.no_grad():
        for p, q in zip(noisy.parameters(), tiny_model.parameters(), strict=True):
            p.copy_(q + 0.02 * torch.randn_like(q))
    noisy.save_pretrained(tmp_path / "later")
    plist = tmp_path / "list.txt"
    plist.write_text("\n".join(["FFFF", "SSSS", "GGGG", "KKKK", "FSGK", "GSKF", "SSGG", "KKFF", "FGFG"]))
    for name, ckpt in (("a", workdir / "ckpt"), ("b", tmp_path / "later")):
        code, _, _ = run(["place", "measure", ckpt, "--data", workdir / "data", "--placements", plist]
                         + ["--out", tmp_path / f"{name}.jsonl", "--device", "cpu"], capsys)  # fmt: skip
        assert code == 0
    code, out, _ = run(["place", "stability", tmp_path / "a.jsonl", tmp_path / "b.jsonl", "--json", "--k", 3], capsys)
    data = json.loads(out)
    assert code == 0 and data["n"] == 9 and -1 <= data["spearman"] <= 1 and data["topk_overlap"]["None"] >= 0
    same = compare_tables(tmp_path / "a.jsonl", tmp_path / "a.jsonl", metric="kl", k=3)
    assert same["spearman"] == pytest.approx(1.0) and same["topk_overlap"][None] == 1.0
    space = PlacementSpace.from_config(tiny_model.config)
    costs = CostTerms.from_model(AdditiveCost([1.0, 0.5, 0.2, 0.1], mixer_names=space.kinds), space)
    per_budget = compare_tables(tmp_path / "a.jsonl", tmp_path / "b.jsonl", costs=costs, budgets=[0.5, 4.0], k=2)
    assert set(per_budget["topk_overlap"]) == {None, 0.5, 4.0}
    code, out, _ = run(["place", "stability", tmp_path / "a.jsonl", tmp_path / "b.jsonl"], capsys)
    assert code == 0 and "Spearman" in out and "9 shared placements" in out


def test_cli_errors(workdir, tmp_path, capsys):
    ckpt = workdir / "ckpt"
    other = tmp_path / "six"
    Supernet.random(SupernetConfig.tiny(num_layers=6, vocab_size=97), std=0.2).save_pretrained(other)
    bad = tmp_path / "bad.txt"
    bad.write_text("FSGK\nFSGKK\n")
    data = ["--data", workdir / "data", "--device", "cpu"]
    code, _, err = run(["place", "measure", ckpt, "--placements", bad, "--out", tmp_path / "t.jsonl"] + data, capsys)
    assert code == 2 and "error:" in err and "bad.txt:2" in err and "5 letters" in err
    assert not (tmp_path / "t.jsonl").exists()  # nothing measured, nothing written

    table, fit = tmp_path / "t4.jsonl", tmp_path / "fit4.json"
    assert run(["place", "measure", ckpt, "--placements", "stratified:12", "--out", table] + data, capsys)[0] == 0
    code, _, err = run(["place", "fit", table, "--out", fit, "--model", other], capsys)
    assert code == 2 and "another model" in err
    code, _, err = run(["place", "fit", table, "--out", fit, "--metric", "accuracy"], capsys)
    assert code == 2 and "no 'accuracy'" in err
    empty = tmp_path / "empty.jsonl"
    MeasurementTable.open(empty, {"space": PlacementSpace.from_config(SupernetConfig.tiny()).to_json()})
    code, _, err = run(["place", "fit", empty, "--out", fit], capsys)
    assert code == 2 and "no measured placements" in err

    assert run(["place", "fit", table, "--out", fit, "--estimator", "ridge", "--no-plots"], capsys)[0] == 0
    code, _, err = run(["place", "optimize", other, "--fit", fit], capsys)
    assert code == 2 and "another model" in err
    code, _, err = run(["place", "optimize", ckpt, "--fit", fit, "--memory-budget-gb", "1e-9"], capsys)
    assert code == 2 and "no placement satisfies" in err
    code, _, err = run(["place", "optimize", ckpt, "--fit", fit, "--fixed", "0:G", "--max-count", "gdn=0"], capsys)
    assert code == 2 and "error:" in err
    code, _, err = run(["place", "optimize", ckpt, "--fit", fit, "--fixed", "9:F"], capsys)
    assert code == 2 and "outside 0..3" in err
    code, _, err = run(["place", "optimize", ckpt, "--fit", fit, "--min-count", "mamba=1"], capsys)
    assert code == 2 and "unknown mixer 'mamba'" in err
    code, _, err = run(
        ["place", "cost", ckpt, "--batch", 1, "--context", 100_000, "--out", tmp_path / "c.json"], capsys
    )
    assert code == 2 and "exceeds the model's context" in err
    code, _, err = run(["place", "measure", ckpt, "--placements", "proposals:" + str(tmp_path / "none.json"),
                        "--out", table] + data, capsys)  # fmt: skip
    assert code == 2 and "no such surrogate fit" in err
    single = tmp_path / "one.jsonl"
    MeasurementTable.open(single, {}).append({"placement": "FFFF", "loglik": 1.0})
    code, _, err = run(["place", "stability", table, single], capsys)
    assert code == 2 and "share" in err


def test_sharded_measurement_merges_to_the_single_run(workdir, tmp_path, capsys):
    """Placements measured in two parts (as on two GPUs) and merged equal one process measuring them all."""
    base = ["place", "measure", workdir / "ckpt", "--data", workdir / "data", "--placements", "stratified:10"]
    opts = ["--device", "cpu", "--batch-tokens", "64"]
    assert run(base + ["--out", tmp_path / "all.jsonl"] + opts, capsys)[0] == 0
    for k in (0, 1):
        code, out, _ = run(base + ["--out", tmp_path / f"part{k}.jsonl", "--shard", f"{k}/2"] + opts, capsys)
        assert code == 0 and "measured 5 new placements" in out
    code, out, _ = run(["place", "merge", tmp_path / "part0.jsonl", tmp_path / "part1.jsonl", "--out",
                        tmp_path / "merged.jsonl"], capsys)  # fmt: skip
    assert code == 0 and "10 new placements" in out
    whole = {r["placement"]: r for r in MeasurementTable.read(tmp_path / "all.jsonl").records}
    merged = {r["placement"]: r for r in MeasurementTable.read(tmp_path / "merged.jsonl").records}
    assert merged.keys() == whole.keys()
    for p, r in whole.items():
        assert all(merged[p][m] == r[m] for m in ("loglik", "kl", "agreement"))
    code, _, err = run(base + ["--out", tmp_path / "x.jsonl", "--shard", "2/2"] + opts, capsys)
    assert code == 2 and "--shard" in err
    other = ["--device", "cpu", "--batch-tokens", "64", "--max-len", "9"]  # measured differently: refused
    assert run(base + ["--out", tmp_path / "short.jsonl"] + other, capsys)[0] == 0
    code, _, err = run(["place", "merge", tmp_path / "all.jsonl", tmp_path / "short.jsonl", "--out",
                        tmp_path / "bad.jsonl"], capsys)  # fmt: skip
    assert code == 2 and "cannot be merged" in err
