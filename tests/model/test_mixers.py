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


class _MatmulCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts matmul-like ops with a weight of ``module`` as an operand (what a GPU runs as projection GEMMs)."""

    OPS = ("mm", "addmm", "bmm", "baddbmm")

    def __init__(self, module):
        super().__init__()
        self.weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.OPS and any(
            isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.weights for a in args
        ):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("name", "matmuls"), [("attention", (4, 2)), ("gdn", (3, 2)), ("kda", (9, 3))])
def test_fused_projections_match_naive_with_fewer_matmuls(tiny_config, name, matmuls):
    from gearshift.model import Supernet

    model = Supernet.random(tiny_config, seed=0, std=0.2).eval()
    mod = model.blocks[1].mixer.mixers[name]
    names = [n for n, _ in mod.named_parameters()]
    values = {n: p.detach().clone() for n, p in mod.named_parameters()}
    x = torch.randn(2, 7, tiny_config.hidden_size, generator=torch.Generator().manual_seed(3))
    counts = []
    outs = []
    for fuse in (False, True):
        if fuse:
            assert model.fuse_projections_() is model
        with torch.no_grad(), _MatmulCount(mod) as counter:
            outs.append(mod(x, ctx_for(7, 2)))
        counts.append(counter.count)
    assert tuple(counts) == matmuls
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(outs[1][0], naive.mixer(mod, x[0]), atol=1e-5, rtol=1e-4)
    # names, shapes and values unchanged; fewer storages
    assert [n for n, _ in mod.named_parameters()] == names
    for n, p in mod.named_parameters():
        assert torch.equal(p.detach(), values[n])
    assert len({p.untyped_storage().data_ptr() for p in mod.parameters()}) < len(names)
    # a conversion replaces each parameter's data: back to one matmul each, still right
    model.double()
    with torch.no_grad(), _MatmulCount(mod) as counter:
        again = mod(x.double(), ctx_for(7, 2))
    assert counter.count == matmuls[0]
    torch.testing.assert_close(again.float(), outs[0], atol=1e-5, rtol=1e-4)


def test_fused_projections_train_like_separate_ones(tiny_config):
    """With gradients on, the parts of fused weights get their own gradients (the fused view is not used)."""
    from gearshift.model import Supernet

    ids = torch.randint(0, tiny_config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    grads = []
    for fuse in (False, True):
        model = Supernet.random(tiny_config, seed=0, std=0.2).train()
        if fuse:
            model.fuse_projections_()
        model(ids, "FGKS").logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


def test_fused_model_saves_and_loads(tiny_config, tmp_path):
    from gearshift.model import Supernet

    model = Supernet.random(tiny_config, seed=0, std=0.2).fuse_projections_()
    model.save_pretrained(tmp_path)  # safetensors refuses shared storage: parts are saved on their own
    loaded = Supernet.from_pretrained(tmp_path)
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n == m and torch.equal(a, b)


def test_fused_mlp_and_model_match_naive(tiny_config):
    from gearshift.model import Supernet

    model = Supernet.random(tiny_config, seed=0, std=0.2).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (11,), generator=torch.Generator().manual_seed(1))
    mlp = model.blocks[0].mlp
    x = torch.randn(3, tiny_config.hidden_size)
    counts = []
    for fuse in (False, True):
        if fuse:
            model.fuse_projections_()
        with torch.no_grad(), _MatmulCount(mlp) as counter:
            mlp(x)
        counts.append(counter.count)
    assert counts == [3, 2]
    with torch.no_grad():
        got = model(ids[None], "KGSF")[0]
        ref = naive.model_logits(model, ids, model.resolve("KGSF"))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_fused_attention_with_qkv_bias():
    """Qwen2-style q/k/v biases are laid out together with their weights."""
    from gearshift.config import AttentionConfig
    from gearshift.layers.attention import Attention

    torch.manual_seed(0)
    mod = Attention(32, AttentionConfig(heads=4, head_groups=2, head_size=8, qkv_bias=True)).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        before = mod(x, ctx_for(5, 2))
        mod.fuse_()
        with _MatmulCount(mod) as counter:
            after = mod(x, ctx_for(5, 2))
    assert counter.count == 2
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
