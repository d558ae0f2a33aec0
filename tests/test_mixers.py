"""Each mixer module, and the whole model, against the per-token references in naive.py."""

import pytest
import torch

from gearshift.layers.base import StepContext

import naive


def ctx_for(t, b=1):
    idx = torch.arange(t)
    return StepContext(idx, idx[None].expand(b, t))


@pytest.mark.parametrize("name", ["attention", "sliding_window", "gdn", "kda"])
def test_mixer_matches_naive(tiny_model, name):
    mod = tiny_model.blocks[1].mixer.mixers[name]
    x = torch.randn(1, 13, tiny_model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = mod(x, ctx_for(13))[0]
        ref = naive.mixer(mod, x[0])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_kda_sigmoid_gate_matches_naive():
    from gearshift.config import KDAConfig
    from gearshift.layers.kda import KimiDeltaAttention

    torch.manual_seed(0)
    mod = KimiDeltaAttention(32, KDAConfig(heads=2, head_dim=8, gate_activation="sigmoid"))
    x = torch.randn(1, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(mod(x, ctx_for(9))[0], naive.kda(mod, x[0]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("placement", ["FSGK", "KGSF", "GGKK"])
def test_model_matches_naive(tiny_model, placement):
    ids = torch.randint(0, tiny_model.config.vocab_size, (11,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = tiny_model(ids[None], placement)[0]
        ref = naive.model_logits(tiny_model, ids, tiny_model.resolve(placement))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
