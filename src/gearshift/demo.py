"""`gearshift demo`: the product end to end on an embedded tiny teacher, in about a minute on a CPU.

teacher (a small Llama built here, with a word-level tokenizer) -> Apriel2 supernet -> exact incremental decoding
for every placement -> teacher traces -> layer-local alignment -> stochastic distillation (KL to the teacher per
placement, before, aligned and after) -> presets and thinning -> the serving engine (one batch mixing presets,
self-speculative decoding) -> modelled costs of the paper's presets at the 15B shape.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .config import SupernetConfig
from .model import Supernet, thin
from .roofline import PAPER_PRESETS, format_reports, paper_placement, placement_report

VOCAB = 256
MARKER = ".gearshift-demo"  # marks a directory as a demo's own output, which the next run may clear
SPECIAL = ["<unk>", "<pad>", "<eos>", "<user>", "<assistant>", "<system>", "<end>"]


def tiny_tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer over ``w0 .. wN`` with a chat template (no download needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + [f"w{i}" for i in range(vocab - len(SPECIAL))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <end> {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    return fast


def tiny_teacher(vocab: int = VOCAB, hidden: int = 64, layers: int = 4, std: float = 0.15, seed: int = 0):
    """A small random Llama (token 2 = EOS, 1 = padding, tied embeddings), sharper than the default init so
    that mixers differ measurably."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        vocab_size=vocab,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        eos_token_id=2,
        pad_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name or "embed" in name:
                p.normal_(0, std)
    return model


