"""What the build measures on held-out data: KL to the teacher at fixed lengths, benchmark scores with standard
errors and paired retention, needle retention, and self-speculative acceptance through the serving engine.

Standard errors: a placement's KL at a length is a mean over held-out documents, its standard error that of the
per-document means. Benchmark and NIAH retention (a preset's mean score over the teacher's) is a ratio of two means
over the *same* items, so its standard error comes from the delta method with the paired covariance: items where
both are right or both wrong add no noise to the comparison.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.tokens import TokenShards


def load_documents(path: str | Path, limit: int | None = None) -> list[np.ndarray]:
    shards = TokenShards(path)
    n = len(shards) if limit is None else min(limit, len(shards))
    return [shards[i].tokens.astype(np.int64) for i in range(n)]


def _mean_se(x: Sequence[float]) -> tuple[float, float | None]:
    a = np.asarray(x, dtype=float)
    if a.size == 0:
        return float("nan"), None
    return float(a.mean()), (float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else None)


@torch.no_grad()
def kl_table(
    student: Any,
    teacher: Any,
    sets: Mapping[str, Sequence[np.ndarray]],
    placements: Mapping[str, Any],
    *,
    batch_tokens: int = 16384,
    chunk: int = 2048,
) -> dict[str, dict[str, dict[str, float | None]]]:
    """{placement: {set: {kl, kl_se, agreement, tokens, documents}}}: KL(teacher || placement) per position, every
    position of every document (the teacher: ``teacher``'s all-attention path), the mean per document first."""
    device = student.device
    resolved = {name: student.resolve(p) for name, p in placements.items()}
    per_doc: dict[str, dict[str, list[tuple[float, float, int]]]] = {n: {s: [] for s in sets} for n in resolved}
    for set_name, docs in sets.items():
        if not docs:
            continue
        length = max(d.size for d in docs)
        rows = max(1, batch_tokens // length)
        for b in range(0, len(docs), rows):
            group = docs[b : b + rows]
            if len({d.size for d in group}) != 1:
                raise ValueError(f"set {set_name}: documents of one batch differ in length")
            ids = torch.from_numpy(np.stack(group)).to(device)
            ref = teacher(ids, "all-attention")
            for name, placement in resolved.items():
                out = student(ids, placement)
                kl = torch.zeros(len(group), dtype=torch.float64, device=device)
                agree = torch.zeros(len(group), dtype=torch.float64, device=device)
                for s in range(0, ids.shape[1], chunk):  # [rows, chunk, vocab] in fp32 at a time
                    t = F.log_softmax(ref[:, s : s + chunk].float(), -1)
                    q = F.log_softmax(out[:, s : s + chunk].float(), -1)
                    kl += (t.exp() * (t - q)).sum(-1).sum(-1).double()
                    agree += (t.argmax(-1) == q.argmax(-1)).sum(-1).double()
                n = ids.shape[1]
                for k, a in zip((kl / n).tolist(), (agree / n).tolist(), strict=True):
                    per_doc[name][set_name].append((max(k, 0.0), a, n))
                del out
            del ref
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for name, by_set in per_doc.items():
        table[name] = {}
        for set_name, rows_ in by_set.items():
            kl, se = _mean_se([r[0] for r in rows_])
            agree, _ = _mean_se([r[1] for r in rows_])
            table[name][set_name] = {
                "kl": kl,
                "kl_se": se,
                "agreement": agree,
                "tokens": int(sum(r[2] for r in rows_)),
                "documents": len(rows_),
            }
    return table


def gap_closed(before: float, after: float, floor: float = 1e-6) -> float | None:
    """1 - after / before: the share of the KL gap to the teacher that training closed (None: no gap before)."""
    return None if before is None or after is None or before <= floor else 1.0 - after / before


# ------------------------------------------------------------------------------------------ paired retention
def ratio_stats(preset: Mapping[str, Sequence[float]], base: Mapping[str, Sequence[float]]) -> dict[str, float | None]:
    """Mean over groups (tasks) of the per-item means, for a preset and the baseline on the same items, their
    standard errors, and the retention preset / baseline with its delta-method standard error (paired)."""
    groups = [g for g in base if g in preset]
    if not groups:
        return {"score": None, "score_se": None, "base": None, "base_se": None, "retention": None, "retention_se": None}
    var_p = var_b = cov = 0.0
    mp = mb = 0.0
    for g in groups:
        p, b = np.asarray(preset[g], dtype=float), np.asarray(base[g], dtype=float)
        if p.shape != b.shape:
            raise ValueError(f"{g}: the preset and the baseline were scored on different items")
        n = p.size
        mp, mb = mp + p.mean(), mb + b.mean()
        if n > 1:
            var_p += p.var(ddof=1) / n
            var_b += b.var(ddof=1) / n
            cov += np.cov(p, b, ddof=1)[0, 1] / n
    k = len(groups)
    mp, mb = mp / k, mb / k
    var_p, var_b, cov = var_p / k**2, var_b / k**2, cov / k**2
    mp, mb, var_p, var_b, cov = (float(x) for x in (mp, mb, var_p, var_b, cov))  # plain floats: JSON, bools
    out: dict[str, float | None] = {"score": mp, "score_se": math.sqrt(var_p), "base": mb, "base_se": math.sqrt(var_b)}
    if mb > 0:
        r = mp / mb
        out["retention"] = r
        out["retention_se"] = math.sqrt(max(var_p - 2 * r * cov + r * r * var_b, 0.0)) / mb
    else:
        out["retention"] = out["retention_se"] = None
    return out


def task_correct(scorer: Any, examples: Mapping[str, Sequence[Any]], placement: Any) -> dict[str, dict[str, Any]]:
    """Per task: the primary metric, accuracy, its binomial standard error, and 0/1 per item."""
    from ..evals.tasks import primary_metric, score_multiple_choice

    out = {}
    for task, exs in examples.items():
        res = score_multiple_choice(scorer, exs, placement)
        metric = primary_metric(task)
        preds = res.predictions_norm if metric == "acc_norm" else res.predictions
        correct = [int(p == ex.gold) for p, ex in zip(preds, exs, strict=True)]
        acc = sum(correct) / len(correct)
        se = math.sqrt(acc * (1 - acc) / (len(correct) - 1)) if len(correct) > 1 else None
        out[task] = {"metric": metric, "score": acc, "stderr": se, "n": len(correct), "correct": correct}
    return out


# ------------------------------------------------------------------------------------------ speculative decoding
@torch.no_grad()
def spec_acceptance(
    model: Any, prompts: Sequence[Sequence[int]], target: Any, draft: Any, *, k: int, max_tokens: int
) -> dict[str, float | int]:
    """Greedy self-speculative decoding of every prompt at once through the serving engine (``draft`` proposes,
    ``target`` verifies): accepted / proposed draft tokens, tokens per verify round, and whether each output equals
    the target's own greedy decoding in the same engine (exact in fp32; bf16 near-ties may flip)."""
    from ..serve.engine import Engine, SamplingParams

    context = max(map(len, prompts)) + max_tokens + k + 2
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=())

    def run(with_draft: bool) -> list:
        engine = Engine(
            model,
            max_batch=len(prompts),
            max_context=context,
            max_queue=len(prompts),
            spec_k_max=k,
            placements=[target, draft],
            pool_slots=2 * len(prompts),
            cuda_graphs=False,
        )
        reqs = [engine.submit(list(p), target, params, draft=draft if with_draft else None, spec_k=k) for p in prompts]
        engine.run()
        return reqs

    plain, spec = run(False), run(True)
    proposed, accepted, rounds = (sum(getattr(r, a) for r in spec) for a in ("proposed", "accepted", "rounds"))
    tokens = sum(len(r.output) for r in spec)
    return {
        "acceptance": accepted / max(proposed, 1),
        "proposed": proposed,
        "accepted": accepted,
        "rounds": rounds,
        "tokens_per_round": (tokens - len(spec)) / max(rounds, 1),
        "identical": sum(a.output == b.output for a, b in zip(plain, spec, strict=True)) / len(spec),
        "prompts": len(prompts),
        "prompt_tokens": int(np.mean([len(p) for p in prompts])),
    }
