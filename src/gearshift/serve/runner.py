"""The model runner: the serving engine's decoding state and its forwards over batches of mixed placements.

It owns the pools (one per (layer, mixer) in use, sized to the state budget: ``pools.py``), the per-composition
plans (which rows use which mixer in each layer, on which slots), the CUDA streams of a layer's mixer groups and
the CUDA graphs (``graphs.py``). Its forwards run the model's own block loop (``Supernet.forward`` with a mixer
dispatch, ``_GroupedMix``): every layer splits the batch by the mixer each request uses there and runs each group
on its own pool slots, so no weights are reloaded and no cache is cleared when presets differ. It reads requests
(placements, slots, positions) and returns logits; the scheduler decides what runs and books the results.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..layers.base import StepContext
from ..model import Block, Supernet
from ..ops.fused import fusion
from ..placement import Placement
from .config import EngineConfig
from .graphs import GraphCache
from .logprobs import TokenLogprob, token_logprobs
from .pools import AttentionPool, PoolFullError, RecurrentPool, RecurrentView, consecutive_span, pool_for
from .request import Request

AUTO_STATE_FRACTION = 0.85  # CUDA: decoding state may take this share of the free memory (the rest: activations)

Slots = dict[tuple[int, str], int]  # a request's pool slot per (layer, mixer)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def grows(cls: type, window: int | None) -> bool:
    """Full-attention pools (attention pools without a window): the only ones whose size grows with the context."""
    return cls is AttentionPool and window is None


@dataclass(frozen=True)
class _Group:
    """Rows of a batch that use mixer ``name`` in one layer (``rows`` None: all of them) and their pool slots."""

    name: str
    rows: Tensor | None
    slots: Tensor
    span: slice | None


@dataclass
class PrefillOutput:
    """A prefill forward's results: each row's next-token logits after its chunk ([B, vocab]) and, for rows that
    asked (``prompt_logprobs``), the log-probabilities of the prompt tokens this chunk predicts (None otherwise)."""

    logits: Tensor
    prompt_logprobs: list[list[TokenLogprob]] | None = None


class ModelRunner:
    """Owns the decoding state and runs forwards over it: requests in, logits out (see the module docstring)."""

    def __init__(self, model: Supernet, config: EngineConfig) -> None:
        """The runner lays out ``model``'s weights for inference, in place (``Supernet.fuse_projections_``: same
        names and values, fewer matmuls per step), and allocates the pools ``config`` asks for (see
        ``EngineConfig``: ``pool_slots``, ``state_memory``, ``placements``, ``placement_slots``)."""
        self.model = model.eval().fuse_projections_()  # fewer, larger matmuls per mixer group
        self.engine_config = config
        self.config = model.config
        self.device = model.device
        self.dtype = model.model.embed_tokens.weight.dtype
        cap = self.config.max_position_embeddings
        self.max_context = min(config.max_context or cap, cap)
        self.spec_k_max = config.spec_k_max
        max_batch, placements, placement_slots = config.max_batch, config.placements, config.placement_slots
        slots = config.pool_slots or max_batch
        self.served: tuple[Placement, ...] | None = None
        reserved: dict[Placement, int] | None = None
        if placement_slots is not None:
            if placements is not None or config.pool_slots is not None:
                raise ValueError("placement_slots names the served placements and sizes the pools: give it alone")
            reserved = {}
            for p, count in placement_slots.items():
                if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                    raise ValueError(f"placement_slots: {p!r} needs a whole number of requests >= 1, got {count!r}")
                key = model.resolve(p)
                reserved[key] = reserved.get(key, 0) + count
            placements = list(reserved)
        if placements is not None:
            self.served = tuple(dict.fromkeys(model.resolve(p) for p in placements))
            if not self.served:
                raise ValueError("placements: name at least one placement to serve")
        used = None if self.served is None else {key for p in self.served for key in enumerate(p)}
        specs = [
            {
                name: self._pool_spec(mixer)
                for name, mixer in block.mixer.mixers.items()
                if used is None or (i, name) in used
            }
            for i, block in enumerate(model.blocks)
        ]
        self.state_budget = config.state_memory
        if config.state_memory is None and self.device.type == "cuda":  # free memory, counting torch's unused cache
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            self.state_budget = int(AUTO_STATE_FRACTION * (torch.cuda.mem_get_info(self.device)[0] + cached))
        if reserved is None:
            self.full_attention_slots = self._full_attention_slots(specs, slots, self.state_budget)
            counts = [
                {
                    name: self.full_attention_slots if grows(cls, kw.get("window")) else slots
                    for name, (cls, kw) in layer.items()
                }
                for layer in specs
            ]
        else:
            counts = self._reserved_slots(specs, reserved, self.state_budget)
            grow = {
                (i, n)
                for i, layer in enumerate(specs)
                for n, (cls, kw) in layer.items()
                if grows(cls, kw.get("window"))
            }
            self.full_attention_slots = min(max_batch, sum(c for p, c in reserved.items() if grow & set(enumerate(p))))
        self.placement_slots = reserved
        self.pools: list[dict[str, AttentionPool | RecurrentPool]] = [
            {name: cls(count[name], **kw, device=self.device, dtype=self.dtype) for name, (cls, kw) in layer.items()}
            for layer, count in zip(specs, counts, strict=True)
        ]
        self.contiguous_reads = config.contiguous_reads  # read consecutive slots as views (False: always gather)
        self._plans: dict[tuple, list[list[_Group]]] = {}  # index tensors per batch composition (see plan)
        # decode steps replayed from CUDA graphs, one per batch composition (see graphs.py), on CUDA only. Tests
        # force it on a CPU runner to drive stand-in graphs (tests/serve/test_engine.py)
        self.cuda_graphs = config.cuda_graphs and self.device.type == "cuda"
        self.graphs = GraphCache()
        # side streams for a layer's second, third, ... mixer group (see _GroupedMix); the same ones every step,
        # so their first (eager) use sets up cuBLAS and cuDNN for them before any graph captures them
        self.group_streams = config.streams() and self.device.type == "cuda"
        self._side_streams: list[torch.cuda.Stream] = []

    # ------------------------------------------------------------------ the pools
    def _pool_spec(self, mixer) -> tuple[type, dict]:
        """The pool class and its settings (all but slots, device and dtype) for one mixer's decoding state, from
        the state the mixer describes (``state_spec()``): a new mixer needs no change here."""
        return pool_for(mixer.state_spec(), max_context=self.max_context, spare=self.spec_k_max + 1)

    def _full_attention_slots(self, specs: list[dict[str, tuple[type, dict]]], slots: int, budget: int | None) -> int:
        """Slots of each full-attention pool: ``slots`` when every pool fits the state budget, else as many as fit
        beside ``slots`` of every other pool (their size does not depend on the context)."""
        growing = fixed = 0
        for layer in specs:
            for cls, kw in layer.values():
                size = cls.slot_bytes(**kw, dtype=self.dtype)
                if grows(cls, kw.get("window")):
                    growing += size
                else:
                    fixed += size
        if budget is None or (growing + fixed) * slots <= budget:
            return slots
        fit = (budget - fixed * slots) // growing if growing else 0
        if fit < 1:
            raise ValueError(
                f"decoding state does not fit: {slots} requests' recurrent and window state ({_size(fixed * slots)}) "
                f"plus one request's full-attention KV at a context of {self.max_context} tokens ({_size(growing)}) "
                f"need {_size(fixed * slots + growing)}, over the state budget of {_size(budget)}; lower the context "
                "or the batch, or raise the budget"
            )
        return int(min(slots, fit))

    def _reserved_slots(
        self, specs: list[dict[str, tuple[type, dict]]], reserved: dict[Placement, int], budget: int | None
    ) -> list[dict[str, int]]:
        """Slots per pool for ``placement_slots``: the requests of every placement that uses the pool."""
        counts: list[dict[str, int]] = [dict.fromkeys(layer, 0) for layer in specs]
        for placement, count in reserved.items():
            for i, name in enumerate(placement):
                counts[i][name] += count
        total = sum(
            cls.slot_bytes(**kw, dtype=self.dtype) * counts[i][name]
            for i, layer in enumerate(specs)
            for name, (cls, kw) in layer.items()
        )
        if budget is not None and total > budget:
            raise ValueError(
                f"decoding state does not fit: the reserved requests' pools need {_size(total)} at a context of "
                f"{self.max_context} tokens, over the state budget of {_size(budget)}; reserve fewer requests or "
                "lower the context"
            )
        return counts

    def memory_bytes(self) -> int:
        total = 0
        for layer in self.pools:
            for pool in layer.values():
                total += pool.nbytes_per_slot() * pool.alloc.n
        return total

    def reset_slots(self, taken: dict[tuple[int, str], list[int]]) -> None:
        """Empty the slots just handed out, per (layer, mixer) pool (one fill per pool)."""
        for (i, name), slots in taken.items():
            self.pools[i][name].reset(slots)

    def forget_compositions(self) -> None:
        """Drop the plans and graphs kept per batch composition (the scheduler's composition codes start over)."""
        self._plans.clear()
        self.graphs.clear()

    def check_context(self, max_position: int) -> None:
        if max_position >= self.max_context:
            raise PoolFullError(f"position {max_position} is beyond the engine's context of {self.max_context}")

    # ------------------------------------------------------------------ plans
    def plan_key(
        self,
        placements: Sequence[Placement],
        slots: Sequence[Slots],
        codes: tuple[int, ...] | None = None,
    ) -> tuple:
        if codes is not None:
            return (self.contiguous_reads, "codes", codes)
        return (self.contiguous_reads, tuple(map(tuple, placements)), tuple(tuple(sorted(s.items())) for s in slots))

    def plan(
        self,
        placements: Sequence[Placement],
        slots: Sequence[Slots],
        codes: tuple[int, ...] | None = None,
    ) -> list[list[_Group]]:
        """Per layer, the groups of rows that share a mixer, with their row and slot index tensors.

        Kept for the batch's composition (placements and slots), which a steady decode batch repeats every step:
        building index tensors on the host each layer and step costs a host-to-device copy apiece, each of which
        waits for the GPU.
        """
        key = self.plan_key(placements, slots, codes)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        plan = []
        row_tensors: dict[tuple[int, ...], Tensor] = {}  # equal row sets share one tensor (and one StepContext)
        for i in range(len(self.model.blocks)):
            by_mixer: dict[str, list[int]] = {}
            for row, placement in enumerate(placements):
                by_mixer.setdefault(placement[i], []).append(row)
            layer = []
            for name, rows in by_mixer.items():
                slot_list = [slots[r][(i, name)] for r in rows]
                layer.append(
                    _Group(
                        name,
                        None
                        if len(by_mixer) == 1
                        else row_tensors.setdefault(tuple(rows), torch.tensor(rows, device=self.device)),
                        torch.tensor(slot_list, device=self.device),
                        consecutive_span(slot_list) if self.contiguous_reads else None,
                    )
                )
            plan.append(layer)
        if len(self._plans) >= 64:  # compositions change as requests come and go: keep the recent ones
            self._plans.pop(next(iter(self._plans)))
        self._plans[key] = plan
        return plan

    def recurrent_groups(self, placements: Sequence[Placement], slots: Sequence[Slots], codes: tuple) -> list[tuple]:
        """(pool, slot index tensor, row index tensor or None for all) of each recurrent group of a batch
        composition, from its plan, in the order of the views an eager forward of it returns."""
        return [
            (pool, g.slots, g.rows)
            for i, groups in enumerate(self.plan(placements, slots, codes))
            for g in groups
            if isinstance(pool := self.pools[i][g.name], RecurrentPool)
        ]

    # ------------------------------------------------------------------ the forward over a mixed batch
    @torch.no_grad()
    def mixed_forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        placements: Sequence[Placement],
        slots: Sequence[Slots],
        rollback: int = 0,
        max_position: int | None = None,
        last_only: bool = False,
        codes: tuple[int, ...] | None = None,
        fresh: bool = False,
        token_mask: Tensor | None = None,
        hidden: bool = False,
    ) -> tuple[Tensor, list[RecurrentView]]:
        """Logits [B, T, vocab] for rows at their own positions, each under its own placement and pool slots
        (``hidden``: the final normed hidden states [B, T, dim] instead, for callers that want logits of a few
        rows at every position without the [B, T, vocab] tensor).

        With ``rollback``, recurrent views keep per-token snapshots (returned) for speculative rejection; each
        view covers the rows of its group (``RecurrentView.index``).
        ``max_position``: the largest position in ``positions``, known on the host; the pools then skip their
        own (synchronising) capacity checks. ``last_only``: logits of the last position only (prefill).
        ``codes``: the rows' ``Request.code`` (a cheaper key for the batch's plan). ``fresh``: every row starts
        at position 0 (its prompt's first chunk), so attention needs only this call's keys (see AttentionView).
        ``token_mask`` [B, T]: real tokens of fresh rows left-padded to a common length (padding sits at negative
        positions).
        """
        if token_mask is not None and not fresh:
            raise ValueError("only fresh rows (first prompt chunks) may be padded")
        if max_position is not None:
            self.check_context(max_position)
        mix = _GroupedMix(self, self.plan(placements, slots, codes), positions, token_mask, rollback,
                          max_position is not None, fresh)  # fmt: skip
        out = self.model(tokens, mix=mix, last_only=last_only, return_hidden=hidden)
        return out, mix.views

    def _fork(self, n: int) -> list[torch.cuda.Stream]:
        """``n`` side streams that start after the work queued so far on the current stream (none where group
        streams are off). A layer's mixer groups touch disjoint rows and their own pools, so they may run at once:
        a group of a mixed batch is a chain of small kernels (a few dozen rows each), which alone leaves most of
        the GPU idle, and one stream would run the groups' chains one after another."""
        if not self.group_streams or n <= 0:
            return []
        while len(self._side_streams) < n:
            self._side_streams.append(torch.cuda.Stream(self.device))
        main = torch.cuda.current_stream(self.device)
        side = self._side_streams[:n]
        for stream in side:
            stream.wait_stream(main)
        return side

    def _join(self, side: list[torch.cuda.Stream]) -> None:
        """The current stream waits for the side streams' work (everything after reads the groups' outputs).
        Tensors made on a side stream and read later on another stream are ordered through these joins and the
        next forks, and are freed back to their own stream's memory: reuse is ordered too."""
        if not side:
            return
        main = torch.cuda.current_stream(self.device)
        for stream in side:
            main.wait_stream(stream)

    # ------------------------------------------------------------------ forwards through CUDA graphs
    def graph_forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        placements: Sequence[Placement],
        slots: Sequence[Slots],
        max_position: int,
        codes: tuple[int, ...] | None = None,
        rollback: int = 0,
    ) -> tuple[Tensor, list[RecurrentView]]:
        """``mixed_forward`` of [B, T] tokens replayed from a CUDA graph of this composition, T and roll-back (a
        decode step, a speculative draft step, or a verify pass: k + 1 tokens per row, with per-token snapshots of
        the recurrent state). Returns the graph's own logits and views: valid until the next graph replay (graphs
        share one memory pool). Graphs keep their plan (index tensors) and static inputs alive; the pools are
        fixed buffers, positions are device data and capacity is checked on the host. Eager where
        ``GraphCache.lookup`` gives no graph (and where graphs are off)."""
        t = tokens.shape[1]
        key = self._graph_key(placements, slots, codes, t, rollback)
        graph = self.graphs.lookup(self, key, placements, slots, codes, t, rollback) if self.cuda_graphs else None
        if graph is None:
            with fusion(self.cuda_graphs):
                return self.mixed_forward(
                    tokens, positions, placements, slots, rollback=rollback, max_position=max_position, codes=codes
                )
        self.check_context(max_position)
        graph.tokens.copy_(tokens)
        graph.positions.copy_(positions)
        graph.graph.replay()
        return graph.logits, graph.views

    def graph_decode(
        self,
        tokens: Tensor,
        positions: Tensor,
        placements: Sequence[Placement],
        slots: Sequence[Slots],
        max_position: int,
        codes: tuple[int, ...] | None = None,
    ) -> Tensor:
        """Next-token logits [B, vocab] of a decode step, replayed from a CUDA graph of this batch composition
        (``graph_forward`` of one token). A batch that has only lost rows replays its earlier graph padded (see
        ``GraphCache.padded``) rather than capturing every smaller size."""
        padded = None
        if codes is not None and self._graph_key(placements, slots, codes, 1, 0) not in self.graphs.captured:
            padded = self.graphs.padded(self, codes)
        if padded is not None:
            graph, live = padded
            self.check_context(max_position)
            graph.tokens.zero_()  # the missing rows decode token 0 at position 0 into their free slots
            graph.positions.zero_()
            graph.tokens[live] = tokens
            graph.positions[live] = positions
            graph.graph.replay()
            return graph.logits[live][:, -1]
        return self.graph_forward(tokens, positions, placements, slots, max_position, codes)[0][:, -1]

    def _graph_key(self, placements, slots, codes, tokens: int, rollback: int) -> tuple:
        return (*self.plan_key(placements, slots, codes), tokens, rollback)

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Forwards run eagerly inside this block, graphs or not (profiling where an engine that replays graphs
        spends a step: the kernels a graph replays are the same, one by one)."""
        graphs, self.cuda_graphs = self.cuda_graphs, False
        try:
            yield
        finally:
            self.cuda_graphs = graphs

    # ------------------------------------------------------------------ a step's forwards
    def decode_inputs(self, reqs: list[Request]) -> tuple[Tensor, Tensor]:
        """Each request's last token and its position, [B, 1] each, from the host."""
        positions = torch.tensor([r.processed for r in reqs], device=self.device)[:, None]
        tokens = torch.tensor([r.tokens[-1] for r in reqs], device=self.device)[:, None]
        return tokens, positions

    def decode_logits(self, reqs: list[Request], tokens: Tensor, positions: Tensor) -> Tensor:
        """Next-token logits [B, vocab] of a decode step (from a CUDA graph of the batch composition when enabled)."""
        args = (tokens, positions, [r.placement for r in reqs], [r.slots for r in reqs])
        last, codes = max(r.processed for r in reqs), tuple(r.code for r in reqs)
        if self.cuda_graphs:
            return self.graph_decode(*args, last, codes)
        return self.mixed_forward(*args, max_position=last, codes=codes)[0][:, -1]

    def prefill(self, reqs: list[Request], lengths: list[int]) -> PrefillOutput:
        """Read the next ``lengths[i]`` prompt tokens of each request, in one forward (rows at their own
        positions), into its target state and, for speculative requests, its draft's. The requests' positions
        (``processed``) are the scheduler's to advance.

        Chunks of different lengths are left-padded to the longest, which only first chunks may be: their padding
        is masked out of attention, an identity for the recurrent mixers (as in a left-padded Supernet.generate),
        and written nowhere a real token is. The last column is then every row's last prompt token."""
        width = max(lengths)
        pads = [width - n for n in lengths]
        tokens = torch.tensor(
            [
                [0] * pad + r.tokens[r.processed : r.processed + n]
                for r, n, pad in zip(reqs, lengths, pads, strict=True)
            ],
            device=self.device,
        )
        starts = torch.tensor([[r.processed - pad] for r, pad in zip(reqs, pads, strict=True)], device=self.device)
        positions = starts + torch.arange(width, device=self.device)  # padding at negative positions
        last = max(r.processed + n for r, n in zip(reqs, lengths, strict=True)) - 1
        fresh = all(r.processed == 0 for r in reqs)  # every row reads its prompt's first chunk
        if not fresh and any(pads):
            raise ValueError("only first prompt chunks may be padded")
        mask = positions >= 0 if any(pads) else None
        scored = reqs[0].prompt_logprobs is not None  # the scheduler gives such requests forwards of their own
        logits, _ = self.mixed_forward(
            tokens,
            positions,
            [r.placement for r in reqs],
            [r.slots for r in reqs],
            max_position=last,
            last_only=not scored,
            fresh=fresh,
            token_mask=mask,
            hidden=scored,
        )
        prompt_logprobs = None
        if scored:
            prompt_logprobs = self._prompt_logprobs(reqs, lengths, pads, logits)
            logits = self.model.logits(logits[:, -1:])
        drafting = [i for i, r in enumerate(reqs) if r.draft is not None]
        if drafting:  # the draft reads the same prompt into its own state
            rows = torch.tensor(drafting, device=self.device)
            self.mixed_forward(
                tokens[rows],
                positions[rows],
                [reqs[i].draft for i in drafting],
                [reqs[i].draft_slots for i in drafting],
                max_position=last,
                last_only=True,
                fresh=fresh,
                token_mask=None if mask is None else mask[rows],
            )
        return PrefillOutput(logits[:, -1], prompt_logprobs)

    def _prompt_logprobs(
        self, reqs: list[Request], lengths: list[int], pads: list[int], hidden: Tensor
    ) -> list[list[TokenLogprob]]:
        """Log-probabilities of the prompt tokens that this prefill chunk predicts (``hidden`` [B, T, dim], rows
        left-padded by ``pads``): position p's logits score token p + 1, up to the prompt's last token (the
        first generated token is scored with the generated ones). One row's logits at a time."""
        out: list[list[TokenLogprob]] = []
        for row, (req, n, pad) in enumerate(zip(reqs, lengths, pads, strict=True)):
            start = req.processed  # the chunk's first position (the scheduler advances it after this forward)
            m = min(n, len(req.prompt) - 1 - start)
            entries = []
            if m > 0:
                logits = self.model.logits(hidden[row, pad : pad + m])
                targets = req.prompt[start + 1 : start + 1 + m]
                entries = token_logprobs(logits, targets, req.params.prompt_logprobs)
            out.append(entries)
        return out