def fresh_output(out: Path) -> None:
    """Start from an empty ``out``: a previous demo's output is cleared (its traces would be reused and its
    checkpoints resumed), anything else is refused rather than deleted."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        legacy = all((out / name).exists() for name in ("summary.json", "supernet", "traces"))  # before the marker
        if not ((out / MARKER).exists() or legacy):
            raise ValueError(f"{out} exists and is not a demo's output: give the demo another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `gearshift demo`; the next demo run clears this directory\n")


def run(out: str | Path, *, steps: int = 120, align_steps: int = 60) -> bool:
    from .serve.engine import Engine, SamplingParams
    from .train.config import config_from_dict
    from .train.convert import convert_teacher
    from .train.traces import Prompt, generate_traces
    from .train.trainer import Trainer

    torch.set_num_threads(1)  # tiny shapes: threads cost more than they give
    out = Path(out)
    fresh_output(out)
    t0 = time.perf_counter()
    teacher, tok = tiny_teacher(), tiny_tokenizer()
    model = convert_teacher(teacher, window=16)
    model.save_pretrained(out / "supernet")
    tok.save_pretrained(out / "supernet")
    loaded = Supernet.from_pretrained(out / "supernet")
    ids = torch.randint(len(SPECIAL), VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        teacher_gap = float((loaded(ids, "all-attention") - teacher(ids).logits).abs().max())
    n = model.config.num_layers
    print(
        f"1. converted a {n}-layer Llama teacher into a supernet ({loaded.num_parameters(all_mixers=True) / 1e6:.2f}M "
        f"parameters, 4 mixers per layer): all-attention vs teacher max |logit diff| {teacher_gap:.1e}"
    )

    print("\n2. exact incremental decoding (prefill 17, 1, then 22 tokens vs one full forward):")
    worst = 0.0
    for p in ["all-attention", "all-sliding_window", "all-gdn", "all-kda", "FSGK", "GKSF"]:
        with torch.no_grad():
            full = loaded(ids, p)
            cache = loaded.new_cache(2, p)
            parts = [loaded(ids[:, s : s + k], cache=cache) for s, k in ((0, 17), (17, 1), (18, 22))]
            diff = float((torch.cat(parts, 1) - full).abs().max())
        worst = max(worst, diff)
        print(f"   {p:<20} max |diff| {diff:.1e}, cache {cache.nbytes() / 1024:.1f} KiB")

    rng = torch.Generator().manual_seed(2)
    prompts = [
        Prompt(text=" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 7, (4,), generator=rng)))
        for _ in range(400)
    ]
    stats = generate_traces(loaded, tok, prompts, out / "traces", max_new_tokens=48, batch_size=64, temperature=1.0)
    print(
        f"\n3. teacher traces: {stats['new_sequences']} sequences, {stats['generated_tokens']} tokens "
        f"({stats['tokens_per_s']:.0f} tok/s)"
    )

    evals = ["all-attention", "all-sliding_window", "all-gdn", "all-kda", "FSGK"]

    def train_config(mode: str, model: Path, n: int, lr: float) -> dict:
        return {
            "model": str(model),
            "teacher": str(out / "supernet"),
            "output": str(out / mode),
            "mode": mode,
            "data": {"train": [str(out / "traces")], "seq_len": 32, "eval_sequences": 48},
            "optim": {
                "steps": n,
                "batch_size": 8,
                "lr": lr,
                "warmup_steps": 5,
                "dtype": "float32",
                # the sliding-window mixer stays the teacher's attention cut to its window: this toy teacher's
                # random attention is sharp, and training it (align or distill, small or large steps) only made its
                # KL worse here, so the demo keeps it frozen and checks that it is untouched
                "frozen_mixers": ["attention", "sliding_window"],
            },
            "sampler": {"kind": "uniform"},
            "eval": {"every": 0, "placements": evals},
            "checkpoint": {"every": n},
            "log_every": 10,
        }

    # alignment first (every mixer of every layer learns its layer's teacher output), then stochastic distillation
    quiet = dict(device="cpu", log=lambda *a, **k: None)
    aligner = Trainer(config_from_dict(train_config("align", out / "supernet", align_steps, 1e-2)), **quiet)
    before = aligner.evaluate()
    aligner.run()
    aligned = aligner.evaluate()
    trainer = Trainer(config_from_dict(train_config("distill", out / "align" / "final", steps, 3e-3)), **quiet)
    trainer.run()
    after = trainer.evaluate()
    print(
        f"\n4. alignment ({align_steps} steps), then stochastic distillation ({steps} steps) of the GDN and KDA mixers "
        "(sliding window: the teacher's attention cut to 16 tokens, frozen): KL to the teacher on held-out traces, "
        "before -> aligned -> distilled:"
    )
    for p in evals:
        print(
            f"   {p:<20} {before[p]['kl']:.4f} -> {aligned[p]['kl']:.4f} -> {after[p]['kl']:.4f}   "
            f"top-1 agreement {before[p]['agreement']:.2f} -> {after[p]['agreement']:.2f}"
        )

    student = Supernet.from_pretrained(out / "distill" / "final")
    student.add_preset("quality", "FFSF", note="attention-heavy")
    student.add_preset("balanced", "FSGK")
    student.add_preset("fast", "GGKG")
    student.save_pretrained(out / "distill" / "final")
    thin(student, ["quality", "fast"], out / "thinned")
    thinned = Supernet.from_pretrained(out / "thinned")
    print(
        f"\n5. presets {sorted(student.presets)}; thinned to quality+fast: "
        f"{thinned.num_parameters(all_mixers=True) / 1e6:.2f}M parameters (from "
        f"{student.num_parameters(all_mixers=True) / 1e6:.2f}M)"
    )

    engine = Engine(student, max_batch=8)
    params = SamplingParams(max_tokens=12, stop_token_ids=())
    prompts_ids = [tok(p.text)["input_ids"] for p in prompts[:4]]
    reqs = [
        engine.submit(p, preset, params)
        for p, preset in zip(prompts_ids, ["quality", "balanced", "fast", "all-kda"], strict=True)
    ]
    spec = engine.submit(prompts_ids[0], "quality", params, draft="balanced", spec_k=3)
    engine.run()
    mixed_ok = all(
        r.output
        == student.generate([r.prompt], r.placement, max_new_tokens=12, eos_token_id=[])[0, len(r.prompt) :].tolist()
        for r in reqs
    )
    print(
        f"\n6. engine: one batch mixing 4 presets, each request identical to running alone: {mixed_ok}; "
        f"speculative (quality verifies, balanced drafts) identical to plain: {spec.output == reqs[0].output}, "
        f"acceptance {spec.acceptance:.2f}"
    )

    print("\n7. modelled decode cost of the paper's presets on the 15B-shaped supernet, 32k context, batch 64 (H200):")
    big = SupernetConfig.apriel_15b()
    print(
        format_reports(
            [placement_report(big, paper_placement(name), context=32768, batch=64) for name in PAPER_PRESETS]
        )
    )
    trained = ["all-gdn", "all-kda", "FSGK"]
    checks = {
        "converted all-attention matches the teacher": teacher_gap < 1e-3,
        "incremental decoding matches a full forward for every placement": worst < 1e-3,
        "traces were generated": stats["new_sequences"] > 0 and stats["generated_tokens"] > 0,
        "all-attention stays the teacher (KL < 1e-6)": after["all-attention"]["kl"] < 1e-6,
        "frozen sliding window unchanged": abs(after["all-sliding_window"]["kl"] - before["all-sliding_window"]["kl"])
        < 1e-6,
        f"training lowered the KL of {', '.join(trained)}": all(after[p]["kl"] < before[p]["kl"] for p in trained),
        "distillation lowered the KL of all-gdn, all-kda below alignment's": all(
            after[p]["kl"] < aligned[p]["kl"] for p in ("all-gdn", "all-kda")
        ),
        "engine: a mixed batch matches each request alone": mixed_ok,
        "speculative decoding matches plain decoding": spec.output == reqs[0].output,
    }
    ok = all(checks.values())
    summary = {
        "checks": checks,
        "exact_decoding_worst": worst,
        "teacher_gap": teacher_gap,
        "kl_before": before,
        "kl_aligned": aligned,
        "kl_after": after,
        "engine_mixed_ok": mixed_ok,
        "spec_acceptance": spec.acceptance,
        "seconds": time.perf_counter() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\nchecks:")
    for name, passed in checks.items():
        print(f"   {'ok    ' if passed else 'FAILED'} {name}")
    verdict = "all checks passed" if ok else f"{sum(not v for v in checks.values())} check(s) FAILED"
    print(f"\n{verdict} ({summary['seconds']:.0f} s; summary in {out / 'summary.json'})")
    return ok
