"""lm-evaluation-harness adapter: any lm-eval task on a gearshift checkpoint under one preset.

Registered as ``gearshift`` when lm-eval is importable (this module imports without it; the class then has the
same methods, usable directly). lm-eval does not discover third-party models by itself, so either import this
module before calling ``lm_eval.simple_evaluate(model="gearshift", model_args="pretrained=DIR,preset=fast")``,
or run its command line through ``python -m gearshift.evals.lm_eval_adapter --model gearshift --model_args
pretrained=DIR,preset=fast --tasks hellaswag``, which registers the model first.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

from ..placement import PlacementSpec
from .errors import EvalError
from .scoring import Scorer
from .tokenizer import load_tokenizer

try:
    from lm_eval.api.model import LM as _Base
    from lm_eval.api.registry import register_model as _register
except ImportError:  # lm-eval is optional: the adapter still works with plain request objects
    _Base = object
    _register = None

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _args(request: Any) -> tuple:
    """The argument tuple of an lm-eval ``Instance`` (``.args``) or of a plain tuple/string request."""
    args = getattr(request, "args", request)
    return args if isinstance(args, tuple) else (args,)


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default  # lm-eval passes batch_size="auto"; our batching is by token budget anyway


class GearshiftLM(_Base):  # type: ignore[misc, valid-type]
    """A gearshift supernet under one placement, speaking lm-eval's three request types."""

    def __init__(
        self,
        pretrained: str | None = None,
        preset: PlacementSpec = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 64,
        max_batch_tokens: int | str = 16384,
        max_gen_toks: int | str = 256,
        **_: Any,
    ) -> None:
        super().__init__()
        if model is None:
            if pretrained is None:
                raise EvalError("GearshiftLM needs pretrained=DIR (a gearshift/Apriel2 checkpoint) or a model")
            from ..model import Supernet

            if dtype is not None and dtype not in DTYPES:
                raise EvalError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = Supernet.from_pretrained(pretrained, device=device, dtype=DTYPES[dtype] if dtype else None)
        if tokenizer is None or isinstance(tokenizer, str):
            if pretrained is None and tokenizer is None:
                raise EvalError("pass a tokenizer (object, directory or 'bytes') when giving a model object")
            tokenizer = load_tokenizer(pretrained or ".", tokenizer)
        self.model = model.eval()
        self.placement = model.resolve(preset)  # fail on a bad preset before any request arrives
        self.scorer = Scorer(
            model,
            tokenizer,
            max_batch_tokens=_int(max_batch_tokens, 16384),
            max_batch_size=_int(batch_size, 64),
        )
        self.max_gen_toks = _int(max_gen_toks, 256)

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def tokenizer_name(self) -> str:
        return self.scorer.tokenizer.name

    def _cache(self, kind: str, args: tuple, result: Any) -> None:
        hook = getattr(self, "cache_hook", None)
        if hook is not None:
            hook.add_partial(kind, args, result)

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is_greedy) for each (context, continuation) request."""
        pairs = [(str(a[0]), str(a[1])) for a in map(_args, requests)]
        out = self.scorer.loglikelihood(pairs, self.placement)
        for pair, res in zip(pairs, out, strict=True):
            self._cache("loglikelihood", pair, res)
        return out

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood (rolling windows over the model's context) for each (text,) request."""
        texts = [str(_args(r)[0]) for r in requests]
        out = self.scorer.loglikelihood_rolling(texts, self.placement)
        for text, res in zip(texts, out, strict=True):
            self._cache("loglikelihood_rolling", (text,), res)
        return out

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Generation per (context, gen_kwargs) request: greedy unless do_sample, cut at the first ``until``."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        settings: dict[tuple, tuple[list[str], int, float]] = {}
        for i, r in enumerate(requests):
            args = _args(r)
            kwargs = dict(args[1]) if len(args) > 1 and args[1] else {}
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = _int(kwargs.get("max_gen_toks", kwargs.get("max_new_tokens")), self.max_gen_toks)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            key = (tuple(until), new, temperature)
            groups.setdefault(key, []).append(i)
            settings[key] = (until, new, temperature)
        for key, idx in groups.items():
            until, new, temperature = settings[key]
            prompts = [str(_args(requests[i])[0]) for i in idx]
            texts = self.scorer.generate(
                prompts, self.placement, max_new_tokens=new, until=until, temperature=temperature, seed=0
            )
            for i, text in zip(idx, texts, strict=True):
                out[i] = text
                self._cache("generate_until", _args(requests[i]), text)
        return out  # type: ignore[return-value]


if _register is not None:
    _register("gearshift")(GearshiftLM)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line with the ``gearshift`` model registered."""
    if _register is None:
        raise SystemExit("lm-eval is not installed: pip install lm-eval")
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    cli_evaluate()


if __name__ == "__main__":
    main()
