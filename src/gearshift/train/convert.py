"""Teacher -> supernet: shared weights copied, FA/SWA copied from the teacher's attention, GDN/KDA initialised from it.

GDN ("DIL", mixers.md) with group-consistent heads: GDN key head j is the teacher's KV head j, its query the
first query head of that group (j * group), value head h the teacher's KV head h // group (the one attention
head h reads), output columns those of attention head h; z = 0, in_proj_ba = 0, conv = 0.5 at the last tap,
A_log = log 0.1, dt_bias = 0. KDA ("KIL"): q, k, v, o copied (K/V heads repeated per group), low-rank decay,
gate and beta projections random, conv 0.5 at the last tap, A_log = log 0.1, dt_bias = 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..config import AttentionConfig, GDNConfig, KDAConfig, LayerConfig, MLPConfig, RopeConfig, SupernetConfig
from ..model import Supernet
from .teacher import SUPPORTED, TeacherError

MIXER_NAMES = ("attention", "sliding_window", "gdn", "kda")


def _rope(cfg: Any) -> RopeConfig:
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    source = {**scaling, **params}
    if kind == "default":
        return RopeConfig(theta=float(theta))
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return RopeConfig(theta=float(theta), type="llama3", **{k: source[k] for k in keys if k in source})
    raise TeacherError(f"teacher rotary scaling {kind!r} is not supported (default and llama3 are)")


def supernet_config_from_teacher(
    cfg: Any, *, mixers: tuple[str, ...] = MIXER_NAMES, window: int = 4096, main_mixer: str = "attention"
) -> SupernetConfig:
    if getattr(cfg, "model_type", None) not in SUPPORTED:
        raise TeacherError(f"teacher architecture {getattr(cfg, 'model_type', None)!r} is not supported")
    unknown = [m for m in mixers if m not in MIXER_NAMES]
    if unknown or not mixers:
        raise TeacherError(f"unknown mixers {unknown}; choose from {MIXER_NAMES}")
    if main_mixer not in mixers:
        raise TeacherError(f"main mixer {main_mixer!r} is not among the mixers {list(mixers)}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise TeacherError(f"teacher MLP activation {cfg.hidden_act!r} is not supported (silu is)")
    if getattr(cfg, "mlp_bias", False):
        raise TeacherError("teachers with MLP biases are not supported")
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    qkv_bias = cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False))
    o_bias = cfg.model_type != "qwen2" and bool(getattr(cfg, "attention_bias", False))
    rope = _rope(cfg)
    catalog = {
        "attention": AttentionConfig(heads, kv, head_dim, rope=rope, qkv_bias=qkv_bias, o_bias=o_bias),
        "sliding_window": AttentionConfig(
            heads, kv, head_dim, rope=rope, window_size=window, qkv_bias=qkv_bias, o_bias=o_bias
        ),
        "gdn": GDNConfig(value_heads=heads, key_heads=kv, key_head_dim=head_dim, value_head_dim=head_dim),
        "kda": KDAConfig(heads=heads, head_dim=head_dim),
    }
    layer = LayerConfig({m: catalog[m] for m in mixers}, main_mixer, MLPConfig(cfg.intermediate_size))
    eos = cfg.eos_token_id
    return SupernetConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        layers=(layer,) * cfg.num_hidden_layers,
        norm_eps=float(cfg.rms_norm_eps),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.max_position_embeddings),
        bos_token_id=cfg.bos_token_id,
        eos_token_id=list(eos) if isinstance(eos, list | tuple) else eos,
        pad_token_id=cfg.pad_token_id,
    )


@torch.no_grad()
def convert_teacher(
    teacher: nn.Module,
    *,
    mixers: tuple[str, ...] = MIXER_NAMES,
    window: int = 4096,
    main_mixer: str = "attention",
    seed: int = 0,
) -> Supernet:
    """Build a supernet from a transformers Llama/Mistral/Qwen2 causal LM (fp32 copy of its weights)."""
    cfg = supernet_config_from_teacher(teacher.config, mixers=mixers, window=window, main_mixer=main_mixer)
    model = Supernet.random(cfg, seed=seed, std=0.02)
    gen = torch.Generator().manual_seed(seed)
    t = teacher.model
    model.model.embed_tokens.weight.copy_(t.embed_tokens.weight)
    model.model.norm.weight.copy_(t.norm.weight)
    if model.lm_head is not None:
        model.lm_head.weight.copy_(teacher.lm_head.weight)
    if len(t.layers) != cfg.num_layers:
        raise TeacherError(f"teacher has {len(t.layers)} layers, its config says {cfg.num_layers}")
    for block, tl in zip(model.blocks, t.layers, strict=True):
        block.input_layernorm.weight.copy_(tl.input_layernorm.weight)
        block.post_attention_layernorm.weight.copy_(tl.post_attention_layernorm.weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(block.mlp, name).weight.copy_(getattr(tl.mlp, name).weight)
        attn = tl.self_attn
        for name, mixer in block.mixer.mixers.items():
            if name in ("attention", "sliding_window"):
                for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    _copy_linear(getattr(mixer, proj), getattr(attn, proj))
            elif name == "gdn":
                _init_gdn(mixer, attn, cfg.layers[0].mixers["gdn"])
            elif name == "kda":
                _init_kda(mixer, attn, cfg.layers[0].mixers["kda"], gen)
    return model.eval()


def _copy_linear(dst: nn.Linear, src: nn.Linear) -> None:
    if dst.weight.shape != src.weight.shape:
        raise TeacherError(f"shape mismatch {tuple(src.weight.shape)} -> {tuple(dst.weight.shape)}")
    dst.weight.copy_(src.weight)
    if dst.bias is not None:
        dst.bias.copy_(src.bias if src.bias is not None else torch.zeros_like(dst.bias))


def _heads(w: torch.Tensor, n: int) -> torch.Tensor:
    return w.view(n, w.shape[0] // n, w.shape[1])


def _short_conv_identity(conv: nn.Module) -> None:
    conv.weight.zero_()
    conv.weight[:, 0, -1] = 0.5


def _init_gdn(mixer: nn.Module, attn: nn.Module, c: GDNConfig) -> None:
    group = c.value_heads // c.key_heads
    q = _heads(attn.q_proj.weight, c.value_heads)[::group]  # one query head per key group
    k = _heads(attn.k_proj.weight, c.key_heads)
    v = _heads(attn.v_proj.weight, c.key_heads).repeat_interleave(group, 0)
    z = torch.zeros_like(v)
    mixer.in_proj_qkvz.weight.copy_(torch.cat([x.reshape(-1, x.shape[-1]) for x in (q, k, v, z)]))
    mixer.in_proj_ba.weight.zero_()
    _short_conv_identity(mixer.convolution)
    mixer.A_log.fill_(math.log(0.1))
    mixer.dt_bias.zero_()
    mixer.norm.weight.fill_(1.0)
    mixer.out_proj.weight.copy_(attn.o_proj.weight)


def _init_kda(mixer: nn.Module, attn: nn.Module, c: KDAConfig, gen: torch.Generator) -> None:
    kv_heads = attn.k_proj.weight.shape[0] // c.head_dim
    group = c.heads // kv_heads
    mixer.q_proj.weight.copy_(attn.q_proj.weight)
    for dst, src in ((mixer.k_proj, attn.k_proj), (mixer.v_proj, attn.v_proj)):
        dst.weight.copy_(_heads(src.weight, kv_heads).repeat_interleave(group, 0).reshape(dst.weight.shape))
    mixer.o_proj.weight.copy_(attn.o_proj.weight)
    for lin in (mixer.f_a_proj, mixer.f_b_proj, mixer.g_a_proj, mixer.g_b_proj, mixer.beta_proj):
        bound = 1 / math.sqrt(lin.weight.shape[1])
        lin.weight.copy_(torch.empty(lin.weight.shape).uniform_(-bound, bound, generator=gen))
    for conv in (mixer.q_conv, mixer.k_conv, mixer.v_conv):
        _short_conv_identity(conv)
    mixer.A_log.fill_(math.log(0.1))
    mixer.dt_bias.zero_()
    mixer.norm.weight.fill_(1.0)
