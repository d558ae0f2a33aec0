"""Supernet configuration as plain data.

A supernet is a stack of layers that share an MLP and two norms; each layer holds a non-empty set of named
token mixers. The configuration mirrors the Apriel2 ``config.json`` (see ``apriel2.py`` for the mapping) but
is validated and typed here, so that every later stage can trust it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# The four mixer kinds gearshift implements, and the one-letter codes of compact placement strings.
MIXER_KINDS = ("attention", "sliding_window", "gdn", "kda")
KIND_LETTERS = {"attention": "F", "sliding_window": "S", "gdn": "G", "kda": "K"}
LETTER_KINDS = {letter: kind for kind, letter in KIND_LETTERS.items()}


class ConfigError(ValueError):
    """A configuration that gearshift cannot build a model from."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding (non-interleaved rotate-half). ``type`` is ``default`` or ``llama3``."""

    theta: float = 10000.0
    type: str = "default"
    # llama3 frequency scaling (only read when type == "llama3")
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.type not in ("default", "llama3"):
            raise ConfigError(f"rotary type {self.type!r} is not supported (supported: default/mistral_1d, llama3)")
        if self.theta <= 0:
            raise ConfigError(f"rotary theta must be positive, got {self.theta}")


@dataclass(frozen=True)
class AttentionConfig:
    """Causal GQA attention; with ``window_size`` it is sliding-window attention (SWA)."""

    heads: int
    head_groups: int
    head_size: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    window_size: int | None = None
    qkv_bias: bool = False
    o_bias: bool = False

    @property
    def kind(self) -> str:
        return "attention" if self.window_size is None else "sliding_window"

    def __post_init__(self) -> None:
        _positive(self, "heads", "head_groups", "head_size")
        if self.heads % self.head_groups:
            raise ConfigError(f"attention heads ({self.heads}) must be a multiple of head_groups ({self.head_groups})")
        if self.head_size % 2:
            raise ConfigError(f"attention head_size must be even for rotary embeddings, got {self.head_size}")
        if self.window_size is not None and self.window_size < 1:
            raise ConfigError(f"window_size must be >= 1, got {self.window_size}")


@dataclass(frozen=True)
class GDNConfig:
    """Gated DeltaNet (Qwen3-Next style): scalar decay per head, grouped value heads."""

    value_heads: int
    key_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int = 4
    norm_eps: float = 1e-5

    kind = "gdn"

    def __post_init__(self) -> None:
        _positive(self, "value_heads", "key_heads", "key_head_dim", "value_head_dim", "conv_kernel")
        if self.value_heads % self.key_heads:
            raise ConfigError(
                f"gdn value_heads ({self.value_heads}) must be a multiple of key_heads ({self.key_heads})"
            )


@dataclass(frozen=True)
class KDAConfig:
    """Kimi Delta Attention: per-channel decay, low-rank decay and output-gate projections."""

    heads: int
    head_dim: int
    conv_kernel: int = 4
    norm_eps: float = 1e-5
    gate_activation: str = "silu"
    conv_activation: str = "silu"

    kind = "kda"

    def __post_init__(self) -> None:
        _positive(self, "heads", "head_dim", "conv_kernel")
        for name in ("gate_activation", "conv_activation"):
            if getattr(self, name) not in ("silu", "sigmoid"):
                raise ConfigError(f"kda {name} must be 'silu' or 'sigmoid', got {getattr(self, name)!r}")


MixerConfig = AttentionConfig | GDNConfig | KDAConfig


@dataclass(frozen=True)
class MLPConfig:
    intermediate_size: int
    activation: str = "silu"
    gated: bool = True
    bias: bool = False

    def __post_init__(self) -> None:
        _positive(self, "intermediate_size")
        if self.activation not in ("silu", "gelu", "gelu_tanh", "relu"):
            raise ConfigError(f"MLP activation {self.activation!r} is not supported")


@dataclass(frozen=True)
class LayerConfig:
    """One decoder layer: named mixers (the supernet's choices) + the shared MLP; ``main_mixer`` is the default."""

    mixers: dict[str, MixerConfig]
    main_mixer: str
    mlp: MLPConfig

    def __post_init__(self) -> None:
        if not self.mixers:
            raise ConfigError("a layer must hold at least one mixer")
        if self.main_mixer not in self.mixers:
            raise ConfigError(f"main mixer {self.main_mixer!r} is not among the layer's mixers {list(self.mixers)}")

    def names_of_kind(self, kind: str) -> list[str]:
        return [name for name, m in self.mixers.items() if m.kind == kind]


