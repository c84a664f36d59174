"""Where every second of an RIL step goes: per phase, time, tokens/s, TFLOP/s, MFU and peak memory.

    python bench/throughput.py --preset tiny                     # CPU smoke run (the test suite runs it)
    python bench/throughput.py --preset 3b --compare             # one GPU: every side-by-side below
    python bench/throughput.py --preset qwen3vl-4b --activation-checkpointing   # Qwen3-VL-4B's shapes
    python bench/throughput.py --preset 3b --padded --eager      # choose the layouts / kernels to run
    torchrun --nproc_per_node=N bench/throughput.py --preset 7b --profile runs/trace     # FSDP2, N ranks

It builds a student of the preset's real shape with random weights and a synthetic data set (images,
question and response lengths drawn from a realistic mix: ``bench/_workload.py``), then runs full RIL
steps through the trainer itself (``ril_fast.train.setup`` and ``train_step``): rollouts, discriminator
updates, judge, discriminator scores, old/reference log-probs, policy updates, optimiser. After
``--warmup`` unmeasured steps it measures ``--steps`` steps and reports per phase

    seconds per step, its share of the step, tokens per second (what a phase's tokens are: TOKENS below),
    achieved TFLOP/s from analytic model FLOPs (``ril_fast/flops.py`` gives every formula), MFU against a
    dense matmul peak measured in the same run (bf16 on GPU, fp32 on CPU), and peak memory (GPU: the
    allocator's peak inside the phase; CPU: the process's resident size).

Side by side, in one run (each configuration builds its own run of the same workload and seed):
    --packed / --padded   the step's micro-batches packed (varlen) or right-padded (``batch.padded``)
    --fused / --eager     the fused log-prob / loss kernels or their eager full-logits references
                          (``loss.kernels``); the discriminator's d→1 head keeps its automatic choice
Giving both flags of a pair runs both; ``--compare`` gives all four. The first of each pair is the base
configuration; each other one changes one thing, and the ratio table divides their times. With the base
configuration two phases also run alone against a baseline (``bench/_baselines.py``; ``--no-baselines``
skips them):
    policy update         on the last step's micro-batches, through ril_fast's kernels and through
                          Liger's ``LigerFusedLinearGRPOLoss(loss_type="dr_grpo")`` (same decoder pass)
    rollout               the first batch's questions, through the trainer's FSDP2 model and through
                          plain HF ``generate`` on an unsharded model of the same weights

Communication: one rank has none. Under FSDP2 on several ranks the collectives overlap the phases
that issue them, so they are not a phase of their own: ``--profile DIR`` records one extra step with
torch.profiler, and the "communication" row gives the time spent in collective kernels (NCCL on GPU;
gloo's ops on CPU), attributed to the phases they ran in. Without ``--profile`` it is not measured.

Rows go to ``bench/results/throughput.csv`` (one per configuration and phase, with the device, date,
git SHA, the torch / triton / transformers / liger-kernel versions, preset and every setting; a file with
an older header gains the new columns, empty in its old rows); the tables are printed as markdown.
``--profile DIR`` also writes a chrome trace per rank.

TOKENS: rollout, generated tokens; disc_update / policy_update, μ × all tokens of every output;
disc_score, all tokens (no row with --rl-only: there is no discriminator); old_ref_logprobs, all tokens ×
frozen models; judge, response tokens judged; step, all tokens of every output (the trainer's tokens_per_s);
policy_update_isolated, all tokens of the micro-batches it runs on (this rank); rollout_isolated, generated
tokens. The optimiser's GB/s is per device: under FSDP2 each rank steps its 1/N shard of the parameters.
"""

import argparse
import contextlib
import dataclasses
import datetime
import io
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py etc., also under runpy / pytest
from _common import (CUDA, append_csv, copy_bandwidth_gbps, device_name, free_memory, git_sha,  # noqa: E402
                     markdown_table, sig, unless_out_of_memory, versions)
from _baselines import compare_policy_update, plain_generate, rollout_inputs, time_rollout  # noqa: E402
from _probe import PhaseProbe, RecordingProcessor, collective_seconds  # noqa: E402
from _workload import PRESETS, build  # noqa: E402

