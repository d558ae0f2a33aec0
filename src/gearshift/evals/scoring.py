"""Log-likelihoods and generations of one supernet, with any placement per call.

Two ways to read contexts:

- ``Scorer.score_spans``: every (tokens, start) span is one row; rows are sorted by length, left-padded
  (``pad_left`` + ``attention_mask``) and run in batches bounded by a token budget. Logits are computed only at
  the scored positions, because the full [batch, time, vocab] tensor can dwarf the model itself.
- ``SharedContext``: one long context prefilled once into a cache created with roll-back; each continuation is
  fed and then rolled back. Needle-in-a-haystack ranks a dozen candidate values against the same 30k-token
  context, so this costs a few tokens per candidate instead of a whole context.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..generation import pad_left
from ..placement import PlacementSpec
from ..sampling import sample_next
from .errors import EvalError
from .tokenizer import TextCodec, as_codec

if TYPE_CHECKING:
    from ..model import Supernet

Span = tuple[Sequence[int], int]  # (tokens, index of the first scored token; everything before is context)


@dataclass(frozen=True)
class SpanScore:
    """Sum of log-probabilities of the scored tokens, their count, and whether greedy decoding emits them all."""

    logprob: float
    tokens: int
    greedy: bool


def rolling_spans(tokens: Sequence[int], start: int, max_length: int, stride: int | None = None) -> list[Span]:
    """Windows that score ``tokens[start:]`` exactly once with at most ``max_length`` input tokens each.

    Each window predicts up to ``stride`` new tokens and fills the rest of its input with the tokens just before
    them. The default ``stride = max_length`` is lm-eval's rolling log-likelihood (a token sees the history inside
    its own window; the last window is filled up to full context); a smaller stride guarantees every token at
    least ``max_length - stride`` tokens of history, at ``max_length / stride`` times the compute.
    """
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise EvalError(f"stride must lie in [1, {max_length}], got {stride}")
    if start < 1:
        raise EvalError("the first scored token needs at least one token before it (start >= 1)")
    spans: list[Span] = []
    p = start
    while p < len(tokens):
        end = min(len(tokens), p + stride)
        a = max(0, end - 1 - max_length)
        spans.append((tokens[a:end], p - a))
        p = end
    return spans


class Scorer:
    """Scores text and token spans with a supernet; ``placement`` is chosen per call, like the model's own."""

    def __init__(
        self,
        model: Supernet,
        tokenizer: Any = None,
        *,
        max_batch_tokens: int = 16384,
        max_batch_size: int = 64,
        logit_chunk: int = 4096,
    ) -> None:
        if max_batch_tokens < 1 or max_batch_size < 1 or logit_chunk < 1:
            raise EvalError("batch limits must be positive")
        self.model = model
        self.codec: TextCodec | None = None if tokenizer is None else as_codec(tokenizer)
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.logit_chunk = logit_chunk

    # ------------------------------------------------------------------ tokens
    @property
    def max_length(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def tokenizer(self) -> TextCodec:
        if self.codec is None:
            raise EvalError("this scorer was built without a tokenizer; pass one to score text")
        return self.codec

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is replaced by: BOS, else EOS (tokenizer's, then the model config's), else 0."""
        cfg = self.model.config
        eos = cfg.eos_ids()
        for candidate in (
            self.codec and self.codec.bos_token_id,
            self.codec and self.codec.eos_token_id,
            cfg.bos_token_id,
            eos[0] if eos else None,
        ):
            if isinstance(candidate, int) and not isinstance(candidate, bool) and candidate < cfg.vocab_size:
                return candidate
        return 0

    @property
    def pad_token_id(self) -> int:
        pad = self.model.config.pad_token_id
        return pad if pad is not None else 0

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Tokens of a (context, continuation) pair, split where the continuation starts (lm-eval's convention).

        Trailing whitespace of the context moves to the continuation, the pair is encoded whole and split after
        the context's own tokens, so the continuation is tokenised as it would be in running text.
        """
        tok = self.tokenizer
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        if not context:
            return [self.prefix_token_id], tok.encode(continuation)
        ctx = tok.encode(context)
        whole = tok.encode(context + continuation)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx) :]
        return ctx, tok.encode(continuation)  # the tokenizer merged across the boundary: encode the parts

    # ------------------------------------------------------------------ batched scoring
    def _check_span(self, tokens: Sequence[int], start: int) -> None:
        if not 1 <= start < len(tokens):
            raise EvalError(f"a span of {len(tokens)} tokens cannot be scored from index {start}")
        if len(tokens) - 1 > self.max_length:
            raise EvalError(
                f"a span of {len(tokens)} tokens needs {len(tokens) - 1} input positions, more than the model's "
                f"max_position_embeddings ({self.max_length}); use rolling windows or shorter inputs"
            )
        vocab = self.model.config.vocab_size
        if min(tokens) < 0 or max(tokens) >= vocab:
            raise EvalError(f"token ids must lie in [0, {vocab}) for this model, got {min(tokens)}..{max(tokens)}")

    def _batches(self, lengths: Sequence[int]) -> Iterable[list[int]]:
        """Indices grouped into batches, longest first, each within the token budget (at least one row)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batch: list[int] = []
        for i in order:
            width = lengths[batch[0]] if batch else lengths[i]
            if batch and ((len(batch) + 1) * width > self.max_batch_tokens or len(batch) >= self.max_batch_size):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    @torch.no_grad()
    def score_spans(self, spans: Sequence[Span], placement: PlacementSpec = None) -> list[SpanScore]:
        """Score ``tokens[start:]`` given ``tokens[:start]`` for every span, batched."""
        for tokens, start in spans:
            self._check_span(tokens, start)
        model = self.model
        resolved = model.resolve(placement)
        device = model.device
        results: list[SpanScore | None] = [None] * len(spans)
        lengths = [len(t) - 1 for t, _ in spans]
        for batch in self._batches(lengths):
            inputs = [list(spans[i][0][:-1]) for i in batch]
            ids, mask = pad_left(inputs, self.pad_token_id, device)
            width = ids.shape[1]
            hidden = model(ids, resolved, attention_mask=None if bool(mask.all()) else mask, return_hidden=True)
            rows, cols, targets = [], [], []
            for r, i in enumerate(batch):
                tokens, start = spans[i]
                offset = width - (len(tokens) - 1)
                n = len(tokens) - start
                rows.append(torch.full((n,), r, dtype=torch.long))
                cols.append(torch.arange(offset + start - 1, offset + len(tokens) - 1))
                targets.append(torch.as_tensor(list(tokens[start:]), dtype=torch.long))
            row_t, col_t, tgt_t = (torch.cat(x).to(device) for x in (rows, cols, targets))
            logprob = torch.zeros(len(batch), dtype=torch.float64, device=device)
            misses = torch.zeros(len(batch), dtype=torch.long, device=device)
            for c in range(0, len(tgt_t), self.logit_chunk):
                sl = slice(c, c + self.logit_chunk)
                logits = model.logits(hidden[row_t[sl], col_t[sl]]).float()
                lp = logits.log_softmax(-1).gather(-1, tgt_t[sl, None])[:, 0]
                logprob.index_add_(0, row_t[sl], lp.double())
                misses.index_add_(0, row_t[sl], (logits.argmax(-1) != tgt_t[sl]).long())
            for i, lp_sum, miss in zip(batch, logprob.tolist(), misses.tolist(), strict=True):  # one device sync
                tokens, start = spans[i]
                results[i] = SpanScore(lp_sum, len(tokens) - start, miss == 0)
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ text
    def loglikelihood(
        self, pairs: Sequence[tuple[str, str]], placement: PlacementSpec = None
    ) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is_greedy) per pair; over-long contexts lose their oldest tokens."""
        spans: list[Span] = []
        for context, continuation in pairs:
            ctx, cont = self.encode_pair(context, continuation)
            if not cont:
                raise EvalError(f"continuation {continuation!r} encodes to no tokens")
            if len(cont) > self.max_length:
                raise EvalError(
                    f"a continuation of {len(cont)} tokens does not fit the model's context ({self.max_length})"
                )
            ctx = ctx[-(self.max_length + 1 - len(cont)) :]
            spans.append((ctx + cont, len(ctx)))
        return [(s.logprob, s.greedy) for s in self.score_spans(spans, placement)]

    def loglikelihood_rolling(
        self, texts: Sequence[str], placement: PlacementSpec = None, *, stride: int | None = None
    ) -> list[float]:
        """Log-likelihood of each whole text, conditioned on the prefix token, in rolling windows."""
        owners: list[int] = []
        spans: list[Span] = []
        for k, text in enumerate(texts):
            tokens = [self.prefix_token_id, *self.tokenizer.encode(text)]
            for span in rolling_spans(tokens, 1, self.max_length, stride):
                owners.append(k)
                spans.append(span)
        totals = [0.0] * len(texts)
        for k, score in zip(owners, self.score_spans(spans, placement), strict=True):
            totals[k] += score.logprob
        return totals

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        placement: PlacementSpec = None,
        *,
        max_new_tokens: int = 256,
        until: Sequence[str] = (),
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[str]:
        """Continue each prompt until a stop string, EOS or ``max_new_tokens``; returns the text before the stop."""
        if not 1 <= max_new_tokens < self.max_length:
            raise EvalError(f"max_new_tokens must lie in [1, {self.max_length}), got {max_new_tokens}")
        tok = self.tokenizer
        keep = self.max_length - max_new_tokens
        encoded = [(tok.encode(p) or [self.prefix_token_id])[-keep:] for p in prompts]
        eos = set(self.model.config.eos_ids())
        if tok.eos_token_id is not None:
            eos.add(tok.eos_token_id)
        gen = None if seed is None else torch.Generator(device=self.model.device).manual_seed(seed)
        out: list[str] = [""] * len(prompts)
        for batch in self._batches([len(e) for e in encoded]):
            texts = self._generate_batch(
                [encoded[i] for i in batch], placement, max_new_tokens, until, eos, temperature, gen
            )
            for i, text in zip(batch, texts, strict=True):
                out[i] = text
        return out

    def _generate_batch(
        self,
        encoded: list[list[int]],
        placement: PlacementSpec,
        max_new_tokens: int,
        until: Sequence[str],
        eos: set[int],
        temperature: float,
        gen: torch.Generator | None,
    ) -> list[str]:
        model, tok = self.model, self.tokenizer
        ids, mask = pad_left(encoded, self.pad_token_id, model.device)
        cache = model.new_cache(len(encoded), placement)
        cache.set_padding(mask)
        logits = model(ids, cache=cache, last_only=True)[:, -1]
        new: list[list[int]] = [[] for _ in encoded]
        done = [False] * len(encoded)
        for step in range(max_new_tokens):
            token = sample_next(logits.float(), temperature, generator=gen)
            for r, t in enumerate(token.tolist()):
                if done[r]:
                    continue
                if t in eos:
                    done[r] = True
                    continue
                new[r].append(t)
                if until and any(s in tok.decode(new[r]) for s in until):
                    done[r] = True
            if all(done) or step + 1 == max_new_tokens:
                break
            logits = model(token[:, None], cache=cache)[:, -1]
        texts = [tok.decode(n) for n in new]
        return [_cut(t, until) for t in texts]


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the earliest stop string."""
    ends = [text.find(s) for s in until if s and s in text]
    return text[: min(ends)] if ends else text


class SharedContext:
    """One context prefilled once; continuations are scored (and greedy answers decoded) by rolling back.

    ``rollback`` bounds how many tokens a continuation may feed: a candidate of n tokens feeds n - 1 (the first
    is predicted by the context's last position), a greedy answer of n tokens feeds n - 1.
    """

    @torch.no_grad()
    def __init__(
        self,
        model: Supernet,
        context: Sequence[int],
        placement: PlacementSpec = None,
        *,
        rollback: int,
        prefill_chunk: int = 4096,
    ) -> None:
        limit = model.config.max_position_embeddings
        if not context:
            raise EvalError("a shared context needs at least one token")
        if len(context) + rollback > limit:
            raise EvalError(
                f"context of {len(context)} tokens + {rollback} continuation tokens exceeds the model's "
                f"max_position_embeddings ({limit})"
            )
        self.model = model
        self.length = len(context)
        self.rollback = rollback
        self.cache = model.new_cache(1, placement, rollback=max(rollback, 1))
        ids = torch.as_tensor([list(context)], dtype=torch.long, device=model.device)
        for s in range(0, self.length, prefill_chunk):
            logits = model(ids[:, s : s + prefill_chunk], cache=self.cache, last_only=True)
        self.last = logits[0, -1].float().log_softmax(-1)
        self.fed = 0  # tokens fed since the context, to be rolled back

    def _feed(self, tokens: Sequence[int]) -> torch.Tensor:
        if self.fed + len(tokens) > self.rollback:
            raise EvalError(f"{self.fed + len(tokens)} tokens exceed this context's roll-back room ({self.rollback})")
        self.fed += len(tokens)
        ids = torch.as_tensor([list(tokens)], dtype=torch.long, device=self.model.device)
        return self.model(ids, cache=self.cache)[0].float().log_softmax(-1)

    def _rewind(self) -> None:
        self.cache.truncate(self.length)
        self.fed = 0

    @torch.no_grad()
    def score(self, continuation: Sequence[int]) -> SpanScore:
        """Log-probability of ``continuation`` right after the context (the cache is returned to the context)."""
        if not continuation:
            raise EvalError("cannot score an empty continuation")
        c = list(continuation)
        logp = [self.last]
        if len(c) > 1:
            logp.extend(self._feed(c[:-1]).unbind(0))
            self._rewind()
        lp = torch.stack(logp)
        target = torch.as_tensor(c, device=lp.device)
        picked = lp.gather(-1, target[:, None])[:, 0]
        return SpanScore(float(picked.double().sum()), len(c), bool((lp.argmax(-1) == target).all()))

    @torch.no_grad()
    def greedy(self, max_new_tokens: int, stop_ids: Iterable[int] = ()) -> list[int]:
        """Greedy continuation of the context (stops after a stop id, which is included)."""
        if max_new_tokens - 1 > self.rollback:
            raise EvalError(f"{max_new_tokens} greedy tokens exceed this context's roll-back room ({self.rollback})")
        stop = set(stop_ids)
        out: list[int] = []
        lp = self.last
        for i in range(max_new_tokens):
            t = int(lp.argmax())
            out.append(t)
            if t in stop or i + 1 == max_new_tokens:
                break
            lp = self._feed([t])[-1]
        self._rewind()
        return out
