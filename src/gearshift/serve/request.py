"""What a client asks the serving engine for and what it gets back: a request, its sampling parameters, the
errors that refuse one. The scheduler moves a ``Request`` through its life (waiting, running, finished); the model
runner reads its placement, slots and tokens."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..placement import Placement
from .logprobs import TokenLogprob


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at its bound; the caller should retry later (HTTP 429)."""


class RequestError(ValueError):
    """A request the engine cannot serve: unknown preset, prompt longer than the context, bad parameters."""


@dataclass
class SamplingParams:
    """``max_tokens`` 0 scores the prompt only (with ``prompt_logprobs``): nothing is generated.
    ``logprobs``: record each generated token's log-probability under the model (its raw distribution, before
    temperature and filtering) and this many most likely alternatives; ``prompt_logprobs`` the same for every
    prompt token after the first. None: nothing is computed (no full-vocabulary work for such requests)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's EOS ids
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def validate(self) -> None:
        numbers = (self.temperature, self.top_p)
        if (
            not all(isinstance(x, int | float) and math.isfinite(x) for x in numbers)
            or self.temperature < 0
            or not 0 < self.top_p <= 1
            or self.top_k < 0
            or self.max_tokens < 0
            or (self.max_tokens == 0 and self.prompt_logprobs is None)
            or any(k is not None and k < 0 for k in (self.logprobs, self.prompt_logprobs))
        ):
            raise RequestError(
                f"bad sampling parameters: temperature={self.temperature}, top_p={self.top_p}, top_k={self.top_k}, "
                f"max_tokens={self.max_tokens} (0 only to score the prompt: with prompt_logprobs), "
                f"logprobs={self.logprobs}, prompt_logprobs={self.prompt_logprobs}"
            )


@dataclass(eq=False)  # identity: requests are looked up in lists every step (value equality is O(fields))
class Request:
    id: int
    prompt: list[int]
    placement: Placement
    params: SamplingParams
    draft: Placement | None = None
    spec_k: int = 4
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    processed: int = 0  # tokens whose state is in the target pools
    draft_processed: int = 0
    slots: dict[tuple[int, str], int] = field(default_factory=dict)
    draft_slots: dict[tuple[int, str], int] = field(default_factory=dict)
    generator: torch.Generator | None = None
    finished: bool = False
    finish_reason: str | None = None
    cancelled: bool = False
    proposed: int = 0
    accepted: int = 0
    rounds: int = 0  # speculative verify rounds (each emits accepted + 1 tokens)
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    new_tokens: list[int] = field(default_factory=list)  # emitted since the last step (consumed by callers)
    label: str = ""  # the placement as letters (metrics), set on submission
    code: int = -1  # its (placement, slots) as a small int, set on admission (cheap batch-composition keys)
    draft_code: int = -1  # the same for its draft's placement and slots (the speculative draft steps' graphs)
    key: tuple = ()  # its placement and slots, set on admission (see Scheduler._code)
    rank: int = 0  # its row's place in the running batch, set on admission (see Scheduler._admit)
    needs: dict[tuple[int, str], int] = field(default_factory=dict)  # slots per (layer, mixer) pool, set on submission
    stops: frozenset[int] = frozenset()  # the stop token ids (the model's EOS ids by default), set on submission
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token, with params.logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token (None first), with prompt_logprobs
    error: str | None = None  # why the engine failed this request (finish_reason "error")
    scoring: bool = False  # it only scores its prompt (max_tokens 0): it reads all but its last token, emits nothing

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None
