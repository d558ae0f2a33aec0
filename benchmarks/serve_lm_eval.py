"""lm-eval scores a served preset, and the all-attention preset's multiple-choice accuracy through the server equals
`gearshift eval tasks` on the same items (issue 21's goal).

The items are `gearshift eval tasks`' own seeded sample (``load_examples(task, limit, seed)``), written as local
lm-eval task files (context; options with lm-eval's " " target delimiter, so acc_norm divides by the same option
characters). lm-eval 0.4.13 scores them through ``local-completions`` against a live `gearshift serve` (token-id
prompts, ``echo``, ``logprobs: 1``). `gearshift eval tasks` scores the same sample in process (``--eval-json``: its
tasks.json, else it is run here). Per item, the option each picks is compared too.

    gearshift convert smollm2 /tmp/smol                    # the real SmolLM2-135M teacher as a supernet (CPU)
    python benchmarks/serve_lm_eval.py /tmp/smol --tasks arc_easy,piqa --limit 60 \\
        --out benchmarks/results/serve_robustness_lm_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from live_server import ServerProcess

from common import write_json


def task_files(folder: Path, task: str, examples) -> str:
    """One lm-eval task (YAML + JSON lines) holding exactly these examples; returns its name."""
    name = f"gs_{task}"
    docs = []
    for ex in examples:
        contexts = {c for c, _ in ex.pairs}
        if len(contexts) != 1 or any(cont != " " + ans for (_, cont), ans in zip(ex.pairs, ex.answers, strict=True)):
            raise SystemExit(f"{task}: options are not ' ' + answer after one context; pick another task")
        docs.append({"context": ex.pairs[0][0], "choices": list(ex.answers), "gold": ex.gold})
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / (name + '.jsonl')}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: choices\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--tasks", default="arc_easy,piqa")
    p.add_argument("--limit", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-json", help="tasks.json of `gearshift eval tasks` with the same --tasks/--limit/--seed")
    p.add_argument("--max-context", type=int, default=1024)
    p.add_argument("--out", default="benchmarks/results/serve_robustness_lm_eval.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve_lm_eval_"))
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(work / "hf"))

    from gearshift.evals import load_examples

    tasks = args.tasks.split(",")
    examples = {t: load_examples(t, limit=args.limit, seed=args.seed) for t in tasks}
    if args.eval_json is None:
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "gearshift", "eval", "tasks", args.checkpoint, "--tasks", args.tasks]
        cmd += ["--limit", str(args.limit), "--seed", str(args.seed), "--device", "cpu", "--out", str(work / "eval")]
        subprocess.run(cmd, check=True)
        args.eval_json = str(work / "eval" / "tasks.json")
        print(f"gearshift eval tasks: {time.perf_counter() - t0:.0f} s", flush=True)
    doc = json.loads(Path(args.eval_json).read_text())
    baseline = next(r for r in doc["rows"] if r["preset"] == "all-attention")

    import lm_eval
    import lm_eval.models  # noqa: F401 - its registry is filled lazily only while empty
    from lm_eval.tasks import TaskManager

    folder = work / "tasks"
    folder.mkdir()
    names = {t: task_files(folder, t, examples[t]) for t in tasks}
    flags = ["--device", "cpu", "--max-context", str(args.max_context), "--max-batch", "16"]
    with ServerProcess(args.checkpoint, *flags, log=work / "server.log") as server:
        model_args = (
            f"base_url={server.url}/v1/completions,model=gearshift,tokenizer={args.checkpoint},"
            f"tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=4,batch_size=8,"
            f"max_length={args.max_context},max_retries=1,timeout=3600"
        )
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=model_args,
            tasks=list(names.values()),
            task_manager=TaskManager(include_path=str(folder), include_defaults=False),
            log_samples=True,
        )
        served_seconds = time.perf_counter() - t0
        health = server.health()
    rows = {}
    for task, name in names.items():
        res = out["results"][name]
        mine = baseline["details"].get(task, {})
        rows[task] = {
            "items": len(examples[task]),
            "served_acc": res["acc,none"],
            "served_acc_norm": res["acc_norm,none"],
            "eval_tasks_acc": mine.get("acc"),
            "eval_tasks_acc_norm": mine.get("acc_norm"),
            "eval_tasks_score": baseline["scores"].get(task),
        }
        rows[task]["equal"] = rows[task]["served_acc"] == rows[task]["eval_tasks_acc"] and (
            rows[task]["eval_tasks_acc_norm"] is None
            or rows[task]["served_acc_norm"] == rows[task]["eval_tasks_acc_norm"]
        )
        print(task, json.dumps(rows[task]), flush=True)
    report = {
        "checkpoint": args.checkpoint,
        "preset": "all-attention (the checkpoint's default placement, served as the bare model id)",
        "limit": args.limit,
        "seed": args.seed,
        "lm_eval": lm_eval.__version__,
        "served_seconds": round(served_seconds, 1),
        "server_health_after": health,
        "tasks": rows,
        "all_equal": all(r["equal"] for r in rows.values()),
        "eval_tasks_settings": doc.get("settings"),
    }
    write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
