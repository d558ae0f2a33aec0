"""Log-likelihood scoring: hand-computed multiple-choice answers, batching/caching equivalence, rolling windows,
generation, errors."""

from __future__ import annotations

import math
import random

import pytest
import torch
from test_evals_rig import STRONG, AsciiTokenizer, base_table, logprob, rigged_model, text_logprob

from gearshift.evals import EvalError, Scorer, SharedContext, rolling_spans
from gearshift.evals.tasks import MCExample, multiple_choice, score_multiple_choice


@pytest.fixture(scope="module")
def rig():
    return rigged_model()


def test_acc_and_acc_norm_differ_exactly_as_by_hand():
    # after "q" comes " " for sure; then "x" (logit 3) beats "y" (logit 2), but "y" is followed by the certain "zw"
    table = {"q": {" ": STRONG}, " ": {"x": 3.0, "y": 2.0}, "y": {"z": STRONG}, "z": {"w": STRONG}}
    scorer = Scorer(rigged_model(table), AsciiTokenizer())
    lse = math.log(math.exp(3) + math.exp(2) + 126)
    certain = STRONG - math.log(math.exp(STRONG) + 127)
    ll_x = certain + (3 - lse)  # " x"
    ll_yzw = certain + (2 - lse) + 2 * certain  # " yzw"
    assert ll_x > ll_yzw and ll_x / 1 < ll_yzw / 3  # acc picks "x", acc_norm (per character) picks "yzw"
    got = scorer.loglikelihood([("q", " x"), ("q", " yzw")], "FG")
    assert got[0][0] == pytest.approx(ll_x, abs=1e-4) and got[1][0] == pytest.approx(ll_yzw, abs=1e-4)
    examples = [multiple_choice("q", ["x", "yzw"], gold=1), multiple_choice("q", ["x", "yzw"], gold=0)]
    r = score_multiple_choice(scorer, examples, "FG")
    assert r.predictions == (0, 0) and r.predictions_norm == (1, 1)
    assert (r.acc, r.acc_norm, r.acc_bytes, r.n) == (0.5, 0.5, 0.5, 2)
    only_norm = score_multiple_choice(scorer, examples[:1], "KS")
    assert (only_norm.acc, only_norm.acc_norm) == (0.0, 1.0)


def test_acc_bytes_normalises_by_utf8_length():
    class FixedScorer:  # the metric arithmetic alone, with hand-picked log-likelihoods
        def loglikelihood(self, pairs, placement=None):
            return [(-1.5, False), (-2.2, False)]

    ex = MCExample(pairs=(("c", " é"), ("c", " ab")), gold=0, answers=("é", "ab"))
    r = score_multiple_choice(FixedScorer(), [ex])
    # sums: -1.5 vs -2.2 -> "é"; per char: -1.5 vs -1.1 -> "ab"; per byte ("é" is 2 bytes): -0.75 vs -1.1 -> "é"
    assert (r.acc, r.acc_norm, r.acc_bytes) == (1.0, 0.0, 1.0)


def test_rigged_model_answers_every_synthetic_question(rig):
    rng = random.Random(0)
    examples = []
    for _ in range(12):
        context = "".join(rng.choice("mnopq ") for _ in range(rng.randint(1, 12))) + rng.choice(":?")
        correct = "abcdefgh"[: rng.randint(1, 8)]  # the rigged chain after the delimiter
        wrong = ["".join(rng.choice("bcdefghijk") for _ in range(rng.randint(1, 8))) for _ in range(3)]
        gold = rng.randrange(4)
        options = wrong[:gold] + [correct] + wrong[gold:]
        examples.append(multiple_choice(context, options, gold))
    scorer = Scorer(rig, AsciiTokenizer(), max_batch_tokens=64)
    for placement in ("FF", "GK", "SF"):
        r = score_multiple_choice(scorer, examples, placement)
        assert (r.acc, r.acc_norm, r.n) == (1.0, 1.0, 12)
    shifted = [MCExample(e.pairs, (e.gold + 1) % 4, e.answers) for e in examples]
    assert score_multiple_choice(scorer, shifted, "FF").acc == 0.0


