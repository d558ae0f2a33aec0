"""Document boundaries inside packed training rows.

Training rows are documents laid end to end (``gearshift.train.rows.pack``). Nothing may cross a boundary: a query
attends only to keys of its own document, the short convolutions and the delta-rule state restart at a document's
first token, and RoPE positions restart at 0. ``Documents`` holds one batch's layout in the forms the mixers need
(segment ids for masks, start flags for convolutions and the recurrence, ``cu_seqlens`` for fla's varlen
kernels, flex-attention block masks), built once per batch and shared by every layer, the teacher and the student.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

_WHOLE_ROW_MASKS: dict = {}


@dataclass(eq=False)
class Documents:
    """The documents of a batch of packed rows [B, T] (use ``from_segments`` or ``whole_rows``)."""

    segments: Tensor  # [B, T] int32: the document's index within its row, 0, 1, 2, ... (canonical)
    starts: Tensor  # [B, T] bool: the token begins a document (every row's first token does)
    positions: Tensor  # [B, T] int64: the token's position within its document (RoPE)
    cu_seqlens: Tensor  # [N + 1] int64 on the device: document boundaries of the batch flattened row after row
    cu_seqlens_cpu: Tensor  # the same on the host, so fla's kernels need no device-to-host copy
    lengths: list[int]  # the N documents' lengths, row after row (FLOP counts, masks)
    single: bool  # one document per row: every mixer takes its plain (unpacked) path
    _block_masks: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_segments(cls, segments: Tensor) -> Documents:
        """From per-token document labels [B, T]: a new document begins wherever the label changes along a row
        (labels need not be canonical; ids are renumbered 0, 1, ... per row)."""
        if segments.dim() != 2 or segments.dtype.is_floating_point or segments.dtype == torch.bool:
            raise ValueError(
                f"document segments must be an integer tensor [batch, seq], got {segments.dtype} "
                f"{tuple(segments.shape)}"
            )
        b, t = segments.shape
        if t == 0:
            raise ValueError("empty rows")
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        return cls._build(starts)

    @classmethod
    def whole_rows(cls, batch: int, length: int, device: torch.device | str = "cpu") -> Documents:
        """Every row one document (unpacked data)."""
        starts = torch.zeros(batch, length, dtype=torch.bool, device=device)
        starts[:, 0] = True
        return cls._build(starts)

    @classmethod
    def from_starts(cls, starts: Tensor) -> Documents:
        """From per-token start flags [B, T] bool (a row's first token always starts a document)."""
        if starts.dim() != 2 or starts.dtype != torch.bool:
            raise ValueError(f"document starts must be a bool tensor [batch, seq], got {starts.dtype}")
        starts = starts.clone()
        starts[:, 0] = True
        return cls._build(starts)

    @classmethod
    def _build(cls, starts: Tensor) -> Documents:
        b, t = starts.shape
        index = torch.arange(t, device=starts.device)
        first = torch.where(starts, index, 0).cummax(dim=1).values  # index of each token's document start
        flat = starts.reshape(-1).cpu()
        begin = flat.nonzero().squeeze(1)
        cu_cpu = torch.cat([begin, torch.tensor([b * t])]).to(torch.int64)
        return cls(
            segments=(starts.cumsum(1) - 1).to(torch.int32),
            starts=starts,
            positions=index - first,
            cu_seqlens=cu_cpu.to(starts.device),
            cu_seqlens_cpu=cu_cpu,
            lengths=cu_cpu.diff().tolist(),
            single=len(begin) == b,
        )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.segments.shape)  # type: ignore[return-value]

    def dense_mask(self, window: int | None, queries: slice = slice(None)) -> Tensor:
        """Boolean mask [B, 1, Tq, T]: key j visible from query i (of ``queries``) when j <= i, both lie in the same
        document, and i - j < window."""
        t = self.segments.shape[1]
        qi = torch.arange(t, device=self.segments.device)[queries]
        kj = torch.arange(t, device=self.segments.device)
        visible = kj[None, :] <= qi[:, None]
        if window is not None:
            visible = visible & (qi[:, None] - kj[None, :] < window)
        same = self.segments[:, queries, None] == self.segments[:, None, :]
        return (visible & same)[:, None]

    def block_mask(self, window: int | None):
        """flex attention's BlockMask for causal (windowed) attention within documents, built once per window and
        batch (rows of one document each share theirs across batches: it depends on the shape only). Build it
        outside compiled code (``prepare``): creating one is eager work; compiled code only looks it up."""
        if window not in self._block_masks:
            if self.single:
                key = (*self.shape, window, self.segments.device)
                if key not in _WHOLE_ROW_MASKS:
                    _WHOLE_ROW_MASKS.clear()  # one training shape at a time
                    _WHOLE_ROW_MASKS[key] = self._create_block_mask(window)
                self._block_masks[window] = _WHOLE_ROW_MASKS[key]
            else:
                self._block_masks[window] = self._create_block_mask(window)
        return self._block_masks[window]

    def _create_block_mask(self, window: int | None):
        from torch.nn.attention.flex_attention import create_block_mask

        segments = self.segments
        b, t = segments.shape

        def causal(b, h, q, kv):
            return (kv <= q) & (q - kv < window) if window is not None else kv <= q

        def within_document(b, h, q, kv):
            return causal(b, h, q, kv) & (segments[b, q] == segments[b, kv])

        if self.single:  # one mask broadcast over the rows
            return create_block_mask(causal, None, None, t, t, device=segments.device)
        return create_block_mask(within_document, b, None, t, t, device=segments.device)

    def prepare(self, windows: set[int | None]) -> None:
        """Build the block masks of the attention mixers ahead of a forward (CUDA; the CPU path uses dense masks)."""
        if self.segments.is_cuda:
            for window in windows:
                if not (self.single and (window is None or window >= self.segments.shape[1])):
                    self.block_mask(window)

    def to(self, device: torch.device | str) -> Documents:
        """The same documents on ``device`` (block masks are rebuilt there on demand)."""
        return Documents(
            segments=self.segments.to(device),
            starts=self.starts.to(device),
            positions=self.positions.to(device),
            cu_seqlens=self.cu_seqlens.to(device),
            cu_seqlens_cpu=self.cu_seqlens_cpu,
            lengths=self.lengths,
            single=self.single,
        )
