"""Token shards: the on-disk form of teacher traces and tokenised text.

A shard directory holds ``index.json`` and, per shard, ``shard-NNNNN.npz`` with three arrays: ``tokens`` (all
sequences concatenated, uint32), ``offsets`` (int64, N+1 boundaries) and ``prompt_lens`` (int32, N: how many
leading tokens of each sequence are prompt, so losses can skip them). Shards are written atomically (temp file
+ rename) and the index is rewritten after each shard, so an interrupted writer loses at most the shard in
progress and can resume by appending.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "gearshift-tokens/1"
INDEX = "index.json"


class ShardError(ValueError):
    """A token-shard directory that cannot be read (missing index, corrupt shard, wrong format)."""


@dataclass(frozen=True)
class TokenSequence:
    tokens: np.ndarray  # uint32 [n]
    prompt_len: int


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2).encode())


class TokenShardWriter:
    """Appends sequences to a shard directory; ``flush`` closes the current shard. Resumes an existing directory."""

    def __init__(self, path: str | Path, *, vocab_size: int, shard_tokens: int = 1 << 24, meta: dict | None = None):
        self.path = Path(path)
        self.shard_tokens = shard_tokens
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / INDEX).exists():
            self.index = read_index(self.path)
            if self.index["vocab_size"] != vocab_size:
                raise ShardError(
                    f"{self.path}: existing shards have vocab {self.index['vocab_size']}, not {vocab_size}"
                )
        else:
            self.index = {"format": FORMAT, "vocab_size": vocab_size, "shards": [], "meta": meta or {}}
        self._tokens: list[np.ndarray] = []
        self._prompt_lens: list[int] = []
        self._count = 0

    @property
    def sequences_written(self) -> int:
        return sum(s["sequences"] for s in self.index["shards"]) + len(self._tokens)

    def add(self, tokens: Sequence[int] | np.ndarray, prompt_len: int = 0) -> None:
        arr = np.asarray(tokens, dtype=np.int64)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError("a sequence must be a non-empty 1-D list of token ids")
        if arr.min() < 0 or arr.max() >= self.index["vocab_size"]:
            raise ValueError(f"token ids must lie in [0, {self.index['vocab_size']})")
        if not 0 <= prompt_len <= arr.size:
            raise ValueError(f"prompt_len {prompt_len} outside [0, {arr.size}]")
        self._tokens.append(arr.astype(np.uint32))
        self._prompt_lens.append(prompt_len)
        self._count += arr.size
        if self._count >= self.shard_tokens:
            self.flush()

    def flush(self, **extra: Any) -> None:
        """Close the current shard; ``extra`` (JSON-able) is stored with it in the index (e.g. prompt hashes)."""
        if not self._tokens:
            return
        n = len(self.index["shards"])
        name = f"shard-{n:05d}.npz"
        offsets = np.zeros(len(self._tokens) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([t.size for t in self._tokens])
        buf = _npz_bytes(
            tokens=np.concatenate(self._tokens),
            offsets=offsets,
            prompt_lens=np.asarray(self._prompt_lens, dtype=np.int32),
        )
        atomic_write_bytes(self.path / name, buf)
        entry = {"file": name, "sequences": len(self._tokens), "tokens": int(offsets[-1]), **extra}
        self.index["shards"].append(entry)
        atomic_write_json(self.path / INDEX, self.index)
        self._tokens, self._prompt_lens, self._count = [], [], 0

    def close(self) -> None:
        self.flush()
        if not (self.path / INDEX).exists():
            atomic_write_json(self.path / INDEX, self.index)

    def __enter__(self) -> TokenShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    import io

    bio = io.BytesIO()
    np.savez(bio, **arrays)
    return bio.getvalue()


def read_index(path: str | Path) -> dict:
    path = Path(path)
    file = path / INDEX
    if not file.exists():
        raise ShardError(f"{path}: no {INDEX} (not a token-shard directory)")
    try:
        index = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ShardError(f"{file}: not valid JSON ({exc})") from None
    if index.get("format") != FORMAT:
        raise ShardError(f"{file}: format {index.get('format')!r}, expected {FORMAT!r}")
    return index


class TokenShards:
    """Random access to the sequences of a shard directory (shards are loaded lazily and cached)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.index = read_index(self.path)
        self.vocab_size: int = self.index["vocab_size"]
        counts = [s["sequences"] for s in self.index["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._cache: dict[int, dict[str, np.ndarray]] = {}
        if len(self) == 0:
            raise ShardError(f"{self.path}: holds no sequences")

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_tokens(self) -> int:
        return sum(s["tokens"] for s in self.index["shards"])

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        if i not in self._cache:
            file = self.path / self.index["shards"][i]["file"]
            try:
                with np.load(file) as z:
                    self._cache[i] = {k: z[k] for k in ("tokens", "offsets", "prompt_lens")}
            except Exception as exc:  # noqa: BLE001 - zip/npy errors come in many types
                raise ShardError(f"{file}: cannot read shard ({exc})") from None
        return self._cache[i]

    def __getitem__(self, i: int) -> TokenSequence:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        shard = self._shard(s)
        j = i - int(self._starts[s])
        a, b = shard["offsets"][j], shard["offsets"][j + 1]
        return TokenSequence(shard["tokens"][a:b], int(shard["prompt_lens"][j]))

    def __iter__(self) -> Iterator[TokenSequence]:
        for i in range(len(self)):
            yield self[i]
