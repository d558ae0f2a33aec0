"""Training rows: token shards, raw text or chat JSONL, packed into fixed-length rows with a loss mask.

Documents (a shard's sequences, a text file's paragraphs, chat conversations) are laid end to end and cut into rows;
each row records which document every token belongs to, so that the model keeps documents apart (no attention,
state or convolution crosses a boundary; ``gearshift.ops.documents``) and no token is trained to predict the first
token of the next document.

The order of rows is a pure function of (seed, epoch), and a step's rows a pure function of (step, rank): a
resumed or multi-process run sees exactly the rows of a single uninterrupted run at the same global batch.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import token_ids
from ..data.tokens import INDEX, ShardError, TokenShards


class DataError(ValueError):
    """Training data that cannot be used: missing or empty files, unreadable shards, no tokenizer for text."""


@dataclass
class PackedRows:
    tokens: np.ndarray  # int64 [N, seq_len + 1]: inputs are [:, :-1], targets [:, 1:]
    mask: np.ndarray  # bool  [N, seq_len]: which targets count in the loss
    documents: np.ndarray | None = None  # int32 [N, seq_len + 1]: each token's document (None: one per row)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, rows: slice) -> PackedRows:
        """A subset of the rows (documents kept)."""
        return PackedRows(self.tokens[rows], self.mask[rows], None if self.documents is None else self.documents[rows])

    def batch(self, indices: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        return (
            torch.from_numpy(self.tokens[idx]).to(device),
            torch.from_numpy(self.mask[idx]).to(device),
        )

    def input_documents(self, indices: Sequence[int], device: torch.device) -> torch.Tensor | None:
        """The documents of the input tokens of these rows, [B, seq_len] (``Supernet(documents=...)``), or None
        where each row is one sequence."""
        if self.documents is None:
            return None
        return torch.from_numpy(self.documents[np.asarray(indices, dtype=np.int64), :-1]).to(device)


def pack(sequences: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int) -> PackedRows:
    """Concatenate (tokens, target mask) documents and cut rows of seq_len + 1 tokens (overlapping by one). Rows
    record each token's document (numbered from 0 in each row); a target from another document than its input
    (the first token of the next document) is masked out of the loss."""
    toks, masks = [], []
    for t, m in sequences:
        toks.append(np.asarray(t, dtype=np.int64))
        masks.append(np.asarray(m, dtype=bool))
    if not toks:
        raise DataError("no training sequences")
    flat = np.concatenate(toks)
    flat_mask = np.concatenate(masks)
    flat_doc = np.repeat(np.arange(len(toks)), [len(t) for t in toks])
    n = (len(flat) - 1) // seq_len
    if n < 1:
        raise DataError(f"only {len(flat)} tokens: not enough for one row of {seq_len + 1}")
    starts = np.arange(n) * seq_len
    window = starts[:, None] + np.arange(seq_len + 1)
    rows = flat[window]
    docs = flat_doc[window]
    # mask of the token being predicted (position t predicts t + 1), only within a document
    mask = flat_mask[window[:, 1:]] & (docs[:, 1:] == docs[:, :-1])
    return PackedRows(rows, mask, (docs - docs[:, :1]).astype(np.int32))


def _from_shards(path: Path, skip_prompt: bool) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    try:
        shards = TokenShards(path)
    except ShardError as exc:
        raise DataError(str(exc)) from None
    for seq in shards:
        mask = np.ones(len(seq.tokens), dtype=bool)
        if skip_prompt:
            mask[: seq.prompt_len] = False
        yield seq.tokens.astype(np.int64), mask


def _from_text(
    path: Path, tokenize: Callable[[str], list[int]], eos: int | None
) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise DataError(f"{path}: looks like a binary file, not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    docs = [d for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise DataError(f"{path}: empty text file")
    for doc in docs:
        ids = list(tokenize(doc)) + ([eos] if eos is not None else [])
        yield np.asarray(ids), np.ones(len(ids), dtype=bool)


def chat_tokens(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Tokens of a conversation and, per token, whether it belongs to an assistant turn (SFT trains on those)."""
    ids: list[int] = []
    mask: list[bool] = []
    for i, msg in enumerate(messages):
        if msg.get("role") not in ("system", "user", "assistant", "tool"):
            raise DataError(f"chat message {i}: unknown role {msg.get('role')!r}")
        full = token_ids(tokenizer.apply_chat_template(messages[: i + 1], tokenize=True))
        if full[: len(ids)] != ids:
            raise DataError("the chat template does not render conversations incrementally; cannot mask turns")
        new = full[len(ids) :]
        ids += new
        mask += [msg["role"] == "assistant"] * len(new)
    return ids, mask


def _from_chat(path: Path, tokenizer) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    if tokenizer is None:
        raise DataError(f"{path}: chat data needs a tokenizer with a chat template in the model directory")
    n = 0
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{line_no}: expected a JSON object with 'messages'") from None
        ids, mask = chat_tokens(tokenizer, messages)
        n += 1
        yield np.asarray(ids), np.asarray(mask)
    if n == 0:
        raise DataError(f"{path}: no conversations")


def load_rows(
    sources: Sequence[str],
    seq_len: int,
    *,
    tokenizer=None,
    eos: int | None = None,
    chat: bool = False,
    skip_prompt: bool = False,
) -> PackedRows:
    """Token-shard directories, text files (documents split on blank lines) or chat JSONL files -> packed rows."""

    def sequences() -> Iterable[tuple[np.ndarray, np.ndarray]]:
        for src in sources:
            path = Path(src)
            if not path.exists():
                raise DataError(f"training data {src} not found")
            if path.is_dir():
                if not (path / INDEX).exists():
                    raise DataError(f"{path}: a directory without {INDEX} is not a token-shard directory")
                yield from _from_shards(path, skip_prompt)
            elif chat:
                yield from _from_chat(path, tokenizer)
            else:
                if tokenizer is None:
                    raise DataError(f"{path}: raw text needs a tokenizer in the model directory")
                yield from _from_text(path, lambda s: tokenizer(s)["input_ids"], eos)

    try:
        return pack(sequences(), seq_len)
    except UnicodeDecodeError as exc:
        raise DataError(f"training data is not readable text ({exc})") from None


def step_rows(
    n_rows: int, step: int, micro: int, rank: int, world: int, batch: int, accum: int, seed: int
) -> list[int]:
    """Row indices of (step, micro-batch, rank): a slice of the global batch in a seeded per-epoch order."""
    global_batch = batch * accum * world
    start = step * global_batch + (micro * world + rank) * batch
    out = []
    for g in range(start, start + batch):
        epoch, pos = divmod(g, n_rows)
        out.append(int(_epoch_order(n_rows, seed, epoch)[pos]))
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_rows)