from ril_fast import distributed, memory, train  # noqa: E402
from ril_fast.config import Config  # noqa: E402
from ril_fast.flops import ADAMW_BYTES_PER_PARAM, Sample, Shapes, matmul_peak_tflops, phase_flops  # noqa: E402
from ril_fast.models import Kernels  # noqa: E402
from ril_fast.preflight import DoesNotFit  # noqa: E402

PHASES = ("rollout", "disc_update", "judge", "disc_score", "old_ref_logprobs", "policy_update", "optimizer")
# torch .. liger_kernel (versions), rl_only, image_tokens (the most per image), seed, activation_checkpointing ..
# offload_pageable, warmup and reps came after the first GPU rows and are empty in them: append_csv extends an
# older header when it writes to its file.
COLUMNS = ["date", "git_sha", "device", "torch", "triton", "transformers", "liger_kernel", "world_size", "preset",
           "layers", "provider", "layout", "kernels", "dtype", "rl_only", "questions_per_step", "group_size", "mu",
           "beta", "max_new_tokens", "max_tokens", "image_tokens", "seed", "activation_checkpointing",
           "gather_again", "cpu_offload", "offload_pageable", "warmup", "steps", "reps",
           "prompt_tokens", "student_tokens", "teacher_tokens", "phase", "seconds", "share", "tokens", "tokens_per_s",
           "tflop", "tflops", "mfu", "gb_per_s", "peak_gib", "matmul_peak_tflops", "copy_peak_gbps", "note"]


# ----------------------------------------------------------------------------------------------------
# One configuration: set up, warm up, measure
# ----------------------------------------------------------------------------------------------------
def make_config(args, workload, out_dir: Path, *, padded: bool, kernels: Kernels) -> Config:
    """The trainer config of one benchmarked configuration."""
    teachers = [] if args.rl_only else [str(t) for t in workload.teachers]
    return Config.from_dict({
        "student": str(workload.student), "train_data": str(workload.train), "teachers": teachers,
        "eval_data": "", "output_dir": str(out_dir), "progress": False, "seed": args.seed,
        "group_size": args.group_size, "mu": args.mu, "beta": args.beta, "max_new_tokens": args.max_new_tokens,
        # Throughput does not depend on the learning rate; a tiny one keeps random weights from diverging.
        "optim": {"lr": 1e-7}, "disc": {"lr": 1e-7},
        "batch": {"questions_per_step": args.questions_per_step, "max_tokens": args.max_tokens, "padded": padded,
                  "activation_checkpointing": args.activation_checkpointing,
                  "keep_gathered": not args.gather_again, "cpu_offload": args.cpu_offload,
                  "offload_pinned": not args.offload_pageable},
        "loss": {"kernels": kernels},
        "rollout": {"batch_size": max(64, args.questions_per_step * args.group_size)},
    })


def _record_step(recorder: RecordingProcessor, metrics: dict) -> dict:
    return dict(metrics=metrics, prompts=list(recorder.prompts), students=list(recorder.students),
                teachers=list(recorder.teachers), encoded=list(recorder.encoded))


def run_configuration(args, cfg: Config, shapes: Shapes, *, base: bool, profile_dir: Path | None):
    """Set up a run of ``cfg``, run the warm-up and measured steps and, for the base configuration, the
    baselines (``bench/_baselines.py``) and the profiled step -> (step records, {phase: baseline results},
    collective seconds or None)."""
    with contextlib.redirect_stdout(io.StringIO()):  # setup prints the resolved config
        run = train.setup(cfg)
    recorder = RecordingProcessor(run.processor)
    run.processor = recorder
    records, baselines, comms = [], {}, None
    for step in range(1, args.warmup + args.steps + 1):
        recorder.clear()
        metrics = train.train_step(run, step, timer=PhaseProbe())
        if run.dist.is_main:  # progress: a big preset's step takes minutes
            phases = ", ".join(f"{k[5:]} {v:.3g}" for k, v in metrics.items() if k.startswith("time/"))
            print(f"[{Path(cfg.output_dir).name}] step {step}/"
                  f"{args.warmup + args.steps}{' (warm-up)' if step <= args.warmup else ''}: {phases} s",
                  file=sys.stderr, flush=True)
        if step > args.warmup:
            records.append(_record_step(recorder, metrics))
    if base and not args.no_baselines:
        prompts, settings = rollout_inputs(cfg, run.dist.rank, run.dist.world_size)
        baselines["rollout"] = [unless_out_of_memory("ril_fast", lambda: time_rollout(
            "ril_fast", run.student, recorder.inner, prompts, settings, shapes, args.reps))]
        if _liger_available():
            baselines["policy_update"] = compare_policy_update(run, records[-1]["encoded"], shapes, args.reps)
    if base and profile_dir is not None:
        comms = profile_step(run, recorder, profile_dir, args.warmup + args.steps + 1, args.preset)
    del run, recorder
    free_memory()
    if "rollout" in baselines:  # loaded once the run is gone: two copies of a 7B model need not fit at once
        baselines["rollout"].append(unless_out_of_memory(
            "hf_generate", lambda: plain_generate(cfg, prompts, settings, shapes, args.reps)))
    return records, baselines, comms


