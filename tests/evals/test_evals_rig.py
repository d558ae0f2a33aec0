"""A supernet rigged through its weights into a bigram model with known log-probabilities, for the eval tests.

Every mixer and MLP output projection is zeroed, so the residual stream at a position is the current token's
embedding. With 128 ASCII tokens and hidden size 128, the embedding is sqrt(H) * one-hot, the final RMSNorm
leaves it (up to eps) unchanged, and the LM head's column x holds the logits of the token after x. Logits not
set in the table are 0, so log P(y | x) = table[x][y] - log(sum_y' exp(table[x][y'])) exactly (by hand).

Optionally the sliding-window mixer is "damaged": its values are constant and its output projection writes a huge
vector along token ``DAMAGE_TOKEN``, so every placement using it predicts as if the current token were that one.
Other test modules import the helpers from here.
"""

from __future__ import annotations

import math

import pytest
import torch

from gearshift import Supernet, SupernetConfig
from gearshift.evals import Scorer

V = H = 128
CHAIN = "abcdefghijklmnopqrstuvwxyz"
DAMAGE_TOKEN = "~"  # what a damaged sliding-window layer makes every position look like
STRONG = 20.0


class AsciiTokenizer:
    """One token per ASCII character (ids 0..127): the tiny test tokenizer."""

    bos_token_id = None
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        ids = [ord(c) for c in text]
        assert max(ids, default=0) < V, f"non-ASCII text {text!r}"
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def base_table() -> dict[str, dict[str, float]]:
    """':' '?' and 's' -> ' ', ' ' -> 'a', the alphabet chain a -> b -> ... -> z, digits 1 -> 2 -> ... -> 7 -> '.'."""
    table: dict[str, dict[str, float]] = {":": {" ": STRONG}, "?": {" ": STRONG}, "s": {" ": STRONG}}
    table[" "] = {"a": STRONG}
    for a, b in zip(CHAIN, CHAIN[1:], strict=False):
        table.setdefault(a, {})[b] = STRONG
    for a, b in zip("1234567", "234567.", strict=True):
        table[a] = {b: STRONG}
    table[DAMAGE_TOKEN] = {"9": 10.0}
    return table


def config(max_positions: int = 512, layers: int = 2) -> SupernetConfig:
    return SupernetConfig.uniform(
        num_layers=layers,
        hidden_size=H,
        vocab_size=V,
        heads=4,
        kv_heads=2,
        head_dim=32,
        intermediate_size=32,
        window=8,
        max_position_embeddings=max_positions,
        bos_token_id=None,
        eos_token_id=None,
    )


@torch.no_grad()
def rigged_model(
    table: dict[str, dict[str, float]] | None = None,
    *,
    max_positions: int = 512,
    layers: int = 2,
    damage_swa: bool = False,
) -> Supernet:
    model = Supernet.random(config(max_positions, layers), seed=0).eval()
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")):
            p.zero_()
    model.model.embed_tokens.weight.copy_(math.sqrt(H) * torch.eye(V))
    eps = model.model.norm.eps
    head = torch.zeros(V, V)
    for x, row in (table or base_table()).items():
        for y, logit in row.items():
            head[ord(y), ord(x)] = logit * math.sqrt(1 + eps) / math.sqrt(H)
    model.lm_head.weight.copy_(head)
    if damage_swa:
        for block in model.blocks:
            swa = block.mixer.mixers["sliding_window"]
            swa.v_proj.weight.fill_(1 / math.sqrt(H))  # every token's value ~ ones
            swa.o_proj.weight.zero_()
            swa.o_proj.weight[ord(DAMAGE_TOKEN)] = 1e4 / H  # output ~ 1e4 along DAMAGE_TOKEN
    return model


def logprob(table: dict[str, dict[str, float]], prev: str, nxt: str) -> float:
    """log P(nxt | prev) of the rigged model, by hand."""
    row = table.get(prev, {})
    z = sum(math.exp(v) for v in row.values()) + (V - len(row))
    return row.get(nxt, 0.0) - math.log(z)


def text_logprob(table: dict[str, dict[str, float]], context: str, continuation: str) -> float:
    full = context + continuation
    return sum(logprob(table, full[i - 1], full[i]) for i in range(len(context), len(full)))


@pytest.fixture(scope="module")
def rig() -> Supernet:
    return rigged_model()


@torch.no_grad()
def test_rigged_model_matches_hand_computed_logprobs(rig):
    table = base_table()
    tok = AsciiTokenizer()
    text = "q: abcz?1234 x"
    ids = torch.tensor([tok.encode(text)])
    for placement in ("FF", "SG", "KK"):
        lp = rig(ids, placement)[0].log_softmax(-1)
        for i in range(1, len(text)):
            assert float(lp[i - 1, ord(text[i])]) == pytest.approx(logprob(table, text[i - 1], text[i]), abs=1e-4)
    # the scorer agrees with the hand sum, through the left-padded batch
    scorer = Scorer(rig, tok)
    pairs = [("q:", " abc"), ("longer context:", " abd"), ("x?", " b")]
    got = scorer.loglikelihood(pairs, "FS")
    for (ctx, cont), (ll, _) in zip(pairs, got, strict=True):
        assert ll == pytest.approx(text_logprob(table, ctx, cont), abs=1e-4)
    assert [g for _, g in got] == [True, False, False]


@torch.no_grad()
def test_damaged_sliding_window_predicts_the_damage_token_row():
    table = base_table()
    model = rigged_model(damage_swa=True)
    ids = torch.tensor([AsciiTokenizer().encode("ab")])
    clean = model(ids, "FF")[0, 0].log_softmax(-1)
    damaged = model(ids, "SF")[0, 0].log_softmax(-1)
    assert float(clean[ord("b")]) == pytest.approx(logprob(table, "a", "b"), abs=1e-4)
    assert int(damaged.argmax()) == ord("9")
    assert float(damaged[ord("9")]) == pytest.approx(logprob(table, DAMAGE_TOKEN, "9"), abs=1e-2)
