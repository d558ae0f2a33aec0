"""``gearshift build``: teacher -> supernet -> data -> align -> distill -> KL -> placements -> presets -> evaluations.

One command on one GPU, because the trained weights never leave the machine: every measurement that needs them
runs in the same build, and what comes back are small result files (``RUN/results/``). Stages, in order:

==============  ====================================================================================================
teacher         load the teacher, convert it to a supernet (window from the recipe), check all-attention's logits
preflight       forward + backward of every mixer on the device (kernel compiles; PyTorch path if a kernel fails)
traces          teacher answers to chat prompts (topics x templates, questions of unscored sets), train / held out
longctx         long documents (``gearshift.data.longctx``): curriculum sets for training, held-out KL/recall/place
kl_before       KL to the teacher of the converted supernet at each held-out length
align_short ..  the recipe's training stages (alignment, then distillation on short, then long documents)
kl_after        KL after training; all-attention must still be the teacher
place           placements measured on long held-out documents (stratified, every mixer, paper mixes)
presets         surrogate fit, exact DP presets at the target speed-ups (modelled decode at 8k), their KL
tasks           the multiple-choice tasks, teacher and presets, standard errors and paired retention
spec            self-speculative acceptance per draft token, presets drafting for all-attention, at 1k and 8k
niah            needle in a haystack up to 8k, lengths x depths x trials per preset, relative to the teacher
==============  ====================================================================================================

Each stage writes its result when it ends (``stages.StageLog``); a second run of the same command skips finished
stages, and a failed stage skips only the stages that need its output. After every stage the goals table
(``goals.py``) is recomputed and ``RUN/results/`` rewritten, so a hold that runs out of time keeps what finished.
"""

from __future__ import annotations

import copy
import gc
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import envs
from ..data.tokens import atomic_write_json
from .recipe import Recipe
from .stages import StageLog


