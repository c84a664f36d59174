"""The benchmarks' arithmetic, without running a step: bench/_common.py's timing, peaks, memory and tables,
bench/throughput.py's rows, ratios and settings, and bench/_baselines.py's timing and token counts (the figures
users compare ril_fast on: a peak taken as the slowest run, a phase counted with padding or a ratio inverted
would be wrong without failing the smoke runs)."""

import runpy
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import _baselines  # noqa: E402
import _common  # noqa: E402


@pytest.fixture(scope="module")
def bench():
    """bench/throughput.py's globals (run as a module, not as __main__)."""
    return runpy.run_path(str(BENCH / "throughput.py"), run_name="throughput")


class _Clock:
    """A fake ``time`` module whose perf_counter advances only by what ``work()`` spends: each call takes the
    next of ``durations`` seconds."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, list(durations), 0

    def perf_counter(self):
        return self.now

    def work(self):
        self.now += self.durations[self.calls]
        self.calls += 1


# ----------------------------------------------------------------------------------------------------
# _common
# ----------------------------------------------------------------------------------------------------
def test_time_ms_is_the_median_after_a_warm_up_and_the_fastest_for_peaks(monkeypatch):
    """On a CPU: one untimed warm-up call (a slow first call is not timed), then the median of ``reps`` calls,
    in milliseconds; ``best`` (the peaks): the fastest call, never the slowest."""
    monkeypatch.setattr(_common, "CUDA", False)
    for best, expected in ((False, 2500.0), (True, 1000.0)):
        clock = _Clock([100.0, 3.0, 1.0, 2.0, 10.0])  # the warm-up, then 4 timed calls (median 2.5 s, mean 4 s)
        monkeypatch.setattr(_common, "time", clock)
        assert _common.time_ms(clock.work, 4, best=best) == pytest.approx(expected)
        assert clock.calls == 5


def test_copy_bandwidth_counts_the_read_and_the_write_of_the_fastest_copy(monkeypatch):
    """A copy of 64 MiB on the CPU moves 128 MiB: in 1 ms, 134.2 GB/s; timed as a peak (the fastest copy)."""
    monkeypatch.setattr(_common, "CUDA", False)
    asked = []

    def time_ms(fn, reps, *, best=False):
        asked.append(best)
        return 1.0

    monkeypatch.setattr(_common, "time_ms", time_ms)
    assert _common.copy_bandwidth_gbps() == pytest.approx(2 * 2**26 / 1e-3 / 1e9)
    assert asked == [True]


def test_peak_mb_is_what_the_call_adds_in_mib(monkeypatch):
    """On a CPU, the resident size the call adds above where it started, in MiB (2**20 bytes), sampled while it
    runs; the size reached at the call's very end counts too (sampled once more after it, here the only sample
    that sees it: the sampling thread is shown the starting size)."""
    monkeypatch.setattr(_common, "CUDA", False)
    size = {"now": 1000 * 2**20}

    def rss_bytes():
        if threading.current_thread() is not threading.main_thread():
            return 1000 * 2**20
        return size["now"]

    monkeypatch.setattr(_common, "rss_bytes", rss_bytes)

    def grow():
        size["now"] += 256 * 2**20

    assert _common.peak_mb(grow) == 256.0


def test_rss_bytes_is_the_resident_size():
    """rss_bytes reads the resident size (``/proc/self/statm``'s second field), not the virtual size: within
    a few MiB of /proc/self/status's VmRSS."""
    with open("/proc/self/status") as f:
        vm_rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    assert abs(_common.rss_bytes() - vm_rss) < 16 * 2**20


def test_sig_keeps_4_significant_digits():
    assert _common.sig(123456.0) == 123500.0 and _common.sig(0.000123456) == 0.0001235


def test_markdown_table_aligns_numbers_right_and_leaves_missing_cells_empty():
    table = _common.markdown_table([{"a": "x", "n": 1.5}, {"a": "y", "n": None}, {"a": "z"}], [("a", "A"), ("n", "N")])
    assert table == "| A | N |\n|---|---:|\n| x | 1.5 |\n| y |  |\n| z |  |"


def test_a_baseline_out_of_memory_is_a_note_naming_its_provider():
    def fails():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore lines")

    assert _common.unless_out_of_memory("liger", fails) == {
        "provider": "liger", "note": "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"}
    assert _common.unless_out_of_memory("liger", lambda: {"seconds": 1.0}) == {"seconds": 1.0}


# ----------------------------------------------------------------------------------------------------
# throughput.py: from step records to rows
# ----------------------------------------------------------------------------------------------------
def _phase_rows(bench, comms=None, world=2):
    """``phase_rows`` of two made-up measured steps (μ = 2, β > 0: two frozen passes; 4 outputs of 20 tokens, 8 of
    them response; world 2) -> ({phase: row}, phase order, the FLOPs of one step, step seconds)."""
    from ril_fast.config import Config
    from ril_fast.flops import Sample, Shapes, phase_flops

    args = SimpleNamespace(rl_only=False, preset="7b", layers=None)
    cfg = Config.from_dict({"student": "x", "train_data": "x", "teachers": ["t"], "output_dir": "unused", "mu": 2,
                            "beta": 0.04})
    encoded = [SimpleNamespace(length=20, prompt_len=12, response_len=8, image_grid_thw=None, pixel_values=None)
               for _ in range(4)]
    prompts, students = [Sample(12, 12, 0, [])], [Sample(18, 12, 6, []), Sample(22, 12, 10, [])]
    records = []
    for k, scale in enumerate((1.0, 3.0)):  # the second step twice as slow (means, not sums or maxima)
        times = {"rollout": 3.0, "disc_update": 1.0, "judge": 0.1, "disc_score": 0.5, "old_ref_logprobs": 0.25,
                 "policy_update": 2.0, "optimizer": 0.5}
        times = {p: t * scale for p, t in times.items()}
        peaks = {p: (k + 1) * 2**30 for p in times} | {"policy_update": 5 * 2**30}
        metrics = {"step_time_s": sum(times.values()) + 1.0 * scale, "mfu": 0.0,
                   **{f"time/{p}": t for p, t in times.items()}, **{f"peak_bytes/{p}": b for p, b in peaks.items()}}
        records.append(dict(metrics=metrics, prompts=prompts, students=students,
                            teachers=[Sample(20, 12, 8, [])] * 2, encoded=encoded))
    shapes = Shapes(hidden=8, vocab=8, decoder_params=1000, attention_layers=1, query_width=8)
    flops = phase_flops(shapes, prompts, students, [Sample(20, 12, 8, [])] * 4, group_size=cfg.group_size, mu=2,
                        frozen_models=2, disc=True)
    rows = bench["phase_rows"](args, cfg, shapes, records, n_student=1_000_000, world=world, peak_tflops=1e-9,
                               copy_gbps=3350.0, comms=comms)
    return {r["phase"]: r for r in rows}, [r["phase"] for r in rows], flops, 2 * (7.35 + 1.0)


def test_phase_rows_count_each_phase_once_without_padding(bench):
    """Tokens per phase: rollout the generated tokens, judge the response tokens, disc_update and policy_update
    μ × all, old_ref_logprobs 2 frozen models × all, step all; times the mean over the steps, the step's time the
    trainer's (overhead included), shares of it; FLOPs a step's (the step's the sum of every phase's, the rollout's
    included); MFU against the peak of all ``world`` devices; the peak memory in GiB (the step's the highest
    phase's); the optimiser's GB/s for μ AdamW steps of this rank's shard."""
    from ril_fast.flops import ADAMW_BYTES_PER_PARAM

    rows, order, flops, step_s = _phase_rows(bench)
    assert order == [*bench["PHASES"], "communication", "step"]
    tokens = {"rollout": 16, "disc_update": 160, "judge": 32, "disc_score": 80, "old_ref_logprobs": 160,
              "policy_update": 160, "step": 80}
    seconds = {"rollout": 6.0, "disc_update": 2.0, "judge": 0.2, "disc_score": 1.0, "old_ref_logprobs": 0.5,
               "policy_update": 4.0, "optimizer": 1.0, "step": step_s}
    flops["step"] = sum(flops.values())
    for phase, s in seconds.items():
        row = rows[phase]
        assert row["seconds"] == pytest.approx(s, rel=1e-3), phase
        assert row["share"] == pytest.approx(s / step_s, rel=1e-3), phase
        if phase in tokens:
            assert row["tokens"] == tokens[phase] and row["tokens_per_s"] == pytest.approx(tokens[phase] / s,
                                                                                           rel=1e-3), phase
        if flops.get(phase):
            assert row["tflop"] == pytest.approx(flops[phase] / 1e12, rel=1e-3), phase
            assert row["tflops"] == pytest.approx(flops[phase] / s / 1e12, rel=1e-3), phase
            assert row["mfu"] == pytest.approx(flops[phase] / s / 1e12 / (1e-9 * 2), rel=1e-3), phase
        assert row["peak_gib"] == (5.0 if phase in ("policy_update", "step") else 2.0), phase
    assert rows["optimizer"]["gb_per_s"] == pytest.approx(2 * ADAMW_BYTES_PER_PARAM * 1_000_000 / 2 / 1.0 / 1e9,
                                                          rel=1e-3)
    assert rows["step"]["student_tokens"] == 8.0 and rows["step"]["teacher_tokens"] == 8.0
    assert rows["step"]["prompt_tokens"] == 12.0


def test_the_communication_row_is_its_share_of_the_step(bench):
    rows, order, _, step_s = _phase_rows(bench, comms={"total": 0.5, "policy_update": 0.5, "judge": 0.0})
    comm = rows["communication"]
    assert order[-2:] == ["communication", "step"]
    assert comm["seconds"] == 0.5 and comm["share"] == pytest.approx(0.5 / step_s, rel=1e-3)
    assert comm["note"] == "inside the phases above (profiled step): policy_update 0.5 s"


def test_baseline_rows_divide_by_their_own_seconds(bench):
    """An isolated phase's tokens/s, TFLOP/s and MFU (this rank: one device's peak) from its own time."""
    results = {"policy_update": [dict(provider="liger", seconds=2.0, tokens=100, flops=4e12, peak=2**31, loss=0.5,
                                      note=""), dict(provider="ril_fast", note="out of memory: x")]}
    rows = bench["baseline_rows"](dict(preset="7b"), results, 4.0)
    liger, ril = rows
    assert (liger["phase"], liger["provider"], liger["tokens"], liger["tokens_per_s"]) == (
        "policy_update_isolated", "liger", 100, 50.0)
    assert (liger["tflop"], liger["tflops"], liger["mfu"], liger["peak_gib"]) == (4.0, 2.0, 0.5, 2.0)
    assert ril["seconds"] == "" and ril["note"] == "out of memory: x (this rank)" and ril["provider"] == "ril_fast"


def test_the_side_by_side_ratios_are_the_others_time_over_the_bases(bench, capsys):
    """The ratio table's columns name what changed (layout, then kernels) and hold time of the other ÷ time of the
    base; the isolated comparisons' sentences say ril_fast's time over HF generate's and Liger's time over
    ril_fast's."""
    def rows(step, update):
        return [dict(phase="policy_update", seconds=update), dict(phase="step", seconds=step)]

    base = ("packed", "fused")
    tables = [(base, rows(2.0, 1.0)), (("padded", "fused"), rows(3.0, 1.5)), (("packed", "eager"), rows(8.0, 4.0))]
    isolated = [dict(phase="rollout_isolated", provider="ril_fast", seconds=3.0),
                dict(phase="rollout_isolated", provider="hf_generate", seconds=1.5),
                dict(phase="policy_update_isolated", provider="ril_fast", seconds=2.0),
                dict(phase="policy_update_isolated", provider="liger", seconds=5.0)]
    bench["report_comparisons"](tables, isolated, base)
    printed = capsys.readouterr().out
    assert "| phase | packed / padded | fused / eager |\n|---|---:|---:|\n| policy_update | 1.5 | 4.0 |\n" \
           "| step | 1.5 | 4.0 |" in printed
    assert "rollout: ril_fast (FSDP2) takes 2x the time of plain HF generate" in printed
    assert "policy update: ril_fast runs at 2.5x Liger's speed" in printed


def test_parse_applies_the_flags_to_the_preset(bench):
    """--image-tokens below the preset's least lowers both bounds; --max-new-tokens and --layers reach the preset
    the workload is built from (its teacher responses fit L_max); with no layout or kernel flag, packed + fused."""
    args, preset = bench["_parse"](["--preset", "tiny", "--image-tokens", "2", "--max-new-tokens", "9",
                                    "--layers", "1"])
    assert preset.image_tokens == (2, 2) and preset.max_new_tokens == 9 and preset.layers == 1
    assert (args.layouts, args.kernel_sets, args.max_tokens) == (["packed"], ["fused"], 256)
    _, preset = bench["_parse"](["--preset", "tiny", "--image-tokens", "12"])
    assert preset.image_tokens == (4, 12) and preset.max_new_tokens == 16
    args, _ = bench["_parse"](["--compare"])
    assert (args.layouts, args.kernel_sets) == (["packed", "padded"], ["fused", "eager"])


def test_make_config_passes_every_flag(bench, tmp_path):
    from ril_fast.models import Kernels

    workload = SimpleNamespace(student=tmp_path / "s", train=tmp_path / "t.jsonl", teachers=(tmp_path / "a",))
    args = SimpleNamespace(rl_only=True, seed=3, group_size=2, mu=2, beta=0.0, max_new_tokens=9, questions_per_step=4,
                           max_tokens=128, activation_checkpointing=True, gather_again=True, cpu_offload=True,
                           offload_pageable=True)
    cfg = bench["make_config"](args, workload, tmp_path / "out", padded=True, kernels=Kernels.EAGER)
    assert cfg.teachers == [] and cfg.batch.padded and cfg.batch.activation_checkpointing
    assert not cfg.batch.keep_gathered and cfg.batch.cpu_offload and not cfg.batch.offload_pinned
    args.rl_only = args.gather_again = args.offload_pageable = False
    cfg = bench["make_config"](args, workload, tmp_path / "out", padded=False, kernels=Kernels.AUTO)
    assert cfg.teachers == [str(tmp_path / "a")] and cfg.batch.keep_gathered and cfg.batch.offload_pinned


# ----------------------------------------------------------------------------------------------------
# _baselines
# ----------------------------------------------------------------------------------------------------
def test_measure_times_the_median_after_a_warm_up(monkeypatch):
    """The warm-up call (Liger compiles in it) is neither timed nor in the peak; the peak is the highest of the
    timed calls, not the last one's."""
    monkeypatch.setattr(_baselines, "CUDA", False)
    clock = _Clock([50.0, 3.0, 1.0, 2.0, 10.0])
    sizes = iter([900, 100, 300, 200, 150])

    class Peak:
        def __enter__(self):
            self.bytes = next(sizes)
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(_baselines, "time", clock)
    monkeypatch.setattr(_baselines, "RssPeak", Peak)
    after = []
    seconds, peak, result = _baselines.measure(lambda: clock.work() or clock.calls, 4, after=lambda: after.append(1))
    assert (seconds, peak, result, len(after)) == (2.5, 300, 5, 5)


def test_each_rank_rolls_out_its_share_of_the_first_questions(tmp_path):
    import json

    from ril_fast.config import load_config

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"How many {i}?", "answer": str(i), "images": []})
                            + "\n" for i in range(6)))
    cfg = load_config([f"train_data={data}", "batch.questions_per_step=4"])
    shares = [_baselines.rollout_inputs(cfg, rank, 2)[0] for rank in (0, 1)]
    assert [[p["question"] for p in share] for share in shares] == [["How many 0?", "How many 2?"],
                                                                    ["How many 1?", "How many 3?"]]


