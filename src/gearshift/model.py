"""The supernet: shared embeddings, norms and MLPs; several token mixers per layer; a placement per call.

Module names follow the Apriel2 checkpoint layout (``model.decoder.blocks.{i}.mixer.mixers.{name}.*``), so a
state dict of this module *is* an Apriel2 stochastic-supernet state dict.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .cache import SupernetCache
from .checkpoint import (
    PRESETS_NAME,
    CheckpointError,
    read_config,
    read_presets,
    read_state,
    restrict_mixers,
    write_checkpoint,
)
from .config import AttentionConfig, GDNConfig, KDAConfig, LayerConfig, MixerConfig, MLPConfig, SupernetConfig
from .layers.attention import Attention
from .layers.base import Mixer, RMSNorm, StepContext, fuse_linears_, linear_outputs
from .layers.gdn import GatedDeltaNet
from .layers.kda import KimiDeltaAttention
from .ops.compiled import compiled
from .ops.documents import Documents
from .ops.fused import ACTIVATIONS, gated_activation
from .placement import Placement, PlacementError, PlacementSpec, looks_like_placement, resolve_placement

# A layer's mixer dispatch: (layer index, block, normed input [B, T, dim]) -> the mixer output. Where one is given,
# the block loop calls it in place of the placement's mixer (the serving engine's rows use different mixers, each
# group on its own state); everything else a block does stays in Block.forward, written once.
LayerMix = Callable[[int, "Block", Tensor], Tensor]


def _block(
    block: Block, h: Tensor, mixer: str | Callable[[Tensor], Tensor], ctx: StepContext | None, cache: Any = None
) -> tuple[Tensor, Tensor]:
    return block(h, mixer, ctx, cache)


# Regional compilation: one compiled function serves every block (the blocks share their code; parameters are
# inputs), a variant per mixer kind, grad mode and shape. The delta-rule kernels stay eager inside (graph breaks).
_compiled_block = compiled(_block, name="decoder block")
_compiled_mixer = compiled(lambda mixer, x, ctx: mixer(x, ctx), name="mixer")


def build_mixer(hidden_size: int, cfg: MixerConfig) -> Mixer:
    if isinstance(cfg, AttentionConfig):
        return Attention(hidden_size, cfg)
    if isinstance(cfg, GDNConfig):
        return GatedDeltaNet(hidden_size, cfg)
    if isinstance(cfg, KDAConfig):
        return KimiDeltaAttention(hidden_size, cfg)
    raise TypeError(f"unknown mixer config {cfg!r}")


class MLP(nn.Module):
    def __init__(self, hidden_size: int, cfg: MLPConfig) -> None:
        super().__init__()
        self.gated = cfg.gated
        self.activation = cfg.activation
        self.act = ACTIVATIONS[cfg.activation]
        if cfg.gated:
            self.gate_proj = nn.Linear(hidden_size, cfg.intermediate_size, bias=cfg.bias)
        self.up_proj = nn.Linear(hidden_size, cfg.intermediate_size, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, hidden_size, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            gate, up = linear_outputs(x, (self.gate_proj, self.up_proj))
            return self.down_proj(gated_activation(gate, up, self.activation))
        return self.down_proj(self.act(self.up_proj(x)))

    def fuse_(self) -> None:
        """The gate and up projections as one matmul in inference (see ``Mixer.fuse_``)."""
        if self.gated:
            fuse_linears_((self.gate_proj, self.up_proj))


class MixerSet(nn.Module):
    """The mixers a layer holds (the Apriel2 'stochastic' mixer)."""

    def __init__(self, hidden_size: int, mixers: Mapping[str, MixerConfig]) -> None:
        super().__init__()
        self.mixers = nn.ModuleDict({name: build_mixer(hidden_size, cfg) for name, cfg in mixers.items()})


class Block(nn.Module):
    def __init__(self, hidden_size: int, cfg: LayerConfig, eps: float) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.mixer = MixerSet(hidden_size, cfg.mixers)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        self.mlp = MLP(hidden_size, cfg.mlp)

    def forward(
        self, h: Tensor, mixer: str | Callable[[Tensor], Tensor], ctx: StepContext | None = None, cache: Any = None
    ) -> tuple[Tensor, Tensor]:
        """Returns (new residual stream, this layer's mixer output). ``mixer``: the name of the mixer to run on
        ``ctx`` and ``cache``, or a function of the normed input that returns the mixer output (a dispatch of rows
        to several mixers, see ``Supernet.forward``'s ``mix``)."""
        x = self.input_layernorm(h)
        m = self.mixer.mixers[mixer](x, ctx, cache) if isinstance(mixer, str) else mixer(x)
        h = h + m
        return h + self.mlp(self.post_attention_layernorm(h)), m


class Decoder(nn.Module):
    def __init__(self, config: SupernetConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(config.hidden_size, layer, config.norm_eps) for layer in config.layers)


class Backbone(nn.Module):
    def __init__(self, config: SupernetConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.decoder = Decoder(config)
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)


class Supernet(nn.Module):
    """A supernet language model; ``placement`` picks one mixer per layer on every call."""

    def __init__(self, config: SupernetConfig, presets: Mapping[str, Sequence[str]] | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, False)
        self.gradient_checkpointing = False  # recompute each block in backward (training memory)
        self.compile_blocks = False  # cache-free forwards run each block through torch.compile (CUDA training)
        self.presets: dict[str, tuple[str, ...]] = {}  # name -> placement
        self.preset_meta: dict[str, dict[str, Any]] = {}  # name -> metadata (predicted quality, cost, ...)
        for name, placement in (presets or {}).items():
            self.add_preset(name, placement)

    # ------------------------------------------------------------------ construction
    @classmethod
    def random(
        cls,
        config: SupernetConfig,
        *,
        seed: int = 0,
        std: float = 0.02,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Supernet:
        """A randomly initialised supernet, built directly on ``device`` in ``dtype`` (no fp32 CPU detour)."""
        with torch.device("meta"):
            model = cls(config).to(dtype)  # cast while still on meta: the device only ever holds `dtype`
        model = model.to_empty(device=device)
        gen = torch.Generator(device=device).manual_seed(seed)
        model.init_weights(std=std, generator=gen)
        return model

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) projections and embeddings; the mixers' own dynamics parameters as in their papers."""
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif leaf == "bias":
                p.zero_()
            elif leaf == "A_log":
                p.copy_(torch.empty_like(p, dtype=torch.float32).uniform_(1, 16, generator=generator).log())
            elif leaf == "dt_bias":
                p.fill_(1.0)
            elif name.endswith("conv.weight") or name.endswith("convolution.weight"):
                bound = p.shape[-1] ** -0.5
                p.copy_(torch.empty_like(p, dtype=torch.float32).uniform_(-bound, bound, generator=generator))
            else:
                p.copy_(torch.empty_like(p, dtype=torch.float32).normal_(0, std, generator=generator))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        mixers: Iterable[str] | None = None,
    ) -> Supernet:
        """Load an Apriel2 checkpoint directory, with its presets, in eval mode.

        ``dtype`` casts every tensor (default: as stored). ``mixers`` keeps only mixers with these names (to save
        memory when serving a subset). Missing, unexpected or mis-shaped tensors raise ``CheckpointError``.
        """
        path = Path(path)
        cfg, stochastic = read_config(path)
        if mixers is not None:
            cfg = restrict_mixers(cfg, mixers)
        presets = read_presets(path)
        with torch.device("meta"):
            model = cls(cfg)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        state = read_state(path, cfg, stochastic, shapes, device=device, dtype=dtype, partial=mixers is not None)
        model.load_state_dict(state, assign=True, strict=True)
        for name, entry in presets.items():
            meta = {k: v for k, v in entry.items() if k not in ("placement", "letters")}
            try:
                model.add_preset(name, entry["placement"], **meta)
            except ValueError as exc:
                raise CheckpointError(f"{path / PRESETS_NAME}: preset {name!r}: {exc}") from None
        return model.eval()

    def save_pretrained(
        self,
        path: str | Path,
        *,
        max_shard_size: int | str = "5GB",
        presets: Mapping[str, Any] | None = None,
        copy_from: str | Path | None = None,
    ) -> None:
        """Write an Apriel2 checkpoint directory (``gearshift.checkpoint.write_checkpoint``); files appear atomically.

        Presets: ``presets`` (name -> placement, or name -> dict with a 'placement' and any metadata) or, by
        default, the model's own. ``copy_from`` copies tokenizer/chat-template files from another checkpoint.
        """
        if presets is None:
            presets = {name: {**self.preset_meta.get(name, {}), "placement": p} for name, p in self.presets.items()}
        write_checkpoint(
            path,
            self.config,
            self.state_dict(),
            presets,
            known_presets=self.presets,
            max_shard_size=max_shard_size,
            copy_from=copy_from,
        )

    # ------------------------------------------------------------------ placements
    def resolve(self, placement: PlacementSpec = None) -> Placement:
        return resolve_placement(placement, self.config, self.presets)

    def add_preset(self, name: str, placement: PlacementSpec, **meta: Any) -> None:
        """Store a named placement (saved with the checkpoint in presets.json); ``meta`` is free-form."""
        if not name or any(ch.isspace() for ch in name):
            raise PlacementError(f"preset names must be non-empty and without spaces, got {name!r}")
        if looks_like_placement(name):
            raise PlacementError(
                f"preset name {name!r} reads as a placement (all-<mixer>, a mixer name or F/S/G/K letters) or as "
                "'auto', which it would shadow; choose another name"
            )
        self.presets[name] = resolve_placement(placement, self.config, self.presets)
        self.preset_meta[name] = dict(meta)

    def thinned_config(self, placements: Sequence[PlacementSpec]) -> SupernetConfig:
        """This model's config keeping, per layer, only the mixers that some of ``placements`` uses. The default
        placement stays if it is one of them, else the first of them becomes the default."""
        if not placements:
            raise ValueError("thinning needs at least one placement to keep")
        resolved = [self.resolve(p) for p in placements]
        # the default placement stays when it is one of the kept ones, else the first kept one becomes it: never a
        # mix of the two that nobody asked for
        default = self.config.default_placement
        main = default if default in resolved else resolved[0]
        layers = []
        for i, layer in enumerate(self.config.layers):
            keep = {p[i] for p in resolved}
            mixers = {n: m for n, m in layer.mixers.items() if n in keep}
            layers.append(LayerConfig(mixers=mixers, main_mixer=main[i], mlp=layer.mlp))
        return self.config.replace(layers=tuple(layers))

    def thin_(self, placements: Sequence[PlacementSpec]) -> Supernet:
        """Drop, in place, every mixer that none of ``placements`` uses in its layer, and the presets that need a
        dropped one. A server of a few presets then holds only their weights: for the paper's three mixes on
        the 15B shape, 37.5 of 49.3 GB, the rest left to decoding state. ``gearshift thin`` writes the same
        model as a checkpoint."""
        cfg = self.thinned_config(placements)
        for block, layer in zip(self.blocks, cfg.layers, strict=True):
            for name in [n for n in block.mixer.mixers if n not in layer.mixers]:
                del block.mixer.mixers[name]
        self.config = cfg
        for name, placement in list(self.presets.items()):
            if not cfg.holds(placement):
                del self.presets[name]
                self.preset_meta.pop(name, None)
        return self

    def fuse_projections_(self) -> Supernet:
        """Lay out, in place, the weights that read the same input as one tensor each: a mixer's input projections
        (and KDA's convs and low-rank up-projections), an MLP's gate and up. Inference (gradients off) then runs
        one matmul for each such set, so a decode step launches fewer kernels -- which matters most in a batch
        that mixes presets, where every layer runs one chain per mixer group. Names, shapes and values stay; a
        later ``.to()`` or ``load_state_dict(assign=True)`` undoes it (run it again after). The serving engine
        runs it on its model."""
        for block in self.blocks:
            block.mlp.fuse_()
            for mixer in block.mixer.mixers.values():
                mixer.fuse_()
        return self

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.decoder.blocks

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def new_cache(self, batch_size: int, placement: PlacementSpec = None, *, rollback: int = 0) -> SupernetCache:
        """An empty decoding cache for ``batch_size`` rows under one placement.

        ``rollback`` > 0 keeps what is needed to return up to that many tokens back (speculative decoding).
        """
        placement = self.resolve(placement)
        layers = [
            block.mixer.mixers[name].new_cache(rollback) for block, name in zip(self.blocks, placement, strict=True)
        ]
        return SupernetCache(placement, layers, batch_size, self.device)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,
        placement: PlacementSpec = None,
        *,
        attention_mask: Tensor | None = None,
        cache: SupernetCache | None = None,
        mixer_outputs: list[Tensor] | None = None,
        mixer_inputs: list[Tensor] | None = None,
        return_hidden: bool = False,
        last_only: bool = False,
        documents: Documents | Tensor | None = None,
        output_fn: Callable[[Tensor, Tensor], Any] | None = None,
        mix: LayerMix | None = None,
    ) -> Tensor:
        """Logits [B, T, vocab] (or the final hidden states with ``return_hidden``).

        ``attention_mask`` [B, T] marks real tokens (1) and padding (0). Without a cache any padding works (right
        padding for training, left padding for scoring); with a cache, pad on the left. Passing a cache continues
        its sequences and advances it; its placement is the one it was created with. ``mixer_outputs``, when a
        list, receives each layer's mixer output (for activation-matching distillation), ``mixer_inputs`` each
        layer's normed mixer input (for layer-local alignment; recomputed, so no-grad use). ``last_only`` computes
        logits for the last position only (prefill: the full [T, vocab] tensor can dwarf everything else).
        ``documents``: the rows are packed documents (a ``Documents``, or per-token document labels [B, T]); no
        mixer reads across a boundary and RoPE positions restart in each (no cache, no padding mask then).
        ``output_fn(hidden, output_weight)`` replaces the logits by what it returns: a loss fused with the output
        projection (``train.losses.linear_losses``), computed inside this forward so data-parallel wrappers see it.
        ``mix(layer, block, x)``: each layer's mixer output for its normed input ``x``, in place of the placement's
        mixer (the serving engine's batches, whose rows use different mixers on their own state); the dispatch
        holds the positions and the state, so ``placement``, ``attention_mask``, ``cache`` and ``documents`` are
        not given with it. Every other part of the forward is the same code for both.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        ctx = None
        if mix is not None:
            if any(x is not None for x in (placement, attention_mask, cache, documents)):
                raise ValueError("a mixer dispatch (mix) holds its own positions and state: no placement, mask, "
                                 "cache or documents with it")  # fmt: skip
            placement = (None,) * len(self.blocks)
        elif cache is not None:
            if placement is not None and self.resolve(placement) != cache.placement:
                raise PlacementError("this cache was created for another placement; start a new cache to switch")
            placement = cache.placement
        else:
            placement = self.resolve(placement)
        if mix is None:
            ctx = self._context(input_ids, attention_mask, cache, documents)
        h = self.model.embed_tokens(input_ids)
        recompute = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        run = _compiled_block if self.compile_blocks and cache is None and mix is None else _block
        if run is _compiled_block:
            mixers = [block.mixer.mixers[name] for block, name in zip(self.blocks, placement, strict=True)]
            self.prepare_context(ctx, mixers, h.dtype)
        for i, (block, name) in enumerate(zip(self.blocks, placement, strict=True)):
            if mixer_inputs is not None:
                mixer_inputs.append(block.input_layernorm(h))
            mixer = name if mix is None else functools.partial(mix, i, block)
            if recompute:
                h, m = checkpoint(run, block, h, mixer, ctx, None, use_reentrant=False)
            else:
                h, m = run(block, h, mixer, ctx, None if cache is None else cache.layers[i])
            if mixer_outputs is not None:
                mixer_outputs.append(m)
        if cache is not None:
            cache.length += input_ids.shape[1]
            if cache.static_index is not None:
                cache.static_index += input_ids.shape[1]  # device-side, so a captured graph advances it
        if last_only:
            h = h[:, -1:]
        h = self.model.norm(h)
        if return_hidden:
            return h
        if output_fn is not None:
            return output_fn(h, self.output_weight)
        return self.logits(h)

    @property
    def output_weight(self) -> Tensor:
        """The output projection [vocab, hidden]: the LM head, or the embeddings where they are tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.output_weight)

    def step_context(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, documents: Documents | Tensor | None = None
    ) -> StepContext:
        """The positions and masks a mixer needs to run on its own over ``input_ids`` (no cache)."""
        return self._context(input_ids, attention_mask, None, documents)

    def prepare_context(self, ctx: StepContext, mixers: Sequence[Mixer], dtype: torch.dtype) -> None:
        """Compute, eagerly, what compiled mixers will look up in ``ctx``: flex-attention block masks and RoPE
        tables (in the activations' ``dtype``: the autocast dtype where it is on)."""
        attention = [m for m in mixers if isinstance(m, Attention)]
        if ctx.documents is not None:
            ctx.documents.prepare({m.cfg.window_size for m in attention})
        device = ctx.positions.device
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        for m in attention:
            ctx.rope(m.cfg.head_size, m.cfg.rope, dtype)

    def call_mixer(self, layer: int, name: str, x: Tensor, ctx: StepContext) -> Tensor:
        """One layer's mixer on its own (layer-local alignment), compiled where ``compile_blocks`` is set."""
        mixer = self.blocks[layer].mixer.mixers[name]
        if not self.compile_blocks:
            return mixer(x, ctx)
        self.prepare_context(ctx, [mixer], x.dtype)
        return _compiled_mixer(mixer, x, ctx)

    def _context(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        cache: SupernetCache | None,
        documents: Documents | Tensor | None = None,
    ) -> StepContext:
        b, t = input_ids.shape
        device = input_ids.device
        limit = self.config.max_position_embeddings
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        if documents is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("packed documents are for cache-free forwards without a padding mask")
            if not isinstance(documents, Documents):
                documents = Documents.from_segments(documents.to(device))
            if documents.shape != (b, t):
                raise ValueError(f"documents cover {documents.shape} tokens, input_ids is {(b, t)}")
            if max(documents.lengths) > limit:
                raise ValueError(f"a document is longer than the model's context ({limit} tokens)")
            q_index = torch.arange(t, device=device)
            positions = q_index[None].expand(b, t) if documents.single else documents.positions
            return StepContext(q_index, positions, documents=documents)
        if cache is None:
            q_index = torch.arange(t, device=device)
            if attention_mask is None or bool(attention_mask.all()):
                if t > limit:
                    raise ValueError(f"sequence of {t} tokens is longer than the model's context ({limit})")
                return StepContext(q_index, q_index[None].expand(b, t))
            mask = attention_mask.bool()
            positions = (mask.long().cumsum(1) - 1).clamp(min=0)
            if int(mask.sum(1).max()) > limit:
                raise ValueError(f"a sequence is longer than the model's context ({limit} tokens)")
            return StepContext(q_index, positions, token_mask=mask, padded=True)
        if cache.batch_size != b:
            raise ValueError(f"cache holds {cache.batch_size} rows but input_ids has {b}")
        if cache.length == 0 and attention_mask is not None:
            cache.set_padding(attention_mask)
        elif attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("with a cache, padding goes on the left of the first call (the prompt) only")
        if cache.static_index is not None:
            q_index = cache.static_index + torch.arange(t, device=device)
        else:
            q_index = torch.arange(cache.length, cache.length + t, device=device)
        if cache.length + t - cache.min_start > limit:
            raise ValueError(
                f"context of {cache.length + t - cache.min_start} tokens exceeds the model's context ({limit})"
            )
        positions = (q_index[None] - cache.start[:, None]).clamp(min=0)
        token_mask = q_index[None] >= cache.start[:, None] if cache.length < cache.max_start else None
        return StepContext(q_index, positions, token_mask=token_mask, start=cache.start, padded=cache.max_start > 0)

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids: Tensor | Sequence[Sequence[int]], placement: PlacementSpec = None, **kwargs: Any):
        """Autoregressive decoding with incremental state; see ``gearshift.generation.generate``."""
        from .generation import generate

        return generate(self, input_ids, placement, **kwargs)

    def num_parameters(self, placement: PlacementSpec | None = None, *, all_mixers: bool = False) -> int:
        """Parameters used by one placement (or stored in all, with ``all_mixers``)."""
        if all_mixers:
            return sum(p.numel() for p in self.parameters())
        chosen = self.resolve(placement)
        total = 0
        for name, p in self.named_parameters():
            parts = name.split(".")
            if "mixers" in parts:
                layer, mixer = int(parts[3]), parts[parts.index("mixers") + 1]
                if chosen[layer] != mixer:
                    continue
            total += p.numel()
        return total


def thin(
    model: Supernet,
    placements: Sequence[PlacementSpec],
    path: str | Path,
    *,
    copy_from: str | Path | None = None,
    **save_kwargs: Any,
) -> Supernet:
    """Write a checkpoint keeping, per layer, only the mixers that the given placements use; returns the thinned
    model (sharing the kept tensors).

    Presets whose placements survive thinning are kept. The thinned model gives the same logits as the full one
    for every kept placement (only unused tensors are dropped). The default placement stays if it is kept, else
    the first of ``placements`` becomes it.
    """
    cfg = model.thinned_config(placements)
    with torch.device("meta"):
        thinned = Supernet(cfg)
    wanted = thinned.state_dict().keys()
    state = {k: v for k, v in model.state_dict().items() if k in wanted}
    thinned.load_state_dict(state, assign=True, strict=True)
    for name, placement in model.presets.items():
        if cfg.holds(placement):
            thinned.add_preset(name, placement, **model.preset_meta.get(name, {}))
    thinned.save_pretrained(path, copy_from=copy_from, **save_kwargs)
    return thinned
