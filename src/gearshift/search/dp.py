"""Exact Pareto frontier of predicted quality vs. additive cost over placements, by dynamic programming.

The surrogate (``ClusterExpansion.to_dp_terms``) writes predicted quality as a chain model

    quality(p) = const + sum_l h[l, p_l] + sum_{d=1..r} sum_l J[d-1, l, p_l, p_{l+d}]

and the cost of a placement is a per-layer sum ``sum_l cost[l, p_l]``. Because interactions only reach r
layers back, the best partial placement for a given (layer, last r mixers, cost so far) does not depend on how
it got there, so a DP over those states enumerates the whole frontier exactly in O(L * M^(r+1) * C)
instead of M^L.

Costs are rounded to integer multiples of ``cost_resolution`` (``round(cost / cost_resolution)``, to nearest),
and the DP is exact for those rounded costs: no placement with a rounded cost at most that of a returned point
has higher quality. Returned solutions report their exact, unrounded cost. A ``max_cost`` cap admits a
placement when its rounded cost is at most ``floor(max_cost / cost_resolution)`` units; the optional memory
constraint is handled the same way with its own resolution.

Letter codes used elsewhere in the project: F = attention, S = sliding_window, K = kda, G = gdn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

Letters = Sequence[str] | str | None  # mixer index -> letter, e.g. "FSKG"

__all__ = [
    "Solution",
    "best_under_budget",
    "diverse",
    "evaluate",
    "pareto_frontier",
    "placement_cost",
]

# DP tables larger than this many entries per layer are refused: the fix is a coarser resolution.
_MAX_STATE_ENTRIES = 40_000_000
_MAX_STORED_ENTRIES = 600_000_000
_EPS = 1e-9


@dataclass(frozen=True, eq=False)
class Solution:
    """One placement on (or next to) the frontier.

    ``alternatives`` is filled only with ``k_best``: the next-best distinct placements whose rounded cost is
    within this solution's rounded cost, best first, so a preset can be swapped for a near-equal one.
    """

    placement: np.ndarray
    quality: float
    cost: float
    memory: float | None = None
    alternatives: tuple[Solution, ...] = field(default=())

    def as_string(self, letters: Letters = None) -> str:
        """Placement as a compact string, e.g. ``"FFSGKG"`` with ``letters="FSKG"``."""
        return placement_string(self.placement, letters)


def placement_string(placement: np.ndarray | Sequence[int], letters: Letters = None) -> str:
    """Render a placement as one symbol per layer (digits unless ``letters`` maps mixer index -> letter)."""
    p = np.asarray(placement).ravel()
    if letters is None:
        return "".join(str(int(v)) for v in p) if p.size == 0 or p.max() < 10 else ",".join(map(str, p))
    if len(letters) <= int(p.max(initial=0)):
        raise ValueError(f"{len(letters)} mixer letters given but the placement uses mixer {int(p.max())}")
    return "".join(letters[int(v)] for v in p)


# ----------------------------------------------------------------------------------------------------------
# evaluation helpers


def _terms(const: float, h: np.ndarray, J: np.ndarray | None) -> tuple[float, np.ndarray, np.ndarray]:
    h = np.asarray(h, dtype=float)
    if h.ndim != 2:
        raise ValueError(f"h must be [n_layers, n_mixers], got shape {h.shape}")
    L, M = h.shape
    if L < 1 or M < 1:
        raise ValueError(f"h must have at least one layer and one mixer, got shape {h.shape}")
    if J is None:
        J = np.zeros((0, L, M, M))
    J = np.asarray(J, dtype=float)
    if J.ndim == 3:
        J = J[None]
    if J.ndim != 4 or J.shape[1:] != (L, M, M):
        raise ValueError(f"J must be [r, {L}, {M}, {M}] to match h {h.shape}, got shape {J.shape}")
    if not (np.isfinite(h).all() and np.isfinite(J).all() and np.isfinite(const)):
        raise ValueError("const, h and J must be finite")
    return float(const), h, J


def _placements(placement: np.ndarray | Sequence[int], L: int, M: int) -> np.ndarray:
    P = np.asarray(placement)
    if P.ndim not in (1, 2) or P.shape[-1] != L:
        raise ValueError(f"placement must have shape [{L}] or [n, {L}], got {P.shape}")
    if P.dtype.kind not in "iu":
        if P.dtype.kind != "f" or not np.all(np.round(P) == P):
            raise ValueError(f"placement must hold integer mixer indices, got dtype {P.dtype}")
        P = P.astype(np.int64)
    if P.size and (P.min() < 0 or P.max() >= M):
        raise ValueError(f"placement values must lie in 0..{M - 1}, got range {P.min()}..{P.max()}")
    return P.astype(np.int64, copy=False)


def evaluate(
    placement: np.ndarray | Sequence[int], const: float, h: np.ndarray, J: np.ndarray | None
) -> float | np.ndarray:
    """Chain-model quality of one placement [L] (float) or many [n, L] (array); the DP's objective."""
    const, h, J = _terms(const, h, J)
    L, M = h.shape
    P = _placements(placement, L, M)
    P2 = P.reshape(-1, L)
    layers = np.arange(L)
    q = const + h[layers, P2].sum(axis=1)
    for d in range(1, J.shape[0] + 1):
        if d < L:
            q = q + J[d - 1, layers[:-d], P2[:, :-d], P2[:, d:]].sum(axis=1)
    return float(q[0]) if P.ndim == 1 else q