def test_a_rollout_counts_each_stop_token_it_generated(monkeypatch):
    """A response that stopped generated its stop token too (the processor appends it to the encoded response the
    trainer counts); a truncated one did not."""
    from ril_fast.flops import Shapes

    def out(n, truncated):
        return SimpleNamespace(token_ids=[1] * n, truncated=truncated)

    rollouts = [[out(3, False), out(5, True)], [out(2, True), out(7, False)]]
    monkeypatch.setattr(_baselines, "sample_responses", lambda *a, **k: rollouts)
    processor = SimpleNamespace(encode=lambda p: SimpleNamespace(length=12, prompt_len=12, response_len=0,
                                                                 image_grid_thw=None, pixel_values=None))
    shapes = Shapes(hidden=8, vocab=8, decoder_params=1000, attention_layers=1, query_width=8)
    out = _baselines.time_rollout("x", None, processor, [{"question": "a"}, {"question": "b"}], {"group_size": 2},
                                  shapes, 1)
    assert out["tokens"] == 4 + 5 + 2 + 8


def test_the_isolated_policy_update_counts_real_tokens_and_the_head(monkeypatch):
    """compare_policy_update, its passes faked: advantages centred over each group of G outputs without a
    discriminator (2G with one), FLOPs with the LM head, tokens of the real samples only (no fillers)."""
    from ril_fast.config import Config

    seen = {}

    def policy_pass(model, micro, advantages, divisor, cfg, ref=None):
        seen["advantages"], seen["divisor"] = advantages, float(divisor)
        return {"loss": 0.0}

    def training_flops(shapes, samples, *, head):
        seen["head"] = head
        return 1e12

    micro = [SimpleNamespace(batch=SimpleNamespace(lengths=[10, 20, 5]), real=[0, 1])]
    for name, fake in (("policy_pass", policy_pass), ("training_flops", training_flops),
                       ("liger_policy_pass", lambda *a, **k: 0.0), ("micro_batches", lambda *a, **k: micro),
                       ("rank_agreement", lambda *a: {}), ("CUDA", False)):
        monkeypatch.setattr(_baselines, name, fake)
    for disc, group in ((None, 2), (object(), 4)):
        cfg = Config.from_dict({"student": "x", "train_data": "x", "output_dir": "unused", "group_size": 2,
                                "max_new_tokens": 10, "seed": 1})
        encoded = [SimpleNamespace(length=20, prompt_len=12, response_len=8, image_grid_thw=None, pixel_values=None)
                   for _ in range(8)]
        run = SimpleNamespace(cfg=cfg, dist=SimpleNamespace(device=torch.device("cpu")), processor=None, disc=disc,
                              reference=None, student=None, optimizer=SimpleNamespace(zero_grad=lambda **k: None))
        results = _baselines.compare_policy_update(run, encoded, None, 1)
        assert [r["provider"] for r in results] == ["ril_fast", "liger"]
        assert all(r["tokens"] == 30 and r["flops"] == 1e12 for r in results) and seen["head"] is True
        groups = seen["advantages"].view(-1, group)
        assert torch.allclose(groups.sum(1), torch.zeros(len(groups))), disc
        assert seen["divisor"] == 8 * 10