class BuildError(ValueError):
    """A build that cannot start (bad arguments, missing inputs)."""


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Build:
    def __init__(
        self,
        recipe: Recipe,
        run: str | Path,
        *,
        teacher: str | None = None,
        device: str | None = None,
        data_dir: str | Path | None = None,
        haystack: str | Path | None = None,
        texts: list[str] | None = None,
        minutes: float | None = None,
        budget_minutes: float | None = None,
        redo: list[str] | None = None,
        skip: list[str] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.recipe = recipe
        self.run_dir = Path(run)
        self.teacher_source = teacher
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if self.device.type == "cpu" and recipe.name == "tiny":
            torch.set_num_threads(1)  # tiny shapes: threads cost more than they give
        self.data_dir = data_dir
        self.haystack = haystack
        self.texts = list(texts or [])
        self.minutes = recipe.minutes if minutes is None else minutes
        self.budget_minutes = budget_minutes
        self.skip = set(skip or [])
        self.log = log
        self.t0 = time.perf_counter()
        self.stages = StageLog(self.run_dir)
        self.results: dict[str, dict] = {}
        self.status: dict[str, str] = {}
        self._guard = None
        names = self.stage_names()
        unknown = sorted(set(redo or []) - set(names)) + sorted(self.skip - set(names))
        if unknown:
            raise BuildError(f"unknown stage(s) {unknown}; stages: {', '.join(names)}")
        for name in redo or []:  # this stage and every later one run again, from scratch
            for later in names[names.index(name) :]:
                self.stages.forget(later)
                for path in self.outputs(later):
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ layout
    @property
    def supernet(self) -> Path:
        return self.run_dir / "supernet"

    @property
    def data(self) -> Path:
        return self.run_dir / "data"

    @property
    def longctx(self) -> Path:
        return self.data / "longctx"

    @property
    def results_dir(self) -> Path:
        return self.run_dir / "results"

    def train_name(self, i: int) -> str:
        s = self.recipe.stages[i]
        return f"{s.mode}_{s.data}"

    @property
    def final(self) -> Path:
        return self.run_dir / "train" / self.train_name(len(self.recipe.stages) - 1) / "final"

    def outputs(self, name: str) -> list[Path]:
        """What a stage writes that a rerun must not resume from (traces and trainers resume by design)."""
        if name == "traces":
            return [self.data / "prompts.json", *self.data.glob("traces_*")]
        if name == "longctx":
            return [self.longctx]
        if name == "place":
            return [self.run_dir / "place"]
        if name in [self.train_name(i) for i in range(len(self.recipe.stages))]:
            return [self.run_dir / "train" / name]
        return []

    def stage_names(self) -> list[str]:
        train = [self.train_name(i) for i in range(len(self.recipe.stages))]
        first = ["teacher", "preflight", "traces", "longctx", "kl_before"]
        return [*first, *train, "kl_after", "place", "presets", "tasks", "spec", "niah"]  # spec is short: before NIAH

    def needs(self) -> dict[str, list[str]]:
        train = [self.train_name(i) for i in range(len(self.recipe.stages))]
        out = {
            "teacher": [],
            "preflight": ["teacher"],
            "traces": ["teacher"],
            "longctx": ["traces"],
            "kl_before": ["longctx"],
            "kl_after": [train[-1]],
            "place": [train[-1]],
            "presets": ["place"],
            "tasks": ["presets"],
            "niah": ["presets"],
            "spec": ["presets"],
        }
        for i, name in enumerate(train):
            out[name] = ["longctx", "preflight"] + ([train[i - 1]] if i else [])
        return out

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        needs = self.needs()
        fns = self._stage_functions()
        for name in self.stage_names():
            previous = self.stages.done(name)
            if previous is not None:
                self.results[name], self.status[name] = previous, "ok"
                self.stages.event(name, "skip", reason="done before")
                self._restore(name)
                continue
            blocked = [n for n in needs[name] if self.status.get(n) != "ok"]
            if name in self.skip or blocked:
                self.status[name] = "skipped"
                self.stages.event(name, "skip", reason="asked" if name in self.skip else f"needs {blocked}")
                continue
            self.status[name], self.results[name] = self.stages.run(name, fns[name], self.log)
            _release(self.device)
            self.write_results()
        summary = self.write_results()
        self.stages.event("build", "done", minutes=round((time.perf_counter() - self.t0) / 60, 2))
        return summary

    def _restore(self, name: str) -> None:
        """Side effects of a finished stage that later stages rely on (a resumed build starts a new process)."""
        if name == "preflight" and self.results[name].get("train_backend") == "torch":
            envs.assign(TRAIN_BACKEND="torch")

    def _stage_functions(self) -> dict[str, Callable[[], dict]]:
        fns: dict[str, Callable[[], dict]] = {
            "teacher": self.stage_teacher,
            "preflight": self.stage_preflight,
            "traces": self.stage_traces,
            "longctx": self.stage_longctx,
            "kl_before": lambda: self.stage_kl(self.supernet),
            "kl_after": lambda: self.stage_kl(self.final, check_attention=True),
            "place": self.stage_place,
            "presets": self.stage_presets,
            "tasks": self.stage_tasks,
            "niah": self.stage_niah,
            "spec": self.stage_spec,
        }
        for i in range(len(self.recipe.stages)):
            fns[self.train_name(i)] = lambda i=i: self.stage_train(i)
        return fns

    def write_results(self) -> dict[str, Any]:
        from .goals import summarize

        summary = summarize(self)
        out = self.results_dir
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "summary.json", summary)
        (out / "summary.md").write_text(summary["markdown"])
        details = {name: _compact(r) for name, r in self.results.items()}
        atomic_write_json(out / "build.json", {"status": self.status, "stages": details})
        for src, dst in ((self.run_dir / "stages.log", "stages.log"), (self.run_dir / "place" / "table.jsonl", None)):
            if src.exists():
                shutil.copyfile(src, out / (dst or src.name))
        return summary

    # ------------------------------------------------------------------ shared pieces
    def model(self, path: Path, **kw: Any):
        from ..model import Supernet

        return Supernet.from_pretrained(path, device=self.device, dtype=self.dtype, **kw).eval()

    def tokenizer(self):
        from ..checkpoint import load_tokenizer

        tok = load_tokenizer(self.supernet)
        if tok is None:
            raise BuildError(f"{self.supernet}: no tokenizer (the teacher stage writes one)")
        return tok

    def guard(self):
        """The evaluation-text guard: haystack, needle, scored task items (built once per process)."""
        if self._guard is None:
            from ..data.guard import EvalTextGuard, evaluation_guard, needle_phrases
            from ..evals.errors import EvalError

            try:
                self._guard = evaluation_guard(haystack=self.haystack, data_dir=self.data_dir, tasks=self.recipe.tasks)
            except EvalError:
                if self.recipe.name != "tiny":
                    raise
                self._guard = EvalTextGuard()  # the smoke run without evaluation data: the needle only
                for phrase in needle_phrases():
                    self._guard.add_phrase(phrase, "niah:needle")
        return self._guard

    def kl_placements(self, n_layers: int) -> dict[str, str]:
        from ..roofline import paper_placement

        out = {p: p for p in ("all-attention", "all-sliding_window", "all-gdn", "all-kda")}
        for paper in self.recipe.kl_mixes:  # the paper's mixes, scaled to this depth: "Reg|Lklhd-26" -> reg-26
            out["reg-" + paper.rsplit("-", 1)[1]] = paper_placement(paper, n_layers)
        return out

    def cost_terms(self):
        """Modelled decode cost per layer and mixer at the recipe's operating point (8k tokens, batch 64), and
        the placement space it is over."""
        if getattr(self, "_costs", None) is None:
            from ..checkpoint import read_config
            from ..search.cost_sources import CostTerms, modelled_costs
            from ..search.space import PlacementSpace

            config, _ = read_config(self.supernet)
            r = self.recipe
            self.space = PlacementSpace.from_config(config)
            model = modelled_costs(config, batch=r.cost_batch, context=r.cost_context)
            self._costs = CostTerms.from_model(model, self.space)
        return self._costs

    def single_speedups(self) -> dict[str, float]:
        """Modelled decode speed-up over all-attention of the single-mixer placements (empty before the teacher)."""
        if not (self.supernet / "config.json").exists():
            return {}
        costs = self.cost_terms()
        letters = list(self.space.letters)
        total = costs.total(self.space.encode([c * self.space.n_layers for c in letters]))
        ref = total[letters.index("F")]
        names = {"F": "all-attention", "S": "all-sliding_window", "G": "all-gdn", "K": "all-kda"}
        return {names[c]: float(ref / t) for c, t in zip(letters, total, strict=True)}

    def elapsed_minutes(self) -> float:
        return (time.perf_counter() - self.t0) / 60

    # ------------------------------------------------------------------ stages
    def stage_teacher(self) -> dict:
        from ..train.convert import convert_teacher

        t0 = time.perf_counter()
        if self.teacher_source in (None, "tiny") and self.recipe.name == "tiny":
            from .tiny import byte_tokenizer, tiny_teacher

            hf, tok, source = tiny_teacher(), byte_tokenizer(), "built-in tiny Llama"
        else:
            from ..train.teacher import load_teacher, resolve_teacher_path

            source = self.teacher_source or "smollm2"
            hf, tok = load_teacher(source)
            source = str(resolve_teacher_path(source))
        load_s = time.perf_counter() - t0
        model = convert_teacher(hf.float().cpu(), window=self.recipe.window)
        text = "Question: Why do leaves change colour in autumn?\nAnswer: " * 40
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:256]])
        with torch.no_grad():
            diff = float((model(ids, "all-attention") - hf(ids).logits).abs().max())
        model.save_pretrained(self.supernet)
        tok.save_pretrained(self.supernet)
        cfg = model.config
        return {
            "source": source,
            "load_s": load_s,
            "layers": cfg.num_layers,
            "context": cfg.max_position_embeddings,
            "window": self.recipe.window,
            "parameters": model.num_parameters(all_mixers=True),
            "teacher_parameters": model.num_parameters("all-attention"),
            "max_abs_logit_diff": diff,
        }

    def stage_preflight(self) -> dict:
        """Forward + backward of every mixer on the device before long work, so a kernel that cannot train here
        fails in seconds; on a kernel failure training moves to the PyTorch path (GEARSHIFT_TRAIN_BACKEND=torch;
        inference keeps the kernels) and the check runs again."""
        from ..ops.dispatch import kernel_gradient_checks

        probe = self.model(self.supernet).float().train()
        ids = torch.randint(0, probe.config.vocab_size, (2, min(256, self.recipe.window)), device=self.device)
        result: dict = {"seconds_per_mixer": {}}
        for name in ("attention", "sliding_window", "gdn", "kda"):
            for attempt in range(2):
                t0 = time.perf_counter()
                try:
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                        loss = probe(ids, f"all-{name}").float().logsumexp(-1).mean()
                    loss.backward()
                    _sync(self.device)
                    break
                except Exception as exc:  # noqa: BLE001 - retried once on the reference path, then raised
                    if attempt or envs.TRAIN_BACKEND == "torch" or self.device.type != "cuda":
                        raise
                    result["kernel_error"] = f"{name}: {type(exc).__name__}: {exc}"
                    self.log(f"preflight: {result['kernel_error']}; training on the PyTorch path")
                    envs.assign(TRAIN_BACKEND="torch")
                    probe.zero_grad(set_to_none=True)
            result["seconds_per_mixer"][name] = time.perf_counter() - t0
        result["train_backend"] = envs.TRAIN_BACKEND
        result["kernel_gradient_cosines"] = kernel_gradient_checks()
        return result

    def _prompts(self) -> tuple[list, dict]:
        from .prompts import question_prompts, template_prompts

        r = self.recipe
        prompts = template_prompts()
        if r.template_prompts is not None:  # an even spread over topics and templates
            prompts = prompts[:: max(1, len(prompts) // r.template_prompts)][: r.template_prompts]
        try:
            questions, found = question_prompts(self.data_dir, r.question_prompts, r.seed)
        except Exception as exc:  # noqa: BLE001 - no evaluation data: topic prompts only
            if r.name != "tiny":
                raise
            questions, found = [], {"error": str(exc)}
        return prompts + questions, found

    def stage_traces(self) -> dict:
        from ..data.longctx import assign_split
        from ..train.traces import encode_prompt, generate_traces, prompt_hash

        r, cfg = self.recipe, self.recipe.longctx
        tok = self.tokenizer()
        prompts, found = self._prompts()
        guard = self.guard()
        users: dict[str, str] = {}
        split: dict[str, list] = {"train": [], "heldout": []}
        rejected = []
        for p in prompts:
            text = p.messages[-1]["content"]
            if guard.match(text) is not None:
                rejected.append(text)
                continue
            h = prompt_hash(encode_prompt(p, tok, chat=True))
            if h in users:
                continue
            users[h] = text
            split[assign_split(h, cfg.seed, cfg.heldout_fraction)].append(p)
        self.data.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.data / "prompts.json", users)
        model = self.model(self.supernet)
        kw = dict(max_new_tokens=r.trace_tokens, batch_size=r.trace_batch, temperature=0.7, top_p=0.95, chat=True)
        out: dict[str, Any] = {"prompts": {k: len(v) for k, v in split.items()}, "question_sets": found}
        out["rejected_prompts"] = rejected
        for i in range(r.trace_rounds):
            out[f"train_{i}"] = generate_traces(
                model, tok, split["train"], self.data / f"traces_train_{i}", seed=1000 * (i + 1), **kw
            )
        out["heldout"] = generate_traces(model, tok, split["heldout"], self.data / "traces_heldout", seed=1, **kw)
        return out

    def trace_dirs(self, split: str) -> list[Path]:
        if split == "heldout":
            return [self.data / "traces_heldout"]
        return [self.data / f"traces_train_{i}" for i in range(self.recipe.trace_rounds)]

    def _completer(self, model, tok) -> Callable[[list[list[int]], int], list[list[int]]]:
        """The teacher answering recall questions: batches of similar length (the builder sorts them), sampled as
        the traces are, seeded per batch."""
        eos = set(model.config.eos_ids())
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        budget = self.recipe.completion_batch_tokens

        def complete(prefixes: list[list[int]], max_new: int) -> list[list[int]]:
            out: list[list[int]] = []
            i = 0
            while i < len(prefixes):
                rows = max(1, min(256, budget // (len(prefixes[i]) + max_new)))
                batch = prefixes[i : i + rows]
                seqs = model.generate(
                    batch,
                    "all-attention",
                    max_new_tokens=max_new,
                    temperature=0.7,
                    top_p=0.95,
                    seed=self.recipe.seed + i,
                    pad_token_id=pad,
                    prefill_chunk=2048,
                )
                width = max(map(len, batch))
                for row in seqs.tolist():
                    new = row[width:]
                    stop = next((j for j, t in enumerate(new) if t in eos), len(new))
                    out.append(new[:stop])
                i += rows
            return out

        return complete

    def stage_longctx(self) -> dict:
        from ..data.longctx import LongContextBuilder, Passage, group_key, turns_from_traces
        from .prompts import local_passages, text_passages

        tok = self.tokenizer()
        users = json.loads((self.data / "prompts.json").read_text())
        model = self.model(self.supernet)
        cfg = copy.deepcopy(self.recipe.longctx)
        builder = LongContextBuilder(
            tok,
            cfg,
            vocab_size=model.config.vocab_size,
            guard=self.guard(),
            complete=self._completer(model, tok),
            log=self.log,
        )
        for d in self.trace_dirs("train") + self.trace_dirs("heldout"):
            builder.add_turns(turns_from_traces(d, users, tok), source=d.name)
        try:
            local = local_passages(self.data_dir)
        except Exception as exc:  # noqa: BLE001
            if self.recipe.name != "tiny":
                raise
            local = {}
            self.log(f"longctx: no local passages ({exc})")
        local["text"] = text_passages(self.texts)
        for source, texts in local.items():
            builder.add_passages(Passage(t, group_key(source, t), source) for t in texts)
        manifest = builder.build(self.longctx)
        return {
            "sets": manifest["sets"],
            "inputs": manifest["inputs"],
            "local_passages": {k: len(v) for k, v in local.items()},
            "excluded": len(manifest["excluded"]),
            "excluded_by": _count(e["matched"] for e in manifest["excluded"]),
            "guard": manifest["guard"],
        }

    def kl_sets(self) -> dict[str, list[np.ndarray]]:
        from .measure import load_documents

        names = [f"kl_{n}" for n in self.recipe.kl_lengths]
        names += [s.name for s in self.recipe.longctx.sets if s.name.startswith("recall_")]
        return {n: load_documents(self.longctx / n) for n in names}

    def stage_kl(self, path: Path, *, check_attention: bool = False, placements: dict | None = None) -> dict:
        from .measure import kl_table

        student = self.model(path)
        teacher = self.model(self.supernet, mixers=["attention"])
        placements = placements or self.kl_placements(student.config.num_layers)
        table = kl_table(student, teacher, self.kl_sets(), placements, batch_tokens=self.recipe.eval_batch_tokens)
        out: dict[str, Any] = {"model": str(path), "placements": placements, "table": table}
        if check_attention:  # the frozen attention mixers are the teacher's, bit for bit
            diffs = [
                float((a.detach().float() - b.detach().float()).abs().max())
                for (na, a), (nb, b) in zip(
                    _attention_params(student), _attention_params(self.model(self.supernet)), strict=True
                )
            ]
            out["attention_max_abs_diff"] = max(diffs) if diffs else None
        return out

    def _train_minutes(self, i: int) -> float:
        """This stage's share of the training minutes, shrunk when a build budget leaves less room."""
        stages = self.recipe.stages
        planned = self.minutes * stages[i].share
        if self.budget_minutes is None:
            return planned
        left = [j for j in range(i, len(stages)) if self.status.get(self.train_name(j)) != "ok"]
        room = self.budget_minutes - self.elapsed_minutes() - self.recipe.reserve_minutes
        fair = room * stages[i].share / sum(stages[j].share for j in left)
        return max(min(planned, fair), 0.1 * planned)

    def stage_train(self, i: int) -> dict:
        from ..train.config import config_from_dict
        from ..train.trainer import Trainer

        r, s = self.recipe, self.recipe.stages[i]
        name = self.train_name(i)
        out = self.run_dir / "train" / name
        start = self.supernet if i == 0 else self.run_dir / "train" / self.train_name(i - 1) / "final"
        data = [str(d) for d in self.trace_dirs("train")] + [str(self.longctx / "train_short")]
        if s.data == "long":
            data = [str(self.longctx / "train_long")]
        minutes = self._train_minutes(i)
        plan_file = out / "plan.json"
        plan = json.loads(plan_file.read_text()) if plan_file.exists() else None
        sampler = {"kind": "uniform"} if s.mode == "align" else dict(r.sampler)
        cfg = {
            "model": str(start),
            "teacher": str(self.supernet),
            "output": str(out),
            "mode": s.mode,
            # held-out conversations of the longest length: enough tokens for a few rows at any seq_len
            "data": {"train": data, "eval": [str(self.longctx / f"kl_{max(r.kl_lengths)}")], "seq_len": s.seq_len},
            "optim": {
                "steps": plan["steps"] if plan else 10**6,
                "max_minutes": minutes,
                "batch_size": s.batch_size,
                "lr": s.lr,
                "warmup_steps": s.warmup_steps,
                "min_lr_ratio": 0.1,
                "seed": r.seed + i,
            },
            "sampler": sampler,
            "loss": dict(r.loss),
            "eval": {"every": 0},
            "checkpoint": {"every": 10**6, "keep": 1},
            "log_every": 5,
        }
        cfg["data"]["eval_sequences"] = 8
        trainer = Trainer(config_from_dict(cfg), device=str(self.device), log=self.log)
        probe: list[dict] = []
        t0 = time.perf_counter()
        if plan is None:  # time a few steps (the first compile kernels), then fit the step count to the minutes
            warm, timed = (1, 2) if r.name == "tiny" else (3, 5)
            for _ in range(warm):
                probe.append(trainer.train_step())
            _sync(self.device)
            t1 = time.perf_counter()
            for _ in range(timed):
                probe.append(trainer.train_step())
            _sync(self.device)
            step_s = (time.perf_counter() - t1) / timed
            left = 60 * minutes - (time.perf_counter() - t0)
            plan = {"steps": trainer.step + max(1, int(0.97 * left / step_s)), "step_seconds": step_s}
            plan["minutes"] = minutes
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(plan_file, plan)
            trainer.cfg.optim.steps = plan["steps"]
            trainer.cfg.optim.max_minutes = max(minutes - (time.perf_counter() - t0) / 60, 0.05)
            trainer.cfg.checkpoint.every = max(25, plan["steps"] // 2)  # a resume point mid-stage (and the end)
        last = trainer.run()
        seconds = time.perf_counter() - t0
        keep = ("loss", "act", "fkl", "rkl", "tokens_per_s", "mfu", "peak_mem_gb", "grad_norm", "lr")
        return {
            "start": str(start),
            "minutes_planned": minutes,
            "plan": plan,
            "steps": trainer.step,
            "train_seconds": seconds,
            "train_rows": len(trainer.rows),
            "seq_len": s.seq_len,
            "batch_size": s.batch_size,
            "tokens_seen": trainer.step * s.batch_size * s.seq_len,
            "first": {k: probe[0][k] for k in keep if probe and k in probe[0]},
            "last": {k: last[k] for k in keep if k in last},
        }

    def stage_place(self) -> dict:
        from ..search.measure import PlacementScorer, load_sequences, measure_placements
        from ..search.sampling import stratified
        from ..search.table import MeasurementTable

        r = self.recipe
        model = self.model(self.final)
        seqs = load_sequences(self.longctx / r.place_set)
        scorer = PlacementScorer(
            model,
            seqs,
            batch_tokens=r.eval_batch_tokens,
            reference_memory_gb=64.0 if self.device.type == "cuda" else 4.0,
        )
        placements = stratified(scorer.space, r.place_placements, r.seed)
        placements += [_letters(model, p) for p in self.kl_placements(model.config.num_layers).values()]
        placements = list(dict.fromkeys(placements))
        (self.run_dir / "place").mkdir(parents=True, exist_ok=True)
        table = MeasurementTable.open(self.run_dir / "place" / "table.jsonl", scorer.header())
        measure_placements(scorer, placements, table, source="build", log=self.log)
        return {
            "documents": len(seqs),
            "min_tokens": int(min(s.tokens.size for s in seqs)),
            "scored_tokens": scorer.n_tokens,
            "placements": len(table.done),
        }

    def stage_presets(self) -> dict:
        from ..checkpoint import read_presets
        from ..roofline import placement_report
        from ..search.cost_sources import CostTerms, modelled_costs
        from ..search.fit import fit_table
        from ..search.measure import PlacementScorer, load_sequences, measure_placements
        from ..search.optimize import optimize
        from ..search.plots import plot_frontier
        from ..search.presets import pareto_regret_of, write_presets
        from ..search.table import MeasurementTable

        r = self.recipe
        table = MeasurementTable.read(self.run_dir / "place" / "table.jsonl")
        space = table.space
        fits = {k: fit_table(table, metric="kl", space=space, r=k, estimator=r.fit_estimator) for k in r.fit_ranges}
        rmse = {k: f.cv.get("rmse") for k, f in fits.items()}
        best = min(fits, key=lambda k: rmse[k] if rmse[k] is not None else float("inf"))
        fit = fits[best]
        config = self.model(self.final).config
        costs = CostTerms.from_model(modelled_costs(config, batch=r.cost_batch, context=r.cost_context), space)
        result = optimize(fit, costs, speedups=list(r.speedups))
        # presets come cheapest first; each names the speed-up target ("2x") it was chosen for
        entries = {f"speed-{p.target}": {"placement": p.placement, **p.meta(fit, costs)} for p in result.presets}
        if not entries:
            raise RuntimeError(f"no preset reaches the speed-ups {r.speedups} ({result.skipped})")
        write_presets(self.final, entries)
        model = self.model(self.final)
        scorer = PlacementScorer(
            model,
            load_sequences(self.longctx / r.place_set),
            batch_tokens=r.eval_batch_tokens,
            reference_memory_gb=64.0 if self.device.type == "cuda" else 4.0,
        )
        table = MeasurementTable.open(table.path, scorer.header())
        measure_placements(scorer, [e["placement"] for e in entries.values()], table, source="presets", log=self.log)
        measured = table.as_mapping("kl")
        regret = pareto_regret_of([e["placement"] for e in entries.values()], measured, costs, space, sign=-1)
        presets = {}
        for (name, e), reg in zip(entries.items(), regret, strict=True):
            rep = placement_report(model, e["placement"], context=r.cost_context, batch=r.cost_batch)
            base = placement_report(model, "all-attention", context=r.cost_context, batch=r.cost_batch)
            presets[name] = {
                "placement": e["placement"],
                "composition": rep.composition,
                "modelled_speedup": base.bytes_per_step / rep.bytes_per_step,
                "predicted_kl": e["predicted_quality"],
                "measured_kl": measured.get(e["placement"]),
                "pareto_regret": reg,
            }
        ref = costs.total(space.encode([space.reference_placement()]))[0]
        all_p = list(measured)
        xs = costs.total(space.encode(all_p)) / ref
        plot_frontier(
            self.results_dir / "frontier.png",
            measured=(xs, [measured[p] for p in all_p], all_p),
            frontier=(
                [(costs.overhead + s.cost) / ref for s in result.frontier],
                [-s.quality for s in result.frontier],
            ),
            presets=[
                (n, float(costs.total(space.encode([p["placement"]]))[0] / ref), p["measured_kl"])
                for n, p in presets.items()
            ],
            xlabel=f"modelled decode cost relative to all-attention ({r.cost_context} tokens, batch {r.cost_batch})",
            ylabel=f"KL to the teacher on {r.place_set} (lower is better)",
        )
        kl = self.stage_kl(self.final, placements={n: p["placement"] for n, p in presets.items()})
        return {
            "fit": {"r": best, "cv_rmse": rmse, "cv": fit.cv, "estimator": fit.estimator},
            "presets": presets,
            "stored": sorted(read_presets(self.final)),
            "skipped_targets": result.skipped,
            "kl": kl["table"],
        }

    def preset_placements(self) -> dict[str, str]:
        """all-attention, then the build's presets (by name)."""
        presets = self.results.get("presets", {}).get("presets", {})
        return {"all-attention": "all-attention", **{n: p["placement"] for n, p in presets.items()}}

    def stage_tasks(self) -> dict:
        from ..evals.scoring import Scorer
        from ..evals.tasks import load_examples
        from .measure import ratio_stats, task_correct

        r = self.recipe
        examples = {t: load_examples(t, self.data_dir, limit=r.task_limit, seed=r.seed) for t in r.tasks}
        model = self.model(self.final)
        scorer = Scorer(model, self.tokenizer(), max_batch_tokens=r.eval_batch_tokens)
        per: dict[str, dict] = {}
        for name, placement in self.preset_placements().items():
            per[name] = task_correct(scorer, examples, placement)
            self.log(f"tasks {name}: " + ", ".join(f"{t} {v['score']:.3f}" for t, v in per[name].items()))
        base = {t: v["correct"] for t, v in per["all-attention"].items()}
        out = {}
        for name, tasks in per.items():
            out[name] = {
                "tasks": {t: {k: v[k] for k in ("metric", "score", "stderr", "n")} for t, v in tasks.items()},
                **ratio_stats({t: v["correct"] for t, v in tasks.items()}, base),
            }
        (self.run_dir / "evals").mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self.run_dir / "evals" / "tasks_items.json",
            {n: {t: v["correct"] for t, v in d.items()} for n, d in per.items()},
        )
        return {"limit": r.task_limit, "presets": out}

    def stage_niah(self) -> dict:
        from ..evals.niah import run_niah
        from .measure import ratio_stats

        r = self.recipe
        model = self.model(self.final)
        wanted = r.niah_presets
        placements = {
            n: p for n, p in self.preset_placements().items() if wanted is None or n in ("all-attention", *wanted)
        }
        niah = run_niah(
            model,
            self.tokenizer(),
            placements,
            lengths=r.niah_lengths,
            depths=r.niah_depths,
            trials=r.niah_trials,
            seed=r.seed,
            haystack=self.haystack,
        )
        (self.run_dir / "evals").mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.run_dir / "evals" / "niah.json", niah)
        _plot_niah(niah, self.results_dir / "niah.png")
        hits = {
            name: {key: {"all": [h for c in res["cells"] for h in c[f"{key}_hits"]]} for key in ("greedy", "ll")}
            for name, res in niah["presets"].items()
        }
        out = {}
        for name, res in niah["presets"].items():
            out[name] = {
                "placement": res["placement"],
                "needles": len(hits[name]["greedy"]["all"]),
                "greedy": ratio_stats(hits[name]["greedy"], hits["all-attention"]["greedy"]),
                "ll": ratio_stats(hits[name]["ll"], hits["all-attention"]["ll"]),
                "by_length": {
                    str(n): {
                        k: float(np.mean([c[k] for c in res["cells"] if c["length"] == n])) for k in ("greedy", "ll")
                    }
                    for n in r.niah_lengths
                },
            }
        return {"settings": niah["settings"], "presets": out}

    def stage_spec(self) -> dict:
        from .measure import load_documents, spec_acceptance

        r = self.recipe
        model = self.model(self.final)  # a copy of its own: the engine lays the weights out for inference in place
        out: dict[str, dict] = {}
        for n in r.spec_lengths:
            docs = load_documents(self.longctx / f"kl_{n}", limit=r.spec_prompts)
            prompts = [d[: n - r.spec_tokens - r.spec_k - 2].tolist() for d in docs]
            for name, placement in self.preset_placements().items():
                if name == "all-attention":
                    continue
                res = spec_acceptance(model, prompts, "all-attention", placement, k=r.spec_k, max_tokens=r.spec_tokens)
                out.setdefault(name, {})[str(n)] = res
                self.log(f"spec {name} @ {n}: acceptance {res['acceptance']:.3f}")
        return {"k": r.spec_k, "max_tokens": r.spec_tokens, "drafts": out}


# ------------------------------------------------------------------------------------------ helpers
def _attention_params(model) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if ".mixers.attention." in n]


def _letters(model, placement) -> str:
    from ..placement import placement_letters

    return placement_letters(model.resolve(placement), model.config)


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _compact(result: dict) -> dict:
    """A stage result without its bulky parts (tracebacks stay: they say why a stage failed)."""
    return {k: v for k, v in result.items() if k not in ("rejected_prompts",)}


def _plot_niah(niah: dict, path: Path) -> Path:
    """Greedy retrieval over (depth x length) for every preset, side by side: one small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths = niah["settings"]["lengths"], niah["settings"]["depths"]
    names = list(niah["presets"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        res = niah["presets"][name]
        g = np.full((len(depths), len(lengths)), np.nan)
        for c in res["cells"]:
            g[depths.index(c["depth"]), lengths.index(c["length"])] = c["greedy"]
        ax.imshow(g, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        for (i, j), v in np.ndenumerate(g):
            ax.text(j, i, "-" if np.isnan(v) else f"{v:.1f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths], fontsize=7)
        ax.set_title(f"{name}: {res['summary']['greedy']:.2f}", fontsize=8)
    fig.suptitle("NIAH greedy retrieval (depth x context length)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
