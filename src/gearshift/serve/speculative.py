"""Self-speculative decoding: a fast placement of the same supernet drafts, the request's placement verifies.

One round for a group of requests: the draft proposes k tokens one at a time; the target scores all k+1 positions
in one forward; each request keeps its longest agreeing prefix plus one token from the target (the correction,
or a bonus token when all k agree). Greedy requests get exactly the target's greedy tokens; sampled requests use
the standard speculative-sampling rule (accept d with probability min(1, p(d)/q(d)), otherwise sample from
max(0, p - q)), which leaves the output distribution equal to the target's. Recurrent state (GDN/KDA) of both
target and draft returns to the last accepted token from per-token snapshots; attention state needs nothing
(positions past the accepted ones are masked and later overwritten). k adapts to each request's acceptance.

A round stays on the device for all its rows -- proposals, draws, acceptance, corrections -- and reads back to
the host once, at the end (seeded requests draw from their own generators, row by row, still on the device).

A round runs on the model runner and returns what each request accepted (``Verified``); the scheduler books it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..sampling import draw, filter_logits
from .logprobs import TokenLogprob, token_logprobs
from .pools import RecurrentPool
from .request import Request
from .sampler import index_groups

if TYPE_CHECKING:
    from .runner import ModelRunner


@dataclass
class Verified:
    """One request's outcome of a speculative round, for the scheduler to book."""

    tokens: list[int]  # the accepted proposals, then the target's own token (a correction or a bonus)
    accepted: int  # proposals accepted, of the round's k
    draft_read: int  # tokens the draft's state advanced by: its catch-up and the draft steps it keeps
    logprobs: list[TokenLogprob] | None = None  # per token, under the target, where the request asks for them
    failed: bool = False  # its distribution could not be drawn from (NaN logits): the request fails


def round_size(reqs: list[Request], max_context: int) -> int:
    """Proposals per row of these requests' next round (their ``spec_k``, as the context's end allows); below 1,
    they are too close to the end to speculate and take a plain decode step instead."""
    room = min(max_context - len(r.tokens) for r in reqs)
    return min(reqs[0].spec_k, room - 1)


def next_spec_k(spec_k: int, accepted: int, k: int, k_max: int) -> int:
    """A request's k for its next round: one more after a round it accepted whole, one less when it accepted under
    half."""
    if accepted == k:
        return min(k_max, spec_k + 1)
    if accepted < k // 2:
        return max(1, spec_k - 1)
    return spec_k


class _SampledRows:
    """The sampled requests of a round and their index tensors, built once per round: each host-to-device copy
    waits for the GPU, so none is made inside the draft loop."""

    def __init__(self, reqs: list[Request], device: torch.device) -> None:
        self.reqs, self.device = reqs, device
        self.settings = index_groups([(r.params.temperature, r.params.top_k, r.params.top_p) for r in reqs], device)
        free = [i for i, r in enumerate(reqs) if r.generator is None]
        self.free = torch.tensor(free, device=device) if free else None
        self.seeded = [(i, r.generator) for i, r in enumerate(reqs) if r.generator is not None]
        self.bad: Tensor | None = None  # [N] rows whose distribution could not be drawn from (see sampling.draw)

    def probs(self, logits: Tensor) -> Tensor:
        """Each row's sampling distribution [N, V] under its request's temperature / top-k / top-p (one filter
        call per group of equal settings)."""
        if len(self.settings) == 1:
            (temperature, top_k, top_p), _ = self.settings[0]
            return filter_logits(logits, temperature, top_k, top_p).softmax(-1)
        out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        for (temperature, top_k, top_p), index in self.settings:
            out[index] = filter_logits(logits[index], temperature, top_k, top_p).softmax(-1)
        return out

    def draw(self, probs: Tensor) -> Tensor:
        """One token per row [N] from probs [N, V]: seeded requests from their own generators, the rest together.
        A row that is not a distribution (NaN logits) is marked in ``bad`` and gets token 0, so the round goes on;
        its request fails when the round is booked."""
        out = torch.empty(len(self.reqs), dtype=torch.long, device=probs.device)
        if self.free is not None:
            out[self.free] = draw(probs[self.free])
        for i, generator in self.seeded:
            out[i] = draw(probs[i : i + 1], generator)[0]
        bad = out < 0
        self.bad = bad if self.bad is None else self.bad | bad
        return out.clamp(min=0)

    def uniforms(self, k: int) -> Tensor:
        """k uniform draws per row [N, k], seeded requests from their own generators."""
        out = torch.rand(len(self.reqs), k, device=self.device)
        for i, generator in self.seeded:
            out[i] = torch.rand(k, generator=generator, device=out.device)
        return out