def placement_cost(placement: np.ndarray | Sequence[int], cost: np.ndarray) -> float | np.ndarray:
    """Exact (unrounded) additive cost of one placement [L] (float) or many [n, L] (array)."""
    cost = np.asarray(cost, dtype=float)
    if cost.ndim != 2:
        raise ValueError(f"cost must be [n_layers, n_mixers], got shape {cost.shape}")
    L, M = cost.shape
    P = _placements(placement, L, M)
    c = cost[np.arange(L), P.reshape(-1, L)].sum(axis=1)
    return float(c[0]) if P.ndim == 1 else c


# ----------------------------------------------------------------------------------------------------------
# the DP


def _units(values: np.ndarray, resolution: float, what: str) -> np.ndarray:
    if not (resolution > 0 and math.isfinite(resolution)):
        raise ValueError(f"{what} resolution must be a positive number, got {resolution}")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"{what} must be finite and non-negative")
    return np.rint(values / resolution).astype(np.int64)


def _budget_units(budget: float, resolution: float) -> int:
    return math.floor(budget / resolution + _EPS)


@dataclass
class _CountAxis:
    mixer: int
    low: int
    cap: int
    saturate: bool  # no max_count: counts above `low` are all equivalent, so the axis stops at `low`


@dataclass
class _Problem:
    const: float
    h: np.ndarray
    J: np.ndarray  # [R, L, M, M] with R >= 1 (zero-padded when r == 0)
    cost: np.ndarray
    memory: np.ndarray | None
    allowed: np.ndarray
    cq: np.ndarray  # rounded cost units [L, M]
    mq: np.ndarray  # rounded memory units [L, M] (zeros without a memory constraint)
    C: int  # largest cost unit tracked
    Mem: int  # largest memory unit tracked
    counts: list[_CountAxis]

    @property
    def L(self) -> int:
        return self.h.shape[0]

    @property
    def M(self) -> int:
        return self.h.shape[1]

    @property
    def R(self) -> int:
        return self.J.shape[0]


