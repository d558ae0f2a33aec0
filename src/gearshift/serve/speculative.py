"""Self-speculative decoding: a fast placement of the same supernet drafts, the request's placement verifies.

One round per request: the draft proposes k tokens one at a time; the target scores all k+1 positions in one
forward; the longest agreeing prefix is kept plus one token from the target (the correction, or a bonus token
when all k agree). Greedy requests get exactly the target's greedy tokens; sampled requests use the standard
speculative-sampling rule (accept d with probability min(1, p(d)/q(d)), otherwise sample from max(0, p - q)),
which leaves the output distribution equal to the target's. Recurrent state (GDN/KDA) of both target and draft
returns to the last accepted token from per-token snapshots; attention state needs nothing (positions past the
accepted ones are masked and later overwritten). k adapts to each request's acceptance.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..generation import filter_logits


def _dist(logits: Tensor, req) -> Tensor:
    p = req.params
    return filter_logits(logits[None], max(p.temperature, 1e-6), p.top_k, p.top_p).softmax(-1)[0]


def _draw(probs: Tensor, req) -> int:
    return int(torch.multinomial(probs, 1, generator=req.generator)[0])


def _uniform(req, device) -> float:
    return float(torch.rand((), generator=req.generator, device=device))


@torch.no_grad()
def speculative_round(engine, reqs: list, touched: list) -> None:
    device = engine.device
    room = min(engine.max_context - len(r.tokens) for r in reqs)
    k = min(reqs[0].spec_k, room - 1)
    if k < 1:  # too close to the context end to speculate: one plain target step
        engine._decode(reqs, touched)
        return
    # 1) the draft catches up with tokens it has not read (the last token of a fully accepted round)
    for r in reqs:
        lag = r.tokens[r.draft_processed : len(r.tokens) - 1]
        if lag:
            pos = torch.arange(r.draft_processed, r.draft_processed + len(lag), device=device)[None]
            engine.mixed_forward(torch.tensor([lag], device=device), pos, [r.draft], [r.draft_slots])
            r.draft_processed += len(lag)
    base = torch.tensor([r.processed for r in reqs], device=device)
    drafts, dslots = [r.draft for r in reqs], [r.draft_slots for r in reqs]
    # 2) draft k tokens, keeping the draft's recurrent state after each step
    x = torch.tensor([[r.tokens[-1]] for r in reqs], device=device)
    proposals: list[list[int]] = [[] for _ in reqs]
    q_dists: list[list[Tensor]] = [[] for _ in reqs]
    draft_states = []
    for j in range(k):
        logits, views = engine.mixed_forward(x, (base + j)[:, None], drafts, dslots)
        draft_states.append(
            [(v.pool, v.slots, v.pool.state[v.slots].clone(), [c[v.slots].clone() for c in v.pool.conv]) for v in views]
        )
        nxt = []
        for row, r in enumerate(reqs):
            if r.params.temperature == 0:
                tok = int(logits[row, -1].argmax())
            else:
                q = _dist(logits[row, -1], r)
                q_dists[row].append(q)
                tok = _draw(q, r)
            proposals[row].append(tok)
            nxt.append([tok])
        x = torch.tensor(nxt, device=device)
    # 3) the target scores the last token and the k proposals in one forward, keeping per-token snapshots
    verify = torch.tensor([[r.tokens[-1], *proposals[row]] for row, r in enumerate(reqs)], device=device)
    positions = base[:, None] + torch.arange(k + 1, device=device)[None]
    logits, views = engine.mixed_forward(
        verify, positions, [r.placement for r in reqs], [r.slots for r in reqs], rollback=k + 1
    )
    # 4) accept per request
    accepted_n, emitted = [], []
    for row, r in enumerate(reqs):
        n = 0
        greedy = r.params.temperature == 0
        for j in range(k):
            d = proposals[row][j]
            if greedy:
                ok = int(logits[row, j].argmax()) == d
            else:
                p = _dist(logits[row, j], r)
                q = q_dists[row][j]
                ok = _uniform(r, device) < min(1.0, float(p[d] / q[d].clamp(min=1e-20)))
            if not ok:
                break
            n += 1
        if greedy:
            last = int(logits[row, n].argmax())
        else:
            p = _dist(logits[row, n], r)
            if n < k:
                residual = (p - q_dists[row][n]).clamp(min=0)
                p = residual / residual.sum() if float(residual.sum()) > 0 else p
            last = _draw(p, r)
        accepted_n.append(n)
        emitted.append(proposals[row][:n] + [last])
    # 5) roll recurrent state back: the target read n+1 tokens, the draft min(n+1, k)
    consumed = torch.tensor([n + 1 for n in accepted_n], device=device)
    for view in views:
        view.restore_rows(consumed)
    rows = torch.arange(len(reqs), device=device)
    choice = torch.tensor([min(n, k - 1) for n in accepted_n], device=device)
    for layer_views in zip(*draft_states, strict=True):  # the same pool/slots across the k steps
        pool, slots = layer_views[0][0], layer_views[0][1]
        pool.state[slots] = torch.stack([s for _, _, s, _ in layer_views], 1)[rows, choice]
        for ci, pool_c in enumerate(pool.conv):
            pool_c[slots] = torch.stack([c[ci] for _, _, _, c in layer_views], 1)[rows, choice]
    # 6) bookkeeping, adaptive k, emit
    for row, r in enumerate(reqs):
        n = accepted_n[row]
        r.processed += n + 1
        r.draft_processed += min(n, k - 1) + 1
        r.proposed += k
        r.accepted += n
        r.rounds += 1
        if n == k:
            r.spec_k = min(engine.spec_k_max, r.spec_k + 1)
        elif n < k // 2:
            r.spec_k = max(1, r.spec_k - 1)
        engine._emit(r, emitted[row], touched)
