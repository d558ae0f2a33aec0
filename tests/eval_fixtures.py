"""Helpers shared by test folders (moved from test_evals_tasks.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc


def write_split(root: Path, rel: str, rows: list[dict], *, files: int = 1, file_format: bool = False) -> Path:
    """A ``datasets.save_to_disk`` split: data-0000i-of-0000n.arrow (Arrow streams) + state.json."""
    d = root / rel
    d.mkdir(parents=True, exist_ok=True)
    names = [f"data-{i:05d}-of-{files:05d}.arrow" for i in range(files)]
    per = -(-len(rows) // files)
    for i, name in enumerate(names):
        table = pa.Table.from_pylist(rows[i * per : (i + 1) * per])
        with pa.OSFile(str(d / name), "wb") as f:
            writer = ipc.new_file(f, table.schema) if file_format else ipc.new_stream(f, table.schema)
            with writer:
                writer.write_table(table)
    state = {"_data_files": [{"filename": n} for n in names], "_split": "validation"}
    (d / "state.json").write_text(json.dumps(state))
    return d


def arc_row(i: int, correct: str, wrong: list[str], gold: int) -> dict:
    options = wrong[:gold] + [correct] + wrong[gold:]
    labels = list("ABCDE"[: len(options)])
    return {
        "id": f"q{i}",
        "question": f"what {i}?",
        "choices": {"text": options, "label": labels},
        "answerKey": labels[gold],
    }


ONE_ROW = {
    "hellaswag": {
        "ind": 1,
        "activity_label": "Roof [title] work",
        "ctx_a": "A man is on a roof.",
        "ctx_b": "he",
        "ctx": "",
        "endings": ["falls [step] down.", "  sits  "],
        "source_id": "x",
        "split": "val",
        "split_type": "indomain",
        "label": "1",
    },
    "arc_easy": arc_row(0, "solid", ["gas", "liquid"], 1),
    "arc_challenge": arc_row(0, "x", ["y"], 0),
    "piqa": {"goal": "Open a jar", "sol1": "twist", "sol2": "pull", "label": 1},
    "winogrande": {"sentence": "Ann beat Bo so _ won.", "option1": "Ann", "option2": "Bo", "answer": "1"},
    "boolq": {"question": "is it", "answer": True, "passage": "It is."},
    "copa": {
        "premise": "The man fell.",
        "choice1": "He tripped.",
        "choice2": "He won.",
        "question": "cause",
        "idx": 0,
        "label": 0,
    },
    "openbookqa": {
        "id": "1",
        "question_stem": "Fish live in",
        "choices": {"text": ["water", "air"], "label": ["A", "B"]},
        "answerKey": "A",
    },
    "sciq": {
        "question": "Q?",
        "distractor1": "a",
        "distractor2": "b",
        "distractor3": "c",
        "correct_answer": "d",
        "support": "",
    },
    "social_iqa": {
        "context": "Tom ran.",
        "question": "Why?",
        "answerA": "late",
        "answerB": "fun",
        "answerC": "cold",
        "label": "2",
    },
    "commonsense_qa": {
        "id": "1",
        "question": "Where?",
        "question_concept": "x",
        "choices": {"label": ["A", "B"], "text": ["bank", "mall"]},
        "answerKey": "B",
    },
    "mmlu": {"question": " 2+2? ", "subject": "high_school_math", "choices": ["3", "4", "5", "6"], "answer": 1},
    "basic_arithmetic": arc_row(0, "4", ["5", "6"], 2),
}