@torch.no_grad()
@pytest.mark.parametrize("placement", ["FFFF", "SSSS", "GGGG", "KKKK", "FSGK"])
def test_batched_padding_and_shared_context_match_single_rows(tiny_model, placement):
    gen = torch.Generator().manual_seed(1)
    spans = []
    for n in (5, 9, 14, 21, 7, 3):
        tokens = torch.randint(0, 97, (n,), generator=gen).tolist()
        spans.append((tokens, max(1, n // 2)))
    reference = []
    for tokens, start in spans:
        lp = tiny_model(torch.tensor([tokens[:-1]]), placement)[0].log_softmax(-1)
        reference.append(sum(float(lp[j - 1, tokens[j]]) for j in range(start, len(tokens))))
    batched = Scorer(tiny_model, max_batch_tokens=45).score_spans(spans, placement)  # several mixed-width batches
    for got, ref, (tokens, start) in zip(batched, reference, spans, strict=True):
        assert got.logprob == pytest.approx(ref, abs=2e-4)
        assert got.tokens == len(tokens) - start
    for (tokens, start), ref in zip(spans, reference, strict=True):
        shared = SharedContext(tiny_model, tokens[:start], placement, rollback=len(tokens) - start, prefill_chunk=4)
        first = shared.score(tokens[start:])
        again = shared.score(tokens[start:])  # the roll-back restored the context exactly
        assert first.logprob == pytest.approx(ref, abs=2e-4)
        assert again.logprob == pytest.approx(first.logprob, abs=1e-5)


def test_rolling_spans_by_hand_and_cover_every_token_once():
    # lm-eval's documented example: tokens 0..9 after a prefix P, context 4
    tokens = ["P", *range(10)]
    spans = rolling_spans(tokens, 1, 4)
    assert [(list(t), s) for t, s in spans] == [
        (["P", 0, 1, 2, 3], 1),
        ([3, 4, 5, 6, 7], 1),
        ([5, 6, 7, 8, 9], 3),
    ]
    rng = random.Random(0)
    for _ in range(50):
        n, max_len = rng.randint(2, 40), rng.randint(1, 9)
        start, stride = rng.randint(1, n - 1), rng.randint(1, max_len)
        seq = list(range(n))
        scored = []
        for t, s in rolling_spans(seq, start, max_len, stride):
            assert 1 <= s < len(t) and len(t) - 1 <= max_len
            scored += list(t[s:])
        assert scored == seq[start:]
    with pytest.raises(EvalError, match="stride"):
        rolling_spans(seq, 1, 4, stride=5)


def test_rolling_loglikelihood_over_windows_equals_the_hand_sum():
    table = base_table()
    model = rigged_model(max_positions=8)  # the text needs four windows
    text = "abcdefghij klmnopqrstu"
    scorer = Scorer(model, AsciiTokenizer())
    assert scorer.prefix_token_id == 0  # no BOS/EOS anywhere: token 0 stands in
    (got,) = scorer.loglikelihood_rolling([text], "GS")
    assert got == pytest.approx(logprob(table, "\x00", "a") + text_logprob(table, "a", text[1:]), abs=1e-3)
    (strided,) = scorer.loglikelihood_rolling([text], "GS", stride=3)
    assert strided == pytest.approx(got, abs=1e-3)


def test_encode_pair_moves_trailing_space_and_handles_empty_context(rig):
    scorer = Scorer(rig, AsciiTokenizer())
    assert scorer.encode_pair("q: ", "abc") == ([ord("q"), ord(":")], [ord(c) for c in " abc"])
    assert scorer.encode_pair("", "ab") == ([0], [ord("a"), ord("b")])
    # an over-long context loses its oldest tokens; the bigram model does not notice
    long = Scorer(rigged_model(max_positions=8), AsciiTokenizer())
    (ll, greedy), *_ = long.loglikelihood([("mnopqrstuvwxyz:", " abc")], "FF")
    assert ll == pytest.approx(text_logprob(base_table(), ":", " abc"), abs=1e-4) and greedy


def test_generate_stops_at_until_eos_and_budget(rig):
    scorer = Scorer(rig, AsciiTokenizer())
    out = scorer.generate(["q:", "a much longer prompt?"], "GK", max_new_tokens=10, until=["e"])
    assert out == [" abcd", " abcd"]
    assert scorer.generate(["q:"], "FS", max_new_tokens=3) == [" ab"]
    table = base_table()
    table["c"] = {"\x02": STRONG}  # "c" is followed by token 2, the EOS of the config below
    eos_model = rigged_model(table)
    eos_model.config = eos_model.config.replace(eos_token_id=2)
    assert Scorer(eos_model, AsciiTokenizer()).generate(["q:"], "FF", max_new_tokens=10) == [" abc"]


def test_scoring_errors(rig):
    scorer = Scorer(rig, AsciiTokenizer())
    with pytest.raises(EvalError, match="max_position_embeddings"):
        scorer.score_spans([(list(range(100)) * 6, 1)])
    with pytest.raises(EvalError, match="token ids"):
        scorer.score_spans([([1, 2, 500], 1)])
    with pytest.raises(EvalError, match="cannot be scored"):
        scorer.score_spans([([1, 2], 2)])
    with pytest.raises(EvalError, match="no tokens"):
        scorer.loglikelihood([("abc", "")])
    with pytest.raises(EvalError, match="without a tokenizer"):
        Scorer(rig).loglikelihood([("a", "b")])
    with pytest.raises(EvalError, match="max_position_embeddings"):
        SharedContext(rig, [1] * 510, "FF", rollback=8)
    shared = SharedContext(rig, [ord(":")], "FF", rollback=2)
    with pytest.raises(EvalError, match="roll-back room"):
        shared.score([1, 2, 3, 4])
    with pytest.raises(EvalError, match="roll-back room"):
        shared.greedy(5)
    assert shared.greedy(3) == [ord(" "), ord("a"), ord("b")]
