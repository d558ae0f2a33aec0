"""Training configuration (distillation and SFT), read from YAML or TOML with every key checked.

A typo in a config must stop the run before any work starts, so unknown keys are errors naming their path.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class TrainConfigError(ValueError):
    """A configuration file that cannot describe a run: unknown keys, wrong types, impossible values."""


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # token-shard directories or raw text files
    eval: list[str] = field(default_factory=list)
    seq_len: int = 512
    eval_sequences: int = 64
    chat: bool = False  # SFT: JSONL chat data, loss on assistant tokens only


@dataclass
class OptimConfig:
    steps: int = 1000
    max_minutes: float = 0.0  # stop (and save) after this much training time; 0 = no limit
    batch_size: int = 8  # sequences per process per micro-batch
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "auto"  # autocast dtype: auto (bf16 on CUDA, none on CPU), float32, bfloat16
    activation_checkpointing: bool = False
    compile: str = "auto"  # torch.compile of each block and of the loss chunks: auto (on CUDA), on, off
    train: str = "mixers"  # mixers: only mixer parameters; all: everything
    frozen_mixers: list[str] = field(default_factory=lambda: ["attention"])
    # learning-rate multipliers per mixer name: copies of the teacher (attention, sliding_window) start near
    # their optimum and want small steps, mixers initialised from scratch-like states (gdn, kda) larger ones
    mixer_lr: dict[str, float] = field(default_factory=dict)


@dataclass
class SamplerConfig:
    kind: str = "uniform"  # uniform | full_layout | predefined
    mixers: list[str] = field(default_factory=list)  # allowed mixers (empty: all a layer holds)
    placements: dict[str, float] = field(default_factory=dict)  # predefined: placement/preset -> weight
    predefined_prob: float = 0.0  # with a base kind: probability of drawing a predefined placement instead
    sandwich: bool = False  # also train the teacher path (all-attention) and the cheapest path each step


@dataclass
class LossConfig:
    activation: float = 0.5
    forward_kl: float = 0.0
    reverse_kl: float = 1.0
    cross_entropy: float = 0.0
    temperature: float = 1.0


@dataclass
class EvalConfig:
    every: int = 100
    placements: list[str] = field(default_factory=lambda: ["all-attention"])


@dataclass
class CheckpointConfig:
    every: int = 100
    keep: int = 2


@dataclass
class TrainConfig:
    model: str = ""  # supernet checkpoint directory (from `gearshift convert`)
    output: str = "runs/train"
    mode: str = "distill"  # distill | sft | align (layer-local activation matching, a first stage)
    teacher: str = ""  # default: the model's own all-attention path, frozen
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log_every: int = 10
    parallel: str = "ddp"  # over several processes: ddp (whole replicas) | fsdp (sharded; distill and sft)

    def validate(self) -> TrainConfig:
        problems = []
        if not self.model:
            problems.append("model: a supernet checkpoint directory is required")
        if self.mode not in ("distill", "sft", "align"):
            problems.append(f"mode: {self.mode!r} is not distill, sft or align")
        if self.mode == "align" and self.optim.train != "mixers":
            problems.append("optim.train: align trains mixers only (layer-local losses reach no other parameter)")
        if not self.data.train:
            problems.append("data.train: at least one token-shard directory or text file is required")
        if self.sampler.kind not in ("uniform", "full_layout", "predefined"):
            problems.append(f"sampler.kind: {self.sampler.kind!r} is not uniform, full_layout or predefined")
        if self.sampler.kind == "predefined" and not self.sampler.placements:
            problems.append("sampler.placements: the predefined sampler needs placements with weights")
        if not 0 <= self.sampler.predefined_prob <= 1:
            problems.append("sampler.predefined_prob must lie in [0, 1]")
        if self.parallel not in ("ddp", "fsdp"):
            problems.append(f"parallel: {self.parallel!r} is not ddp or fsdp")
        if self.optim.compile not in ("auto", "on", "off"):
            problems.append(f"optim.compile: {self.optim.compile!r} is not auto, on or off")
        if self.optim.dtype not in ("auto", "float32", "bfloat16"):
            problems.append(f"optim.dtype: {self.optim.dtype!r} is not auto, float32 or bfloat16")
        if any(v <= 0 for v in self.optim.mixer_lr.values()):
            problems.append("optim.mixer_lr multipliers must be > 0")
        if self.optim.train not in ("mixers", "all"):
            problems.append(f"optim.train: {self.optim.train!r} is not mixers or all")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self.optim, name) < 1:
                problems.append(f"optim.{name} must be >= 1")
        if self.data.seq_len < 2:
            problems.append("data.seq_len must be >= 2")
        losses = self.loss
        if min(losses.activation, losses.forward_kl, losses.reverse_kl, losses.cross_entropy) < 0:
            problems.append("loss weights must be >= 0")
        if losses.activation + losses.forward_kl + losses.reverse_kl + losses.cross_entropy == 0:
            problems.append("loss: every weight is 0, nothing would train")
        if losses.temperature <= 0:
            problems.append("loss.temperature must be > 0")
        if problems:
            raise TrainConfigError("invalid training config:\n  " + "\n  ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise TrainConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise TrainConfigError(f"unknown config key(s): {', '.join(where + k for k in unknown)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{path}.{key}" if path else key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    origin = typing.get_origin(tp)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise TrainConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TrainConfigError(f"{path}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(vt, v, f"{path}.{k}") for k, v in value.items()}
    return _validate_leaf(tp, value, path)


_NAMES = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}


_NOT = object()


def _already_typed(tp: Any, value: Any) -> Any:
    """``value`` itself (an int as a float) when it already has the declared type -- a plain type, one member of
    a union (None included), or a literal's value -- else ``_NOT``."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return value if any(value == a and type(value) is type(a) for a in typing.get_args(tp)) else _NOT
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        items = [_already_typed(a, v) for a, v in zip(args, value, strict=False)] if len(args) == len(value) else []
        return tuple(items) if len(items) == len(value) and _NOT not in items else _NOT
    members = typing.get_args(tp) if origin in (typing.Union, types.UnionType) else (tp,)
    for member in members:
        if (member is type(None) and value is None) or (member in _NAMES and type(value) is member):
            return value
    if float in members and type(value) is int:
        return float(value)
    return _NOT


