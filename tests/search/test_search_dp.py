"""The exact Pareto DP against brute-force enumeration of every placement on small chains."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gearshift.search import Solution, best_under_budget, diverse, evaluate, pareto_frontier, placement_cost
from gearshift.search.dp import placement_string

RES = 0.05


def random_terms(seed: int, L: int, M: int, r: int) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    const = float(rng.normal())
    h = rng.normal(0.0, 1.0, (L, M))
    J = rng.normal(0.0, 0.6, (r, L, M, M))
    cost = rng.uniform(0.0, 1.0, (L, M))
    return const, h, J, cost


def all_placements(L: int, M: int) -> np.ndarray:
    return np.array(list(itertools.product(range(M), repeat=L)), dtype=np.int64)


def brute_quality(P: np.ndarray, const: float, h: np.ndarray, J: np.ndarray) -> np.ndarray:
    """Independent evaluation: explicit loops over layers and pair distances."""
    L = h.shape[0]
    q = np.full(len(P), const)
    for l in range(L):
        q += h[l, P[:, l]]
        for d in range(1, J.shape[0] + 1):
            if l + d < L:
                q += J[d - 1, l, P[:, l], P[:, l + d]]
    return q


def units(P: np.ndarray, table: np.ndarray, res: float) -> np.ndarray:
    return np.rint(table / res).astype(np.int64)[np.arange(P.shape[1]), P].sum(axis=1)


def brute_frontier(
    const: float,
    h: np.ndarray,
    J: np.ndarray,
    cost: np.ndarray,
    *,
    feasible: np.ndarray | None = None,
    k: int = 1,
) -> list[tuple[int, list[float]]]:
    """[(cost units, top-k qualities with cost <= that)] for every frontier point, over all M^L placements."""
    L, M = h.shape
    P = all_placements(L, M)
    q = brute_quality(P, const, h, J)
    cu = units(P, cost, RES)
    if feasible is not None:
        ok = feasible(P)
        q, cu = q[ok], cu[ok]
    out = []
    running = -np.inf
    for c in np.unique(cu):
        best = q[cu == c].max()
        if best > running:
            running = best
            within = np.sort(q[cu <= c])[::-1][:k]
            out.append((int(c), within.tolist()))
    return out


def check_against_brute(
    sols: list[Solution],
    expected: list[tuple[int, list[float]]],
    cost: np.ndarray,
    const: float,
    h: np.ndarray,
    J: np.ndarray,
    feasible=None,
    k: int = 1,
) -> None:
    assert len(sols) == len(expected) > 0
    for s, (c, quals) in zip(sols, expected, strict=True):
        P = s.placement[None, :]
        assert units(P, cost, RES)[0] == c
        assert s.quality == pytest.approx(quals[0], abs=1e-9)
        assert s.quality == pytest.approx(brute_quality(P, const, h, J)[0], abs=1e-9)
        assert s.cost == pytest.approx(cost[np.arange(len(s.placement)), s.placement].sum(), abs=1e-12)
        if feasible is not None:
            assert feasible(P)[0]
        if k > 1:
            group = [s, *s.alternatives]
            assert [g.quality for g in group] == pytest.approx(quals, abs=1e-9)
            assert len({g.placement.tobytes() for g in group}) == len(group)
            for g in group:
                assert units(g.placement[None, :], cost, RES)[0] <= c
                if feasible is not None:
                    assert feasible(g.placement[None, :])[0]
        else:
            assert s.alternatives == ()
    costs = [s.cost for s in sols]
    quals = [s.quality for s in sols]
    assert np.all(np.diff(quals) > 0)
    assert np.all(np.diff([units(s.placement[None, :], cost, RES)[0] for s in sols]) > 0)
    assert costs[0] <= costs[-1]


@pytest.mark.parametrize("r", [1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_frontier_equals_brute_force(r: int, seed: int) -> None:
    const, h, J, cost = random_terms(seed, 8, 4, r)
    sols = pareto_frontier(const, h, J, cost, cost_resolution=RES)
    check_against_brute(sols, brute_frontier(const, h, J, cost), cost, const, h, J)


def test_frontier_r3_and_no_pairs() -> None:
    const, h, J, cost = random_terms(7, 7, 3, 3)
    sols = pareto_frontier(const, h, J, cost, cost_resolution=RES)
    check_against_brute(sols, brute_frontier(const, h, J, cost), cost, const, h, J)
    # r = 0: J=None is the one-body model
    sols0 = pareto_frontier(const, h, None, cost, cost_resolution=RES)
    J0 = np.zeros((0, 7, 3, 3))
    check_against_brute(sols0, brute_frontier(const, h, J0, cost), cost, const, h, J0)


@pytest.mark.parametrize("seed", [2, 3])
def test_allowed_mask(seed: int) -> None:
    const, h, J, cost = random_terms(seed, 8, 4, 2)
    rng = np.random.default_rng(seed + 100)
    allowed = rng.random((8, 4)) < 0.6
    allowed[np.arange(8), rng.integers(0, 4, 8)] = True

    def feasible(P: np.ndarray) -> np.ndarray:
        return allowed[np.arange(8), P].all(axis=1)

    sols = pareto_frontier(const, h, J, cost, cost_resolution=RES, allowed=allowed)
    expected = brute_frontier(const, h, J, cost, feasible=feasible)
    check_against_brute(sols, expected, cost, const, h, J, feasible)


def test_fixed_layers() -> None:
    const, h, J, cost = random_terms(4, 8, 4, 2)
    fixed = {0: 0, 5: 2, 7: 3}

    def feasible(P: np.ndarray) -> np.ndarray:
        return np.all([P[:, l] == m for l, m in fixed.items()], axis=0)

    sols = pareto_frontier(const, h, J, cost, cost_resolution=RES, fixed=fixed)
    expected = brute_frontier(const, h, J, cost, feasible=feasible)
    check_against_brute(sols, expected, cost, const, h, J, feasible)


def test_min_count() -> None:
    const, h, J, cost = random_terms(5, 8, 4, 2)
    min_count = {0: 3, 2: 2}

    def feasible(P: np.ndarray) -> np.ndarray:
        return ((P == 0).sum(1) >= 3) & ((P == 2).sum(1) >= 2)

    sols = pareto_frontier(const, h, J, cost, cost_resolution=RES, min_count=min_count)
    expected = brute_frontier(const, h, J, cost, feasible=feasible)
    check_against_brute(sols, expected, cost, const, h, J, feasible)


def test_max_count() -> None:
    const, h, J, cost = random_terms(6, 8, 4, 1)
    max_count = {1: 2, 3: 0}

    def feasible(P: np.ndarray) -> np.ndarray:
        return ((P == 1).sum(1) <= 2) & ((P == 3).sum(1) == 0)

    sols = pareto_frontier(const, h, J, cost, cost_resolution=RES, max_count=max_count)
    expected = brute_frontier(const, h, J, cost, feasible=feasible)
    check_against_brute(sols, expected, cost, const, h, J, feasible)


def test_min_and_max_count_same_mixer() -> None:
    const, h, J, cost = random_terms(8, 8, 3, 2)
    lo, hi = {0: 2, 1: 1}, {0: 4}

    def feasible(P: np.ndarray) -> np.ndarray:
        n0 = (P == 0).sum(1)
        return (n0 >= 2) & (n0 <= 4) & ((P == 1).sum(1) >= 1)

    sols = pareto_frontier(const, h, J, cost, cost_resolution=RES, min_count=lo, max_count=hi)
    expected = brute_frontier(const, h, J, cost, feasible=feasible)
    check_against_brute(sols, expected, cost, const, h, J, feasible)


def test_memory_budget() -> None:
    const, h, J, cost = random_terms(9, 8, 4, 2)
    rng = np.random.default_rng(99)
    memory = rng.uniform(0.0, 2.0, (8, 4))
    mres, budget = 0.1, 7.0

    def feasible(P: np.ndarray) -> np.ndarray:
        return units(P, memory, mres) <= int(np.floor(budget / mres + 1e-9))

    assert 0.05 < feasible(all_placements(8, 4)).mean() < 0.95  # the constraint actually binds
    sols = pareto_frontier(
        const, h, J, cost, cost_resolution=RES, memory=memory, memory_budget=budget, memory_resolution=mres
    )
    expected = brute_frontier(const, h, J, cost, feasible=feasible)
    check_against_brute(sols, expected, cost, const, h, J, feasible)
    for s in sols:
        assert s.memory == pytest.approx(memory[np.arange(8), s.placement].sum())


def test_max_cost() -> None:
    const, h, J, cost = random_terms(10, 8, 4, 2)
    full = pareto_frontier(const, h, J, cost, cost_resolution=RES)
    cap = float(np.median([s.cost for s in full]))

    def feasible(P: np.ndarray) -> np.ndarray:
        return units(P, cost, RES) <= int(np.floor(cap / RES + 1e-9))

    sols = pareto_frontier(const, h, J, cost, cost_resolution=RES, max_cost=cap)
    expected = brute_frontier(const, h, J, cost, feasible=feasible)
    check_against_brute(sols, expected, cost, const, h, J, feasible)
    assert len(sols) < len(full)
    best = best_under_budget(const, h, J, cost, cap, cost_resolution=RES)
    assert best.quality == pytest.approx(sols[-1].quality)
    assert np.array_equal(best.placement, sols[-1].placement)


@pytest.mark.parametrize("r,k", [(1, 3), (2, 4)])
def test_k_best(r: int, k: int) -> None:
    const, h, J, cost = random_terms(11 + r, 8, 4, r)
    sols = pareto_frontier(const, h, J, cost, cost_resolution=RES, k_best=k)
    expected = brute_frontier(const, h, J, cost, k=k)
    check_against_brute(sols, expected, cost, const, h, J, k=k)
    assert any(len(s.alternatives) == k - 1 for s in sols)


def test_k_best_with_constraints() -> None:
    const, h, J, cost = random_terms(13, 7, 3, 2)
    lo, fixed = {2: 2}, {3: 1}

    def feasible(P: np.ndarray) -> np.ndarray:
        return ((P == 2).sum(1) >= 2) & (P[:, 3] == 1)

    sols = pareto_frontier(const, h, J, cost, cost_resolution=RES, min_count=lo, fixed=fixed, k_best=5)
    expected = brute_frontier(const, h, J, cost, feasible=feasible, k=5)
    check_against_brute(sols, expected, cost, const, h, J, feasible, k=5)


def test_rounding_keeps_exact_costs() -> None:
    """Costs are rounded for the DP, but solutions report the exact sum of the given costs."""
    const, h, J, _ = random_terms(14, 6, 3, 1)
    cost = np.tile([1.0, 0.333, 0.126], (6, 1))
    sols = pareto_frontier(const, h, J, cost, cost_resolution=0.1)
    for s in sols:
        assert s.cost == pytest.approx(placement_cost(s.placement, cost), abs=0)
    assert any(abs(s.cost / 0.1 - round(s.cost / 0.1)) > 1e-6 for s in sols)


def test_helpers_and_large_chain() -> None:
    """L=48 r=1: ends are the cheapest placement and the unconstrained optimum (checked by Viterbi)."""
    L, M = 48, 4
    const, h, J, _ = random_terms(15, L, M, 1)
    cost = np.tile([1.0, 0.48, 0.21, 0.14], (L, 1))
    sols = pareto_frontier(const, h, J, cost, cost_resolution=0.01)
    assert np.array_equal(sols[0].placement, np.full(L, 3))
    # Viterbi for the unconstrained maximum of the chain
    score, back = h[0].copy(), []
    for l in range(1, L):
        cand = score[:, None] + J[0, l - 1] + h[l][None, :]
        back.append(cand.argmax(axis=0))
        score = cand.max(axis=0)
    assert sols[-1].quality == pytest.approx(const + score.max(), abs=1e-9)
    q = evaluate(np.stack([s.placement for s in sols]), const, h, J)
    assert np.allclose(q, [s.quality for s in sols])
    assert evaluate(sols[0].placement, const, h, J) == pytest.approx(sols[0].quality)
    assert placement_cost(sols[0].placement, cost) == pytest.approx(0.14 * L)
    assert placement_string(sols[0].placement, "FSKG") == "G" * L
    assert sols[0].as_string("FSKG") == "G" * L


def test_diverse() -> None:
    def sol(p: list[int]) -> Solution:
        return Solution(np.array(p), 0.0, 0.0)

    s = [sol([0, 0, 0, 0]), sol([0, 0, 0, 1]), sol([0, 1, 1, 0]), sol([1, 1, 1, 1]), sol([1, 1, 1, 0])]
    kept = diverse(s, 2)
    assert [k.placement.tolist() for k in kept] == [[0, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1]]
    assert len(diverse(s, 0)) == 5
    assert len(diverse(s, 5)) == 1
    with pytest.raises(ValueError):
        diverse(s, -1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_count": {0: 5, 1: 4}}, "only 8"),
        ({"min_count": {1: 3}, "allowed": "col1_two"}, "exceeds the 2 layers"),
        ({"fixed": {2: 1}, "allowed": "col1_two"}, "not allowed"),
        ({"fixed": {9: 0}}, "out of range"),
        ({"max_cost": 0.1}, "below the cheapest"),
        ({"allowed": "empty_row"}, "no mixer is allowed at layer"),
        ({"memory": "ones", "memory_budget": 3.0}, "below the smallest-memory"),
        ({"memory": "ones"}, "together"),
        ({"max_count": {0: 1}, "min_count": {0: 2}}, "below min_count"),
        ({"max_count": {0: 2, 1: 2, 2: 2}}, "admit no placement"),
        ({"k_best": 0}, "k_best"),
        ({"cost_resolution": 1e-7}, "too large"),
        ({"cost_resolution": -1.0}, "resolution"),
    ],
)
def test_infeasible_and_invalid(kwargs: dict, match: str) -> None:
    const, h, J, cost = random_terms(16, 8, 3, 2)
    cost = cost + 0.5
    if kwargs.get("allowed") == "col1_two":
        allowed = np.ones((8, 3), dtype=bool)
        allowed[2:, 1] = False
        kwargs["allowed"] = allowed
    elif kwargs.get("allowed") == "empty_row":
        allowed = np.ones((8, 3), dtype=bool)
        allowed[4] = False
        kwargs["allowed"] = allowed
    if kwargs.get("memory") == "ones":
        kwargs["memory"] = np.ones((8, 3))
    with pytest.raises(ValueError, match=match):
        pareto_frontier(const, h, J, cost, **kwargs)


def test_bad_shapes() -> None:
    const, h, J, cost = random_terms(17, 5, 3, 1)
    with pytest.raises(ValueError, match="J must be"):
        pareto_frontier(const, h, J[:, :4], cost)
    with pytest.raises(ValueError, match="cost must be"):
        pareto_frontier(const, h, J, cost[:, :2])
    with pytest.raises(ValueError, match="non-negative"):
        pareto_frontier(const, h, J, -cost)
    with pytest.raises(ValueError, match="0..2"):
        evaluate(np.array([0, 1, 2, 3, 0]), const, h, J)
    with pytest.raises(ValueError, match="shape"):
        placement_cost(np.array([0, 1]), cost)
    with pytest.raises(ValueError, match="budget"):
        best_under_budget(const, h, J, cost, 1.0, max_cost=2.0)
