"""Apriel2 checkpoints: config.json <-> SupernetConfig, sharded safetensors, presets, thinning.

Reads what ServiceNow's Apriel2 code writes (fixed and pattern decoders, stochastic and plain layers, one file or
shards with ``model.safetensors.index.json``) and writes what it reads: every layer as a ``stochastic`` mixer
(also when thinned to one mixer, as their thinning tool does), rotary ``mistral_1d``, every field explicit.
Presets live in ``presets.json`` beside the weights (Apriel2 has no placement field; their loader ignores it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
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
from .placement import PlacementSpec, placement_letters, resolve_placement

if TYPE_CHECKING:  # torch and safetensors load with the first weights: reading a config needs neither
    import torch

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PRESETS_NAME = "presets.json"
# Files that travel with a checkpoint when it is rewritten or thinned (tokenizer, chat template, generation).
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
IGNORED_PREFIXES = ("model.vision_encoder.", "model.multi_modal_projector.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class CheckpointError(ValueError):
    """A checkpoint directory gearshift cannot read: missing files, malformed config, wrong tensors."""


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


# ---------------------------------------------------------------------------------------------- weights


def _internal_key(key: str, stochastic: list[bool], cfg: SupernetConfig) -> str:
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


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: malformed index ({exc})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{path}: index names missing shard files {missing}")
        return [path / f for f in files]
    if (path / SINGLE_NAME).exists():
        return [path / SINGLE_NAME]
    raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME} found")


def read_config(path: str | Path) -> tuple[SupernetConfig, list[bool]]:
    path = Path(path)
    file = path / CONFIG_NAME
    if not file.exists():
        raise CheckpointError(f"{path}: no {CONFIG_NAME} (is this a checkpoint directory?)")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return config_from_apriel2(raw)


def read_presets(path: str | Path) -> dict[str, dict[str, Any]]:
    file = Path(path) / PRESETS_NAME
    if not file.exists():
        return {}
    try:
        data = json.loads(file.read_text())
        presets = data["presets"]
        if not isinstance(presets, dict) or not all("placement" in p for p in presets.values()):
            raise TypeError("each preset needs a 'placement'")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{file}: malformed presets file ({exc})") from None
    return presets


def fingerprint(path: str | Path, *, samples: int = 16, sample_bytes: int = 4096) -> str:
    """A short hash that tells checkpoints apart: the config and, per tensor, its name, dtype, shape and bytes
    sampled at ``samples`` evenly spaced places (all of a small tensor). Training changes every trained tensor, so
    two checkpoints of one run differ; reading costs a few seeks per tensor, not the whole 30 GB.
    Presets, tokenizer and other side files do not count (adding a preset does not change a measurement)."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no {CONFIG_NAME} (is this a checkpoint directory?)")
    h = hashlib.sha256()
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({exc})") from None
    h.update(json.dumps(config, sort_keys=True).encode())
    tensors: dict[str, bytes] = {}  # name -> digest of its sample (sorted below: sharding does not matter)
    for file in _weight_files(path):
        with open(file, "rb") as f:
            try:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{file}: cannot read safetensors header ({exc})") from None
            base = 8 + n
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                t = hashlib.sha256(json.dumps([name, entry["dtype"], entry["shape"]]).encode())
                begin, end = entry["data_offsets"]
                size = end - begin
                if size <= samples * sample_bytes:
                    f.seek(base + begin)
                    t.update(f.read(size))
                else:
                    step = (size - sample_bytes) // (samples - 1)
                    for k in range(samples):
                        f.seek(base + begin + k * step)
                        t.update(f.read(sample_bytes))
                tensors[name] = t.digest()
    for name in sorted(tensors):
        h.update(tensors[name])
    return h.hexdigest()[:16]


