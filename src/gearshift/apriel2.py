"""The Apriel2 checkpoint format: its ``config.json`` <-> ``SupernetConfig``, and its tensor names.

Reads what ServiceNow's Apriel2 code writes (fixed and pattern decoders, stochastic and plain layers) and writes what
it reads: every layer as a ``stochastic`` mixer (also when thinned to one mixer, as their thinning tool does), rotary
``mistral_1d``, every field explicit. Pure data translation: files are ``checkpoint.py``'s, the model ``model.py``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .config import (
    AttentionConfig,
    ConfigError,
    GDNConfig,
    KDAConfig,
    LayerConfig,
    MixerConfig,
    MLPConfig,
    RopeConfig,
    SupernetConfig,
)

if TYPE_CHECKING:
    import torch

# Tensors of Apriel2's multimodal checkpoints that the text supernet has no place for.
IGNORED_PREFIXES = ("model.vision_encoder.", "model.multi_modal_projector.")


class CheckpointError(ValueError):
    """A checkpoint directory gearshift cannot read: missing files, malformed config, wrong tensors.

    Defined with the format mapping, the lowest floor that reports one; ``gearshift.checkpoint`` re-exports it."""


# ---------------------------------------------------------------------------------------------- config


def _req(d: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(d, Mapping) or key not in d:
        raise CheckpointError(f"config.json: {where} is missing required field {key!r}")
    return d[key]


def _mixer_from_apriel2(d: Mapping[str, Any], where: str) -> MixerConfig:
    kind = d.get("type", "attention")
    try:
        if kind == "attention":
            rotary = _req(d, "rotary", where)
            rtype = rotary.get("type", "mistral_1d")
            if rtype in ("mistral_1d", "default"):
                rope = RopeConfig(theta=float(_req(rotary, "theta", where + ".rotary")))
            elif rtype == "llama3":
                keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                rope = RopeConfig(
                    theta=float(rotary["theta"]), type="llama3", **{k: rotary[k] for k in keys if k in rotary}
                )
            else:
                raise CheckpointError(f"config.json: {where}: rotary type {rtype!r} is not supported")
            base_bias = bool(d.get("add_linear_biases", False))

            def bias(layer: str) -> bool:
                return bool(d.get(layer, {}).get("bias", {}).get("enabled", base_bias))

            qkv = {bias("query_layer"), bias("key_layer"), bias("value_layer")}
            if len(qkv) != 1:
                raise CheckpointError(f"config.json: {where}: q/k/v projections must all or none have biases")
            if not d.get("causal", True):
                raise CheckpointError(f"config.json: {where}: non-causal attention is not supported")
            heads = int(_req(d, "heads", where))
            return AttentionConfig(
                heads=heads,
                head_groups=int(d.get("head_groups", heads)),
                head_size=int(_req(d, "head_size", where)),
                rope=rope,
                window_size=d.get("window_size"),
                qkv_bias=qkv.pop(),
                o_bias=bias("dense_layer"),
            )
        if kind == "gdn":
            conv = _req(d, "convolution_layer", where)
            return GDNConfig(
                value_heads=int(_req(d, "value_heads", where)),
                key_heads=int(_req(d, "key_heads", where)),
                key_head_dim=int(_req(d, "key_head_dim", where)),
                value_head_dim=int(_req(d, "value_head_dim", where)),
                conv_kernel=int(_req(conv, "kernel_size", where + ".convolution_layer")),
                norm_eps=float(d.get("norm_eps", 1e-5)),
            )
        if kind == "kda":
            conv = d.get("convolution_layer", {})
            norm = d.get("normalization", {})
            return KDAConfig(
                heads=int(_req(d, "heads", where)),
                head_dim=int(_req(d, "head_dim", where)),
                conv_kernel=int(conv.get("kernel_size", 4)),
                conv_activation=conv.get("activation", "silu"),
                norm_eps=float(norm.get("epsilon", 1e-5)),
                gate_activation=norm.get("activation", "silu"),
            )
    except ConfigError as exc:
        raise CheckpointError(f"config.json: {where}: {exc}") from None
    if kind == "mamba":
        raise CheckpointError(f"config.json: {where}: mamba mixers are not supported by gearshift")
    if kind == "stochastic":
        raise CheckpointError(f"config.json: {where}: stochastic mixers cannot be nested")
    raise CheckpointError(f"config.json: {where}: unknown mixer type {kind!r}")


def _plain_name(cfg: MixerConfig) -> str:
    return cfg.kind


def _layer_from_apriel2(block: Mapping[str, Any], where: str) -> tuple[LayerConfig, bool]:
    """Returns the layer and whether it was stored as a stochastic mixer."""
    mixer = _req(block, "mixer", where)
    if mixer.get("type") == "stochastic":
        mixers_d = _req(mixer, "mixers", where + ".mixer")
        if not isinstance(mixers_d, Mapping) or not mixers_d:
            raise CheckpointError(f"config.json: {where}.mixer: a stochastic mixer needs a non-empty 'mixers' dict")
        mixers = {name: _mixer_from_apriel2(m, f"{where}.mixer.mixers.{name}") for name, m in mixers_d.items()}
        main = mixer.get("main_mixer_name", next(iter(mixers)))
        stochastic = True
    else:
        cfg = _mixer_from_apriel2(mixer, where + ".mixer")
        mixers, main, stochastic = {_plain_name(cfg): cfg}, _plain_name(cfg), False
    mlp = _req(block, "mlp", where)
    if mlp.get("type", "mlp") != "mlp":
        raise CheckpointError(f"config.json: {where}.mlp: type {mlp.get('type')!r} is not supported")
    norm = block.get("normalization", {"type": "rms_norm"})
    if norm.get("type", "rms_norm") != "rms_norm":
        raise CheckpointError(f"config.json: {where}.normalization: only rms_norm is supported")
    try:
        mlp_cfg = MLPConfig(
            intermediate_size=int(_req(mlp, "intermediate_size", where + ".mlp")),
            activation=mlp.get("activation", "silu"),
            gated=bool(mlp.get("gated", True)),
            bias=bool(mlp.get("add_linear_biases", False)) and not bool(mlp.get("gated", True)),
        )
        return LayerConfig(mixers=mixers, main_mixer=main, mlp=mlp_cfg), stochastic
    except ConfigError as exc:
        raise CheckpointError(f"config.json: {where}: {exc}") from None


def config_from_apriel2(d: Mapping[str, Any]) -> tuple[SupernetConfig, list[bool]]:
    """Parse an Apriel2 config dict; also returns, per layer, whether its weights are stored stochastic-style."""
    model_type = d.get("model_type")
    if model_type not in ("apriel2_text", "apriel2"):
        raise CheckpointError(f"config.json: model_type {model_type!r} is not an Apriel2 model (apriel2_text)")
    dec = _req(d, "decoder", "the top level")
    n = int(_req(dec, "num_blocks", "decoder"))
    if n < 1:
        raise CheckpointError("config.json: decoder.num_blocks must be >= 1")
    dtype = dec.get("type", "fixed")
    if dtype == "fixed":
        blocks = [_req(dec, "block", "decoder")] * n
        names = ["block"] * n
    elif dtype == "pattern":
        pattern, defs = _req(dec, "pattern", "decoder"), _req(dec, "blocks", "decoder")
        if not pattern:
            raise CheckpointError("config.json: decoder.pattern is empty")
        names = [pattern[i % len(pattern)] for i in range(n)]
        missing = sorted({p for p in names if p not in defs})
        if missing:
            raise CheckpointError(f"config.json: decoder.pattern names undefined blocks {missing}")
        blocks = [defs[p] for p in names]
    else:
        raise CheckpointError(f"config.json: unknown decoder type {dtype!r} (expected fixed or pattern)")
    parsed: dict[str, tuple[LayerConfig, bool]] = {}
    for name, block in zip(names, blocks, strict=True):
        if name not in parsed:
            parsed[name] = _layer_from_apriel2(block, f"decoder.blocks.{name}")
    layers = [parsed[name][0] for name in names]
    head = d.get("head", {})
    try:
        cfg = SupernetConfig(
            vocab_size=int(_req(d, "vocab_size", "the top level")),
            hidden_size=int(_req(d, "hidden_size", "the top level")),
            layers=tuple(layers),
            norm_eps=float(head.get("normalization", {}).get("epsilon", 1e-5)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("embeddings", {}).get("max_position_embeddings", 2048)),
            bos_token_id=d.get("bos_token_id", 1),
            eos_token_id=d.get("eos_token_id", 2),
            pad_token_id=d.get("pad_token_id"),
        )
    except ConfigError as exc:
        raise CheckpointError(f"config.json: {exc}") from None
    return cfg, [parsed[name][1] for name in names]


def _mixer_to_apriel2(cfg: MixerConfig) -> dict[str, Any]:
    if isinstance(cfg, AttentionConfig):
        rotary: dict[str, Any] = {"type": "mistral_1d", "theta": cfg.rope.theta}
        if cfg.rope.type == "llama3":
            rotary = {
                "type": "llama3",
                "theta": cfg.rope.theta,
                "factor": cfg.rope.factor,
                "low_freq_factor": cfg.rope.low_freq_factor,
                "high_freq_factor": cfg.rope.high_freq_factor,
                "original_max_position_embeddings": cfg.rope.original_max_position_embeddings,
            }
        out: dict[str, Any] = {
            "type": "attention",
            "heads": cfg.heads,
            "head_groups": cfg.head_groups,
            "head_size": cfg.head_size,
            "rotary": rotary,
            "add_linear_biases": False,
        }
        if cfg.qkv_bias or cfg.o_bias:
            for layer in ("query_layer", "key_layer", "value_layer"):
                out[layer] = {"bias": {"enabled": cfg.qkv_bias}}
            out["dense_layer"] = {"bias": {"enabled": cfg.o_bias}}
        if cfg.window_size is not None:
            out["window_size"] = cfg.window_size
        return out
    if isinstance(cfg, GDNConfig):
        out = {
            "type": "gdn",
            "value_heads": cfg.value_heads,
            "key_heads": cfg.key_heads,
            "key_head_dim": cfg.key_head_dim,
            "value_head_dim": cfg.value_head_dim,
            "convolution_layer": {"kernel_size": cfg.conv_kernel},
        }
        if cfg.norm_eps != 1e-5:
            out["norm_eps"] = cfg.norm_eps
        return out
    return {
        "type": "kda",
        "heads": cfg.heads,
        "head_dim": cfg.head_dim,
        "convolution_layer": {"kernel_size": cfg.conv_kernel, "activation": cfg.conv_activation},
        "normalization": {"epsilon": cfg.norm_eps, "activation": cfg.gate_activation},
    }


def _block_to_apriel2(layer: LayerConfig, eps: float) -> dict[str, Any]:
    return {
        "mixer": {
            "type": "stochastic",
            "main_mixer_name": layer.main_mixer,
            "sampling_strategy": "uniform",
            "mixers": {name: _mixer_to_apriel2(m) for name, m in layer.mixers.items()},
        },
        "mlp": {
            "type": "mlp",
            "intermediate_size": layer.mlp.intermediate_size,
            "activation": layer.mlp.activation,
            "gated": layer.mlp.gated,
            "add_linear_biases": layer.mlp.bias,
        },
        "normalization": {"type": "rms_norm", "epsilon": eps},
    }


def config_to_apriel2(cfg: SupernetConfig, dtype: torch.dtype | None = None) -> dict[str, Any]:
    blocks = [_block_to_apriel2(layer, cfg.norm_eps) for layer in cfg.layers]
    if all(b == blocks[0] for b in blocks):
        decoder: dict[str, Any] = {"type": "fixed", "num_blocks": cfg.num_layers, "block": blocks[0]}
    else:
        unique: list[dict[str, Any]] = []
        pattern = []
        for b in blocks:
            if b not in unique:
                unique.append(b)
            pattern.append(f"block_{unique.index(b)}")
        decoder = {
            "type": "pattern",
            "num_blocks": cfg.num_layers,
            "pattern": pattern,
            "blocks": {f"block_{i}": b for i, b in enumerate(unique)},
        }
    out: dict[str, Any] = {
        "architectures": ["Apriel2ForCausalLM"],
        "model_type": "apriel2_text",
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "embeddings": {"max_position_embeddings": cfg.max_position_embeddings},
        "head": {"normalization": {"type": "rms_norm", "epsilon": cfg.norm_eps}},
        "decoder": decoder,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "use_cache": True,
    }
    if dtype is not None:
        out["torch_dtype"] = str(dtype).removeprefix("torch.")
    return out


# ---------------------------------------------------------------------------------------------- tensor names


def internal_key(key: str, stochastic: list[bool], cfg: SupernetConfig) -> str:
    """Map a plain-layer key ``...blocks.{i}.mixer.X`` to the stochastic form gearshift uses internally."""
    prefix = "model.decoder.blocks."
    if not key.startswith(prefix):
        return key
    layer_s, rest = key[len(prefix) :].split(".", 1)
    if not layer_s.isdigit() or int(layer_s) >= len(stochastic):
        return key
    i = int(layer_s)
    if rest.startswith("mixer.") and not stochastic[i]:
        return f"{prefix}{i}.mixer.mixers.{cfg.layers[i].main_mixer}.{rest[len('mixer.') :]}"
    return key
