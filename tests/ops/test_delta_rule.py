"""The two delta-rule forms (chunked, recurrent) against the literal recurrence of mixers.md."""

import pytest
import torch
import torch.nn.functional as F

from gearshift.ops import delta_rule as delta_rule_module
from gearshift.ops.delta_rule import chunk_delta_rule, recurrent_delta_rule

from naive import delta_rule_literal


def inputs(per_channel, t=19, b=2, h=2, hv=4, dk=8, dv=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, dk, generator=gen)
    k = F.normalize(torch.randn(b, t, h, dk, generator=gen), dim=-1)
    v = torch.randn(b, t, hv, dv, generator=gen)
    shape = (b, t, hv, dk) if per_channel else (b, t, hv)
    g = -torch.rand(shape, generator=gen) * 3  # strong decays too: exp(-3) per token
    beta = torch.rand(b, t, hv, generator=gen)
    s0 = torch.randn(b, hv, dk, dv, generator=gen)
    return q, k, v, g, beta, s0


@pytest.fixture(params=["one_block", "many_blocks"])
def kda_blocks(request, monkeypatch):
    """KDA's chunks go through the chunked form in blocks sized by memory: one block, or a block per 2 chunks."""
    if request.param == "many_blocks":
        monkeypatch.setattr(delta_rule_module, "PER_CHANNEL_BLOCK_ELEMENTS", 2 * 2 * 4 * 4 * 4 * 8)
    return request.param


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
@pytest.mark.parametrize("with_state", [False, True])
def test_forms_match_literal_recurrence(per_channel, with_state, kda_blocks):
    q, k, v, g, beta, s0 = inputs(per_channel)
    s0 = s0 if with_state else None
    ratio = v.shape[2] // q.shape[2]
    ref_o, ref_s = delta_rule_literal(
        q.repeat_interleave(ratio, 2), k.repeat_interleave(ratio, 2), v, g, beta, 0.35, s0
    )
    o, s = recurrent_delta_rule(q, k, v, g, beta, 0.35, s0)
    torch.testing.assert_close(o, ref_o, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(s, ref_s, atol=2e-5, rtol=1e-4)
    for chunk in (1, 4, 8, 64):  # partial last chunk, exact multiple, single chunk
        o, s = chunk_delta_rule(q, k, v, g, beta, 0.35, s0, chunk_size=chunk)
        torch.testing.assert_close(o, ref_o, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(s, ref_s, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
def test_chunked_gradients_match_recurrent(per_channel, kda_blocks):
    base = inputs(per_channel, t=11, seed=1)
    grads = []
    for fn in (recurrent_delta_rule, lambda *a: chunk_delta_rule(*a, chunk_size=4)):
        xs = [x.clone().requires_grad_(True) for x in base]
        o, s = fn(*xs[:5], 0.5, xs[5])
        (o.square().sum() + s.sum()).backward()
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_recurrent_states_and_splitting():
    q, k, v, g, beta, s0 = inputs(True, t=9)
    o, s, states = recurrent_delta_rule(q, k, v, g, beta, 0.3, s0, return_states=True)
    assert states.shape == (2, 9, 4, 8, 6)
    torch.testing.assert_close(states[:, -1], s)
    # running the first 5 tokens, then the rest from the state after 5, is the same as running all 9
    _, s5 = chunk_delta_rule(q[:, :5], k[:, :5], v[:, :5], g[:, :5], beta[:, :5], 0.3, s0, chunk_size=2)
    torch.testing.assert_close(s5, states[:, 4], atol=1e-5, rtol=1e-5)
    o2, _ = chunk_delta_rule(q[:, 5:], k[:, 5:], v[:, 5:], g[:, 5:], beta[:, 5:], 0.3, s5, chunk_size=2)
    torch.testing.assert_close(o2, o[:, 5:], atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_rejected():
    q, k, v, g, beta, _ = inputs(False)
    with pytest.raises(ValueError, match="g must be"):
        chunk_delta_rule(q, k, v, g[..., None, None], beta, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        recurrent_delta_rule(q[:, :, :1].expand(-1, -1, 3, -1), k[:, :, :1].expand(-1, -1, 3, -1), v, g, beta, 1.0)


def test_fla_gdn_backward_guard_matches_fla_issue_640():
    from gearshift.ops.dispatch import gated_backward_broken

    assert gated_backward_broken((9, 0), "3.6.0", has_tilelang=False)  # the H200 image of 2026-11
    assert gated_backward_broken((9, 0), "3.4.0", has_tilelang=False)
    assert not gated_backward_broken((9, 0), "3.7.1", has_tilelang=False)
    assert not gated_backward_broken((9, 0), "3.3.1", has_tilelang=False)
    assert not gated_backward_broken((9, 0), "3.6.0", has_tilelang=True)
    assert not gated_backward_broken((8, 0), "3.6.0", has_tilelang=False)  # A100: not affected
    assert not gated_backward_broken((9, 0), None, has_tilelang=False)
    assert gated_backward_broken((9, 0), "3.6.0+git1234", has_tilelang=False)


def test_training_backend_override(monkeypatch):
    from gearshift.ops.dispatch import backend_for

    cpu = torch.device("cpu")
    monkeypatch.setenv("GEARSHIFT_TRAIN_BACKEND", "bogus")
    assert backend_for(cpu) == "torch"  # inference ignores the training override
    with pytest.raises(ValueError, match="GEARSHIFT_TRAIN_BACKEND"):
        backend_for(cpu, training=True)
    monkeypatch.setenv("GEARSHIFT_TRAIN_BACKEND", "fla")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        backend_for(cpu, training=True)
    monkeypatch.setenv("GEARSHIFT_TRAIN_BACKEND", "torch")
    assert backend_for(cpu, training=True) == "torch"


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
def test_gradient_check_tells_right_from_wrong_kernels(per_channel):
    """The check run before training on a kernel: the recurrent form agrees with the chunked one; a form with the
    right forward but a sign-flipped key gradient (a silently wrong backward, like fla #640) is caught."""
    from gearshift.ops.dispatch import delta_rule_gradients_agree

    def recurrent(q, k, v, g, beta, scale, state):
        return recurrent_delta_rule(q, k, v, g, beta, scale, state)

    def wrong_backward(q, k, v, g, beta, scale, state):
        k = k.detach() - (k - k.detach())  # same values, gradient negated
        return chunk_delta_rule(q, k, v, g, beta, scale, state)

    shape = (1, 40, 2, 8)
    agree, cosine = delta_rule_gradients_agree(recurrent, chunk_delta_rule, per_channel, shape=shape)
    assert agree and cosine > 0.9999
    agree, cosine = delta_rule_gradients_agree(wrong_backward, chunk_delta_rule, per_channel, shape=shape)
    assert not agree and cosine < 0


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="fla's kernels need CUDA (run on the GPU machine)"))])  # fmt: skip
def test_in_place_decode(per_channel, device):
    """``delta_rule(in_place=True)`` writes the final state over the initial one and returns that tensor, equal to
    the recurrence; on CUDA through fla's kernel (GDN's decay broadcast over K), also for a non-contiguous state
    (no in-place kernel there: a copy keeps the contract). With a recorded tail it is refused."""
    from gearshift.ops.dispatch import delta_rule

    q, k, v, g, beta, s0 = (x.to(device) for x in inputs(per_channel, t=3, dk=64, dv=64))
    for state in (s0.clone(), s0.transpose(0, 1).contiguous().transpose(0, 1)):
        ref_o, ref_state = recurrent_delta_rule(*(x.cpu() for x in (q, k, v, g, beta)), 0.125, s0.cpu())
        with torch.no_grad():  # decoding (with gradients, fla's chunked kernels run)
            o, final, _ = delta_rule(q, k, v, g, beta, 0.125, state, in_place=True)
        assert final is state
        torch.testing.assert_close(final.cpu(), ref_state, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(o.cpu().float(), ref_o, atol=2e-4, rtol=2e-4)
    with pytest.raises(ValueError, match="in_place"):
        delta_rule(q, k, v, g, beta, 0.125, s0.clone(), record_last=1, in_place=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's kernels need CUDA (run on the GPU machine)")
@pytest.mark.parametrize("per_channel", [False, True])
def test_fla_in_place_kernel_agrees_with_the_public_one(per_channel):
    from gearshift.ops.dispatch import _in_place_usable, in_place_decode_agrees

    assert in_place_decode_agrees(torch.device("cuda"), per_channel)
    assert _in_place_usable(torch.device("cuda"), per_channel)


def test_in_place_kernel_is_checked_once_and_never_in_a_capture(monkeypatch):
    """The in-place decode kernel is used only after an eager check on that GPU agreed; a graph capture never runs
    the check (it uses the public kernel until an eager call has checked)."""
    from gearshift.ops import dispatch

    calls = []
    monkeypatch.setattr(dispatch, "_in_place_verdicts", {})
    monkeypatch.setattr(dispatch, "_fla_recurrent_in_place", lambda: object())
    monkeypatch.setattr(dispatch, "in_place_decode_agrees", lambda device, per_channel: calls.append(1) or per_channel)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not dispatch._in_place_usable(torch.device("cuda", 0), True) and not calls
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert dispatch._in_place_usable(torch.device("cuda", 0), True)
    assert not dispatch._in_place_usable(torch.device("cuda", 0), False)  # a kind whose check disagreed
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert dispatch._in_place_usable(torch.device("cuda", 0), True) and len(calls) == 2  # checked once each
    monkeypatch.setattr(dispatch, "_fla_recurrent_in_place", lambda: None)
    assert not dispatch._in_place_usable(torch.device("cuda", 1), True)  # an fla without the kernel


def test_gdn_is_kda_with_its_decay_broadcast_over_the_key_channels():
    """Why GDN may train on KDA's kernel: a scalar decay per head is a diagonal decay with equal entries, so the
    per-channel recurrence computes the same outputs, and the gradient of the shared decay is the sum of the
    channels' (which autograd forms through the broadcast)."""
    base = inputs(False, t=21, seed=3)
    grads = []
    for per_channel in (False, True):
        q, k, v, g, beta, s0 = (x.clone().requires_grad_(True) for x in base)
        decay = g[..., None].expand(*g.shape, q.shape[-1]) if per_channel else g
        o, s = chunk_delta_rule(q, k, v, decay, beta, 0.4, s0, chunk_size=8)
        (o.square().sum() + s.sum()).backward()
        grads.append([o.detach(), s.detach()] + [x.grad for x in (q, k, v, g, beta, s0)])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_training_kernel_routes_gdn_through_kda_where_its_own_backward_fails(monkeypatch):
    from gearshift.ops import dispatch

    verdicts = {"gdn": True, "kda": True, "gdn-via-kda": True}
    broken = [False]
    monkeypatch.setattr(dispatch, "_gradients_check", lambda index, name, heads: (verdicts[name], 1.0))
    monkeypatch.setattr(dispatch, "_gdn_backward_broken_on", lambda index: broken[0])
    cuda = torch.device("cuda", 0)
    assert dispatch.training_kernel(cuda, per_channel=True) == "kda"
    assert dispatch.training_kernel(cuda, per_channel=False) == "gdn"  # GDN's own kernel where it works
    broken[0] = True  # fla #640: Hopper, Triton in [3.4, 3.7.1)
    assert dispatch.training_kernel(cuda, per_channel=False) == "kda"
    verdicts["gdn-via-kda"] = False  # a route whose gradient check fails never trains
    assert dispatch.training_kernel(cuda, per_channel=False) is None
    verdicts["gdn-via-kda"] = True
    monkeypatch.setenv("GEARSHIFT_GDN_VIA_KDA", "0")
    assert dispatch.training_kernel(cuda, per_channel=False) is None
    verdicts["kda"] = False
    assert dispatch.training_kernel(cuda, per_channel=True) is None


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
def test_packed_gradient_check_catches_a_kernel_that_ignores_document_starts(per_channel):
    """The check a training kernel passes first runs on packed rows: a kernel that carried the state across
    documents (the forward of unpacked rows) is caught."""
    from gearshift.ops.dispatch import delta_rule_gradients_agree

    def packed(q, k, v, g, beta, scale, state, starts):
        return recurrent_delta_rule(q, k, v, g, beta, scale, state, starts=starts)

    def unpacked(q, k, v, g, beta, scale, state, starts):
        return chunk_delta_rule(q, k, v, g, beta, scale, state)

    shape = (2, 192, 2, 8)
    agree, cosine = delta_rule_gradients_agree(packed, chunk_delta_rule, per_channel, shape=shape, packed=True)
    assert agree and cosine > 0.9999
    agree, _ = delta_rule_gradients_agree(unpacked, chunk_delta_rule, per_channel, shape=shape, packed=True)
    assert not agree
