"""Independent references written straight from the equations in shared/reference/mixers.md.

Nothing here imports gearshift's ops: per-token loops, explicit convolution sums, explicit rotations, explicit
softmax. Slow by design; tiny shapes only.
"""

import math

import torch
import torch.nn.functional as F


def rope_rotate(x, pos, theta):
    """x [D] at position pos: rotate pairs (i, i + D/2) by pos * theta^(-2i/D) (rotate-half convention)."""
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        ang = pos * theta ** (-2 * i / d)
        a, b = x[i], x[i + d // 2]
        out[i] = a * math.cos(ang) - b * math.sin(ang)
        out[i + d // 2] = b * math.cos(ang) + a * math.sin(ang)
    return out


def attention(mod, x, window=None):
    """Causal GQA attention of one sequence x [T, hidden]; key j visible from i iff j <= i and i - j < window."""
    c = mod.cfg
    t = x.shape[0]
    q = (x @ mod.q_proj.weight.T).view(t, c.heads, c.head_size)
    k = (x @ mod.k_proj.weight.T).view(t, c.head_groups, c.head_size)
    v = (x @ mod.v_proj.weight.T).view(t, c.head_groups, c.head_size)
    group = c.heads // c.head_groups
    out = torch.zeros(t, c.heads, c.head_size)
    for h in range(c.heads):
        kv = h // group
        qs = [rope_rotate(q[i, h], i, c.rope.theta) for i in range(t)]
        ks = [rope_rotate(k[j, kv], j, c.rope.theta) for j in range(t)]
        for i in range(t):
            js = [j for j in range(i + 1) if window is None or i - j < window]
            scores = torch.stack([qs[i] @ ks[j] for j in js]) / math.sqrt(c.head_size)
            w = scores.softmax(0)
            out[i, h] = sum(w[n] * v[j, kv] for n, j in enumerate(js))
    return out.reshape(t, -1) @ mod.o_proj.weight.T


def short_conv(x, weight):
    """y_t = sum_j w[c, j] * x_{t - (K-1) + j}, zeros before the start; x [T, C], weight [C, 1, K]."""
    t, _ = x.shape
    k = weight.shape[-1]
    y = torch.zeros_like(x)
    for i in range(t):
        for j in range(k):
            src = i - (k - 1) + j
            if src >= 0:
                y[i] += weight[:, 0, j] * x[src]
    return y


def l2(x):
    return x / torch.sqrt((x * x).sum() + 1e-6)


def rms(x, eps):
    return x / torch.sqrt((x * x).mean() + eps)


def gdn(mod, x):
    c = mod.cfg
    t = x.shape[0]
    kd, vd = c.key_heads * c.key_head_dim, c.value_heads * c.value_head_dim
    qkvz = x @ mod.in_proj_qkvz.weight.T
    q, k, v, z = qkvz[:, :kd], qkvz[:, kd : 2 * kd], qkvz[:, 2 * kd : 2 * kd + vd], qkvz[:, 2 * kd + vd :]
    ba = x @ mod.in_proj_ba.weight.T
    b, a = ba[:, : c.value_heads], ba[:, c.value_heads :]
    conv = F.silu(short_conv(torch.cat([q, k, v], -1), mod.convolution.weight))
    q, k, v = conv[:, :kd], conv[:, kd : 2 * kd], conv[:, 2 * kd :]
    ratio = c.value_heads // c.key_heads
    out = torch.zeros(t, c.value_heads, c.value_head_dim)
    for h in range(c.value_heads):
        kh = h // ratio
        s = torch.zeros(c.key_head_dim, c.value_head_dim)
        for i in range(t):
            qi = l2(q[i, kh * c.key_head_dim : (kh + 1) * c.key_head_dim]) / math.sqrt(c.key_head_dim)
            ki = l2(k[i, kh * c.key_head_dim : (kh + 1) * c.key_head_dim])
            vi = v[i, h * c.value_head_dim : (h + 1) * c.value_head_dim]
            g = -torch.exp(mod.A_log[h]) * F.softplus(a[i, h] + mod.dt_bias[h])
            beta = torch.sigmoid(b[i, h])
            decayed = torch.exp(g) * s
            s = decayed + beta * torch.outer(ki, vi - decayed.T @ ki)  # S_t = e^g S + beta k (v - (e^g S)^T k)^T
            o = s.T @ qi
            zi = z[i, h * c.value_head_dim : (h + 1) * c.value_head_dim]
            out[i, h] = rms(o, c.norm_eps) * mod.norm.weight * F.silu(zi)
    return out.reshape(t, vd) @ mod.out_proj.weight.T


def kda(mod, x):
    c = mod.cfg
    t = x.shape[0]
    h_, d = c.heads, c.head_dim
    q = F.silu(short_conv(x @ mod.q_proj.weight.T, mod.q_conv.weight))
    k = F.silu(short_conv(x @ mod.k_proj.weight.T, mod.k_conv.weight))
    v = F.silu(short_conv(x @ mod.v_proj.weight.T, mod.v_conv.weight))
    graw = (x @ mod.f_a_proj.weight.T) @ mod.f_b_proj.weight.T
    gate = (x @ mod.g_a_proj.weight.T) @ mod.g_b_proj.weight.T
    braw = x @ mod.beta_proj.weight.T
    act = torch.sigmoid if c.gate_activation == "sigmoid" else F.silu
    out = torch.zeros(t, h_, d)
    for h in range(h_):
        sl = slice(h * d, (h + 1) * d)
        s = torch.zeros(d, d)
        for i in range(t):
            qi, ki, vi = l2(q[i, sl]) / math.sqrt(d), l2(k[i, sl]), v[i, sl]
            g = -torch.exp(mod.A_log[h]) * F.softplus(graw[i, sl] + mod.dt_bias[sl])
            beta = torch.sigmoid(braw[i, h])
            # S_t = (I - beta k k^T) Diag(e^g) S_{t-1} + beta k v^T
            s = (torch.eye(d) - beta * torch.outer(ki, ki)) @ torch.diag(torch.exp(g)) @ s + beta * torch.outer(ki, vi)
            o = s.T @ qi
            out[i, h] = rms(o, c.norm_eps) * mod.norm.weight * act(gate[i, sl])
    return out.reshape(t, h_ * d) @ mod.o_proj.weight.T


def mixer(mod, x):
    if mod.kind == "gdn":
        return gdn(mod, x)
    if mod.kind == "kda":
        return kda(mod, x)
    return attention(mod, x, mod.cfg.window_size)


def model_logits(model, ids, placement):
    """Full model on one sequence ids [T] with per-token-loop mixers."""
    eps = model.config.norm_eps
    h = model.model.embed_tokens.weight[ids]
    for block, name in zip(model.blocks, placement, strict=True):
        x = torch.stack([rms(r, eps) for r in h]) * block.input_layernorm.weight
        h = h + mixer(block.mixer.mixers[name], x)
        y = torch.stack([rms(r, eps) for r in h]) * block.post_attention_layernorm.weight
        mlp = block.mlp
        h = h + (F.silu(y @ mlp.gate_proj.weight.T) * (y @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    h = torch.stack([rms(r, eps) for r in h]) * model.model.norm.weight
    w = model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    return h @ w.T


def delta_rule_literal(q, k, v, g, beta, scale, s0=None):
    """The literal recurrence on [B, T, H, ...] tensors (q/k already at value-head count)."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    o = torch.zeros(b, t, h, dv)
    s_out = torch.zeros(b, h, dk, dv)
    for bi in range(b):
        for hi in range(h):
            s = torch.zeros(dk, dv) if s0 is None else s0[bi, hi].clone()
            for i in range(t):
                gi = g[bi, i, hi]
                d = torch.diag(torch.exp(gi)) if gi.dim() else torch.exp(gi) * torch.eye(dk)
                ki, vi = k[bi, i, hi], v[bi, i, hi]
                s = (torch.eye(dk) - beta[bi, i, hi] * torch.outer(ki, ki)) @ d @ s + beta[bi, i, hi] * torch.outer(
                    ki, vi
                )
                o[bi, i, hi] = s.T @ (scale * q[bi, i, hi])
            s_out[bi, hi] = s
    return o, s_out
