"""What a long-context build makes: its sets (name, split, lengths, count, kinds) and sizes, as plain config.

Kept apart from the builder (``longctx.py``) so that a recipe can name its sets without importing numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

KINDS = ("conversation", "kv_recall", "repeat", "multi_doc")
SPLITS = ("train", "heldout")


class LongContextError(ValueError):
    """Inputs that cannot make the requested documents (empty pools, a context too short for a document)."""


@dataclass(frozen=True)
class SetSpec:
    """One output set: ``count`` documents of the ``split``'s sources, lengths uniform in [lo, hi] tokens (exact
    when lo == hi), kinds drawn in the proportions of ``mix``."""

    name: str
    split: str
    lengths: tuple[int, int]
    count: int
    mix: dict[str, float]
    closing: float = 1.0  # share of conversations with a teacher-written recall turn (needs ``complete``)

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise LongContextError(f"set {self.name}: split {self.split!r} is not one of {SPLITS}")
        lo, hi = self.lengths
        if not 16 <= lo <= hi:
            raise LongContextError(f"set {self.name}: lengths {self.lengths} need 16 <= lo <= hi")
        unknown = set(self.mix) - set(KINDS)
        if unknown or not self.mix or min(self.mix.values()) < 0 or sum(self.mix.values()) <= 0:
            raise LongContextError(f"set {self.name}: mix {self.mix} must weigh kinds among {KINDS}")
        if self.count < 0 or not 0 <= self.closing <= 1:
            raise LongContextError(f"set {self.name}: count >= 0 and closing in [0, 1] required")


@dataclass
class LongContextConfig:
    seed: int = 0
    heldout_fraction: float = 0.15
    sets: list[SetSpec] = field(default_factory=list)
    closing_tokens: int = 192  # room for the teacher's recall answer
    facts: tuple[int, int] = (3, 8)  # key-value facts per document
    questions: tuple[int, int] = (2, 4)  # questions at the end of a recall document
    repeat_tokens: tuple[int, int] = (48, 384)  # length of a repeated passage

    @staticmethod
    def curriculum(
        *,
        seed: int = 0,
        short: tuple[int, int] = (1024, 2048),
        long: int = 8192,
        train_short: int = 2000,
        train_long: int = 800,
        kl: Sequence[tuple[int, int]] = ((1024, 32), (4096, 12), (8192, 8)),
        recall: Sequence[tuple[int, int]] = ((4096, 8), (8192, 6)),
        place: tuple[int, int] = (4096, 12),
        heldout_fraction: float = 0.15,
        **sizes: Any,
    ) -> LongContextConfig:
        """The build's sets: training in two stages of length (short, then ``long``), held-out KL sets of natural
        conversations, recall sets, and a mixed set for placement measurement ((length, documents) each);
        ``sizes`` sets the other fields (closing_tokens, facts, questions, repeat_tokens)."""
        train_mix = {"conversation": 0.4, "kv_recall": 0.25, "repeat": 0.15, "multi_doc": 0.2}
        recall_mix = {"kv_recall": 1.0, "repeat": 1.0, "multi_doc": 1.0}
        sets = [
            SetSpec("train_short", "train", short, train_short, train_mix, closing=0.5),
            SetSpec("train_long", "train", (long, long), train_long, train_mix),
        ]
        sets += [SetSpec(f"kl_{n}", "heldout", (n, n), c, {"conversation": 1.0}) for n, c in kl]
        sets += [SetSpec(f"recall_{n}", "heldout", (n, n), c, recall_mix) for n, c in recall]
        sets.append(SetSpec(f"place_{place[0]}", "heldout", (place[0], place[0]), place[1], train_mix))
        return LongContextConfig(seed=seed, heldout_fraction=heldout_fraction, sets=sets, **sizes)