@dataclass(frozen=True)
class SupernetConfig:
    vocab_size: int
    hidden_size: int
    layers: tuple[LayerConfig, ...]
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "hidden_size", "max_position_embeddings")
        if not self.layers:
            raise ConfigError("a supernet needs at least one layer")
        object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def default_placement(self) -> tuple[str, ...]:
        return tuple(layer.main_mixer for layer in self.layers)

    def holds(self, placement: Sequence[str]) -> bool:
        """Whether every layer holds the mixer this (resolved) placement names for it."""
        return all(name in layer.mixers for name, layer in zip(placement, self.layers, strict=True))

    def replace(self, **changes: Any) -> SupernetConfig:
        return dataclasses.replace(self, **changes)

    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list | tuple) else [self.eos_token_id]

    # ---------------------------------------------------------------- convenient builders
    @classmethod
    def uniform(
        cls,
        *,
        num_layers: int,
        hidden_size: int,
        vocab_size: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        intermediate_size: int,
        window: int = 4096,
        mixers: tuple[str, ...] = MIXER_KINDS,
        main_mixer: str = "attention",
        rope_theta: float = 10000.0,
        **kwargs: Any,
    ) -> SupernetConfig:
        """A supernet whose layers all hold the same mixers, dimensioned after one attention teacher.

        GDN gets ``heads`` value heads and ``kv_heads`` key heads; KDA gets ``heads`` heads (as in the paper).
        """
        rope = RopeConfig(theta=rope_theta)
        catalog: dict[str, MixerConfig] = {
            "attention": AttentionConfig(heads, kv_heads, head_dim, rope=rope),
            "sliding_window": AttentionConfig(heads, kv_heads, head_dim, rope=rope, window_size=window),
            "gdn": GDNConfig(value_heads=heads, key_heads=kv_heads, key_head_dim=head_dim, value_head_dim=head_dim),
            "kda": KDAConfig(heads=heads, head_dim=head_dim),
        }
        unknown = [m for m in mixers if m not in catalog]
        if unknown:
            raise ConfigError(f"unknown mixer kind(s) {unknown}; choose from {list(MIXER_KINDS)}")
        layer = LayerConfig(
            mixers={m: catalog[m] for m in mixers},
            main_mixer=main_mixer if main_mixer in mixers else mixers[0],
            mlp=MLPConfig(intermediate_size),
        )
        return cls(vocab_size=vocab_size, hidden_size=hidden_size, layers=(layer,) * num_layers, **kwargs)

    @classmethod
    def tiny(cls, num_layers: int = 4, vocab_size: int = 256, window: int = 8, **kwargs: Any) -> SupernetConfig:
        """The embedded default used by tests and ``gearshift demo``: every mixer, a few layers, tiny widths."""
        return cls.uniform(
            num_layers=num_layers,
            hidden_size=64,
            vocab_size=vocab_size,
            heads=4,
            kv_heads=2,
            head_dim=16,
            intermediate_size=128,
            window=window,
            max_position_embeddings=kwargs.pop("max_position_embeddings", 512),
            **kwargs,
        )

    @classmethod
    def apriel_15b(cls, window: int = 4096) -> SupernetConfig:
        """The shape of the Super Apriel 15B supernet (Apriel 1.6 teacher dimensions, paper.md)."""
        return cls.uniform(
            num_layers=48,
            hidden_size=5120,
            vocab_size=131072,
            heads=32,
            kv_heads=8,
            head_dim=128,
            intermediate_size=14336,
            window=window,
            max_position_embeddings=65536,
            rope_theta=1e6,
        )

    @classmethod
    def small_1b(cls, window: int = 512) -> SupernetConfig:
        """A ~1B-parameter supernet (0.8B active per placement) for multi-GPU runs with random weights; its
        vocabulary is SmolLM2's, so that teacher's traces are valid data for it."""
        return cls.uniform(
            num_layers=16,
            hidden_size=2048,
            vocab_size=49152,
            heads=16,
            kv_heads=4,
            head_dim=128,
            intermediate_size=5632,
            window=window,
            max_position_embeddings=8192,
            rope_theta=1e5,
        )


# The built-in shapes by command-line name (``gearshift init --shape``, a shape in place of a checkpoint for costs),
# and the weight dtypes the commands accept; here beside the config so that every command reads them from one floor.
SHAPES = {"tiny": SupernetConfig.tiny, "small-1b": SupernetConfig.small_1b, "apriel-15b": SupernetConfig.apriel_15b}
DTYPES = ("float32", "bfloat16", "float16")


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")
