"""Long-context training and held-out documents, built offline from teacher traces and local text.

Teacher traces are short (a prompt and one answer, a few hundred tokens), so a supernet distilled on them never
sees a position past ~1k, and its sliding-window, GDN and KDA mixers are never asked to carry anything far. This
builder composes documents up to the teacher's context from what is here, of four kinds:

- ``conversation``: teacher exchanges stitched into one long chat; at a random depth (50-90%) the user asks about
  an early turn ("repeat my first question", "quote the first sentence of your answer to ...") and the *teacher*
  writes the answer with the whole conversation in view (the ``complete`` callback); more exchanges follow. The
  natural long documents: held-out KL at 1k/4k/8k is measured on these.
- ``kv_recall``: key-value facts (random names, places and numbers, never the evaluation's needle) placed at random
  depths in filler text, and questions about them at the end, each answered by restating its fact.
- ``repeat``: a passage, filler, then the same passage again after an instruction to repeat it.
- ``multi_doc``: titled documents back to back, then questions about a title or about which document opens with
  a quoted phrase.

Every source (a trace's exchange, a local passage) belongs to a *group* (a trace's prompt, a passage's text) and
every group to one split, train or held-out, by a seeded hash: a held-out document is composed only of held-out
groups, so held-out and training data share no source text, whichever documents are drawn. Sources that overlap
evaluation text (``EvalTextGuard``: the NIAH haystack and needle, the scored benchmark items) are dropped before
anything is composed, and listed in the manifest. The same inputs and seed give the same documents, token for
token (numpy generators seeded per set; the completion callback is called with the same prefixes in the same
order).

Output: one token-shard directory per set (one document per sequence, every token scored) and ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .guard import EvalTextGuard
from .longctx_sets import KINDS, SPLITS, LongContextConfig, LongContextError, SetSpec
from .tokens import TokenShards, TokenShardWriter, atomic_write_json

MANIFEST = "manifest.json"

# The teacher writes completions: token prefixes in, new tokens out (at most ``max_new_tokens`` each).
Complete = Callable[[list[list[int]], int], list[list[int]]]


@dataclass(frozen=True)
class Turn:
    """One chat exchange (a teacher trace): the user's message and the teacher's answer."""

    user: str
    assistant: str
    group: str  # split key: every sample of one prompt shares it


@dataclass(frozen=True)
class Passage:
    """A piece of plain text: a local document or a teacher answer."""

    text: str
    group: str
    source: str = "text"


def group_key(*parts: Any) -> str:
    """A stable 16-hex key of any JSON-able parts (a prompt's tokens, a passage's text)."""
    return hashlib.sha1(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:16]


def assign_split(group: str, seed: int, heldout_fraction: float) -> str:
    """``train`` or ``heldout`` for a group, a pure function of (group, seed): order and batch independent."""
    u = int(hashlib.sha1(f"{seed}:{group}".encode()).hexdigest()[:12], 16) / float(16**12)
    return "heldout" if u < heldout_fraction else "train"


# ------------------------------------------------------------------------------------------ templates
SYLLABLES = ["ka", "lo", "mi", "ren", "tas", "vel", "dor", "an", "is", "ul", "ber", "gon", "fi", "sha", "tre"]
SYLLABLES += ["wyn", "mar", "quo", "lin", "ost", "ra", "ne", "vo", "zel", "pa", "dri"]
THINGS = ["locker", "badge", "account", "ticket", "passport", "license", "parcel", "membership", "library card"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "silver", "black", "white", "brown"]
ITEMS = ["lamp", "notebook", "kettle", "compass", "umbrella", "violin", "telescope", "basket", "clock", "scarf"]
FOODS = ["ginger", "saffron", "fennel", "walnuts", "basil", "paprika", "lentils", "honey", "rosemary", "barley"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
# (fact, question, answer) with fields filled per document; the answer restates the fact
FACTS = [
    ("{name}'s {thing} number is {num}.", "What is {name}'s {thing} number?", "{name}'s {thing} number is {num}."),
    ("{name} lives in the village of {place}.", "Where does {name} live?", "{name} lives in the village of {place}."),
    (
        "The {color} {item} is kept in box {num}.",
        "In which box is the {color} {item} kept?",
        "The {color} {item} is kept in box {num}.",
    ),
    (
        "The password for the {place} archive is {word}.",
        "What is the password for the {place} archive?",
        "The password for the {place} archive is {word}.",
    ),
    ("{name} was born in the year {year}.", "In what year was {name} born?", "{name} was born in the year {year}."),
    (
        "The meeting with {name} is on {day} in room {num}.",
        "When and where is the meeting with {name}?",
        "The meeting with {name} is on {day} in room {num}.",
    ),
    (
        "The secret ingredient of {name}'s soup is {food}.",
        "What is the secret ingredient of {name}'s soup?",
        "The secret ingredient of {name}'s soup is {food}.",
    ),
]
KV_INTRO = "The notes below mention several facts. Read them carefully; questions follow at the end."
REPEAT_INTRO = "Read the following passage carefully. You will be asked to repeat it later.\n\n"
REPEAT_ASK = "\n\nNow repeat the passage from the beginning of this text, word for word.\n\n"
MULTI_INTRO = "Below is a collection of documents. Questions about them follow at the end.\n\n"
CLOSING = [
    "Before we go on, please repeat my first question word for word.",
    "What was my first question about? Answer in one sentence.",
    "Summarize your first answer in two sentences.",
    'Earlier I asked: "{q}" What was the main point of your answer?',
    'Quote the first sentence of your answer to my question "{q}"',
]


def template_texts() -> list[str]:
    """Every fixed text the builder writes (for checking them against the evaluation guard)."""
    out = [KV_INTRO, REPEAT_INTRO, REPEAT_ASK, MULTI_INTRO, *CLOSING]
    return out + [t for triple in FACTS for t in triple]


class _Names:
    """Pronounceable made-up names and places: facts no pre-trained model (or benchmark) can know."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def word(self, lo: int = 2, hi: int = 3) -> str:
        n = int(self.rng.integers(lo, hi + 1))
        return "".join(SYLLABLES[int(i)] for i in self.rng.integers(0, len(SYLLABLES), n)).capitalize()

    def name(self) -> str:
        return f"{self.word(2, 2)} {self.word(2, 3)}"

    def number(self) -> str:
        digits = int(self.rng.integers(3, 9))
        return str(int(self.rng.integers(10 ** (digits - 1), 10**digits)))

    def fields(self) -> dict[str, str]:
        r = self.rng
        return {
            "name": self.name(),
            "place": self.word(2, 3),
            "num": self.number(),
            "word": f"{self.word(2, 2).lower()}-{int(r.integers(10, 100))}",
            "thing": THINGS[int(r.integers(len(THINGS)))],
            "color": COLORS[int(r.integers(len(COLORS)))],
            "item": ITEMS[int(r.integers(len(ITEMS)))],
            "food": FOODS[int(r.integers(len(FOODS)))],
            "day": DAYS[int(r.integers(len(DAYS)))],
            "year": str(int(r.integers(1200, 2100))),
        }