def profile_step(run, recorder, folder: Path, step: int, preset: str) -> dict | None:
    """One more step under torch.profiler: a chrome trace per rank in ``folder``; returns the collective
    seconds (several ranks) or None (one rank)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    recorder.clear()
    with profile(activities=activities) as prof:
        train.train_step(run, step, timer=PhaseProbe())
    folder.mkdir(parents=True, exist_ok=True)
    trace = folder / f"throughput-{preset}-rank{run.dist.rank}.json"
    prof.export_chrome_trace(str(trace))
    if run.dist.is_main:
        key = "self_device_time_total" if CUDA else "self_cpu_time_total"
        print(f"\ntorch.profiler, one step (trace: {trace}):\n{prof.key_averages().table(sort_by=key, row_limit=15)}")
    return collective_seconds(prof) if run.dist.world_size > 1 else None


# ----------------------------------------------------------------------------------------------------
# From step records to rows
# ----------------------------------------------------------------------------------------------------
def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def phase_rows(args, cfg: Config, shapes: Shapes, records: list[dict], *, n_student: int, world: int,
               peak_tflops: float, copy_gbps: float, comms: dict | None) -> list[dict]:
    """One row per phase (and the whole step) of one configuration, over the measured steps; with several
    ranks the FLOPs and tokens are summed over ranks and the times and memory are the slowest rank's. The
    optimiser's GB/s is per device (each rank steps its 1/``world`` shard of the ``n_student`` parameters),
    beside the per-device copy peak; with ``args.rl_only`` there is no disc_score row (no discriminator)."""
    frozen = int(cfg.mu > 1) + int(cfg.beta > 0)
    per_step = []
    for r in records:
        samples = [Sample.of(e) for e in r["encoded"]]
        flops = phase_flops(shapes, r["prompts"], r["students"], samples, group_size=cfg.group_size, mu=cfg.mu,
                            frozen_models=frozen, disc=not args.rl_only)
        total = sum(s.length for s in samples)
        tokens = {"rollout": sum(s.response for s in r["students"]), "disc_update": cfg.mu * total,
                  "judge": sum(s.response for s in samples), "disc_score": total,
                  "old_ref_logprobs": frozen * total, "policy_update": cfg.mu * total, "optimizer": 0, "step": total}
        per_step.append((r["metrics"], flops, tokens))
    # Without a discriminator (--rl-only) the trainer still times an empty disc_score block: not a phase.
    present = [p for p in PHASES if f"time/{p}" in per_step[0][0] and not (args.rl_only and p == "disc_score")]
    names = present + ["step"]
    # [seconds, peak] reduced with max over ranks; [flops, tokens] with a sum.
    local_max = torch.tensor([[_mean(m.get(f"time/{p}", 0.0) for m, _, _ in per_step) for p in present]
                              + [_mean(m["step_time_s"] for m, _, _ in per_step)],
                              [max(m.get(f"peak_bytes/{p}", 0) for m, _, _ in per_step) for p in present]
                              + [max(m.get(f"peak_bytes/{p}", 0) for m, _, _ in per_step for p in present)]],
                             dtype=torch.float64, device=distributed.init().device)
    local_sum = torch.tensor([[_mean(f.get(p, 0.0) for _, f, _ in per_step) for p in present]
                              + [_mean(sum(f.values()) for _, f, _ in per_step)],
                              [_mean(t[p] for _, _, t in per_step) for p in names]],
                             dtype=torch.float64, device=local_max.device)
    seconds, peaks = distributed.all_reduce_max(local_max).tolist()
    flops, tokens = distributed.all_reduce_sum(local_sum).tolist()

    first = records[0]
    settings = dict(
        world_size=world, preset=args.preset, layers=args.layers or "", provider="ril_fast",
        layout="padded" if cfg.batch.padded else "packed", kernels=cfg.loss.kernels.value,
        dtype="bf16" if CUDA else "fp32", questions_per_step=cfg.batch.questions_per_step,
        group_size=cfg.group_size, mu=cfg.mu, beta=cfg.beta, max_new_tokens=cfg.max_new_tokens,
        max_tokens=cfg.batch.max_tokens, steps=len(records),
        prompt_tokens=sig(_mean(p.length for p in first["prompts"])),
        student_tokens=sig(_mean(s.response for r in records for s in r["students"])),
        teacher_tokens=sig(_mean(s.response for r in records for s in r["teachers"])) if not args.rl_only else "",
        matmul_peak_tflops=sig(peak_tflops), copy_peak_gbps=sig(copy_gbps))
    step_seconds = seconds[-1]
    rows = []
    for i, name in enumerate(names):
        s, f, t = seconds[i], flops[i], tokens[i]
        row = dict(settings, phase=name, seconds=sig(s), share=sig(s / step_seconds) if step_seconds else "",
                   tokens=sig(t) if t else "", tokens_per_s=sig(t / s) if t and s else "",
                   tflop=sig(f / 1e12) if f else "", tflops=sig(f / s / 1e12) if f and s else "",
                   mfu=sig(f / s / 1e12 / (peak_tflops * world)) if f and s else "", peak_gib=sig(peaks[i] / 2**30))
        if name == "optimizer":  # each rank steps its 1/world shard; the time is the slowest rank's
            nbytes = ADAMW_BYTES_PER_PARAM * n_student / world
            row["gb_per_s"] = sig(cfg.mu * nbytes / s / 1e9) if s else ""
            shard = f" of this rank's 1/{world} shard" if world > 1 else ""
            row["note"] = (f"AdamW, ~{ADAMW_BYTES_PER_PARAM} B/param{shard} moved, per device; "
                           f"copy peak {sig(copy_gbps)} GB/s per device")
        elif name == "disc_update":
            row["note"] = "includes the discriminator's optimiser step"
        elif name == "rollout":
            row["note"] = "HF generate; also encodes and packs the step's outputs"
        elif name == "step":  # the trainer's own figure (same formulas and peak; a mean of per-step ratios)
            row["note"] = f"trainer's mfu {sig(_mean(m['mfu'] for m, _, _ in per_step))}"
        if cfg.batch.activation_checkpointing and name in ("policy_update", "disc_update"):
            row["note"] = "; ".join(filter(None, [row.get("note"), "activation checkpointing (recomputation "
                                                                    "not counted in tflop)"]))
        if cfg.batch.cpu_offload and name in ("policy_update", "disc_update", "optimizer"):
            pinning = "pinned" if cfg.batch.offload_pinned else "pageable"
            row["note"] = "; ".join(filter(None, [row.get("note"), f"CPU offload, {pinning} (optimiser on the CPU)"]))
        if world == 1 and not cfg.batch.keep_gathered and name in ("policy_update", "disc_update"):
            row["note"] = "; ".join(filter(None, [row.get("note"), "weights gathered again for the backward"]))
        rows.append(row)
    comm = dict(settings, phase="communication", seconds="", share="")
    if world == 1:
        comm["note"] = "one rank: no collectives"
    elif comms is None:
        comm["note"] = "not measured: run with --profile (collectives overlap the phases above)"
    else:
        comm.update(seconds=sig(comms["total"]), share=sig(comms["total"] / step_seconds),
                    note="inside the phases above (profiled step): " + ", ".join(
                        f"{p} {sig(v)} s" for p, v in comms.items() if p != "total" and v > 0))
    rows.insert(len(present), comm)
    return rows


def baseline_rows(base_settings: dict, baselines: dict, peak_tflops: float) -> list[dict]:
    """Rows of the isolated phases (``<phase>_isolated``): ril_fast's path and its baseline, this rank."""
    rows = []
    for phase, results in baselines.items():
        for c in results:
            if "seconds" not in c:  # it did not fit: the settings, no measurement
                rows.append(dict(base_settings, provider=c["provider"], phase=f"{phase}_isolated", note=f"{c['note']} "
                                 "(this rank)", **dict.fromkeys(("seconds", "share", "tokens", "tokens_per_s", "tflop",
                                                                 "tflops", "mfu", "gb_per_s", "peak_gib"), "")))
                continue
            s, tokens = c["seconds"], c.get("tokens")
            note = (f"loss {c['loss']:.6g}; one μ pass on the last step's micro-batches" if "loss" in c
                    else "one rollout call on the first batch's questions")
            note += f"; {c['note']}" if c.get("note") else ""
            rows.append(dict(base_settings, provider=c["provider"], phase=f"{phase}_isolated", seconds=sig(s),
                             share="", tokens=tokens or "", tokens_per_s=sig(tokens / s) if tokens else "",
                             tflop=sig(c["flops"] / 1e12), tflops=sig(c["flops"] / s / 1e12),
                             mfu=sig(c["flops"] / s / 1e12 / peak_tflops), gb_per_s="",
                             peak_gib=sig(c["peak"] / 2**30), note=note + " (this rank)"))
    return rows


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------
def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--steps", type=int, default=2, help="measured steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (allocator, compilation)")
    for flag, what in (("packed", "packed micro-batches"), ("padded", "right-padded micro-batches"),
                       ("fused", "the fused kernels (loss.kernels=auto)"), ("eager", "the eager references")):
        p.add_argument(f"--{flag}", action="store_true", help=f"run with {what}")
    p.add_argument("--compare", action="store_true", help="all four: --packed --padded --fused --eager")
    p.add_argument("--no-baselines", action="store_true", help="skip the rollout vs plain HF generate and the "
                                                                 "policy update vs Liger comparisons")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions of the isolated policy updates")
    p.add_argument("--rl-only", action="store_true", help="no teachers, no discriminator (Dr.GRPO only)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="the updates recompute each layer in the backward (less memory; room for --max-tokens)")
    p.add_argument("--gather-again", action="store_true", help="on one GPU, gather each layer's weights again "
                   "for the backward (batch.keep_gathered=false: one bf16 copy of the model less in the updates)")
    p.add_argument("--cpu-offload", action="store_true", help="the trained state in the CPU's memory, the "
                   "optimizers stepping there (batch.cpu_offload: a bigger student on one GPU)")
    p.add_argument("--offload-pageable", action="store_true", help="with --cpu-offload, pageable host memory "
                   "instead of pinned (batch.offload_pinned=false: no rounding up to powers of two, slower copies)")
    p.add_argument("--mu", type=int, default=1, help="μ: updates per batch (> 1 adds the π_old pass)")
    p.add_argument("--beta", type=float, default=0.04, help="β: KL weight (> 0 adds the reference model)")
    p.add_argument("--questions-per-step", type=int, help="default: the preset's")
    p.add_argument("--group-size", type=int, help="G; default: the preset's")
    p.add_argument("--max-new-tokens", type=int, help="L_max; default: the preset's")
    p.add_argument("--max-tokens", type=int, help="micro-batch token budget; default: the preset's")
    p.add_argument("--layers", type=int, help="a shallower model of the preset's widths (a quick look)")
    p.add_argument("--image-tokens", type=int, help="most tokens per image (28x28 pixels each; Qwen3-VL 32x32); "
                                                    "default: the preset's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="where the preset's student and data are built and cached "
                                     "(default runs/bench/<preset>)")
    p.add_argument("--profile", metavar="DIR", help="profile one more step of the base configuration; write "
                                                    "chrome traces to DIR")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "throughput.csv"), help="CSV to append to")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for name in ("questions_per_step", "group_size", "max_new_tokens", "max_tokens"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))
    # The data depends on L_max (teacher responses fit in it); the student folder on the depth and on the
    # image processor's bounds.
    lo, hi = preset.image_tokens
    preset = dataclasses.replace(preset, max_new_tokens=args.max_new_tokens, layers=args.layers,
                                 image_tokens=(min(lo, args.image_tokens or hi), args.image_tokens or hi))
    if args.compare:
        args.packed = args.padded = args.fused = args.eager = True
    args.layouts = [x for x, on in (("packed", args.packed), ("padded", args.padded)) if on] or ["packed"]
    args.kernel_sets = [x for x, on in (("fused", args.fused), ("eager", args.eager)) if on] or ["fused"]
    return args, preset


