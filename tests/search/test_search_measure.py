"""Placement measurement: values against hand computations, batching, resumable tables, selection, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gearshift.config import LayerConfig
from gearshift.data.tokens import TokenSequence, TokenShardWriter
from gearshift.model import Supernet
from gearshift.search.measure import PlacementScorer, load_sequences, measure_placements
from gearshift.search.sampling import stratified
from gearshift.search.selection import parse_selection, read_placement_file
from gearshift.search.space import PlaceError, PlacementSpace
from gearshift.search.table import MeasurementTable, TableError

PLACEMENTS = ["FSGK", "GGKS", "SSSS", "KFGF"]


def write_shards(path, n=6, vocab=97, seed=0, min_len=6, max_len=20):
    rng = np.random.default_rng(seed)
    seqs = []
    with TokenShardWriter(path, vocab_size=vocab, shard_tokens=40) as w:  # several shards
        for _ in range(n):
            length = int(rng.integers(min_len, max_len))
            seq = rng.integers(0, vocab, length)
            prompt = int(rng.integers(0, 4))
            w.add(seq, prompt_len=prompt)
            seqs.append((seq, prompt))
    return seqs


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("shards")
    write_shards(path)
    return path


def hand_metrics(model, sequences, placement, reference="FFFF"):
    """One sequence at a time through the plain forward; the scored positions written out as a loop."""
    ll = kl = agree = 0.0
    n = 0
    with torch.no_grad():
        for s in sequences:
            ids = torch.as_tensor(s.tokens.astype(np.int64))[None]
            lp = F.log_softmax(model(ids, placement)[0].double(), -1)
            ref = F.log_softmax(model(ids, reference)[0].double(), -1)
            for i in range(max(s.prompt_len, 1), ids.shape[1]):
                ll += float(lp[i - 1, ids[0, i]])
                kl += float((ref[i - 1].exp() * (ref[i - 1] - lp[i - 1])).sum())
                agree += float(lp[i - 1].argmax() == ref[i - 1].argmax())
                n += 1
    return {"loglik": ll / n, "kl": kl / n, "agreement": agree / n, "tokens": n}


def test_values_match_hand_loop(tiny_model, shards):
    seqs = load_sequences(shards)
    scorer = PlacementScorer(tiny_model, seqs, batch_tokens=80)
    assert len(scorer._batches) < len(seqs)  # really packed with padding
    for placement in ["GSKF", "FFFF"]:
        got = scorer.score(placement)
        want = hand_metrics(tiny_model, seqs, placement)
        assert got["tokens"] == want["tokens"]
        assert got["loglik"] == pytest.approx(want["loglik"], abs=1e-5)
        assert got["kl"] == pytest.approx(want["kl"], abs=1e-5)
        assert got["agreement"] == pytest.approx(want["agreement"])
    same = scorer.score("all-attention")
    assert same["kl"] == pytest.approx(0.0, abs=1e-7) and same["agreement"] == 1.0


def test_batched_equals_one_by_one(tiny_model, shards):
    seqs = load_sequences(shards)
    packed = PlacementScorer(tiny_model, seqs, batch_tokens=4096)
    single = PlacementScorer(tiny_model, seqs, batch_tokens=1)  # one sequence per forward, never padded
    assert len(packed._batches) == 1 and len(single._batches) == len(seqs)
    for p in PLACEMENTS:
        a, b = packed.score(p), single.score(p)
        for key in ("loglik", "kl", "agreement"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (p, key)


def test_topk_reference_is_a_lower_bound(tiny_model, shards):
    seqs = load_sequences(shards)
    exact = PlacementScorer(tiny_model, seqs)
    vocab = tiny_model.config.vocab_size
    full_k = PlacementScorer(tiny_model, seqs, reference_topk=vocab)
    small_k = PlacementScorer(tiny_model, seqs, reference_topk=4)
    for p in ["GGKS", "KFGF"]:
        e, f, s = exact.score(p), full_k.score(p), small_k.score(p)
        assert f["kl"] == pytest.approx(e["kl"], abs=1e-6)
        assert 0 < s["kl"] < e["kl"]
        assert s["agreement"] == e["agreement"] and s["loglik"] == e["loglik"]


def test_extra_metric_hook_and_flags(tiny_model, shards):
    seen = []

    def mc_accuracy(model, placement):
        seen.append(placement)
        return 0.25 * placement.count("gdn")

    scorer = PlacementScorer(
        tiny_model, load_sequences(shards), kl=False, agreement=False, extra_metrics={"mc": mc_accuracy}
    )
    out = scorer.score("GGKS")
    assert out["mc"] == 0.5 and "kl" not in out and "agreement" not in out
    assert seen == [("gdn", "gdn", "kda", "sliding_window")]
    assert scorer.metric_names() == ["loglik", "mc"]
    with pytest.raises(PlaceError, match="clash"):
        PlacementScorer(tiny_model, load_sequences(shards), extra_metrics={"kl": mc_accuracy})


def test_sequence_selection(tmp_path, tiny_model):
    with TokenShardWriter(tmp_path / "d", vocab_size=97) as w:
        w.add([1, 2, 3], prompt_len=3)  # prompt only: nothing to score
        w.add([4], prompt_len=0)  # the first token is never scored
        w.add([5, 6, 7, 8, 9], prompt_len=1)
        w.add([10, 11, 12, 13], prompt_len=0)
    seqs = load_sequences(tmp_path / "d")
    assert [s.tokens.tolist() for s in seqs] == [[5, 6, 7, 8, 9], [10, 11, 12, 13]]
    assert PlacementScorer(tiny_model, seqs).n_tokens == 4 + 3
    assert [s.tokens.tolist() for s in load_sequences(tmp_path / "d", offset=3, max_len=2)] == [[10, 11]]
    with pytest.raises(PlaceError, match="no sequence"):
        load_sequences(tmp_path / "d", limit=2)
    with pytest.raises(PlaceError, match="vocab"):
        PlacementScorer(tiny_model, [TokenSequence(np.array([1, 500], dtype=np.uint32), 0)])
    with pytest.raises(PlaceError, match="no sequences"):
        PlacementScorer(tiny_model, [])
    with pytest.raises(PlaceError, match="reference_topk"):  # 7 tokens x 97 x 4 bytes > 1e-6 GB
        PlacementScorer(tiny_model, seqs, reference_memory_gb=1e-6)
    assert PlacementScorer(tiny_model, seqs, reference_memory_gb=1e-6, kl=False, agreement=False).n_tokens == 7


def test_resume_skips_done_and_survives_torn_line(tiny_model, shards, tmp_path):
    calls = []
    scorer = PlacementScorer(
        tiny_model, load_sequences(shards), extra_metrics={"n": lambda m, p: calls.append(p) or len(calls)}
    )
    path = tmp_path / "t.jsonl"
    table = MeasurementTable.open(path, scorer.header())
    first = measure_placements(scorer, PLACEMENTS[:3], table, source="a")
    assert [r["placement"] for r in first] == PLACEMENTS[:3] and len(calls) == 3
    with open(path, "ab") as f:  # a crash in the middle of a write
        f.write(b'{"placement":"KFGF","loglik":-3.')
    assert MeasurementTable.read(path).done == set(PLACEMENTS[:3])
    table = MeasurementTable.open(path, scorer.header())
    new = measure_placements(scorer, [p.lower() for p in PLACEMENTS] + ["FSGK"], table, source="b")
    assert [r["placement"] for r in new] == ["KFGF"] and len(calls) == 4
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line) for line in lines)  # header + 4 records, no torn line
    again = MeasurementTable.read(path)
    assert again.done == set(PLACEMENTS) and again.space == scorer.space
    names, values = again.values("loglik")
    assert names == PLACEMENTS and values[0] == pytest.approx(first[0]["loglik"])


def test_complete_unterminated_line_is_kept(tiny_model, shards, tmp_path):
    scorer = PlacementScorer(tiny_model, load_sequences(shards))
    path = tmp_path / "t.jsonl"
    measure_placements(scorer, ["FSGK"], MeasurementTable.open(path, scorer.header()))
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # the newline of the last record never made it
    table = MeasurementTable.open(path, scorer.header())
    assert table.done == {"FSGK"}
    measure_placements(scorer, ["GGGG"], table)
    assert MeasurementTable.read(path).done == {"FSGK", "GGGG"}


def test_table_errors(tiny_model, shards, tmp_path):
    scorer = PlacementScorer(tiny_model, load_sequences(shards))
    path = tmp_path / "t.jsonl"
    measure_placements(scorer, ["FSGK", "GGGG"], MeasurementTable.open(path, scorer.header()))
    other = PlacementScorer(tiny_model, load_sequences(shards, limit=3))
    with pytest.raises(TableError, match="data"):
        MeasurementTable.open(path, other.header())
    with pytest.raises(TableError, match="no such"):
        MeasurementTable.read(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    MeasurementTable.open(empty, scorer.header())
    with pytest.raises(TableError, match="no measured placements"):
        MeasurementTable.read(empty)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1][:20], lines[2]]) + "\n")
    with pytest.raises(TableError, match="line 2"):
        MeasurementTable.read(path)
    with pytest.raises(TableError, match="no 'kl'|has no"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"placement": "FFFF", "loglik": 1.0}\n{"placement": "GGGG", "loglik": 2.0}\n')
        MeasurementTable.read(bad).values("kl")


def test_placements_are_checked_against_the_model(tiny_config, tmp_path):
    layer = tiny_config.layers[0]
    no_gdn = LayerConfig({k: v for k, v in layer.mixers.items() if k != "gdn"}, "attention", layer.mlp)
    cfg = tiny_config.replace(layers=(layer, no_gdn, layer, layer))
    space = PlacementSpace.from_config(cfg)
    assert space.letters == "FSKG" and space.layers[1] == "FSK" and space.reference == 0
    assert space.check("fsgk") == "FSGK"
    with pytest.raises(PlaceError, match="3 letters but the model has 4 layers"):
        space.check("FSG")
    with pytest.raises(PlaceError, match="layer 2 has letter 'X'"):
        space.check("FSXK")
    with pytest.raises(PlaceError, match="layer 1 does not hold gdn"):
        space.check("FGGK")
    assert all(p[1] != "G" for p in stratified(space, 40, seed=1))
    model = Supernet.random(cfg, std=0.2).eval()
    seqs = [TokenSequence(np.arange(1, 9, dtype=np.uint32), 0)]
    scorer = PlacementScorer(model, seqs)
    with pytest.raises(PlaceError, match="layer 1 does not hold gdn"):
        measure_placements(scorer, ["FSKG", "GGGG"])
    with pytest.raises(PlaceError, match="more than the model's context"):
        PlacementScorer(model, [TokenSequence(np.ones(600, dtype=np.uint32), 0)])


def test_selection_specs(tiny_config, tmp_path):
    space = PlacementSpace.from_config(tiny_config)
    picked = stratified(space, 30, seed=0)
    assert len(set(picked)) == 30 and picked[:4] == ["FFFF", "SSSS", "KKKK", "GGGG"]
    assert len(stratified(space, 10_000)) == 256  # the whole space, no more
    f = tmp_path / "list.txt"
    f.write_text("# presets to check\nffsg\n\nGGGG  # all GDN\n")
    assert read_placement_file(f, space) == ["FFSG", "GGGG"]
    assert parse_selection(str(f), space) == (["FFSG", "GGGG"], "file:list.txt")
    assert parse_selection("stratified:5", space)[1] == "stratified"
    f.write_text("FFSG\nFFS\n")
    with pytest.raises(PlaceError, match=r"list.txt:2: .*3 letters"):
        read_placement_file(f, space)
    with pytest.raises(PlaceError, match="stratified:N"):
        parse_selection("stratified:many", space)
    with pytest.raises(PlaceError, match="no such placement file"):
        parse_selection(str(tmp_path / "none.txt"), space)