def _build_problem(
    const: float,
    h: np.ndarray,
    J: np.ndarray | None,
    cost: np.ndarray,
    cost_resolution: float,
    allowed: np.ndarray | None,
    fixed: Mapping[int, int] | None,
    min_count: Mapping[int, int] | None,
    max_count: Mapping[int, int] | None,
    memory: np.ndarray | None,
    memory_budget: float | None,
    memory_resolution: float | None,
    max_cost: float | None,
) -> _Problem:
    const, h, J = _terms(const, h, J)
    L, M = h.shape
    if J.shape[0] == 0:
        J = np.zeros((1, L, M, M))
    cost = np.asarray(cost, dtype=float)
    if cost.shape != (L, M):
        raise ValueError(f"cost must be [{L}, {M}] like h, got shape {cost.shape}")
    cq = _units(cost, cost_resolution, "cost")

    ok = np.ones((L, M), dtype=bool)
    if allowed is not None:
        allowed = np.asarray(allowed)
        if allowed.shape != (L, M):
            raise ValueError(f"allowed must be [{L}, {M}], got shape {allowed.shape}")
        ok &= allowed.astype(bool)
    for layer, mixer in (fixed or {}).items():
        layer, mixer = int(layer), int(mixer)
        if not 0 <= layer < L:
            raise ValueError(f"fixed layer {layer} is out of range 0..{L - 1}")
        if not 0 <= mixer < M:
            raise ValueError(f"fixed mixer {mixer} at layer {layer} is out of range 0..{M - 1}")
        if not ok[layer, mixer]:
            raise ValueError(f"fixed mixer {mixer} at layer {layer} is not allowed there")
        ok[layer] = False
        ok[layer, mixer] = True
    empty = np.flatnonzero(~ok.any(axis=1))
    if empty.size:
        raise ValueError(f"no mixer is allowed at layer(s) {empty.tolist()}")

    counts = _count_axes(ok, min_count, max_count)

    big = np.iinfo(np.int64).max // 4
    lo_cost = int(np.where(ok, cq, big).min(axis=1).sum())
    C = int(np.where(ok, cq, -1).max(axis=1).sum())
    if max_cost is not None:
        cap = _budget_units(float(max_cost), cost_resolution)
        if cap < lo_cost:
            raise ValueError(
                f"max_cost {max_cost} is below the cheapest allowed placement "
                f"(rounded cost {lo_cost * cost_resolution:.6g})"
            )
        C = min(C, cap)

    if (memory is None) != (memory_budget is None):
        raise ValueError("memory and memory_budget must be given together")
    if memory is not None:
        assert memory_budget is not None
        memory = np.asarray(memory, dtype=float)
        if memory.shape != (L, M):
            raise ValueError(f"memory must be [{L}, {M}], got shape {memory.shape}")
        if not memory_budget > 0:
            raise ValueError(f"memory_budget must be positive, got {memory_budget}")
        res = memory_resolution if memory_resolution is not None else memory_budget / 100.0
        mq = _units(memory, res, "memory")
        lo_mem = int(np.where(ok, mq, big).min(axis=1).sum())
        Mem = _budget_units(float(memory_budget), res)
        if Mem < lo_mem:
            raise ValueError(
                f"memory_budget {memory_budget} is below the smallest-memory allowed placement "
                f"(rounded memory {lo_mem * res:.6g})"
            )
        Mem = min(Mem, int(np.where(ok, mq, -1).max(axis=1).sum()))
    else:
        mq = np.zeros((L, M), dtype=np.int64)
        Mem = 0

    return _Problem(const, h, J, cost, memory, ok, cq, mq, C, Mem, counts)


def _count_axes(
    ok: np.ndarray, min_count: Mapping[int, int] | None, max_count: Mapping[int, int] | None
) -> list[_CountAxis]:
    L, M = ok.shape
    lows = {int(m): int(v) for m, v in (min_count or {}).items()}
    highs = {int(m): int(v) for m, v in (max_count or {}).items()}
    for name, table in (("min_count", lows), ("max_count", highs)):
        for m, v in table.items():
            if not 0 <= m < M:
                raise ValueError(f"{name} names mixer {m}, out of range 0..{M - 1}")
            if v < 0:
                raise ValueError(f"{name}[{m}] = {v} is negative")
    if sum(lows.values()) > L:
        raise ValueError(f"min_count asks for {sum(lows.values())} layers in total but there are only {L}")
    axes = []
    for m in sorted(set(lows) | set(highs)):
        lo, hi = lows.get(m, 0), highs.get(m)
        n_ok = int(ok[:, m].sum())
        forced = int((ok[:, m] & (ok.sum(axis=1) == 1)).sum())
        if lo > n_ok:
            raise ValueError(f"min_count[{m}] = {lo} exceeds the {n_ok} layers where mixer {m} is allowed")
        if hi is not None and hi < lo:
            raise ValueError(f"max_count[{m}] = {hi} is below min_count[{m}] = {lo}")
        if hi is not None and hi < forced:
            raise ValueError(f"max_count[{m}] = {hi} but {forced} layers are forced to mixer {m}")
        if lo == 0 and (hi is None or hi >= n_ok):
            continue  # vacuous: no state needed
        if hi is None or hi >= n_ok:
            axes.append(_CountAxis(m, lo, lo, True))
        else:
            axes.append(_CountAxis(m, lo, hi, False))
    return axes