def main(argv=None):
    """Run the benchmark (see the module docstring); returns the CSV rows written."""
    from transformers import AutoConfig

    args, preset = _parse(argv)
    dist = distributed.init(cpu_collectives=args.cpu_offload)
    workdir = Path(args.workdir or Path(__file__).resolve().parents[1] / "runs" / "bench"
                   / (args.preset + (f"-{args.layers}l" if args.layers else "")))
    if dist.is_main:
        build(preset, workdir, seed=args.seed)
    distributed.barrier()
    workload = build(preset, workdir, seed=args.seed)  # every rank: the paths (built above, so no work)
    config = AutoConfig.from_pretrained(workload.student)
    shapes = Shapes.of(config)

    device, sha, date = device_name(), git_sha(), datetime.datetime.now().isoformat(timespec="seconds")
    peak_tflops = matmul_peak_tflops(dist.device, torch.bfloat16 if CUDA else torch.float32)
    copy_gbps = copy_bandwidth_gbps()
    plan = memory.plan(config, disc=not args.rl_only, reference=args.beta > 0, gpu=CUDA, shard=dist.world_size,
                       offload=args.cpu_offload, pinned=not args.offload_pageable)
    main_rank = dist.is_main
    if main_rank:
        print(f"# ril_fast throughput: preset {args.preset}{f' ({args.layers} layers)' if args.layers else ''} "
              f"on {device} x{dist.world_size} — git {sha} — {date}")
        print(f"measured peaks: {'bf16' if CUDA else 'fp32'} matmul {peak_tflops:.4g} TFLOP/s, "
              f"copy {copy_gbps:.4g} GB/s")
        print(f"memory: {plan.describe()}")

    base = (args.layouts[0], args.kernel_sets[0])
    configurations = [base] + [(x, base[1]) for x in args.layouts[1:]] + [(base[0], k) for k in args.kernel_sets[1:]]
    # The run's identity and the settings every configuration shares (failed configurations' rows too).
    common = dict(date=date, git_sha=sha, device=device, **versions(), rl_only=args.rl_only,
                  image_tokens=preset.image_tokens[1], seed=args.seed, warmup=args.warmup, reps=args.reps,
                  activation_checkpointing=args.activation_checkpointing, gather_again=args.gather_again,
                  cpu_offload=args.cpu_offload, offload_pageable=args.offload_pageable)
    rows, isolated, tables = [], [], []
    with tempfile.TemporaryDirectory(dir=workdir.parent, prefix="run-") as tmp:
        for layout, kernels in configurations:
            cfg = make_config(args, workload, Path(tmp) / f"{layout}-{kernels}", padded=layout == "padded",
                              kernels=Kernels.AUTO if kernels == "fused" else Kernels.EAGER)
            failed = None
            try:
                records, baselines, comms = run_configuration(args, cfg, shapes, base=(layout, kernels) == base,
                                                         profile_dir=Path(args.profile) if args.profile else None)
            except (torch.OutOfMemoryError, RuntimeError, DoesNotFit) as e:
                if not (_out_of_memory(e) or isinstance(e, DoesNotFit)):
                    raise
                failed = f"does not fit (refused before loading): {e}" if isinstance(e, DoesNotFit) else \
                    f"out of memory: {e}"
            if failed is not None:
                free_memory()  # after the except block: its exception's traceback held the failed run
                if main_rank:
                    print(f"\n{layout} + {kernels}: {failed}", file=sys.stderr)
                these = [dict(preset=args.preset, world_size=dist.world_size, layout=layout,
                              kernels=cfg.loss.kernels.value, phase="step", note=failed[:300])]
            else:
                these = phase_rows(args, cfg, shapes, records, n_student=plan.student_params, world=dist.world_size,
                                   peak_tflops=peak_tflops, copy_gbps=copy_gbps, comms=comms)
                if main_rank:
                    report_configuration(these, (layout, kernels), base, first=not tables)
                tables.append(((layout, kernels), these))
                if baselines:
                    isolated = baseline_rows(these[0], baselines, peak_tflops)
                    these = these + isolated
            these = [dict(common, **r) for r in these]
            if main_rank:  # now: a stage killed at its time limit keeps the configurations it finished
                out = append_csv(args.out, these, COLUMNS)
            rows += these
    if main_rank:
        report_comparisons(tables, isolated, base)
        print(f"\n{len(rows)} rows appended to {out}")
    return rows