def _validate_leaf(tp: Any, value: Any, path: str) -> Any:
    """Type-check and coerce one value with pydantic (lax mode: YAML's ``3e-4``, a string, becomes 3e-4; ``"abc"``
    for a number is an error naming the key). Numbers never silently become strings or booleans."""
    plain = _already_typed(tp, value)
    if plain is not _NOT:
        return plain  # nothing to coerce (and pydantic, which some GPU images lack, not needed to say so)
    from pydantic import ValidationError

    if tp is str and not isinstance(value, str):
        raise TrainConfigError(f"{path}: expected a string, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise TrainConfigError(f"{path}: expected {_NAMES[tp]}, got {value!r}")
    try:
        return _adapter(tp).validate_python(value)
    except ValidationError as exc:
        want = _NAMES.get(tp) or getattr(tp, "__name__", None) or str(tp)
        reason = exc.errors()[0].get("msg", "invalid") if exc.errors() else "invalid"
        raise TrainConfigError(f"{path}: expected {want}, got {value!r} ({reason})") from None


@functools.cache
def _adapter(tp: Any):
    from pydantic import TypeAdapter

    return TypeAdapter(tp)


# Keys a run may change and still resume its checkpoint: how long it trains, how often it logs, evaluates and
# checkpoints, where it writes, and how its global batch is laid out over processes (batch_size x grad_accum x
# processes, DDP or FSDP: a run killed on 2 GPUs may go on on 1). Any other difference (mode, model, data,
# losses, optimizer, sampler) is another run.
RESUMABLE = ("output", "optim.steps", "optim.max_minutes", "eval", "checkpoint", "log_every", "data.eval",
             "data.eval_sequences", "optim.batch_size", "optim.grad_accum", "parallel")  # fmt: skip


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two ``TrainConfig.to_dict()`` (outside ``RESUMABLE``)."""
    out = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        if path in RESUMABLE:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and not path.endswith(("mixer_lr", "placements")):
            out += config_differences(a, b, path + ".")
        elif (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
            out.append(path)
    return out


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML (.yaml/.yml), TOML (.toml) or JSON config; ``overrides`` use dotted keys (optim.lr=...)."""
    path = Path(path)
    if not path.exists():
        raise TrainConfigError(f"config file {path} not found")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise TrainConfigError(f"{path}: use a .yaml, .toml or .json file")
    except TrainConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - parser errors of three libraries
        raise TrainConfigError(f"{path}: cannot parse ({exc})") from None
    for dotted, value in (overrides or {}).items():
        cur = data
        *parents, last = dotted.split(".")
        for key in parents:
            cur = cur.setdefault(key, {})
        cur[last] = value
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, data, "").validate()