def load(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    mixers: Iterable[str] | None = None,
):
    """Load an Apriel2 checkpoint directory into a ``Supernet``.

    ``dtype`` casts every tensor (default: as stored). ``mixers`` keeps only mixers with these names (to save
    memory when serving a subset). Missing, unexpected or mis-shaped tensors raise ``CheckpointError``.
    """
    import torch
    from safetensors import safe_open

    from .model import Supernet

    path = Path(path)
    cfg, stochastic = read_config(path)
    if mixers is not None:
        cfg = _restrict(cfg, set(mixers))
    presets = read_presets(path)
    with torch.device("meta"):
        model = Supernet(cfg)
    expected = {k: v for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    unexpected = []
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    if key.startswith(IGNORED_PREFIXES):
                        continue
                    ikey = _internal_key(key, stochastic, cfg)
                    if ikey not in expected:
                        if mixers is not None and ".mixers." in ikey:
                            continue  # a mixer the caller chose to drop
                        unexpected.append(key)
                        continue
                    t = f.get_tensor(key)
                    if tuple(t.shape) != tuple(expected[ikey].shape):
                        raise CheckpointError(
                            f"{file.name}: tensor {key} has shape {tuple(t.shape)}, the config implies "
                            f"{tuple(expected[ikey].shape)}"
                        )
                    state[ikey] = t if dtype is None else t.to(dtype)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt files
            raise CheckpointError(f"{file}: cannot read safetensors file ({exc})") from None
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        if "lm_head.weight" in unexpected:
            unexpected.remove("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensors missing, e.g. {missing[:5]}")
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected tensors, e.g. {unexpected[:5]}")
    model.load_state_dict(state, assign=True, strict=True)
    for name, entry in presets.items():
        meta = {k: v for k, v in entry.items() if k not in ("placement", "letters")}
        try:
            model.add_preset(name, entry["placement"], **meta)
        except ValueError as exc:
            raise CheckpointError(f"{path / PRESETS_NAME}: preset {name!r}: {exc}") from None
    return model.eval()


def _restrict(cfg: SupernetConfig, keep: set[str]) -> SupernetConfig:
    layers = []
    for i, layer in enumerate(cfg.layers):
        mixers = {n: m for n, m in layer.mixers.items() if n in keep}
        if not mixers:
            raise CheckpointError(f"layer {i}: none of the requested mixers {sorted(keep)} is held by this layer")
        main = layer.main_mixer if layer.main_mixer in mixers else next(iter(mixers))
        layers.append(LayerConfig(mixers=mixers, main_mixer=main, mlp=layer.mlp))
    return cfg.replace(layers=tuple(layers))


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and owning its storage: safetensors refuses tensors that share memory, as the parts of
    weights laid out together do (``Supernet.fuse_projections_``)."""
    import torch

    whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t.contiguous() if whole else t.clone(memory_format=torch.contiguous_format)


def save(
    model,
    path: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    presets: Mapping[str, Any] | None = None,
    copy_from: str | Path | None = None,
) -> None:
    """Write ``model`` as an Apriel2 checkpoint directory; files appear atomically (temp dir, then rename).

    Presets: ``presets`` (name -> placement, or name -> dict with a 'placement' and any metadata) or, by
    default, the model's own. ``copy_from`` copies tokenizer/chat-template files from another checkpoint.

    Like transformers' ``save_pretrained``, writing into a directory that holds a checkpoint replaces it (its
    weights, index and presets; other files stay): the Python API trusts its caller. The command line asks for
    ``--overwrite`` first (``gearshift.clitools.check_output_dir``).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: _standalone(v.detach()) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    dtype = next(iter(state.values())).dtype if state else None
    tmp = Path(tempfile.mkdtemp(prefix=".gearshift-save-", dir=path))
    try:
        names = (
            [SINGLE_NAME]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        for name, shard in zip(names, shards, strict=True):
            save_file({k: v.cpu() for k, v in shard.items()}, str(tmp / name), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                "weight_map": {k: name for name, shard in zip(names, shards, strict=True) for k in sorted(shard)},
            }
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        (tmp / CONFIG_NAME).write_text(json.dumps(config_to_apriel2(model.config, dtype), indent=2))
        entries = _preset_entries(model, presets)
        if entries:
            (tmp / PRESETS_NAME).write_text(json.dumps({"presets": entries}, indent=2))
        if copy_from is not None:
            for name in SIDE_FILES:
                src = Path(copy_from) / name
                if src.exists() and src.resolve() != (path / name).resolve():
                    shutil.copy2(src, tmp / name)
        # Replace: stale weights first (so no mix of old and new shards is ever indexed), then move new files in.
        new = {p.name for p in tmp.iterdir()}
        for old in list(path.glob("*.safetensors")) + [path / INDEX_NAME, path / PRESETS_NAME]:
            if old.exists() and old.name not in new:
                old.unlink()
        for p in sorted(tmp.iterdir(), key=lambda p: p.name == CONFIG_NAME):  # config.json last
            os.replace(p, path / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def preset_entry(placement: Sequence[str], config: SupernetConfig, meta: Mapping[str, Any] | None = None) -> dict:
    """The presets.json form of one resolved placement: its metadata, mixer names and letter string."""
    return {**(meta or {}), "placement": list(placement), "letters": placement_letters(placement, config)}


def _preset_entries(model, presets: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    if presets is None:
        presets = {name: {**model.preset_meta.get(name, {}), "placement": p} for name, p in model.presets.items()}
    out = {}
    for name, entry in presets.items():
        info = dict(entry) if isinstance(entry, Mapping) else {"placement": entry}
        placement = resolve_placement(info.pop("placement"), model.config, model.presets)
        info.pop("letters", None)
        out[name] = preset_entry(placement, model.config, info)
    return out


def thin(
    model,
    placements: Sequence[PlacementSpec],
    path: str | Path,
    *,
    copy_from: str | Path | None = None,
    **save_kwargs: Any,
):
    """Write a checkpoint keeping, per layer, only the mixers that the given placements use; returns the thinned
    model (sharing the kept tensors).

    Presets whose placements survive thinning are kept. The thinned model gives the same logits as the full one
    for every kept placement (only unused tensors are dropped). The default placement stays if it is kept, else
    the first of ``placements`` becomes it.
    """
    import torch

    from .model import Supernet

    cfg = model.thinned_config(placements)
    with torch.device("meta"):
        thinned = Supernet(cfg)
    wanted = thinned.state_dict().keys()
    state = {k: v for k, v in model.state_dict().items() if k in wanted}
    thinned.load_state_dict(state, assign=True, strict=True)
    for name, placement in model.presets.items():
        if cfg.holds(placement):
            thinned.add_preset(name, placement, **model.preset_meta.get(name, {}))
    save(thinned, path, copy_from=copy_from, **save_kwargs)
    return thinned


def load_tokenizer(path: str | Path):
    """The Hugging Face tokenizer stored with a checkpoint (it travels with it from ``gearshift convert``), or None
    when the directory holds no tokenizer files."""
    directory = Path(path)
    if not any((directory / f).exists() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it reads config.json, sees the unknown model type apriel2_text and warns
    try:
        return AutoTokenizer.from_pretrained(directory)
    finally:
        hf_logging.set_verbosity(level)


def token_ids(encoded) -> list[int]:
    """Token ids from a tokenizer's output: a list, or (transformers 5, chat templates) an encoding with input_ids."""
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return [int(x) for x in encoded]