class _GroupedMix:
    """The mixer dispatch of a mixed batch (``Supernet.forward``'s ``mix``): in each layer, the rows of each
    mixer group run that mixer on their own pool slots, the groups on their own CUDA streams where those are on,
    and their outputs are scattered into one tensor. Recurrent views (with per-token snapshots under roll-back) are
    collected in ``views``."""

    def __init__(
        self,
        runner: ModelRunner,
        plan: list[list[_Group]],
        positions: Tensor,
        token_mask: Tensor | None,
        rollback: int,
        checked: bool,
        fresh: bool,
    ) -> None:
        self.runner, self.plan, self.positions, self.token_mask = runner, plan, positions, token_mask
        self.rollback, self.checked, self.fresh = rollback, checked, fresh
        self.views: list[RecurrentView] = []
        # one context per set of rows, shared by the layers where that set forms a group: positions are gathered
        # and rotary tables computed once per call, not once per layer (the plan shares equal row tensors)
        self.contexts: dict[int, StepContext] = {}

    def __call__(self, layer: int, block: Block, x: Tensor) -> Tensor:
        groups = self.plan[layer]
        runner = self.runner
        out = None if len(groups) == 1 and groups[0].rows is None else torch.empty_like(x)
        side = runner._fork(len(groups) - 1)
        for g, stream in zip(groups, [None, *side] if side else [None] * len(groups), strict=True):
            with contextlib.nullcontext() if stream is None else torch.cuda.stream(stream):
                pool = runner.pools[layer][g.name]
                if isinstance(pool, RecurrentPool):
                    view = pool.view(g.slots, self.rollback, g.rows, g.span)
                    self.views.append(view)
                else:
                    view = pool.view(g.slots, g.span, self.checked, self.fresh)
                ctx = self.contexts.get(id(g.rows))
                if ctx is None:
                    pos = self.positions if g.rows is None else self.positions[g.rows]
                    if self.token_mask is None:
                        ctx = StepContext(pos, pos)
                    else:
                        real = self.token_mask if g.rows is None else self.token_mask[g.rows]
                        ctx = StepContext(pos, pos.clamp(min=0), token_mask=real, padded=True)
                    self.contexts[id(g.rows)] = ctx
                if g.rows is None:  # every row uses this mixer here: no gather, no scatter
                    out = block.mixer.mixers[g.name](x, ctx, view)
                else:
                    out[g.rows] = block.mixer.mixers[g.name](x[g.rows], ctx, view)
        runner._join(side)
        return out