@torch.no_grad()
def speculative_round(runner: ModelRunner, reqs: list[Request], k: int) -> list[Verified]:
    """One round of ``k`` proposals (``round_size``) for these requests, on their target and draft pools; returns
    each request's outcome, in order. Reads the requests, changes only their pool state."""
    device = runner.device
    # 1) the draft catches up with tokens it has not read (the last token of a fully accepted round), requests
    # with the same lag in one forward
    lags = [len(r.tokens) - 1 - r.draft_processed for r in reqs]
    lagging: dict[int, list] = {}
    for r, lag in zip(reqs, lags, strict=True):
        if lag:
            lagging.setdefault(lag, []).append(r)
    for lag, group in lagging.items():
        starts = torch.tensor([[r.draft_processed] for r in group], device=device)
        args = (
            torch.tensor([r.tokens[r.draft_processed : r.draft_processed + lag] for r in group], device=device),
            starts + torch.arange(lag, device=device),
            [r.draft for r in group],
            [r.draft_slots for r in group],
        )
        top = max(r.draft_processed for r in group) + lag - 1  # bounds known here: no device check
        if lag == 1 and runner.cuda_graphs:  # one token: a draft decode step, as in step 2
            runner.graph_decode(*args, top, tuple(r.draft_code for r in group))
        else:
            runner.mixed_forward(*args, max_position=top)
    b = len(reqs)
    base = torch.tensor([r.processed for r in reqs], device=device)
    top = max(r.processed for r in reqs)  # the largest position the round starts from, on the host
    drafts, dslots = [r.draft for r in reqs], [r.draft_slots for r in reqs]
    greedy = [i for i, r in enumerate(reqs) if r.params.temperature == 0]
    sampled = [i for i, r in enumerate(reqs) if r.params.temperature != 0]
    rows_s = _SampledRows([reqs[i] for i in sampled], device) if sampled else None
    g_index = torch.tensor(greedy, device=device) if 0 < len(greedy) < b else None
    s_index = torch.tensor(sampled, device=device) if sampled else None
    # 2) draft k tokens, keeping the draft's recurrent state after each step. On CUDA a draft step is a decode
    # step of the draft's batch composition, replayed from the runner's CUDA graph of it: an eager step of a
    # deep model costs the host more than a bandwidth-bound target step costs the GPU, which would leave
    # nothing to gain
    last = torch.tensor([r.tokens[-1] for r in reqs], device=device)
    proposals = torch.empty(b, k, dtype=torch.long, device=device)
    q = torch.empty(len(sampled), k, runner.config.vocab_size, device=device) if sampled else None
    x = last[:, None]
    dcodes = tuple(r.draft_code for r in reqs)
    replayed = runner.recurrent_groups(drafts, dslots, dcodes) if runner.cuda_graphs else None
    draft_states = []
    for j in range(k):
        if replayed is not None:
            logits = runner.graph_decode(x, (base + j)[:, None], drafts, dslots, top + j, dcodes)
            groups = replayed
        else:
            logits, views = runner.mixed_forward(x, (base + j)[:, None], drafts, dslots, max_position=top + j)
            logits = logits[:, -1]
            groups = [(v.pool, v.slots, v.index) for v in views]
        draft_states.append([(group, *_snapshot(*group)) for group in groups])
        if greedy:
            proposals[:, j] = logits.argmax(-1)  # the sampled rows are overwritten below
        if sampled:
            q[:, j] = rows_s.probs(logits[s_index])
            proposals[s_index, j] = rows_s.draw(q[:, j])
        x = proposals[:, j : j + 1]
    # 3) the target scores the last token and the k proposals in one forward, keeping per-token snapshots (on
    # CUDA replayed from a graph of the composition and k, like the draft steps: its logits and views are the
    # graph's buffers, read below -- log-probabilities included -- before any graph replays again)
    verify = torch.cat([last[:, None], proposals], dim=1)
    positions = base[:, None] + torch.arange(k + 1, device=device)[None]
    targets, tslots, codes = [r.placement for r in reqs], [r.slots for r in reqs], tuple(r.code for r in reqs)
    logits, views = runner.graph_forward(verify, positions, targets, tslots, top + k, codes, rollback=k + 1)
    # 4) accept per row, on the device: n agreeing proposals, then the target's own token at position n
    accepted = torch.empty(b, dtype=torch.long, device=device)
    final = torch.empty(b, dtype=torch.long, device=device)
    if greedy:
        rows = slice(None) if g_index is None else g_index
        choice = logits[rows].argmax(-1)  # [G, k+1]
        n = (choice[:, :k] == proposals[rows]).long().cumprod(1).sum(1)
        accepted[rows], final[rows] = n, choice.gather(1, n[:, None]).squeeze(1)
    if sampled:
        s = len(sampled)
        scores = logits[s_index]
        p = torch.stack([rows_s.probs(scores[:, j]) for j in range(k + 1)], 1)  # [S, k+1, V]
        d = proposals[s_index][:, :, None]  # [S, k, 1]
        ratio = p[:, :k].gather(2, d).squeeze(2) / q.gather(2, d).squeeze(2).clamp(min=1e-20)
        n = (rows_s.uniforms(k) < ratio.clamp(max=1.0)).long().cumprod(1).sum(1)
        at = torch.arange(s, device=device)
        target = p[at, n]  # [S, V]: the target's distribution after the accepted prefix
        residual = (target - q[at, n.clamp(max=k - 1)]).clamp(min=0)
        total = residual.sum(-1, keepdim=True)
        # after a rejection, draw from the normalised residual (the target itself where it is empty); after k
        # acceptances, the bonus token from the target
        rejected = ((n < k)[:, None] & (total > 0)).float()
        dist = rejected * residual / total.clamp(min=1e-30) + (1 - rejected) * target
        accepted[s_index], final[s_index] = n, rows_s.draw(dist)
    # 5) roll recurrent state back, on the device: the target read n+1 tokens, the draft min(n+1, k)
    for view in views:
        view.restore_rows(accepted + 1)
    kept = accepted.clamp(max=k - 1)  # the draft step whose state each row keeps
    for steps in zip(*draft_states, strict=True):  # one (layer, mixer) group: the same pool and rows each step
        pool, slots, index = steps[0][0]
        choice = kept if index is None else kept[index]
        pool.restore(slots, [state for _, state, _ in steps], [conv for _, _, conv in steps], choice)
    # 6) the round's one read-back
    accepted_n, finals, drafted = accepted.tolist(), final.tolist(), proposals.tolist()
    failed = set()
    if rows_s is not None and rows_s.bad is not None:
        failed = {sampled[i] for i, bad in enumerate(rows_s.bad.tolist()) if bad}
    # 7) each request's outcome: its accepted proposals and the target's token after them (the scheduler emits
    # them, and keeps the log-probabilities of those it emits before a stop)
    out = []
    for row, r in enumerate(reqs):
        n = accepted_n[row]
        if row in failed:
            out.append(Verified([], n, lags[row], failed=True))
            continue
        tokens = drafted[row][:n] + [finals[row]]
        logprobs = None
        if r.params.logprobs is not None:  # the target's own distribution at each position
            logprobs = token_logprobs(logits[row, : n + 1], tokens, r.params.logprobs)
        out.append(Verified(tokens, n, lags[row] + min(n, k - 1) + 1, logprobs))
    return out


def _snapshot(pool: RecurrentPool, slots: Tensor, index=None) -> tuple[Tensor, list[Tensor]]:
    """A copy of these slots' recurrent state and conv tails (indexing by a tensor gathers: a copy already)."""
    return pool.state[slots], [c[slots] for c in pool.conv]
