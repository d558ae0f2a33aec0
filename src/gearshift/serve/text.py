"""Token ids to text for the API: incremental detokenization with stop strings, and per-token strings."""

from __future__ import annotations

from collections.abc import Sequence

CONTEXT_TOKENS = 6  # tokens of the prompt decoded before the output, so its first token gets its leading space


class Detokenizer:
    """The text of a growing list of token ids, in deltas that are safe to send: an incomplete UTF-8 character
    and whatever could still become a stop string are held back, and the text ends where a stop string starts.

    Each call decodes only a short window (the tokens since the last complete delta), so a long output costs
    linear time, not quadratic. ``context`` (the prompt's last ids) is decoded first and not returned: a
    tokenizer that strips a leading space at the start of a text (SentencePiece) then gives the continuation's
    own spacing, as ``decode(prompt + output)[len(decode(prompt)):]`` would."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = (), context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.ids = list(context[-CONTEXT_TOKENS:])
        self.prefix = 0  # ids[prefix:read] decode to text already counted
        self.read = len(self.ids)
        self.text = ""  # the text so far, cut at a stop string once one is found
        self.sent = 0  # characters of text already returned
        self.stopped = False
        self._hold = max((len(s) - 1 for s in self.stop_strings), default=0)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, new: Sequence[int]) -> str:
        """Take new token ids; returns the text that may be sent now."""
        if self.stopped:
            return ""
        self.ids += new
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._extend(after[len(before) :])
            self.prefix, self.read = self.read, len(self.ids)
        return self._ready(final=False)

    def _extend(self, delta: str) -> None:
        start = max(0, len(self.text) - self._hold)  # a stop string may straddle the old and the new text
        self.text += delta
        for s in self.stop_strings:
            at = self.text.find(s, start)
            if at != -1:
                self.text, self.stopped = self.text[:at], True
                start = min(start, at)

    def _ready(self, final: bool) -> str:
        upto = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self._hold)
        out, self.sent = self.text[self.sent : upto], upto
        return out

    def flush(self) -> str:
        """The rest of the text at the end of the output (an incomplete character decodes as U+FFFD)."""
        if not self.stopped and self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix : self.read])
            self._extend(self._decode(self.ids[self.prefix :])[len(before) :])
            self.prefix = self.read = len(self.ids)
        return self._ready(final=True)


def token_offsets(tokenizer, ids: Sequence[int], context: Sequence[int] = ()) -> tuple[str, list[int]]:
    """The text of ``ids`` and the character offset in it where each token's text starts (a token whose text
    is held back, e.g. the first byte of a multi-byte character, starts where the text stood when it came)."""
    d = Detokenizer(tokenizer, context=context)
    offsets = []
    for token in ids:
        offsets.append(len(d.text))
        d.add([token])
    d.flush()
    return d.text, offsets


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's own text (special tokens included), as logprobs show them."""
    return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
