"""Text <-> token ids for evaluation: one small interface over Hugging Face tokenizers and test tokenizers.

Evaluation code only needs ``encode`` (no special tokens added: the scorer decides about prefix tokens) and
``decode``; wrapping every tokenizer-like object once keeps that decision in one place.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import TOKENIZER_FILES, token_ids
from ..checkpoint import load_tokenizer as load_checkpoint_tokenizer
from .errors import EvalError


@dataclass
class TextCodec:
    """Encode/decode functions plus the special ids the scorer may need (None when the tokenizer has none)."""

    encode_fn: Callable[[str], list[int]]
    decode_fn: Callable[[Sequence[int]], str] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    name: str = "tokenizer"

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.encode_fn(text)]

    def decode(self, ids: Sequence[int]) -> str:
        if self.decode_fn is None:
            raise EvalError(f"{self.name} cannot decode token ids; generation needs a tokenizer with decode()")
        return self.decode_fn([int(i) for i in ids])


class ByteCodec(TextCodec):
    """UTF-8 bytes as token ids 0..255: lets byte-level (and tiny test) checkpoints be evaluated without files."""

    def __init__(self) -> None:
        super().__init__(
            encode_fn=lambda text: list(text.encode("utf-8")),
            decode_fn=lambda ids: bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace"),
            name="bytes",
        )


def _accepts(fn: Callable[..., Any], kwarg: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return kwarg in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def as_codec(tokenizer: Any) -> TextCodec:
    """Wrap a tokenizer-like object: anything with ``encode``/``decode`` (HF tokenizers included) or a callable."""
    if isinstance(tokenizer, TextCodec):
        return tokenizer
    encode = getattr(tokenizer, "encode", None)
    if encode is not None:
        enc = (
            (lambda t: token_ids(encode(t, add_special_tokens=False)))
            if _accepts(encode, "add_special_tokens")
            else None
        )
        enc = enc or (lambda t: token_ids(encode(t)))
    elif callable(tokenizer):
        enc = lambda t: token_ids(tokenizer(t))  # noqa: E731
    else:
        raise EvalError(f"{type(tokenizer).__name__} is not a tokenizer: it needs encode(text) or to be callable")
    decode = getattr(tokenizer, "decode", None)
    dec = None
    if decode is not None:
        dec = (lambda ids: decode(ids, skip_special_tokens=True)) if _accepts(decode, "skip_special_tokens") else decode
    return TextCodec(
        encode_fn=enc,
        decode_fn=dec,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        name=type(tokenizer).__name__,
    )


def load_tokenizer(model_dir: str | Path, spec: str | None = None) -> TextCodec:
    """The tokenizer to evaluate a checkpoint with: ``spec`` ('bytes' or a path), else the checkpoint's own."""
    if spec == "bytes":
        return ByteCodec()
    source = Path(spec) if spec else Path(model_dir)
    if spec is None and not any((source / f).exists() for f in TOKENIZER_FILES):
        raise EvalError(
            f"{model_dir} holds no tokenizer ({', '.join(TOKENIZER_FILES)}); pass --tokenizer PATH "
            "(a tokenizer directory) or --tokenizer bytes (byte-level ids 0..255)"
        )
    try:
        tokenizer = load_checkpoint_tokenizer(source)
    except ImportError as exc:
        raise EvalError(f"reading the tokenizer in {source} needs transformers ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for unreadable tokenizers
        raise EvalError(f"cannot load a tokenizer from {source}: {exc}") from None
    if tokenizer is None:
        raise EvalError(f"{source} holds no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return as_codec(tokenizer)
