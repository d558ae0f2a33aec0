"""Needle in a haystack on a synthetic haystack: prompt construction, a rigged model that knows the needle, a
placement that is damaged on purpose, relative scores, heatmaps, errors."""

from __future__ import annotations

import random

import matplotlib.image as mpimg
import numpy as np
import pytest
from test_evals_rig import STRONG, AsciiTokenizer, base_table, rigged_model

from gearshift.evals import EvalError, Needle, placements_to_evaluate, plot_niah, run_niah
from gearshift.evals.niah import Haystack, build_cell, result_rows
from gearshift.evals.tokenizer import as_codec

VALUE = "1234567"


def essays(n: int = 6, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["lorem", "ipsum", "dolor", "sit", "amet", "tempor", "magna", "dolore"]
    return [
        " ".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + "." for _ in range(20))
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def knowing_model():
    """After 'is' comes ' ', then 1 -> 2 -> ... -> 7: the rigged model 'knows' the needle value 1234567.
    Its sliding-window mixer is damaged, so placements that use it cannot answer."""
    table = base_table()
    table[" "] = {"1": STRONG}
    return rigged_model(table, damage_swa=True)


def test_prompt_holds_the_needle_at_the_asked_depth():
    codec = as_codec(AsciiTokenizer())
    hay = Haystack(codec, essays())
    needle = Needle(value=VALUE)
    for depth in (0, 30, 50, 100):
        cell = build_cell(codec, hay, needle, length=400, depth=depth, trial=0, distractors=5, seed=1)
        text = codec.decode(cell.tokens)
        assert len(cell.tokens) <= 400 and len(cell.tokens) >= 395
        assert text.endswith(
            "\n\nQuestion: What is the special magic number mentioned in the text?\nAnswer: " + needle.answer_prefix
        )
        at = text.index(f"The special magic number is {VALUE}.")
        haystack_len = (
            len(text) - len(text[text.index("\n\nQuestion") :]) - len(f" The special magic number is {VALUE}.")
        )
        assert abs(at / haystack_len - depth / 100) < 0.1  # near the asked depth ...
        assert at == 0 or text[:at].rstrip().endswith(".")  # ... at a sentence boundary
        assert VALUE not in cell.distractors and len(set(cell.distractors)) == 5
        assert all(len(d) == 7 for d in cell.distractors)
    again = build_cell(codec, hay, needle, length=400, depth=50, trial=0, distractors=5, seed=1)
    assert again == build_cell(codec, hay, needle, length=400, depth=50, trial=0, distractors=5, seed=1)
    other = build_cell(codec, hay, Needle(), length=400, depth=50, trial=1, distractors=5, seed=1)
    assert other.value != VALUE and len(other.value) == 7
    long = Haystack(codec, ["Short."]).tokens(50)  # a haystack shorter than asked for repeats
    assert len(long) == 50 and codec.decode(long).startswith("Short.\n\nShort.")


def test_rigged_model_finds_the_needle_and_the_damaged_placement_does_not(knowing_model, tmp_path):
    (tmp_path / "hay").mkdir()
    for i, text in enumerate(essays()):
        (tmp_path / "hay" / f"{i}.txt").write_text(text)
    placements = placements_to_evaluate(knowing_model, ["SF", "GK"])
    assert list(placements) == ["all-attention", "SF", "GK"]
    result = run_niah(
        knowing_model,
        AsciiTokenizer(),
        placements,
        lengths=[200, 320],
        depths=[0, 50, 100],
        needle=Needle(value=VALUE),
        trials=2,
        distractors=6,
        haystack=tmp_path / "hay",
    )
    p = result["presets"]
    assert result["baseline"] == "all-attention" and result["settings"]["chance"] == pytest.approx(1 / 7)
    for name in ("all-attention", "GK"):
        assert len(p[name]["cells"]) == 6
        assert all(c["greedy"] == 1.0 and c["ll"] == 1.0 and c["mean_rank"] == 1.0 for c in p[name]["cells"])
        assert all(c["margin"] > 10 for c in p[name]["cells"])  # a wrong digit costs ~STRONG nats
        assert all(g.startswith(" " + VALUE + ".") for c in p[name]["cells"] for g in c["generated"])
    assert p["GK"]["summary"]["ll_retention"] == 1.0 and p["GK"]["summary"]["greedy_vs_baseline"] == 0.0
    damaged = p["SF"]
    assert damaged["placement"] == "SF"
    assert all(c["greedy"] == 0.0 and c["ll"] == 0.0 for c in damaged["cells"])
    assert all(c["ll_vs_baseline"] == -1.0 for c in damaged["cells"])
    assert damaged["summary"]["ll_retention"] == 0.0 and damaged["summary"]["greedy_vs_baseline"] == -1.0
    rows = {r.preset: r for r in result_rows(result)}
    assert rows["SF"].scores == {"niah_greedy": 0.0, "niah_ll": 0.0}
    assert rows["all-attention"].scores == {"niah_greedy": 1.0, "niah_ll": 1.0}

    paths = plot_niah(result, tmp_path / "plots")
    assert sorted(p.name for p in paths.values()) == ["niah_GK.png", "niah_SF.png", "niah_all-attention.png"]
    for path in paths.values():
        img = mpimg.imread(path)
        assert img.shape[0] > 200 and img.shape[1] > 500
        assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 20  # a drawn figure, not a blank canvas


def test_random_needle_values_are_unknown_to_the_rigged_model(knowing_model):
    result = run_niah(
        knowing_model,
        AsciiTokenizer(),
        {"all-attention": "FF"},
        lengths=[180],
        depths=[50],
        trials=3,
        haystack=essays(),
    )
    cell = result["presets"]["all-attention"]["cells"][0]
    assert cell["greedy"] == 0.0 and cell["mean_rank"] > 1  # it recites 1234567, which is not the needle


def test_niah_errors(knowing_model):
    with pytest.raises(EvalError, match=r"max_position_embeddings \(512\); use --lengths of at most"):
        run_niah(knowing_model, AsciiTokenizer(), {"x": "FF"}, lengths=[200, 600], haystack=essays())
    with pytest.raises(EvalError, match="cannot hold the needle"):
        run_niah(knowing_model, AsciiTokenizer(), {"x": "FF"}, lengths=[40], depths=[0], haystack=essays())
    with pytest.raises(EvalError, match="depth"):
        run_niah(knowing_model, AsciiTokenizer(), {"x": "FF"}, lengths=[250], depths=[120], haystack=essays())
    with pytest.raises(EvalError, match="value"):
        Needle(text="no placeholder")
    with pytest.raises(EvalError, match="7 digits"):
        Needle(value="12")