def _liger_available() -> bool:
    """Whether Liger's chunked losses import; says so on stderr when they do not."""
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except ImportError as e:
        print(f"liger_kernel not importable ({e}): the Liger comparison is skipped", file=sys.stderr)
        return False
    return True


def _out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is, or was raised from, a CUDA out-of-memory error (the trainer rewords them)."""
    while e is not None:
        if isinstance(e, torch.OutOfMemoryError):
            return True
        e = e.__cause__
    return False


def report_configuration(rows, configuration, base, *, first: bool) -> None:
    """Print one configuration's markdown table (after the workload's line, for the ``first``)."""
    columns = [("phase", "phase"), ("seconds", "s/step"), ("share", "share"), ("tokens_per_s", "tokens/s"),
               ("tflop", "TFLOP/step"), ("tflops", "TFLOP/s"), ("mfu", "MFU"), ("peak_gib", "peak GiB"),
               ("gb_per_s", "GB/s"), ("note", "note")]
    if first:
        r = rows[0]
        print(f"\nworkload per step: {r['questions_per_step']} questions, G = {r['group_size']}, "
              f"μ = {r['mu']}, β = {r['beta']}, L_max = {r['max_new_tokens']}; mean tokens: prompt "
              f"{r['prompt_tokens']}, student response {r['student_tokens']}, teacher response "
              f"{r['teacher_tokens'] or '-'}")
    layout, kernels = configuration
    print(f"\n### {layout} + {kernels}{' (base)' if configuration == base else ''}\n")
    print(markdown_table(rows, columns), flush=True)


def report_comparisons(tables, isolated, base) -> None:
    """Print the side-by-side ratios against the base configuration (when it ran) and the baselines."""
    if len(tables) > 1 and tables[0][0] == base:
        base_rows = {r["phase"]: r for r in tables[0][1]}
        ratio_rows = []
        for phase in base_rows:
            row = {"phase": phase}
            for (layout, kernels), rows in tables[1:]:
                other = {r["phase"]: r for r in rows}.get(phase)
                key = f"{base[0]} / {layout}" if layout != base[0] else f"{base[1]} / {kernels}"
                b, o = base_rows[phase].get("seconds"), (other or {}).get("seconds")
                row[key] = sig(o / b) if isinstance(b, float) and isinstance(o, float) and b > 0 else ""
            ratio_rows.append(row)
        keys = [k for k in ratio_rows[0] if k != "phase"]
        print("\n### side by side: speed-up of the base (time of the other ÷ time of the base; same seed, same "
              "workload)\n")
        print(markdown_table(ratio_rows, [("phase", "phase")] + [(k, k) for k in keys]))
    if isolated:
        print("\n### phases alone, same inputs: ril_fast vs its baseline (this rank)\n")
        print(markdown_table(isolated, [("phase", "phase"), ("provider", "provider"), ("seconds", "s"),
                                        ("tokens_per_s", "tokens/s"), ("tflops", "TFLOP/s"), ("mfu", "MFU"),
                                        ("peak_gib", "peak GiB"), ("note", "note")]))
        seconds = {(r["phase"], r["provider"]): r["seconds"] for r in isolated if r.get("seconds")}
        if {("rollout_isolated", "hf_generate"), ("rollout_isolated", "ril_fast")} <= seconds.keys():
            ratio = seconds["rollout_isolated", "ril_fast"] / seconds["rollout_isolated", "hf_generate"]
            print(f"\nrollout: ril_fast (FSDP2) takes {ratio:.3g}x the time of plain HF generate on an unsharded model")
        if {("policy_update_isolated", "liger"), ("policy_update_isolated", "ril_fast")} <= seconds.keys():
            ratio = seconds["policy_update_isolated", "liger"] / seconds["policy_update_isolated", "ril_fast"]
            print(f"policy update: ril_fast runs at {ratio:.3g}x Liger's speed")


if __name__ == "__main__":
    main()
    distributed.destroy()  # before the interpreter tears down (a gloo group destroyed then can abort the process)
