"""The run configuration: nested dataclasses, every field declared once with its default and its help.

    python -m ril_fast.train [--config FILE.yaml] [key=value ...]      # e.g. steps=50 optim.lr=3e-4

Precedence: the defaults below < the YAML files (in order) < the ``key=value`` overrides (left to right).
A key is a field name, dotted for a section's field (``rollout.temperature=0.7``; in YAML, nested under its
section or dotted alike). A path setting that starts with ``~`` is in the home folder. Values are parsed
by the field's type, never evaluated: int, float, bool (true/false, yes/no, on/off, 1/0), str, enum
(one of its values), list[str] (comma-separated, empty entries dropped: ``a,,b`` is ``a,b``, an empty value the
empty list) and Optional (``none`` or ``null`` is None). A data path (``train_data``, ``eval_data``, an entry of a
YAML ``teachers:`` list) that is blank but not empty, or an empty entry of that list, is an error: it would read
as the current folder. Unknown keys and unparsable values are errors that say what is valid (in a
YAML file, at which line); a value out of range says where it was set.
``--help`` prints every key with its default and help.

The mode is derived, never set: no teachers is RL only (Dr.GRPO with the judge reward, no
discriminator); K >= 1 teacher collections is RIL with K teachers (shared/RIL.md). Empty paths mean
"the built-in demo" (``ril_fast.demo.with_demo`` fills them): ``student=''`` uses the demo's tiny
student, ``train_data`` unset uses the demo's easy-VQA training split, and then unset ``teachers``
and ``eval_data`` take the demo's two teacher collections and its held-out test split.

The defaults are the built-in demo's, measured on it (a tiny random student, one-word answers, a
10-minute CPU budget; README, "What the demo shows"): a real 1B-8B student needs its own ``optim.lr``
(RL fine-tuning typically uses ~1e-6), ``optim.grad_clip`` and ``disc.grad_clip`` (typically 1.0), ``max_new_tokens``,
``group_size`` and ``steps``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path

import yaml

from ril_fast import settings
from ril_fast.data import LongPrompts
from ril_fast.export import ExportDtype
from ril_fast.files import write_text_atomic
from ril_fast.judge import JudgeKind
from ril_fast.kernels.disc_head import Pool
from ril_fast.models import Kernels
from ril_fast.settings import ConfigError, opt  # callers import ConfigError from here


# ----------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """Sampling the G student responses of each question."""

    temperature: float = opt(1.0, "sampling temperature τ; the policy's log-probs use logits / τ too")
    top_p: float = opt(1.0, "nucleus sampling: keep the smallest token set of this probability (1 = off)")
    top_k: int = opt(0, "keep only the k most probable tokens (0 = off); applied before top_p")
    batch_size: int = opt(64, "sequences generated together in one batched generate call")


@dataclass
class Optim:
    """AdamW for the student."""

    # 3e-3 measured on the demo (tiny student): 1e-3 for 60 steps stayed at eval 0.36 (yes/no only);
    # 5e-3 collapsed (eval 0 at step 100). See issue 4's note for the runs.
    lr: float = opt(3e-3, "peak learning rate of the student")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    beta1: float = opt(0.9, "AdamW's β1")
    beta2: float = opt(0.999, "AdamW's β2")
    # 0.02 on the demo: below every gradient norm of its runs (0.033-2.5), so each step is clipped to one size.
    # Eq. 2's gradient shrinks ~8x once the response format is learned, and AdamW (β2 0.999) would keep
    # dividing the later steps by the early, larger gradients: with 1.0 the demo reached 0.49 held-out at
    # 400 steps, with 0.02 0.66 at 350.
    grad_clip: float = opt(0.02, "clip the gradient's global norm to this (0 = no clipping)")
    warmup_steps: int = opt(5, "linear learning-rate warm-up from 0, in optimizer steps")


@dataclass
class Disc:
    """The discriminator D_φ (RIL only): Eq. 1 pre-training, then μ updates per batch."""

    lr: float = opt(1e-3, "learning rate of the discriminator's AdamW")
    weight_decay: float = opt(0.01, "the discriminator's AdamW weight decay")
    # The student's clip, which the demo's runs used for the discriminator too: its gradient norms (~0.7)
    # are all above it, so every update has one size.
    grad_clip: float = opt(0.02, "clip the discriminator's gradient's global norm to this (0 = no clipping)")
    pretrain_steps: int = opt(10, "Eq. 1 steps on initial-student vs teacher outputs before the RIL loop")
    pool: Pool = opt(Pool.LAST, "how a response's hidden states become one vector: last (end-of-turn row) or mean")
    threshold: float = opt(0.5, "r_sim = 1[D(q, o) < threshold]: the output reads as a teacher's")


@dataclass
class Loss:
    """Eq. 2, the token-level Dr.GRPO objective."""

    eps_low: float = opt(0.2, "lower clip of the ratio: clip(ρ, 1 - eps_low, 1 + eps_high)")
    eps_high: float = opt(0.2, "upper clip of the ratio")
    kernels: Kernels = opt(Kernels.AUTO, "code for the log-probs and the loss: auto (fused: Triton on GPU, "
                                         "chunked torch on CPU) | triton | torch | eager (full-logits references, "
                                         "a benchmark baseline)")


@dataclass
class Batch:
    """How many questions a step takes and how they are packed."""

    questions_per_step: int = opt(32, "questions per step across all ranks; each gives G student (+ G teacher) outputs")
    max_tokens: int = opt(4096, "token budget of one packed micro-batch (prompt + response tokens)")
    padded: bool = opt(False, "lay micro-batches out right-padded instead of packed (a benchmark baseline)")
    activation_checkpointing: bool = opt(False, "student and discriminator updates keep each layer's input only "
                                                "and recompute the rest in the backward: activation memory of "
                                                "one layer instead of all, for ~1/3 more update compute")
    keep_gathered: bool = opt(True, "on one rank, each layer keeps its gathered (bf16 on GPU) weights from its "
                                    "forward to its backward instead of gathering them again: fewer copies, one "
                                    "more copy of the model in memory during updates (weights sharded over "
                                    "several ranks: always gathered again)")
    shard_ranks: int = opt(0, "ranks that shard one copy of the models (FSDP2); 0: all ranks. Over several nodes, "
                              "the GPUs of a node (e.g. 8) is HSDP: each node holds a sharded copy and only "
                              "gradients cross nodes; must divide the number of ranks")
    cpu_offload: bool = opt(False, "keep the student's and the discriminator's sharded fp32 weights, gradients and "
                                   "AdamW moments, and the reference, in the CPU's memory (FSDP2 CPU offload; the "
                                   "optimizers step there): the GPU holds gathered bf16 weights, a step's gradients "
                                   "(one rank per copy; HSDP: their shard) and activations (3B: 21 instead of 105 GiB "
                                   "before activations), for copies between CPU and GPU every pass (on CPUs, where it "
                                   "all is already: the same numbers, through FSDP's offload path and AdamW's fused "
                                   "CPU kernel)")
    offload_pinned: bool = opt(True, "with cpu_offload on GPUs, the offloaded weights and gradients in pinned memory: "
                                     "asynchronous copies, but torch's pinned cache rounds each tensor up to a power "
                                     "of two (the 3b preset: 141 instead of 98 GiB); false: pageable memory, slower "
                                     "copies")


# ----------------------------------------------------------------------------------------------------
# The config
# ----------------------------------------------------------------------------------------------------
@dataclass
class Config:
    """Everything a run reads. Construct through ``load_config``; ``__post_init__`` checks the values."""

    student: str = opt("", "student model folder (HF format); empty: the built-in demo's tiny Qwen2.5-VL")
    train_data: str | None = opt(None, "training JSONL (ril_fast.data); none: the demo's easy-VQA training split")
    teachers: list[str] | None = opt(None, "teacher collections, one JSONL per teacher; empty: RL only; "
                                           "none: the demo's two when train_data is the demo's, else RL only")
    judge: JudgeKind = opt(JudgeKind.RULE, "correctness judge for r_ans and evaluation: rule | hf | http")
    judge_url: str = opt("", "http judge: base URL of the OpenAI-compatible server")
    judge_model: str = opt("", "hf judge: model folder; http judge: the served model name")
    judge_cache: str = opt("", "persistent judge cache: an SQLite file shared by ranks and runs (teacher "
                               "verdicts are judged once, ever); empty: in memory, this run only")
    judge_batch_size: int = opt(32, "hf judge: prompts per forward pass")
    judge_concurrency: int = opt(16, "http judge: requests in flight at once")
    judge_timeout_s: float = opt(60.0, "http judge: seconds to wait for the connection and for each read")
    judge_retries: int = opt(3, "http judge: retries of a request after a timeout, a dropped connection, "
                                "HTTP 408, 429 or 5xx, with back-off 0.5 s, 1 s, 2 s, ... (API key: $RIL_JUDGE_API_KEY "
                                "or $OPENAI_API_KEY, never the config)")
    steps: int = opt(350, "RIL steps (batches of questions), after discriminator pre-training")
    group_size: int = opt(2, "G: student samples per question (and teacher outputs per question in RIL)")
    mu: int = opt(1, "μ: discriminator and policy updates per batch (1: π_old = π_θ, ratio 1)")
    beta: float = opt(0.0, "β: weight of the k3 KL to the reference model (0: no reference model)")
    max_new_tokens: int = opt(12, "L_max: generation budget, also Dr.GRPO's constant normaliser")
    max_image_pixels: int = opt(0, "Qwen-VL students: resize each image to at most this many pixels, in place of "
                                   "the image processor's own limit (a token per 28x28, Qwen3-VL 32x32: 1003520 is "
                                   "~1280 tokens; a side never under one token; final/'s image processor keeps it); "
                                   "0: the student's own (Qwen2.5-VL: 12845056, ~16384 tokens)")
    long_prompts: LongPrompts = opt(LongPrompts.REFUSE, "an example whose prompt (images included) leaves no room "
                                                        "for max_new_tokens within batch.max_tokens or the model's "
                                                        "limit, the smaller (held-out ones: the model's limit: its "
                                                        "context, sliding window or LongRoPE original context, the "
                                                        "smallest), or whose image the image processor refuses, "
                                                        "found before any model loads: "
                                                        "refuse (the run stops, naming its line) | skip (left out, "
                                                        "counted)")
    seed: int = opt(0, "seed of data order, sampling and initialisation")
    output_dir: str = opt("runs/ril", "run folder: config.yaml, metrics.jsonl, curves, final/ model")
    export_dtype: ExportDtype = opt(ExportDtype.AUTO, "final/'s weights: auto (the dtype the forwards ran in: "
                                                      "bfloat16 on GPUs, so final/ is the model the run sampled "
                                                      "and evaluated, at half the size; float32 on CPUs) | float32 "
                                                      "(the optimiser's master weights) | bfloat16")
    eval_data: str | None = opt(None, "held-out JSONL scored with greedy answers; empty: no evaluation; "
                                      "none: the demo's test split when train_data is the demo's")
    eval_every: int = opt(50, "evaluate every this many steps, and before the first and after the last (0: only then)")
    eval_max_examples: int = opt(300, "evaluate on the first this many held-out examples (0: all)")
    log_every: int = opt(1, "write a metrics line every this many steps")
    progress: bool = opt(True, "show a progress bar with the key numbers (false: log lines only)")
    checkpoint_every: int = opt(20, "write output_dir/step-N/ every this many steps and after the last "
                                    "(0: only on SIGTERM or Ctrl-C)")
    keep_checkpoints: int = opt(2, "keep the newest this many checkpoints (0: all)")
    resume: str = opt("auto", "auto: continue from the newest checkpoint in output_dir if there is one; "
                              "none: start afresh (refused where checkpoints are); or a checkpoint folder")
    max_bad_steps: int = opt(3, "stop the run after this many optimizer steps in a row were skipped for a "
                                "non-finite loss or gradient norm")
    rollout: Rollout = field(default_factory=Rollout, metadata={"help": Rollout.__doc__})
    optim: Optim = field(default_factory=Optim, metadata={"help": Optim.__doc__})
    disc: Disc = field(default_factory=Disc, metadata={"help": Disc.__doc__})
    loss: Loss = field(default_factory=Loss, metadata={"help": Loss.__doc__})
    batch: Batch = field(default_factory=Batch, metadata={"help": Batch.__doc__})

    def __post_init__(self):
        settings.check_types(self)
        for name in ("student", "train_data", "eval_data", "output_dir", "resume", "judge_model", "judge_cache"):
            setattr(self, name, _home(getattr(self, name)))  # YAML keeps ~ as written, as a quoted shell word does
        if self.teachers:
            self.teachers = [_home(t) for t in self.teachers]
        checks = [
            (self.steps >= 0, "steps must be >= 0"),
            (-2**31 < self.seed < 2**31, "seed must lie in (-2^31, 2^31): each step's sampling seed is made from it"),
            (self.group_size >= 1, "group_size (G) must be >= 1"),
            (not self.rl_only or self.group_size >= 2,
             "group_size (G) must be >= 2 in RL-only mode: a group of one output has zero advantage"),
            (self.mu >= 1, "mu (μ) must be >= 1"),
            (self.beta >= 0, "beta (β) must be >= 0"),
            (self.max_new_tokens >= 1, "max_new_tokens (L_max) must be >= 1"),
            (self.max_image_pixels >= 0, "max_image_pixels must be >= 0 (0 = the student's image processor's own)"),
            (self.eval_every >= 0, "eval_every must be >= 0"),
            (self.eval_max_examples >= 0, "eval_max_examples must be >= 0"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0 = only on SIGTERM)"),
            (self.keep_checkpoints >= 0, "keep_checkpoints must be >= 0 (0 = keep all)"),
            (self.resume != "", "resume must be auto, none or a checkpoint folder"),
            (self.max_bad_steps >= 1, "max_bad_steps must be >= 1"),
            (self.output_dir != "", "output_dir must not be empty"),
            (self.train_data != "", "train_data must not be empty (none: the built-in demo's training split)"),
            *((False, f"{key}: {problem}") for key in (*_DATA_PATHS, *_DATA_PATH_LISTS)
              if (problem := _blank_path(key, getattr(self, key)))),  # values set in code
            *judge_checks(self),
            (self.rollout.temperature > 0, "rollout.temperature must be > 0"),
            (0 < self.rollout.top_p <= 1, "rollout.top_p must be in (0, 1]"),
            (self.rollout.top_k >= 0, "rollout.top_k must be >= 0 (0 = off)"),
            (self.rollout.batch_size >= 1, "rollout.batch_size must be >= 1"),
            (0 < self.optim.lr < float("inf"), "optim.lr must be > 0 and finite"),
            (self.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
            (0 <= self.optim.beta1 < 1 and 0 <= self.optim.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)"),
            (self.optim.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 = off)"),
            (self.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
            (0 < self.disc.lr < float("inf"), "disc.lr must be > 0 and finite"),
            (self.disc.weight_decay >= 0, "disc.weight_decay must be >= 0"),
            (self.disc.grad_clip >= 0, "disc.grad_clip must be >= 0 (0 = off)"),
            (self.disc.pretrain_steps >= 0, "disc.pretrain_steps must be >= 0"),
            (0 < self.disc.threshold < 1, "disc.threshold must be in (0, 1)"),
            (0 <= self.loss.eps_low < 1, "loss.eps_low must be in [0, 1)"),
            (self.loss.eps_high >= 0, "loss.eps_high must be >= 0"),
            (self.batch.questions_per_step >= 1, "batch.questions_per_step must be >= 1"),
            (self.batch.shard_ranks >= 0, "batch.shard_ranks must be >= 0 (0 = all ranks)"),
            (self.batch.max_tokens > self.max_new_tokens,
             "batch.max_tokens must exceed max_new_tokens: a sample holds a prompt and a response"),
        ]
        # Each check states what must hold, so NaN (false under every comparison) fails it too.
        errors = [message for ok, message in checks if not ok]
        if errors:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errors), problems=errors)

    # -- derived ---------------------------------------------------------------------------------
    @property
    def rl_only(self) -> bool:
        """True when there are no teacher collections: Dr.GRPO on the judge reward, no discriminator."""
        if self.teachers is None:  # the demo's two teachers when the data is the demo's, else none
            return self.train_data is not None
        return not self.teachers

    # -- output ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The full config as nested plain Python (enums as their values), as YAML writes it."""
        return settings.plain(asdict(self))

    def save(self, path: str | Path) -> Path:
        """Write the full resolved config as YAML (``load_config(["--config", path])`` reads it back)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))

    def describe(self) -> str:
        """One aligned ``key = value`` line per field, ``*`` marking values changed from the default."""
        default = settings.flatten(Config().to_dict())
        flat = settings.flatten(self.to_dict())
        width = max(map(len, flat))
        lines = ["config (* = not the default)"]
        for key, value in flat.items():
            mark = "" if default.get(key, MISSING) == value else " *"
            lines.append(f"  {key:<{width}} = {settings.show(value)}{mark}")
        return "\n".join(lines)

    def differences(self, path: str | Path, *, unsaved_as_default: bool = False) -> list[str]:
        """The keys whose values differ between this config and the one saved at ``path`` (``save``). A key the
        saved config lacks (written before the setting existed) differs, or, with ``unsaved_as_default``, differs
        only where this config does not take its default."""
        saved = settings.flatten(yaml.safe_load(Path(path).read_text()) or {})
        if unsaved_as_default:
            saved = {**settings.flatten(type(self)().to_dict()), **saved}
        mine = settings.flatten(self.to_dict())
        return [k for k in mine if saved.get(k, MISSING) != mine[k]]

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        """A config from nested (YAML-style) data over the defaults; unknown keys are errors."""
        return settings.from_nested(cls, data, check_value=_blank_path)


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------
def judge_checks(s) -> list[tuple[bool, str]]:
    """``(ok, message)`` for each check of the judge settings of ``s``: a :class:`Config`, or the judge CLIs'
    parsed options (``ril_fast.judge.add_judge_arguments``: the same names, ``judge`` a string)."""
    kind = s.judge
    return [
        (kind != JudgeKind.HTTP or bool(s.judge_url and s.judge_model), "judge=http needs judge_url and judge_model"),
        (kind != JudgeKind.HF or bool(s.judge_model), "judge=hf needs judge_model (a model folder)"),
        (s.judge_batch_size >= 1, "judge_batch_size must be >= 1"),
        (s.judge_concurrency >= 1, "judge_concurrency must be >= 1"),
        (0 < s.judge_timeout_s < 1e9, "judge_timeout_s must be > 0 and finite (under 1e9 s)"),
        (s.judge_retries >= 0, "judge_retries must be >= 0"),
        (kind != JudgeKind.HTTP or s.judge_url.startswith(("http://", "https://")),
         "judge_url must start with http:// or https://"),
    ]


def load_config(argv: list[str]) -> Config:
    """Parse ``[--config FILE.yaml] [key=value ...]`` into a checked Config (see the module docstring).

    ``--help`` / ``-h`` prints every key with its default and help, then exits.
    """
    argv = list(argv)
    if "--help" in argv or "-h" in argv:
        print(help_text())
        raise SystemExit(0)
    return settings.load(Config, argv, check_value=_blank_path)


def valid_keys() -> list[str]:
    """Every settable dotted key of Config, in declaration order."""
    return settings.valid_keys(Config)


def help_text() -> str:
    """Every key with its type, default and help, for ``--help``."""
    return settings.help_text(Config, __doc__)


# Data-path settings that a blank value would silently turn into another path (Path("") is the current folder)
_DATA_PATHS = ("train_data", "eval_data")
_DATA_PATH_LISTS = ("teachers",)


def _blank_path(key: str, value) -> str | None:
    """What is wrong with a parsed data-path setting's value, or None: ``train_data`` / ``eval_data`` of blanks
    (empty keeps its meaning), an empty or blank entry of ``teachers`` (a command line's ``a,,b`` has none left).
    ``load_config``'s ``check_value`` and a check of ``Config.__post_init__`` (values set in code)."""
    if key in _DATA_PATHS and isinstance(value, str) and value and not value.strip():
        meaning = "none: the built-in demo's training split" if key == "train_data" else "empty: no evaluation"
        return f"{value!r} is blank: give a path ({meaning})"
    if key in _DATA_PATH_LISTS and isinstance(value, list):
        if blank := [n for n, entry in enumerate(value, start=1) if not entry.strip()]:
            return (f"entry {blank[0]} of {value!r} is {'blank' if value[blank[0] - 1] else 'empty'}: give each "
                    f"teacher collection's path, or remove the entry")
    return None


def _home(value):
    """A path setting with a leading ``~`` (``~/runs``, ``~user/x``) in the home folder, as a shell expands it."""
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


if __name__ == "__main__":  # python -m ril_fast.config [--config FILE] key=value ...: the resolved settings
    try:
        print(load_config(sys.argv[1:]).describe())
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