def _gain(pb: _Problem, l: int) -> np.ndarray:
    """Quality added by choosing mixer p at layer l given the previous R mixers: shape (M,)*R + (M,)."""
    R, M = pb.R, pb.M
    G = np.broadcast_to(pb.h[l], (M,) * R + (M,)).copy()
    for d in range(1, R + 1):
        if l - d >= 0:
            shape = [1] * (R + 1)
            shape[R - d] = M
            shape[R] = M
            G += pb.J[d - 1, l - d].reshape(shape)
    return G


def _forward(pb: _Problem, k: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Run the k-best DP. Value table axes: (M,)*R + counts + (memory, cost) + (k,).

    For each layer we keep, per state, the k best partial values and an index into the candidate list the
    value came from (dropped mixer, rank in the predecessor, and whether a saturated count stayed put), which
    is all backtracking needs.
    """
    L, M, R = pb.L, pb.M, pb.R
    rest = tuple(ax.cap + 1 for ax in pb.counts) + (pb.Mem + 1, pb.C + 1)
    shape = (M,) * R + rest + (k,)
    per_layer = int(np.prod(shape))
    if per_layer > _MAX_STATE_ENTRIES or per_layer * L > _MAX_STORED_ENTRIES:
        raise ValueError(
            f"DP table too large ({per_layer:,} entries per layer): use a coarser cost_resolution / "
            "memory_resolution, fewer count constraints or a smaller k_best"
        )
    count_pos = {ax.mixer: i for i, ax in enumerate(pb.counts)}
    V = np.full(shape, -np.inf)
    V[(0,) * (R + len(rest) + 1)] = 0.0
    idx_dtype = np.int16 if 2 * M * k < np.iinfo(np.int16).max else np.int32
    n_rest = len(rest)
    lead = (slice(None),) * (R - 1)
    srcs: list[np.ndarray] = []
    for l in range(L):
        G = _gain(pb, l)
        new = np.full(shape, -np.inf)
        src = np.zeros(shape, dtype=idx_dtype)
        for p in np.flatnonzero(pb.allowed[l]):
            g = G[..., p]
            cand = V + g.reshape(g.shape + (1,) * (n_rest + 1))
            cand = np.moveaxis(cand, 0, -2)  # (M,)*(R-1) + rest + (M, k): the dropped mixer joins the ranks
            cand = cand.reshape(cand.shape[:-2] + (M * k,))
            offsets = [0] * n_rest
            if p in count_pos:
                offsets[count_pos[p]] = 1
            offsets[-2] = int(pb.mq[l, p])
            offsets[-1] = int(pb.cq[l, p])
            parts = [_shifted(cand, R - 1, rest, offsets)]
            if p in count_pos and pb.counts[count_pos[p]].saturate:
                # a saturated count stays at its cap: add those predecessors as a second candidate block
                i = count_pos[p]
                stay = offsets.copy()
                stay[i] = 0
                block = _shifted(cand, R - 1, rest, stay)
                keep = [slice(None)] * block.ndim
                keep[R - 1 + i] = slice(0, pb.counts[i].cap)
                block[tuple(keep)] = -np.inf
                parts.append(block)
            allc = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
            if k == 1:
                top = np.argmax(allc, axis=-1)[..., None]
            else:
                top = np.argsort(-allc, axis=-1, kind="stable")[..., :k]
            new[lead + (p,)] = np.take_along_axis(allc, top, axis=-1)
            src[lead + (p,)] = top
        V = new
        srcs.append(src)
    return V, srcs


def _shifted(cand: np.ndarray, n_lead: int, rest: tuple[int, ...], offsets: Sequence[int]) -> np.ndarray:
    """Move candidates to the resource buckets they land in after paying ``offsets``; overflow is dropped."""
    out = np.full(cand.shape, -np.inf)
    dst: list[slice] = [slice(None)] * n_lead
    srcs: list[slice] = [slice(None)] * n_lead
    for size, off in zip(rest, offsets, strict=True):
        if off >= size:
            return out
        dst.append(slice(off, size))
        srcs.append(slice(0, size - off))
    out[tuple(dst)] = cand[tuple(srcs)]
    return out


def _final_table(pb: _Problem, V: np.ndarray) -> np.ndarray:
    """Values with count constraints applied, reshaped to [cost bucket, flat state*rank]."""
    V = V.copy()
    R = pb.R
    for i, ax in enumerate(pb.counts):
        bad = [slice(None)] * V.ndim
        bad[R + i] = slice(0, ax.low)
        V[tuple(bad)] = -np.inf
    T = np.moveaxis(V, -2, 0)
    return T.reshape(T.shape[0], -1)


def _backtrack(
    pb: _Problem,
    srcs: list[np.ndarray],
    shape: tuple[int, ...],
    c: int,
    flat: int,
    k: int,
) -> np.ndarray:
    """Recover the placement behind entry ``flat`` of cost bucket ``c`` (see ``_final_table``)."""
    R, M = pb.R, pb.M
    idx = list(np.unravel_index(flat, shape[:-2] + shape[-1:]))  # states + counts + memory + rank
    state = [int(v) for v in idx[:R]]
    counts = [int(v) for v in idx[R : R + len(pb.counts)]]
    mem = int(idx[R + len(pb.counts)])
    rank = int(idx[-1])
    count_pos = {ax.mixer: i for i, ax in enumerate(pb.counts)}
    placement = np.empty(pb.L, dtype=np.int64)
    for l in range(pb.L - 1, -1, -1):
        p = state[-1]
        placement[l] = p
        s = int(srcs[l][tuple(state + counts + [mem, c, rank])])
        variant, rem = divmod(s, M * k)
        a, rank = divmod(rem, k)
        if p in count_pos and variant == 0:
            counts[count_pos[p]] -= 1
        mem -= int(pb.mq[l, p])
        c -= int(pb.cq[l, p])
        state = [a] + state[:-1]
    assert c == 0 and mem == 0 and all(v == 0 for v in counts) and all(v == 0 for v in state), "bad backtrack"
    return placement


def _solution(pb: _Problem, placement: np.ndarray, alternatives: tuple[Solution, ...] = ()) -> Solution:
    quality = evaluate(placement, pb.const, pb.h, pb.J)
    assert isinstance(quality, float)
    cost = placement_cost(placement, pb.cost)
    assert isinstance(cost, float)
    memory = None
    if pb.memory is not None:
        memory = placement_cost(placement, pb.memory)
        assert isinstance(memory, float)
    return Solution(placement, quality, cost, memory, alternatives)


def pareto_frontier(
    const: float,
    h: np.ndarray,
    J: np.ndarray | None,
    cost: np.ndarray,
    *,
    cost_resolution: float = 0.01,
    allowed: np.ndarray | None = None,
    fixed: Mapping[int, int] | None = None,
    min_count: Mapping[int, int] | None = None,
    max_count: Mapping[int, int] | None = None,
    memory: np.ndarray | None = None,
    memory_budget: float | None = None,
    memory_resolution: float | None = None,
    max_cost: float | None = None,
    k_best: int | None = None,
) -> list[Solution]:
    """Exact quality-vs-cost Pareto frontier, sorted by cost ascending with strictly increasing quality.

    Args:
        const, h, J: chain model ``const + sum h[l, p_l] + sum J[d-1, l, p_l, p_{l+d}]`` (J is [r, L, M, M],
            or [L, M, M] for r = 1, or None); quality is maximised.
        cost: [L, M] non-negative per-layer cost of each mixer; minimised after rounding to
            ``cost_resolution`` (the frontier is exact for the rounded costs; solutions carry exact costs).
        allowed: [L, M] bool mask of mixers a layer may use. ``fixed``: {layer: mixer} pins.
        min_count / max_count: {mixer: n} bounds on how many layers use a mixer.
        memory, memory_budget: a second additive resource [L, M] whose rounded total must stay within the
            budget (``memory_resolution`` defaults to budget / 100).
        max_cost: only placements whose rounded cost is within this cap.
        k_best: also keep the k best distinct placements per DP state, and attach to every frontier point the
            runner-ups under its budget as ``Solution.alternatives`` (k - 1 of them when that many exist).

    Raises ValueError when the inputs are malformed or the constraints admit no placement.
    """
    if k_best is not None and (int(k_best) != k_best or k_best < 1):
        raise ValueError(f"k_best must be a positive integer, got {k_best}")
    k = int(k_best or 1)
    pb = _build_problem(
        const,
        h,
        J,
        cost,
        cost_resolution,
        allowed,
        fixed,
        min_count,
        max_count,
        memory,
        memory_budget,
        memory_resolution,
        max_cost,
    )
    V, srcs = _forward(pb, k)
    T = _final_table(pb, V)
    best = T.max(axis=1)
    if not np.isfinite(best).any():
        raise ValueError("the constraints admit no placement (counts, memory, budget, allowed mixers)")

    frontier: list[tuple[int, int]] = []  # (cost bucket, flat index)
    running = -np.inf
    for c in np.flatnonzero(best > -np.inf):
        if best[c] > running:
            running = best[c]
            frontier.append((int(c), int(np.argmax(T[c]))))

    if k == 1:
        return [_solution(pb, _backtrack(pb, srcs, V.shape, c, f, 1)) for c, f in frontier]

    # k-best: running top-k over cost buckets, so the list at bucket c holds the k best with cost <= c
    out = []
    pool_v = np.full(0, -np.inf)
    pool_c = np.zeros(0, dtype=np.int64)
    pool_f = np.zeros(0, dtype=np.int64)
    targets = {c for c, _ in frontier}
    for c in range(int(max(targets)) + 1):
        row = T[c]
        finite = np.flatnonzero(row > -np.inf)
        if finite.size:
            top = finite[np.argsort(-row[finite], kind="stable")[:k]]
            pool_v = np.concatenate([pool_v, row[top]])
            pool_c = np.concatenate([pool_c, np.full(top.size, c)])
            pool_f = np.concatenate([pool_f, top])
            order = np.argsort(-pool_v, kind="stable")[:k]
            pool_v, pool_c, pool_f = pool_v[order], pool_c[order], pool_f[order]
        if c in targets:
            sols = [
                _solution(pb, _backtrack(pb, srcs, V.shape, int(cc), int(ff), k))
                for cc, ff in zip(pool_c, pool_f, strict=True)
            ]
            head = sols[0]
            out.append(Solution(head.placement, head.quality, head.cost, head.memory, tuple(sols[1:])))
    return out


def best_under_budget(
    const: float, h: np.ndarray, J: np.ndarray | None, cost: np.ndarray, budget: float, **kwargs: object
) -> Solution:
    """Highest-quality placement whose rounded cost fits ``budget`` (same keyword options as the frontier)."""
    if "max_cost" in kwargs:
        raise ValueError("pass the cap as budget, not max_cost")
    return pareto_frontier(const, h, J, cost, max_cost=budget, **kwargs)[-1]  # type: ignore[arg-type]


def diverse(solutions: Sequence[Solution], d: int) -> list[Solution]:
    """Greedy filter (in the given order) keeping solutions that differ from every kept one in >= d layers.

    Neighbouring frontier points often differ in one layer; presets are more useful spread out.
    """
    if d < 0:
        raise ValueError(f"d must be >= 0, got {d}")
    kept: list[Solution] = []
    for s in solutions:
        p = np.asarray(s.placement)
        if all(int((p != np.asarray(t.placement)).sum()) >= d for t in kept):
            kept.append(s)
    return kept
