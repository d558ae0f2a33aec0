"""Layer-local alignment, stochastic distillation and targeted SFT of a supernet, on one process or many.

Distillation: each step draws one placement (the same on every rank, from (seed, step)), runs the frozen
teacher — the supernet's own all-attention path, thinned to attention — and the student under that placement,
and trains the mixers on: per-layer activation matching, forward/reverse KL of the logits, and (SFT)
cross-entropy. Alignment (mode ``align``), the first stage: every mixer of every layer learns the teacher's
attention output from the teacher's own layer input, all at once and without gradients across layers.

Speed (``optim.compile``, on by default on CUDA): every decoder block (or aligned mixer) runs through torch.compile,
GDN and KDA through fla's varlen kernels (``gearshift.ops.dispatch``), attention through flex attention where rows
hold several documents or a window is shorter than them, and the logit losses fused with the output projection and
chunked over tokens (``losses.linear_losses``). Rows are packed documents that no mixer reads across
(``gearshift.ops.documents``). MFU counts the FLOPs each step needs (``flops.py``).

Data parallelism (``parallel``): DDP, where every rank holds the whole supernet and `find_unused_parameters`
copes with the mixers a step leaves out; or FSDP (``parallel: fsdp``, distill and SFT), where each rank holds a
1/N shard of every parameter, gradient and optimizer state and gathers one decoder block at a time — the same
steps in less memory per GPU (see ``parallel.py``). Either way the step's placement is the same on every rank and
losses are normalised by the step's global token count, so N processes reproduce one process at the same global
batch.
"""

from __future__ import annotations

import copy
import functools
import gc
import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..checkpoint import load_tokenizer
from ..clitools import progress_disabled
from ..model import Supernet
from ..ops.documents import Documents
from ..placement import placement_letters
from .config import TrainConfig, config_differences
from .flops import BF16_PEAK_FLOPS, StepFlops, align_flops, distill_flops
from .losses import activation_terms, cross_entropy, kl_terms, linear_losses
from .parallel import full, full_optimizer_state, is_sharded, like, load_optimizer_state, shard_blocks
from .resume import StopRequest, latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from .rows import DataError, PackedRows, load_rows, step_rows
from .samplers import build_sampler, cheapest_placement

Batch = tuple[torch.Tensor, torch.Tensor, Documents | None, int]  # tokens, loss mask, documents, loss tokens


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def resolve_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """The training device with an explicit index: 'cuda' alone means this process's GPU (its local rank), because
    ``torch.cuda.set_device`` refuses an index-less device."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped ``Trainer.run``; the checkpoint of ``step`` was saved at ``path`` first."""

    def __init__(self, step: int, path: Path | None) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint {path}")
        self.step, self.path = step, path