# ------------------------------------------------------------------------------------------ the builder
@dataclass
class _Doc:
    kind: str
    tokens: np.ndarray | None = None  # final tokens (None while a conversation waits for its closing answer)
    messages: list[dict] | None = None  # conversation: turns before the closing question (and it)
    after: list[Turn] | None = None  # conversation: turns after the closing answer
    prefix: list[int] | None = None  # conversation: tokens the teacher completes
    length: int = 0
    order: Any = None  # conversation: where further exchanges come from, if rendering comes out short


class LongContextBuilder:
    """Compose the configured sets from turns and passages; see the module docstring."""

    def __init__(
        self,
        tokenizer: Any,
        config: LongContextConfig,
        *,
        vocab_size: int,
        guard: EvalTextGuard | None = None,
        complete: Complete | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.tok = tokenizer
        self.cfg = config
        self.vocab_size = vocab_size
        self.guard = guard
        self.complete = complete
        self.log = log or (lambda msg: None)
        self.turns: dict[str, list[Turn]] = {s: [] for s in SPLITS}
        self.passages: dict[str, list[Passage]] = {s: [] for s in SPLITS}
        self.excluded: list[dict[str, str]] = []
        self.groups: dict[str, set[str]] = {s: set() for s in SPLITS}
        self._sep = self._encode(["\n\n"])[0]

    # ------------------------------------------------------------------ inputs
    def _check(self, text: str, group: str, source: str) -> bool:
        hit = self.guard.match(text) if self.guard is not None else None
        if hit is not None:
            self.excluded.append({"source": source, "group": group, "matched": hit})
        return hit is None

    def add_turns(self, turns: Iterable[Turn], source: str = "traces") -> None:
        for t in turns:
            if not t.assistant.strip() or not self._check(t.user + "\n" + t.assistant, t.group, source):
                continue
            split = assign_split(t.group, self.cfg.seed, self.cfg.heldout_fraction)
            self.turns[split].append(t)
            self.groups[split].add(t.group)

    def add_passages(self, passages: Iterable[Passage]) -> None:
        for p in passages:
            if not p.text.strip() or not self._check(p.text, p.group, p.source):
                continue
            split = assign_split(p.group, self.cfg.seed, self.cfg.heldout_fraction)
            self.passages[split].append(p)
            self.groups[split].add(p.group)

    # ------------------------------------------------------------------ tokens
    def _encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        if not texts:
            return []
        try:
            ids = self.tok(list(texts), add_special_tokens=False)["input_ids"]
        except TypeError:  # tokenizers without batch calls or the keyword
            ids = [self.tok(t)["input_ids"] for t in texts]
        return [np.asarray(i, dtype=np.int64) for i in ids]

    def _chat(self, messages: list[dict], generation: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    # ------------------------------------------------------------------ composition
    def build(self, out: str | Path) -> dict:
        """Write every set under ``out`` (one shard directory each) and ``manifest.json``; returns the manifest."""
        out = Path(out)
        cfg = self.cfg
        pools = self._pools()
        manifest: dict[str, Any] = {
            "format": "gearshift-longctx/1",
            "config": {**asdict(cfg), "sets": [asdict(s) for s in cfg.sets]},
            "inputs": {
                s: {"turns": len(self.turns[s]), "passages": len(self.passages[s]), "groups": len(self.groups[s])}
                for s in SPLITS
            },
            "excluded": self.excluded,
            "guard": self.guard.describe() if self.guard is not None else None,
            "sets": {},
        }
        docs: dict[str, list[_Doc]] = {}
        for i, spec in enumerate(cfg.sets):
            rng = np.random.default_rng([cfg.seed, i, 7919])
            docs[spec.name] = [self._compose(rng, spec, kind, pools[spec.split]) for kind in self._kinds(rng, spec)]
        self._close_conversations(docs, pools)
        for spec in cfg.sets:
            target = out / spec.name
            if target.exists():
                for f in target.iterdir():
                    f.unlink()
            lengths = []
            with TokenShardWriter(
                target, vocab_size=self.vocab_size, shard_tokens=1 << 62, meta={"set": spec.name}
            ) as writer:
                for d in docs[spec.name]:
                    writer.add(d.tokens, prompt_len=0)
                    lengths.append(int(d.tokens.size))
                writer.flush(kinds=[d.kind for d in docs[spec.name]])
            kinds = [d.kind for d in docs[spec.name]]
            manifest["sets"][spec.name] = {
                "split": spec.split,
                "sequences": len(lengths),
                "tokens": int(sum(lengths)),
                "min_len": min(lengths, default=0),
                "max_len": max(lengths, default=0),
                "kinds": {k: kinds.count(k) for k in KINDS if k in kinds},
            }
            self.log(f"longctx {spec.name}: {len(lengths)} documents, {sum(lengths)} tokens")
        manifest["groups"] = {s: sorted(self.groups[s]) for s in SPLITS}
        manifest = json.loads(json.dumps(manifest))  # as it reads back (tuples are lists in JSON)
        atomic_write_json(out / MANIFEST, manifest)
        return manifest

    def _pools(self) -> dict[str, dict[str, Any]]:
        """Per split: turns with their token counts, passages (local text and teacher answers) as tokens."""
        pools = {}
        for split in SPLITS:
            turns = sorted(self.turns[split], key=lambda t: (t.group, t.user, t.assistant))  # input order free
            texts = [p.text for p in sorted(self.passages[split], key=lambda p: (p.group, p.text))]
            texts += [t.assistant for t in turns]
            users, answers = self._encode([t.user for t in turns]), self._encode([t.assistant for t in turns])
            counts = [u.size + a.size for u, a in zip(users, answers, strict=True)]
            pools[split] = {
                "turns": turns,
                "turn_tokens": np.asarray(counts, dtype=np.int64),
                "texts": texts,
                "passages": self._encode(texts),
            }
        return pools

    def _kinds(self, rng: np.random.Generator, spec: SetSpec) -> list[str]:
        """``spec.count`` kinds in the mix's proportions (largest remainders), in a seeded random order."""
        kinds = [k for k in KINDS if spec.mix.get(k, 0) > 0]
        w = np.array([spec.mix[k] for k in kinds], dtype=float)
        exact = w / w.sum() * spec.count
        n = np.floor(exact).astype(int)
        for j in np.argsort(-(exact - n), kind="stable")[: spec.count - int(n.sum())]:
            n[j] += 1
        out = [k for k, c in zip(kinds, n, strict=True) for _ in range(c)]
        rng.shuffle(out)
        return out

    def _compose(self, rng: np.random.Generator, spec: SetSpec, kind: str, pool: dict) -> _Doc:
        lo, hi = spec.lengths
        length = int(rng.integers(lo, hi + 1))
        if kind == "conversation":
            return self._conversation(rng, pool, length, rng.random() < spec.closing and self.complete is not None)
        if not pool["passages"]:
            raise LongContextError(f"set {spec.name}: no {spec.split} passages to compose {kind} documents from")
        build = {"kv_recall": self._kv_recall, "repeat": self._repeat, "multi_doc": self._multi_doc}[kind]
        tokens = build(rng, pool, length)
        assert tokens.size == length, (kind, tokens.size, length)
        return _Doc(kind, tokens=tokens, length=length)

    def _filler(self, rng: np.random.Generator, pool: dict, budget: int) -> list[np.ndarray]:
        """Random passages joined by blank lines, exactly ``budget`` tokens (the last one cut)."""
        out: list[np.ndarray] = []
        n = 0
        passages = pool["passages"]
        while n < budget:
            piece = np.concatenate([self._sep, passages[int(rng.integers(len(passages)))]])
            piece = piece[: budget - n]
            out.append(piece)
            n += piece.size
        return out

    def _kv_recall(self, rng: np.random.Generator, pool: dict, length: int) -> np.ndarray:
        names = _Names(rng)
        lo, hi = self.cfg.facts
        n_facts = int(rng.integers(lo, hi + 1))
        filled = [(*FACTS[int(rng.integers(len(FACTS)))], names.fields()) for _ in range(n_facts)]
        lo, hi = self.cfg.questions
        n_q = int(rng.integers(lo, hi + 1))
        intro = self._encode([KV_INTRO])[0]
        while True:  # fewer facts when a short document cannot hold them all
            facts = self._encode([" " + f.format(**v) for f, _, _, v in filled])
            asked = [0, *(1 + rng.permutation(len(filled) - 1)[: n_q - 1])]  # the earliest fact: the farthest recall
            qa = "".join(
                f"Question: {q.format(**v)}\nAnswer: {a.format(**v)}\n" for _, q, a, v in (filled[i] for i in asked)
            )
            tail = self._encode(["\n\n" + qa])[0]
            budget = length - intro.size - tail.size - sum(f.size for f in facts)
            if budget >= 0 or len(filled) == 1:
                break
            filled.pop()
        if budget < 0:
            raise LongContextError(f"a key-value document of {length} tokens cannot hold one fact and its question")
        pieces = self._filler(rng, pool, budget)
        slots = np.sort(rng.integers(0, int(0.9 * len(pieces)) + 1, len(facts)))  # depths 0-90%, in order
        body: list[np.ndarray] = []
        k = 0
        for j, piece in enumerate([*pieces, np.zeros(0, dtype=np.int64)]):
            while k < len(facts) and slots[k] == j:
                body.append(facts[k])
                k += 1
            body.append(piece)
        return np.concatenate([intro, *body, tail])

    def _repeat(self, rng: np.random.Generator, pool: dict, length: int) -> np.ndarray:
        intro, ask = self._encode([REPEAT_INTRO, REPEAT_ASK])
        lo, hi = self.cfg.repeat_tokens
        want = min(int(rng.integers(lo, hi + 1)), max((length - intro.size - ask.size) // 3, 1))
        passage = np.concatenate(self._filler(rng, pool, want + self._sep.size))[self._sep.size :]
        budget = length - intro.size - ask.size - 2 * passage.size
        if budget < 0:
            raise LongContextError(f"a repeat document of {length} tokens is too short")
        filler = self._filler(rng, pool, budget)
        return np.concatenate([intro, passage, *filler, ask, passage])

    def _multi_doc(self, rng: np.random.Generator, pool: dict, length: int) -> np.ndarray:
        names = _Names(rng)
        intro = self._encode([MULTI_INTRO])[0]
        docs: list[tuple[str, int, int]] = []  # (title, passage index, end offset)
        parts: list[np.ndarray] = [intro]
        used = intro.size
        while used < length:  # documents over the whole length; the questions' room is cut from the end below
            kind = ["Report", "Letter", "Notes", "Article", "Chronicle"][int(rng.integers(5))]
            title = f"The {names.word()} {kind}"
            j = int(rng.integers(len(pool["passages"])))
            head = self._encode([f"Document {len(docs) + 1}: {title}\n"])[0]
            piece = np.concatenate([head, pool["passages"][j][: length // 4], self._sep])  # several per document
            parts.append(piece)
            used += piece.size
            docs.append((title, j, used))
        asks = []
        for i, (title, j, _) in enumerate(docs):
            opening = " ".join(pool["texts"][j].split()[:8])
            asks.append(
                (
                    f"Question: What is the title of document {i + 1}?\nAnswer: {title}\n",
                    f'Question: Which document begins with "{opening}"?\nAnswer: Document {i + 1}\n',
                )
            )
        sizes = [max(x.size for x in self._encode(list(a))) for a in asks]
        lo, hi = self.cfg.questions
        n_q = int(rng.integers(lo, hi + 1))
        while True:  # the questions fit after any document ending before `bound` (fewer questions if none does)
            bound = length - sum(sorted(sizes)[-n_q:])
            eligible = [i for i, (_, _, end) in enumerate(docs) if end <= bound]
            if eligible or n_q == 1:
                break
            n_q -= 1
        if not eligible:
            raise LongContextError(f"a multi-document text of {length} tokens cannot hold a document and questions")
        picks = [eligible[int(i)] for i in rng.integers(0, len(eligible), n_q)]
        tail = self._encode(["\n\n" + "".join(asks[i][q % 2] for q, i in enumerate(picks))])[0]
        body = np.concatenate(parts)[: length - tail.size]
        return np.concatenate([body, tail])

    # ------------------------------------------------------------------ conversations
    def _conversation(self, rng: np.random.Generator, pool: dict, length: int, closing: bool) -> _Doc:
        turns, counts = pool["turns"], pool["turn_tokens"]
        if len(turns) < 2:
            raise LongContextError("conversations need at least two teacher exchanges in the split")
        order = iter(rng.permutation(len(turns)).tolist() * 64)
        overhead = 8  # chat-template tokens per exchange, a rough count (rendering decides)
        depth = rng.uniform(0.5, 0.9) * length - (self.cfg.closing_tokens if closing else 0)
        before: list[Turn] = []
        n = 0
        while n < max(depth, 1) or len(before) < 2:
            i = next(order)
            before.append(turns[i])
            n += int(counts[i]) + overhead
        after: list[Turn] = []
        while n < length + 64:
            i = next(order)
            after.append(turns[i])
            n += int(counts[i]) + overhead
        messages = [
            m
            for t in before
            for m in ({"role": "user", "content": t.user}, {"role": "assistant", "content": t.assistant})
        ]
        if not closing:
            return self._render(_Doc("conversation", messages=messages, after=after, length=length, order=order), turns)
        early = before[int(rng.integers(max(1, len(before) // 3)))]
        q = CLOSING[int(rng.integers(len(CLOSING)))].format(q=early.user.strip())
        messages.append({"role": "user", "content": q})
        prefix = self._encode([self._chat(messages, generation=True)])[0]
        budget = length - self.cfg.closing_tokens
        while prefix.size > budget and len(messages) > 3:  # the estimate ran long: drop exchanges before the question
            del messages[-3:-1]
            prefix = self._encode([self._chat(messages, generation=True)])[0]
        return _Doc("conversation", messages=messages, after=after, prefix=prefix.tolist(), length=length, order=order)

    def _close_conversations(self, docs: dict[str, list[_Doc]], pools: dict) -> None:
        """The teacher answers every closing question (one batched call, longest prefixes first), then each
        conversation is rendered to its length."""
        waiting = [d for ds in docs.values() for d in ds if d.prefix is not None]
        if waiting:
            self.log(f"longctx: the teacher answers {len(waiting)} recall questions")
            order = sorted(range(len(waiting)), key=lambda i: -len(waiting[i].prefix))
            answers = self.complete([waiting[i].prefix for i in order], self.cfg.closing_tokens)
            for i, ans in zip(order, answers, strict=True):
                text = self.tok.decode(trim_repetition(list(ans)), skip_special_tokens=True).strip()
                waiting[i].messages.append({"role": "assistant", "content": text or "I do not remember."})
        for spec in self.cfg.sets:
            turns = pools[spec.split]["turns"]
            for d in docs[spec.name]:
                if d.tokens is None:
                    self._render(d, turns)

    def _render(self, doc: _Doc, turns: list[Turn]) -> _Doc:
        """The conversation's tokens (messages, then the exchanges after), exactly ``doc.length`` of them."""
        after = list(doc.after or [])
        while True:
            msgs = doc.messages + [
                m
                for t in after
                for m in ({"role": "user", "content": t.user}, {"role": "assistant", "content": t.assistant})
            ]
            tokens = self._encode([self._chat(msgs, generation=False)])[0]
            if tokens.size >= doc.length:
                break
            after.append(turns[next(doc.order)])
        if tokens.size < doc.length:
            raise LongContextError(f"a conversation came out {tokens.size} tokens long, {doc.length} wanted")
        doc.tokens = tokens[: doc.length]
        return doc


def trim_repetition(tokens: Sequence[int], n: int = 8, times: int = 3) -> list[int]:
    """A completion cut where it falls into a loop: before the ``times``-th occurrence of any ``n``-token run.
    A small teacher sampled long enough repeats itself ("How to answer: How to answer: ..."); the loop teaches
    nothing a student should carry."""
    seen: dict[tuple[int, ...], int] = {}
    for i in range(len(tokens) - n + 1):
        key = tuple(tokens[i : i + n])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] == times:
            return list(tokens[:i])
    return list(tokens)


def read_manifest(path: str | Path) -> dict:
    file = Path(path) / MANIFEST
    if not file.exists():
        raise LongContextError(f"{path}: no {MANIFEST} (not a long-context build)")
    return json.loads(file.read_text())


def turns_from_traces(path: str | Path, prompts: dict[str, str], tokenizer: Any) -> list[Turn]:
    """Exchanges of a trace directory: ``prompts`` maps each prompt's hash (``traces.prompt_hash`` of its tokens)
    to the user's text; the answer is the completion decoded without special tokens."""
    from ..train.traces import prompt_hash

    out = []
    for seq in TokenShards(path):
        ids = seq.tokens.astype(np.int64).tolist()
        h = prompt_hash(ids[: seq.prompt_len])
        if h not in prompts:
            raise LongContextError(f"{path}: a trace whose prompt is not among the given prompts")
        answer = tokenizer.decode(ids[seq.prompt_len :], skip_special_tokens=True).strip()
        out.append(Turn(prompts[h], answer, group=h))
    return out
