"""Build recipes: every knob of ``gearshift build`` for the SmolLM2 teacher on one H200, and a tiny CPU version.

The SmolLM2 recipe, and why:

- **Sliding window 1024 tokens.** Presets are judged by modelled decode speed at 8k context (``report.py``: bytes
  per decode step at batch 64, bf16). A full-attention layer reads 8192 positions of K/V per row there, a
  1024-window layer 1/8 of that, GDN/KDA a fixed 147 KiB state. So all-SWA is 6.9x all-attention, all-GDN 14.1x,
  all-KDA 13.6x; 12 attention layers + 18 SWA give 2.06x, 2 attention layers + 28 SWA 4.97x: a 2x preset keeps ~12
  of the 30 attention layers (the ones retrieval needs), a 5x preset still has 1-3 with GDN/KDA layers making up
  the cost. A 2048 window would cap all-SWA at 3.8x (a 5x preset could use SWA only sparingly), a 256 window
  (the old pipeline's) at 19x but would see 256 tokens of an 8k context; 1024 also covers every prompt of the five
  multiple-choice tasks (all under ~300 tokens), on which SWA then differs from attention only by its training.
- **Align, then distill; short, then long.** Alignment (layer-local, every mixer every step) closed most of the
  KL gap in the H200 sessions; stochastic distillation then repairs what compounds across layers. Both start on
  2k-token sequences (traces plus composed documents up to 2k), then distillation continues on 8k documents, the
  teacher's context, where sliding windows, GDN and KDA must carry information across thousands of tokens.
- **Sampler:** ``full_layout`` (uniform over mixer counts: placements with many attention layers, like a 2x
  preset, and with few, like a 5x one, as often as the middle), with a quarter of the steps on all-SWA, all-GDN
  and all-KDA, the placements the KL goals name. Losses as in the H200 sessions: activation 0.5, reverse KL 1.0,
  forward KL 0.5.
- **Presets** by the exact DP over a surrogate fitted to KL measured on held-out 4k documents, at 2x and 5x the
  modelled decode speed of all-attention at 8k (batch 64).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.longctx_sets import LongContextConfig
from ..evals.tasks import DEFAULT_TASKS


@dataclass
class TrainStage:
    """One training stage: its data ('short' = traces + train_short, 'long' = train_long), sequence length, rows
    per step, peak learning rate and share of the training minutes."""

    mode: str
    data: str
    seq_len: int
    batch_size: int
    lr: float
    share: float
    warmup_steps: int = 10


@dataclass
class Recipe:
    name: str
    window: int
    minutes: float  # training minutes (alignment + distillation), split by the stages' shares
    reserve_minutes: float  # what the stages after training take (for --budget-minutes)
    # data
    template_prompts: int | None  # topic x template prompts used (None: all 1,760)
    question_prompts: int
    trace_rounds: int
    trace_tokens: int
    trace_batch: int
    longctx: LongContextConfig
    completion_batch_tokens: int  # prefix tokens per batch of teacher-written recall answers
    # training
    stages: list[TrainStage]
    sampler: dict = field(
        default_factory=lambda: {
            "kind": "full_layout",
            "placements": {"all-sliding_window": 1.0, "all-gdn": 1.0, "all-kda": 1.0},
            "predefined_prob": 0.25,
        }
    )
    loss: dict = field(default_factory=lambda: {"activation": 0.5, "reverse_kl": 1.0, "forward_kl": 0.5})
    # measurement
    kl_lengths: tuple[int, ...] = (1024, 4096, 8192)
    kl_mixes: tuple[str, ...] = ("Reg|Lklhd-26", "Reg|Lklhd-18", "Reg|Lklhd-10")  # paper mixes also measured
    eval_batch_tokens: int = 16384
    place_placements: int = 96
    place_set: str = "place_4096"
    speedups: tuple[float, ...] = (2.0, 5.0)
    fit_ranges: tuple[int, ...] = (1, 2)  # pair-interaction ranges tried; the best cross-validated one is used
    fit_estimator: str = "bayes_ridge"  # "auto" also cross-validates lasso: minutes on a CPU for r = 2
    cost_context: int = 8192
    cost_batch: int = 64
    # evaluation
    tasks: tuple[str, ...] = DEFAULT_TASKS
    task_limit: int | None = 1000
    niah_lengths: tuple[int, ...] = (1024, 2048, 4096, 8000)
    niah_depths: tuple[float, ...] = (0.0, 25.0, 50.0, 75.0, 100.0)
    niah_trials: int = 5
    niah_presets: tuple[str, ...] | None = ("speed-2x",)  # besides all-attention (None: every preset)
    spec_lengths: tuple[int, ...] = (1024, 8192)
    spec_prompts: int = 4
    spec_tokens: int = 32
    spec_k: int = 4
    seed: int = 0

    @property
    def context(self) -> int:
        return max(self.kl_lengths)


def smollm2() -> Recipe:
    """SmolLM2-135M-Instruct on one H200 in about 25 minutes (see the module docstring)."""
    return Recipe(
        name="smollm2",
        window=1024,
        minutes=12.0,
        reserve_minutes=7.5,
        template_prompts=None,
        question_prompts=2000,
        trace_rounds=1,
        trace_tokens=384,
        trace_batch=512,
        longctx=LongContextConfig.curriculum(
            short=(1024, 2048),
            long=8192,
            train_short=2400,
            train_long=700,
            kl=((1024, 32), (4096, 12), (8192, 8)),
            recall=((4096, 8), (8192, 6)),
            place=(4096, 12),
        ),
        completion_batch_tokens=1 << 18,
        stages=[
            TrainStage("align", "short", 2048, 8, 3e-3, 0.25),
            TrainStage("distill", "short", 2048, 8, 3e-4, 0.30),
            TrainStage("distill", "long", 8192, 2, 2e-4, 0.45, warmup_steps=5),
        ],
    )


def tiny() -> Recipe:
    """The same stages on the built-in tiny teacher (4 layers, byte tokenizer, 1k context): a CPU smoke run of a
    minute or two. Byte tokens make documents long in tokens, so its lengths are 256-768."""
    return Recipe(
        name="tiny",
        window=64,
        minutes=0.4,
        reserve_minutes=1.0,
        template_prompts=48,
        question_prompts=24,
        trace_rounds=1,
        trace_tokens=48,
        trace_batch=64,
        longctx=LongContextConfig.curriculum(
            short=(384, 448),
            long=768,
            train_short=24,
            train_long=6,
            kl=((256, 1), (512, 1), (768, 2)),
            recall=((512, 1),),
            place=(384, 2),
            heldout_fraction=0.25,
            closing_tokens=32,
            facts=(1, 3),
            questions=(1, 2),
            repeat_tokens=(16, 48),
        ),
        completion_batch_tokens=1 << 13,
        stages=[
            TrainStage("align", "short", 384, 1, 1e-2, 0.3, warmup_steps=2),
            TrainStage("distill", "short", 384, 1, 3e-3, 0.3, warmup_steps=2),
            TrainStage("distill", "long", 768, 1, 2e-3, 0.4, warmup_steps=2),
        ],
        kl_lengths=(256, 512, 768),
        kl_mixes=(),
        eval_batch_tokens=2048,
        place_placements=12,
        place_set="place_384",
        fit_ranges=(1,),
        cost_context=768,
        task_limit=4,
        niah_lengths=(256, 512),
        niah_depths=(0.0, 100.0),
        niah_trials=1,
        spec_lengths=(256, 768),
        spec_prompts=1,
        spec_tokens=8,
        spec_k=3,
    )


RECIPES = {"smollm2": smollm2, "tiny": tiny}
