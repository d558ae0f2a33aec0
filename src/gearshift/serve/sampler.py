"""Next tokens for a batch of requests, each with its own sampling settings, on the functions of ``sampling.py``.

Seeded requests draw from their own generators, one by one; the others are grouped by their settings and each
group is drawn in one call, on the device. A decode step launched one step ahead (``Pending``) keeps its tokens on
the device until the host books them: rows whose top-p nucleus is wider than the sampler's candidates are redrawn
then (``settle``), when the one host sync that tells whether there are any costs nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import sampling
from .request import Request

log = logging.getLogger("gearshift.engine")


def index_groups(keys: Sequence, device: torch.device) -> list[tuple]:
    """Rows grouped by their key, in first-seen order: (key, row index tensor, or None when it is every row)."""
    rows: dict = {}
    for i, key in enumerate(keys):
        rows.setdefault(key, []).append(i)
    return [(key, None if len(idx) == len(keys) else torch.tensor(idx, device=device)) for key, idx in rows.items()]


@dataclass
class Pending:
    """A launched decode step whose sampled tokens have not been booked on the host yet."""

    reqs: list[Request]
    tokens: Tensor  # [B] sampled, on the device (the next step's input)
    positions: Tensor  # [B, 1] the positions this step fed
    host: Tensor  # [B] the same tokens, on the host once ``event`` has passed
    event: torch.cuda.Event | None
    logits: Tensor | None = None  # the step's logits, kept while some rows may need a redraw
    redraws: list = field(default_factory=list)  # see Sampler.settle


class Sampler:
    """Draws a batch's next tokens; keeps, per batch composition, the row index tensors of its settings' groups
    (each host-to-device copy waits for the GPU, so none is made per step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._index: dict[tuple, list[tuple[tuple, Tensor | None]]] = {}  # see sample_on_device

    def sample_rows(self, reqs: list[Request], logits: Tensor) -> list[int]:
        """Next tokens of many requests, on the host: seeded requests draw from their own generators one by one,
        the others through ``sample_on_device`` (one draw per group of sampling settings) and one read-back."""
        out = [0] * len(reqs)
        plain = []
        for i, req in enumerate(reqs):
            if req.generator is not None:
                out[i] = self.sample_one(req, logits[i])
            else:
                plain.append(i)
        if plain:
            if len(plain) < len(reqs):
                reqs, logits = [reqs[i] for i in plain], logits[torch.tensor(plain, device=logits.device)]
            tokens, redraws = self.sample_on_device(reqs, logits, tuple(r.code for r in reqs))
            self.redraw(tokens, logits, redraws)
            for i, token in zip(plain, tokens.tolist(), strict=True):
                out[i] = int(token)
        return out

    def sample_one(self, req: Request, logits: Tensor) -> int:
        """One request's next token from its own generator; -1 when sampling raises (see Scheduler._emit)."""
        p = req.params
        try:
            return int(sampling.sample_next(logits[None], p.temperature, p.top_k, p.top_p, req.generator)[0])
        except Exception:  # noqa: BLE001 - this request fails (see Scheduler._emit), the others are drawn
            log.exception("sampling failed for request %d", req.id)
            return -1

    def sample_on_device(
        self, reqs: list[Request], logits: Tensor, codes: tuple[int, ...]
    ) -> tuple[Tensor, list[tuple[Tensor | None, tuple, Tensor]]]:
        """Next tokens [B] on the device, drawn per group of sampling settings (no seeded requests here), and the
        groups whose rows may need a redraw (see ``settle``): (row index or None, settings, rows flagged). The
        groups' row indices are kept per batch composition, so no host-to-device copy (a sync) runs per step."""
        settings = tuple((r.params.temperature, r.params.top_k, r.params.top_p) for r in reqs)
        key = (codes, settings)
        groups = self._index.get(key)
        if groups is None:
            groups = index_groups(settings, self.device)
            if len(self._index) >= 64:
                self._index.pop(next(iter(self._index)))
            self._index[key] = groups
        out = None if len(groups) == 1 else torch.empty(len(reqs), dtype=torch.long, device=logits.device)
        redraws = []
        for setting, index in groups:
            part = logits if index is None else logits[index]
            try:
                tokens, wide = sampling.sample_candidates(part, *setting)
            except Exception:  # noqa: BLE001 - find the rows it fails on, row by row: only they fail
                tokens, wide = _sample_each(part, setting), None
            if wide is not None:
                redraws.append((index, setting, wide))
            if out is None:
                out = tokens
            else:
                out[index] = tokens
        return out, redraws

    @staticmethod
    def redraw(tokens: Tensor, logits: Tensor, redraws: list) -> bool:
        """Apply ``sample_on_device``'s pending redraws to ``tokens`` in place; whether any row changed."""
        changed = False
        for index, (temperature, _, top_p), wide in redraws:
            part = tokens if index is None else tokens[index]
            fixed = sampling.redraw_wide(part, wide, logits if index is None else logits[index], temperature, top_p)
            if fixed is not part:
                changed = True
                if index is None:
                    tokens.copy_(fixed)
                else:
                    tokens[index] = fixed
        return changed

    def settle(self, p: Pending) -> None:
        """Redraw the pending rows whose top-p nucleus was wider than the sampler's candidates (sampling.
        sample_candidates). Learning whether there are any is the sampler's one host sync; it is taken here, after
        the host has booked the previous step and before anything reads these tokens (the next launch, the
        flush), so the GPU computed this step meanwhile. The step's logits are still intact: nothing ran since."""
        if p.redraws and self.redraw(p.tokens, p.logits, p.redraws):
            copy_to_host(p)
        p.redraws, p.logits = [], None


def copy_to_host(p: Pending) -> None:
    """Start copying the pending tokens to the host while the GPU goes on; the event marks their arrival."""
    if p.tokens.is_cuda:
        p.host = torch.empty(p.tokens.shape, dtype=p.tokens.dtype, pin_memory=True)
        p.host.copy_(p.tokens, non_blocking=True)
        p.event = torch.cuda.Event()
        p.event.record()


def _sample_each(logits: Tensor, setting: tuple[float, int, float]) -> Tensor:
    """``sample_next`` one row at a time, -1 for each row it raises on (the grouped draw raised)."""
    out = []
    for row in logits:
        try:
            out.append(int(sampling.sample_next(row[None], *setting)[0]))
        except Exception:  # noqa: BLE001
            log.exception("sampling failed on one row")
            out.append(-1)
    return torch.tensor(out, device=logits.device)