class Trainer:
    """``Trainer(cfg).run()``. ``model`` and ``rows`` (and ``eval_rows``) may be given in memory instead of
    ``cfg.model`` and ``cfg.data`` (benchmarks); the teacher is then the model's own attention, frozen."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        device: str | None = None,
        log=print,
        model: Supernet | None = None,
        rows: PackedRows | None = None,
        eval_rows: PackedRows | None = None,
        resume: bool = False,
    ) -> None:
        """``resume``: continue from a checkpoint in the output directory even if another mode or configuration
        wrote it (one of the same configuration is always resumed)."""
        self.cfg = cfg
        self.resume_any = resume
        self.rank, self.world, local = _dist_env()
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
            dist.init_process_group(backend)
        self.device = resolve_device(device, local)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        self.out = Path(cfg.output)
        o = cfg.optim
        torch.manual_seed(o.seed)

        if model is None:
            self.student = Supernet.from_pretrained(cfg.model, device=self.device, dtype=torch.float32)
            self.teacher = Supernet.from_pretrained(
                cfg.teacher or cfg.model, device=self.device, dtype=torch.float32, mixers=["attention"]
            )
        else:
            self.student = model.to(device=self.device, dtype=torch.float32)
            self.teacher = copy.deepcopy(self.student).thin_(["all-attention"])
        self.student.train()
        self.student.gradient_checkpointing = o.activation_checkpointing
        self.teacher.eval().requires_grad_(False)
        # the speed-ups (module docstring); benchmarks turn them off one by one to time the plain path
        self.compile = o.compile == "on" or (o.compile == "auto" and self.device.type == "cuda")
        self.fused_loss = True  # logit losses fused with the output projection, chunked (never whole logits)
        self.packed = True  # rows keep their documents apart (False: the rows' tokens as single sequences)
        self.student.compile_blocks = self.teacher.compile_blocks = self.compile
        if self.teacher.config.num_layers != self.student.config.num_layers:
            raise ValueError("teacher and student have different numbers of layers")

        d = cfg.data
        if rows is None:
            tokenizer = load_tokenizer(cfg.model)
            eos = self.student.config.eos_ids()[0] if self.student.config.eos_ids() else None
            kw = dict(tokenizer=tokenizer, eos=eos, chat=d.chat, skip_prompt=cfg.mode == "sft")
            rows = load_rows(d.train, d.seq_len, **kw)
            if d.eval:
                eval_rows = load_rows(d.eval, d.seq_len, **kw)
        self.rows = rows
        if eval_rows is not None:
            self.eval_rows = eval_rows
        else:  # hold the last rows of the training data out
            n = min(d.eval_sequences, len(self.rows) // 10)
            self.eval_rows = self.rows[len(self.rows) - n :]
            self.rows = self.rows[: len(self.rows) - n]
        if len(self.rows) == 0:
            raise DataError("no training rows left after holding out evaluation rows")
        self.eval_rows = self.eval_rows[: d.eval_sequences]
        if len(self.eval_rows) == 0:  # an empty set would report KL 0 (a perfect score) for every placement
            self.log(
                f"warning: no held-out rows to evaluate on ({len(self.rows)} training rows hold out none below 10); "
                "give data.eval: evaluation is skipped"
            )
        vocab = self.student.config.vocab_size
        if int(self.rows.tokens.max()) >= vocab:
            raise DataError(f"training data holds token ids >= the model's vocabulary ({vocab})")

        frozen = set(o.frozen_mixers)
        self.trainable: dict[str, torch.nn.Parameter] = {}
        for name, p in self.student.named_parameters():
            parts = name.split(".")
            is_mixer = "mixers" in parts
            mixer = parts[parts.index("mixers") + 1] if is_mixer else None
            train = (is_mixer or o.train == "all") and mixer not in frozen
            p.requires_grad_(train)
            if train:
                self.trainable[name] = p
        if not self.trainable:
            raise ValueError("no trainable parameters: check optim.train and optim.frozen_mixers")
        # FSDP shards before the optimizer exists: it must hold the sharded parameters (align calls mixers outside
        # the model's forward, where FSDP's gathers never run, so it always averages gradients by hand)
        self.fsdp = self.world > 1 and cfg.parallel == "fsdp" and cfg.mode != "align"
        if cfg.parallel == "fsdp" and cfg.mode == "align" and self.world > 1:
            self.log("parallel=fsdp: align keeps whole replicas (its per-layer mixer calls bypass FSDP)")
        if self.fsdp:
            if self.compile:  # FSDP's gathers hook each block's forward: compiled blocks would trace through them
                self.log("parallel=fsdp: blocks run eagerly (optim.compile applies to ddp and single processes)")
                self.compile = self.student.compile_blocks = self.teacher.compile_blocks = False
            shard_blocks(self.student, self.student.blocks, self.device, self.world)
            self.trainable = {n: p for n, p in self.student.named_parameters() if n in self.trainable}
        self._keys = {".".join(n.split(".")[:7]) + "." for n in self.trainable}  # model.decoder.blocks.i.mixer.mixers.x
        groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
        for n, p in self.trainable.items():
            parts = n.split(".")
            mixer = parts[parts.index("mixers") + 1] if "mixers" in parts else None
            key = (o.lr * o.mixer_lr.get(mixer, 1.0), o.weight_decay if p.dim() >= 2 else 0.0)  # no decay on gains
            groups.setdefault(key, []).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in sorted(groups.items())],
            lr=o.lr,
            betas=o.betas,
            fused=self.device.type == "cuda" and not self.fsdp,  # one kernel per step for all parameters
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.sampler = build_sampler(cfg.sampler, self.student.config, o.seed, self.student.presets)
        self.cheapest = cheapest_placement(self.student.config)
        self.model = self.student
        # align calls each layer's mixers directly, outside the model's forward, where DDP's hooks never run: its
        # gradients are averaged by hand (_all_reduce_grads)
        self.align_mixers: list[list[str]] = []
        if cfg.mode == "align":
            self._set_align_mixers()
        if self.world > 1 and cfg.mode != "align" and not self.fsdp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.student, device_ids=ids, find_unused_parameters=True
            )
        if o.dtype == "bfloat16" or (o.dtype == "auto" and self.device.type == "cuda"):
            self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)
        else:
            self.autocast = nullcontext
        self.step = 0
        self.step_flops = StepFlops()  # the last step's model FLOPs (this rank's share)
        self._compiled_steps = 0
        self._resume()

    # ------------------------------------------------------------------ schedule and state
    def _lr_factor(self, step: int) -> float:
        o = self.cfg.optim
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, o.steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _resume(self) -> None:
        path = latest_checkpoint(self.out / "checkpoints")
        if path is None:
            return
        state = load_checkpoint(path, map_location=self.device)
        old = state.get("config") or {}
        changed = config_differences(old, self.cfg.to_dict())
        if changed and not self.resume_any:
            article = "an" if str(old.get("mode", "")).startswith(("a", "e", "i", "o", "u")) else "a"
            same = old.get("mode") == self.cfg.mode
            what = "a run of another configuration" if same else f"{article} {old.get('mode')} run"
            raise ValueError(
                f"{self.out} holds a checkpoint of {what} (step {state['step']}, {path.name}; differs in "
                f"{', '.join(changed[:6])}{', ...' if len(changed) > 6 else ''}): give this run another output "
                "directory, or pass --resume to continue from that checkpoint"
            )
        missing = set(self.trainable) - set(state["trainable"])
        if missing:
            raise ValueError(f"{path}: checkpoint lacks trainable tensors, e.g. {sorted(missing)[:3]}")
        try:
            load_optimizer_state(self.optimizer, state["optimizer"])
        except ValueError as exc:  # e.g. other parameter groups: another mode, mixer_lr or set of frozen mixers
            raise ValueError(
                f"{path}: this checkpoint was written by a run with another configuration ({exc}); resume with "
                f"that configuration, or start in a new output directory (or remove {self.out / 'checkpoints'})"
            ) from None
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(like(state["trainable"][name], p))
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.log(f"resuming from step {self.step} ({path})")
        self._metrics({"event": "resume", "step": self.step, "checkpoint": str(path)})

    def save_checkpoint(self) -> None:
        # full tensors whatever the strategy (gathering a shard is a collective: every rank takes part)
        trainable = {n: full(p) for n, p in self.trainable.items()}
        optimizer = full_optimizer_state(self.optimizer)
        if self.rank == 0:
            save_checkpoint(
                self.out / "checkpoints",
                self.step,
                {
                    "trainable": trainable,
                    "optimizer": optimizer,
                    "scheduler": self.scheduler.state_dict(),
                    "config": self.cfg.to_dict(),
                },
                keep=self.cfg.checkpoint.keep,
            )
        if self.world > 1:
            dist.barrier()

    def _metrics(self, row: dict[str, Any]) -> None:
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ one step
    def placements_for(self, step: int) -> list[tuple[str, ...]]:
        """The step's placements (sampled, + sandwich paths), keeping only those with something to train."""
        placements = [self.sampler.sample(step)]
        if self.cfg.sampler.sandwich:
            top = self.student.resolve("all-attention") if self._all_have("attention") else None
            placements += [p for p in (top, self.cheapest) if p is not None and p not in placements]
        return [p for p in placements if self._trains(p)]

    def _trains(self, placement: tuple[str, ...]) -> bool:
        """Whether a placement's path holds a trainable parameter (a frozen all-attention path does not)."""
        if self.cfg.optim.train == "all":
            return True
        return any(self._trains_mixer(i, name) for i, name in enumerate(placement))

    def _all_have(self, name: str) -> bool:
        return all(name in layer.mixers for layer in self.student.config.layers)

    def _batch(self, rows: PackedRows, indices: list[int]) -> Batch:
        """Rows on the device: tokens, loss mask, their documents (None: no boundaries kept, the plain path) and
        the number of loss tokens (counted on the host: no device sync)."""
        tokens, mask = rows.batch(indices, self.device)
        documents = None
        if self.packed:  # laid out on the host (no device sync), then copied
            labels = rows.input_documents(indices, torch.device("cpu"))
            b, t = tokens.shape[0], tokens.shape[1] - 1
            documents = Documents.whole_rows(b, t) if labels is None else Documents.from_segments(labels)
            documents = documents.to(self.device)
        return tokens, mask, documents, int(rows.mask[indices].sum())

    def _step_batches(self) -> tuple[list[Batch], float]:
        """This rank's micro-batches of the step and the step's loss-token count over all ranks."""
        o = self.cfg.optim
        micro_rows = [
            step_rows(len(self.rows), self.step, m, self.rank, self.world, o.batch_size, o.grad_accum, o.seed)
            for m in range(o.grad_accum)
        ]
        batches = [self._batch(self.rows, r) for r in micro_rows]
        total = float(sum(b[3] for b in batches))
        if self.world > 1:
            count = torch.tensor(total, device=self.device)
            dist.all_reduce(count)
            total = float(count)
        return batches, total

    @staticmethod
    def _lengths(tokens: torch.Tensor, documents: Documents | None) -> list[int]:
        return documents.lengths if documents is not None else [tokens.shape[1] - 1] * tokens.shape[0]

    def train_step(self) -> dict[str, Any]:
        """One optimizer step. If the first compiled step of a run fails (a backward graph compiles lazily, outside
        the compiled functions' own fallback), the run warns and continues with eager blocks."""
        step = self._align_step if self.cfg.mode == "align" else self._distill_step
        if not self.compile or self._compiled_steps:
            return step()
        try:
            row = step()
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager path is the reference
            warnings.warn(f"compiled training failed ({type(exc).__name__}: {exc}); training eagerly", stacklevel=2)
            self.compile = self.student.compile_blocks = self.teacher.compile_blocks = False
            self.optimizer.zero_grad(set_to_none=True)
            return step()
        self._compiled_steps += 1
        return row

    def pass_losses(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor,
        documents: Documents | None,
        placement,
        teacher_out: torch.Tensor | None,
        teacher_acts: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The student's forward under ``placement`` and its losses on one micro-batch (call inside autocast).
        ``teacher_out``: the teacher's final hidden states (fused loss) or logits (``fused_loss`` off), or None.
        Returns (loss, detached [act, fkl, rkl, ce], the per-layer activation losses or None)."""
        lw = self.cfg.loss
        kl = teacher_out is not None and bool(lw.forward_kl or lw.reverse_kl)
        s_acts: list[torch.Tensor] = []
        loss = torch.zeros((), device=self.device)
        terms = torch.zeros(4, device=self.device)
        run = functools.partial(self.model, inputs, placement, mixer_outputs=s_acts, documents=documents)
        if self.fused_loss and (kl or lw.cross_entropy):

            def head(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return linear_losses(
                    hidden, weight, teacher_out if kl else None, self.teacher.output_weight if kl else None,
                    targets if lw.cross_entropy else None, mask, forward_kl=lw.forward_kl if kl else 0.0,
                    reverse_kl=lw.reverse_kl if kl else 0.0, cross_entropy=lw.cross_entropy,
                    temperature=lw.temperature, compile=self.compile,
                )  # fmt: skip

            logit_loss, logit_terms = run(output_fn=head)
            loss = loss + logit_loss
            terms[1:] = logit_terms[:3]
        elif self.fused_loss:
            run(return_hidden=True)
        else:
            s_logits = run()
            if kl:
                fkl, rkl = kl_terms(s_logits, teacher_out, mask, lw.temperature)
                loss = loss + lw.forward_kl * fkl + lw.reverse_kl * rkl
                terms[1], terms[2] = fkl.detach(), rkl.detach()
            if lw.cross_entropy:
                ce = cross_entropy(s_logits, targets, mask)
                loss = loss + lw.cross_entropy * ce
                terms[3] = ce.detach()
        acts = None
        if lw.activation and teacher_out is not None:
            acts = activation_terms(s_acts, teacher_acts, mask, compile=self.compile)
            loss = loss + lw.activation * acts.mean()
            terms[0] = acts.detach().mean()
        return loss, terms, acts

    def teacher_pass(
        self, inputs: torch.Tensor, documents: Documents | None
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The frozen teacher on one micro-batch: (final hidden states, or logits with ``fused_loss`` off; its
        attention outputs per layer), or (None, []) when no loss needs it."""
        acts: list[torch.Tensor] = []
        if not self._needs_teacher():
            return None, acts
        with torch.no_grad(), self.autocast():
            out = self.teacher(
                inputs, "all-attention", mixer_outputs=acts, documents=documents, return_hidden=self.fused_loss
            )
        return out, acts

    def _distill_step(self) -> dict[str, Any]:
        o = self.cfg.optim
        placements = self.placements_for(self.step)
        batches, total = self._step_batches()
        # each micro-batch contributes sum(loss) / global tokens; DDP averages over ranks, so scale by world
        scale_base = self.world / max(total, 1.0)
        n_layers = self.student.config.num_layers
        names = ["loss", "act", "fkl", "rkl", "ce"]
        stat_sums = torch.zeros(len(names), device=self.device)  # token-weighted sums: one sync at the end
        layer_act = torch.zeros(n_layers, device=self.device)
        flops = StepFlops()
        teacher = self.teacher if self._needs_teacher() else None
        passes = [(b, p) for b in batches for p in placements]
        for i, ((tokens, mask, documents, count), placement) in enumerate(passes):
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            weight = count * scale_base / len(placements)
            share = count / len(placements)  # this pass's tokens: logged stats are token-weighted
            flops = flops + distill_flops(self.student, placement, teacher, self._lengths(tokens, documents))
            t_out, t_acts = self.teacher_pass(inputs, documents)
            sync = i == len(passes) - 1 or self.world == 1
            ctx = nullcontext() if sync or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with ctx:
                with self.autocast():
                    loss, terms, acts = self.pass_losses(inputs, targets, mask, documents, placement, t_out, t_acts)
                (loss * weight).backward()
            stat_sums += torch.cat([loss.detach()[None], terms]) * share
            if acts is not None:
                layer_act += acts.detach() * share
        self.step_flops = flops
        # logged values are means over the step's tokens on every rank (what the gradient optimises), not rank 0's
        sums = torch.cat([stat_sums, layer_act])
        if self.world > 1:
            dist.all_reduce(sums)
        sums = (sums / max(total, 1.0)).tolist()
        stats, layer_act = dict(zip(names, sums[: len(names)], strict=True)), sums[len(names) :]
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), o.grad_clip)
        if is_sharded(grad_norm):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        main = placements[0] if placements else self.sampler.sample(self.step - 1)
        row = {
            "step": self.step,
            "lr": self.scheduler.get_last_lr()[0],
            "placement": placement_letters(main, self.student.config),
            **stats,
            "grad_norm": float(grad_norm),
            "tokens": int(total),
            "layer_act": [round(x, 6) for x in layer_act],
        }
        # per sampled mixer: the activation loss of the layers that used it
        by_mixer: dict[str, list[float]] = {}
        for i, name in enumerate(main):
            by_mixer.setdefault(name, []).append(layer_act[i])
        row["act_by_mixer"] = {k: sum(v) / len(v) for k, v in by_mixer.items()}
        return row

    # ------------------------------------------------------------------ layer-local alignment
    def _set_align_mixers(self) -> None:
        """Per layer, the mixers align trains (those with a trainable parameter, and in sampler.mixers if set);
        their kinds in order of appearance; and align_counts [layers, kinds], 1 where a layer aligns a kind."""
        allowed = set(self.cfg.sampler.mixers)
        names = [
            [n for n in layer.mixers if (not allowed or n in allowed) and self._trains_mixer(i, n)]
            for i, layer in enumerate(self.student.config.layers)
        ]
        if not any(names):
            raise ValueError("align: no layer holds a trainable mixer (check optim.frozen_mixers and sampler.mixers)")
        self.align_mixers = names
        self.align_kinds = list(dict.fromkeys(n for layer in names for n in layer))
        self.align_counts = torch.zeros(len(names), len(self.align_kinds), device=self.device)
        for i, layer in enumerate(names):
            for name in layer:
                self.align_counts[i, self.align_kinds.index(name)] = 1

    def _trains_mixer(self, layer: int, name: str) -> bool:
        return f"model.decoder.blocks.{layer}.mixer.mixers.{name}." in self._keys

    def _align_pass(
        self, tokens: torch.Tensor, mask: torch.Tensor, documents: Documents | None, scale: float | None
    ) -> torch.Tensor:
        """Summed per-token squared errors [layers, kinds] of every aligned mixer on the teacher's inputs, plus
        the teacher outputs' summed squares in an extra last column (for the relative error). With ``scale``, each
        layer's loss (times scale) is backpropagated as soon as it is computed, so one layer's graph is alive."""
        inputs = tokens[:, :-1]
        with torch.no_grad(), self.autocast():
            xs: list[torch.Tensor] = []
            ys: list[torch.Tensor] = []
            self.teacher(
                inputs, "all-attention", mixer_outputs=ys, mixer_inputs=xs, return_hidden=True, documents=documents
            )
        ctx = self.student.step_context(inputs, documents=documents)
        m = mask.to(torch.float32)
        sums = torch.zeros(len(self.align_mixers), len(self.align_kinds) + 1, device=self.device)
        for i, block in enumerate(self.student.blocks):
            if not self.align_mixers[i]:
                continue
            target = ys[i].float()
            sums[i, -1] = (target.pow(2).mean(-1) * m).sum()
            loss = torch.zeros((), device=self.device)
            if self.fsdp:  # a mixer called on its own runs outside FSDP's hooks: gather its block by hand (no grad)
                block.unshard()
            for name in self.align_mixers[i]:
                with torch.set_grad_enabled(scale is not None), self.autocast():
                    out = self.student.call_mixer(i, name, xs[i], ctx)
                err = ((out.float() - target).pow(2).mean(-1) * m).sum()
                loss = loss + err
                sums[i, self.align_kinds.index(name)] = err.detach()
            if self.fsdp:
                block.reshard()
            if scale is not None:
                (loss * scale).backward()
        return sums

    def _align_step(self) -> dict[str, Any]:
        """One step of layer-local alignment: the frozen teacher runs once and records, per layer, its normed
        mixer input and its attention output; every trained mixer of every layer then maps that same input and
        is pulled towards that output (mean squared error per token). No gradient crosses layers, so each layer
        is backpropagated and freed on its own, and every mixer of every layer learns at every step: the cheap,
        well-conditioned first stage before stochastic distillation repairs what compounds across layers."""
        o = self.cfg.optim
        batches, total = self._step_batches()
        pairs = sum(len(names) for names in self.align_mixers)
        scale = 1.0 / (max(total, 1.0) * pairs)  # loss = mean over tokens and (layer, mixer) pairs
        sums = sum(self._align_pass(tokens, mask, documents, scale) for tokens, mask, documents, _ in batches)
        self.step_flops = StepFlops()
        for tokens, _, documents, _ in batches:
            lengths = self._lengths(tokens, documents)
            self.step_flops += align_flops(self.student, self.align_mixers, self.teacher, lengths)
        if self.world > 1:
            dist.all_reduce(sums)
            self._all_reduce_grads()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), o.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        per_pair = sums[:, :-1] / max(total, 1.0)  # [layers, kinds]: per-token MSE
        loss = float(per_pair.sum()) / pairs
        return {
            "step": self.step,
            "lr": self.scheduler.get_last_lr()[-1],
            "loss": loss,
            "act": loss,
            "grad_norm": float(grad_norm),
            "tokens": int(total),
            "layer_act": [round(float(x), 6) for x in per_pair.sum(1) / self.align_counts.sum(1).clamp(min=1)],
            "act_by_mixer": self._by_kind(per_pair),
        }

    def _by_kind(self, per_layer: torch.Tensor) -> dict[str, float]:
        """Mean over the layers that align a kind, per kind."""
        counts = self.align_counts
        return {k: float(per_layer[:, j].sum() / counts[:, j].sum()) for j, k in enumerate(self.align_kinds)}

    @torch.no_grad()
    def align_error(self, rows: PackedRows | None = None) -> dict[str, dict[str, float]]:
        """Held-out layer-local error per mixer kind, on the teacher's inputs: per-token MSE and the relative
        error (MSE / the teacher output's mean square), each averaged over layers; sharded over ranks."""
        if not self.align_mixers:  # usable after any mode: align every trainable mixer
            self._set_align_mixers()
        rows = rows or self.eval_rows
        mine = list(range(self.rank, len(rows), self.world))
        bs = self.cfg.optim.batch_size
        sums = torch.zeros(len(self.align_mixers), len(self.align_kinds) + 1, device=self.device)
        n = torch.zeros((), device=self.device)
        for s in range(0, len(mine), bs):
            tokens, mask, documents, _ = self._batch(rows, mine[s : s + bs])
            sums += self._align_pass(tokens, mask, documents, None)
            n += mask.sum()
        if self.world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(n)
        mse = self._by_kind(sums[:, :-1] / n.clamp(min=1))
        rel = self._by_kind(sums[:, :-1] / sums[:, -1:].clamp(min=1e-12))
        return {k: {"mse": mse[k], "relative": rel[k]} for k in self.align_kinds}

    def _all_reduce_grads(self) -> None:
        """Sum the trained gradients over ranks in one flat buffer (each rank's loss is already scaled by the
        global token count, so the sum is the gradient of the global mean)."""
        grads = [p.grad for p in self.trainable.values() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _needs_teacher(self) -> bool:
        lw = self.cfg.loss
        return bool(lw.activation or lw.forward_kl or lw.reverse_kl)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, placements: list[str] | None = None, rows: PackedRows | None = None) -> dict[str, dict]:
        """KL(teacher || placement) per token and next-token agreement with the teacher; sharded over ranks."""
        rows = rows or self.eval_rows
        placements = placements or self.cfg.eval.placements
        if len(rows) == 0:
            return {}  # nothing held out (warned at start): no numbers rather than zeros that read as perfect
        was_training = self.student.training
        self.student.eval()
        out: dict[str, dict] = {}
        mine = list(range(self.rank, len(rows), self.world))
        bs = self.cfg.optim.batch_size
        for spec in placements:
            sums = torch.zeros(4, device=self.device, dtype=torch.float64)  # kl*n, agree*n, n, nll*n
            for s in range(0, len(mine), bs):
                tokens, mask, documents, n = self._batch(rows, mine[s : s + bs])
                inputs, targets = tokens[:, :-1], tokens[:, 1:]
                with self.autocast():  # the logits, chunk by chunk (``linear_losses``): never [tokens, vocab] whole
                    t = self.teacher(inputs, "all-attention", documents=documents, return_hidden=True)
                    head = functools.partial(
                        _eval_terms, teacher_hidden=t, teacher_weight=self.teacher.output_weight, targets=targets,
                        mask=mask, compile=self.compile,
                    )  # fmt: skip
                    terms = self.student(inputs, spec, documents=documents, output_fn=head)
                fkl, _, nll, agree = terms.double()
                sums += torch.stack([fkl * n, agree * n, fkl.new_tensor(float(n)), nll * n])
            if self.world > 1:
                dist.all_reduce(sums)
            n = max(float(sums[2]), 1.0)
            out[spec] = {"kl": float(sums[0]) / n, "agreement": float(sums[1]) / n, "nll": float(sums[3]) / n}
        self.student.train(was_training)
        return out

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        """Train to ``optim.steps`` (or the time budget), checkpointing as configured, then write ``output/final``.
        Ctrl-C or SIGTERM ends the current step, saves a checkpoint and raises ``TrainingInterrupted``."""
        with StopRequest(self.log) as self._stop:
            return self._run()

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        o = cfg.optim
        if self.step >= o.steps:
            self.log(f"nothing to do: already at step {self.step} of {o.steps}")
        bar = None
        if self.rank == 0:
            try:
                from tqdm import tqdm

                bar = tqdm(
                    total=o.steps, initial=self.step, desc=cfg.mode, dynamic_ncols=True, disable=progress_disabled()
                )
            except ImportError:
                bar = None
        tokens_seen, flops_seen, t0 = 0, 0.0, time.perf_counter()
        last = {}
        interrupted = False
        while self.step < o.steps:
            row = self.train_step()
            tokens_seen += row["tokens"]
            flops_seen += self.step_flops.total  # this rank's share
            elapsed = time.perf_counter() - t0
            row["tokens_per_s"] = tokens_seen / max(elapsed, 1e-9)
            if self.device.type == "cuda":
                row["mfu"] = flops_seen / max(elapsed, 1e-9) / BF16_PEAK_FLOPS
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9  # this rank's GPU
            if self.step % cfg.log_every == 0 or self.step == o.steps:
                self._metrics(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if cfg.eval.every and (self.step % cfg.eval.every == 0 or self.step == o.steps):
                ev = self.evaluate()
                self._metrics({"step": self.step, "eval": ev})
            out_of_time = bool(o.max_minutes) and elapsed > 60 * o.max_minutes
            interrupted = self._stop.requested
            if self.world > 1:  # every rank must stop at the same step
                flag = torch.tensor([float(out_of_time), float(interrupted)], device=self.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                out_of_time, interrupted = bool(flag[0]), bool(flag[1])
            every = cfg.checkpoint.every
            if interrupted or (every and (self.step % every == 0 or self.step == o.steps or out_of_time)):
                self.save_checkpoint()
            last = row
            if interrupted:
                break
            if out_of_time:
                self.log(f"time budget of {o.max_minutes} min reached at step {self.step}")
                break
        if bar is not None:
            bar.close()
        if interrupted:
            raise TrainingInterrupted(self.step, latest_checkpoint(self.out / "checkpoints"))
        self.save_final()
        return last

    def save_final(self) -> None:
        """The trained supernet as an Apriel2 checkpoint in ``output/final`` (under FSDP: gathered to rank 0)."""
        model = self.student
        if self.fsdp:
            weights = {n: full(t) for n, t in self.student.state_dict().items()}  # every rank: collectives
            if self.rank == 0:
                model = Supernet.from_pretrained(self.cfg.model, device="cpu", dtype=torch.float32)
                model.load_state_dict(weights)
                model.presets, model.preset_meta = self.student.presets, self.student.preset_meta
        if self.rank == 0:
            model.save_pretrained(self.out / "final", copy_from=self.cfg.model)
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            # drop the DDP wrapper first: its reducer holds the process group, which would otherwise outlive
            # destroy_process_group and be torn down at interpreter exit, where gloo's threads can abort the process
            self.model = self.student
            gc.collect()
            dist.barrier()  # no rank tears its connections down while a peer still talks over them (gloo aborts)
            dist.destroy_process_group()


def _eval_terms(hidden, weight, *, teacher_hidden, teacher_weight, targets, mask, compile) -> torch.Tensor:
    """[FKL, RKL, NLL, agreement] of a student against the teacher (no gradients; ``linear_losses``)."""
    return linear_losses(hidden, weight, teacher_hidden, teacher_weight, targets, mask, compile=compile)[1]
