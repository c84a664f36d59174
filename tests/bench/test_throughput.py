"""bench/throughput.py: the tiny preset runs every configuration and reports every phase (a smoke test: no
speed is asserted), and the configurations it compares compute the same update."""

import csv
import json
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from models_fixtures import one_thread, random_samples, tiny_folder  # noqa: F401

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench():
    """The benchmark's globals (run as a module, not as __main__; it puts bench/ on sys.path)."""
    return runpy.run_path(str(BENCH / "throughput.py"), run_name="throughput")


def test_tiny_preset_reports_every_phase(tmp_path, monkeypatch, capsys, one_thread, bench):  # noqa: F811
    out = tmp_path / "throughput.csv"
    monkeypatch.setattr(sys, "argv", [str(BENCH / "throughput.py"), "--preset", "tiny", "--compare", "--steps", "1",
                                      "--warmup", "1", "--reps", "1", "--workdir", str(tmp_path / "work"),
                                      "--activation-checkpointing", "--out", str(out)])
    runpy.run_path(str(BENCH / "throughput.py"), run_name="__main__")
    printed = capsys.readouterr().out

    with out.open(newline="") as f:
        assert next(csv.reader(f)) == bench["COLUMNS"]
    rows = list(csv.DictReader(out.open()))
    tiny = bench["PRESETS"]["tiny"]
    for r in rows:
        assert r["device"] and r["git_sha"] and r["date"] and r["preset"] == "tiny" and r["world_size"] == "1"
        # Every setting and the packages' versions are columns.
        assert r["torch"] and r["triton"] and r["transformers"] and r["liger_kernel"]
        assert (r["seed"], r["warmup"], r["reps"], r["image_tokens"]) == ("0", "1", "1", str(tiny.image_tokens[1]))
        assert (r["rl_only"], r["activation_checkpointing"], r["gather_again"], r["cpu_offload"],
                r["offload_pageable"]) == ("False", "True", "False", "False", "False")
    steps = [r for r in rows if not r["phase"].endswith("_isolated")]
    configs = {(r["layout"], r["kernels"]) for r in steps}
    assert configs == {("packed", "auto"), ("padded", "auto"), ("packed", "eager")}
    for config in configs:
        phases = {r["phase"]: r for r in steps if (r["layout"], r["kernels"]) == config}
        assert set(phases) == set(bench["PHASES"]) | {"communication", "step"}
        for name in bench["PHASES"] + ("step",):
            assert float(phases[name]["seconds"]) > 0, (config, name)
            assert float(phases[name]["peak_gib"]) > 0, (config, name)
        for name in ("rollout", "disc_update", "disc_score", "old_ref_logprobs", "policy_update", "step"):
            assert float(phases[name]["tokens_per_s"]) > 0 and float(phases[name]["tflop"]) > 0, (config, name)
            assert 0 < float(phases[name]["mfu"]), (config, name)
        assert float(phases["optimizer"]["gb_per_s"]) > 0
        # The rollout's prompts were recorded (their prefill and images are part of its FLOPs).
        assert float(phases["rollout"]["prompt_tokens"]) > 0, config
        assert phases["communication"]["note"] == "one rank: no collectives"
        assert all("activation checkpointing" in phases[p]["note"] for p in ("policy_update", "disc_update"))
        # The step's FLOPs are the phases' sum; its time at least theirs.
        total = sum(float(phases[p]["tflop"] or 0) for p in bench["PHASES"])
        assert float(phases["step"]["tflop"]) == pytest.approx(total, rel=1e-3)
        # One measured step: the trainer logged the same MFU (its FLOPs from the outputs it encoded, the
        # bench's from the prompts it recorded; the same measured peak).
        trainer = float(phases["step"]["note"].removeprefix("trainer's mfu "))
        assert float(phases["step"]["mfu"]) == pytest.approx(trainer, rel=1e-3) and trainer > 0
    isolated = {(r["phase"], r["provider"]): r for r in rows if r["phase"].endswith("_isolated")}
    assert set(isolated) == {("policy_update_isolated", "ril_fast"), ("policy_update_isolated", "liger"),
                             ("rollout_isolated", "ril_fast"), ("rollout_isolated", "hf_generate")}
    for r in isolated.values():
        assert float(r["seconds"]) > 0 and float(r["tflop"]) > 0 and float(r["tokens_per_s"]) > 0
    # One μ pass on the last (here the only) step's outputs: the tokens of the base's policy update (μ = 1).
    base_update = next(r for r in steps if (r["layout"], r["kernels"], r["phase"]) == ("packed", "auto",
                                                                                      "policy_update"))
    for provider in ("ril_fast", "liger"):
        assert float(isolated["policy_update_isolated", provider]["tokens"]) == float(base_update["tokens"])
    # Same weights, prompts and seed: the FSDP2 rollout and plain generate sample the same tokens.
    assert isolated["rollout_isolated", "ril_fast"]["tokens"] == isolated["rollout_isolated", "hf_generate"]["tokens"]
    for heading in ("### packed + fused (base)", "### padded + fused", "### packed + eager", "### side by side",
                    "ril_fast vs its baseline", "| policy_update |", "| communication |",
                    "x Liger's speed", "x the time of plain HF generate"):
        assert heading in printed, heading


def test_qwen3_vl_tiny_preset_reports_every_phase(tmp_path, monkeypatch, one_thread, bench):  # noqa: F811
    """The Qwen3-VL path end to end (student folder, image processor, FLOPs of its tower and decoder), with
    the layers' weights gathered again for the backward (--gather-again) and the trained state offloaded to the
    CPU's memory (--cpu-offload --offload-pageable, which on a CPU changes where nothing is, but runs FSDP's
    offload path)."""
    out = tmp_path / "throughput.csv"
    monkeypatch.setattr(sys, "argv", [str(BENCH / "throughput.py"), "--preset", "qwen3vl-tiny", "--steps", "1",
                                      "--no-baselines", "--gather-again", "--cpu-offload", "--offload-pageable",
                                      "--workdir",
                                      str(tmp_path / "work"), "--out", str(out)])
    runpy.run_path(str(BENCH / "throughput.py"), run_name="__main__")
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "work" / "student").model_type == "qwen3_vl"
    phases = {r["phase"]: r for r in csv.DictReader(out.open())}
    assert set(phases) == set(bench["PHASES"]) | {"communication", "step"}
    for name in ("rollout", "disc_update", "disc_score", "old_ref_logprobs", "policy_update", "step"):
        assert float(phases[name]["tflop"]) > 0 and float(phases[name]["seconds"]) > 0, name
    assert all("weights gathered again" in phases[p]["note"] for p in ("policy_update", "disc_update"))
    assert all("CPU offload, pageable" in phases[p]["note"] for p in ("policy_update", "disc_update", "optimizer"))
    assert all(phases["step"][c] == "True" for c in ("gather_again", "cpu_offload", "offload_pageable"))
    assert float(phases["rollout"]["prompt_tokens"]) > 0


@pytest.mark.parametrize("family", ["qwen2_5_vl", "granite"])
def test_compared_configurations_compute_the_same_update(family, tmp_path_factory, one_thread, bench):  # noqa: F811
    """Packed and padded micro-batches, fused and eager kernels, and the Liger provider: the same Eq. 2
    loss and gradients on the same outputs (a side-by-side is only fair if the work is the same); Granite's logits
    are scaled by 1/8, which ril_fast folds into the temperature, and Liger must be given the same."""
    from _baselines import liger_policy_pass  # bench/, on sys.path since the fixture ran
    from models_fixtures import text_family

    from ril_fast.microbatch import micro_batches
    from ril_fast.models import Kernels, load
    from ril_fast.policy import LossConfig, frozen_logprobs, policy_pass

    if family == "granite":
        folder, images, max_tokens = text_family(tmp_path_factory, "granite", logits_scaling=8.0), [0] * 6, 60
    else:
        folder, images, max_tokens = tiny_folder(tmp_path_factory, family), [1, 0, 2, 1, 1, 0], 160
    model, processor = load(folder, device="cpu")
    reference, _ = load(folder, device="cpu")
    with torch.no_grad():  # a reference that differs from the student, so the KL term is not zero
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    encoded = [processor.encode(s) for s in random_samples(images)]
    advantages = torch.randn(len(encoded))
    normalizer = torch.tensor(float(len(encoded) * 24))

    def update(padded: bool, kernels: Kernels, liger: bool = False):
        micro = micro_batches(encoded, max_tokens=max_tokens, padded=padded)
        cfg = LossConfig(beta=0.1, temperature=0.9, kernels=kernels)
        ref = frozen_logprobs(reference, micro, cfg.temperature, kernels=kernels)
        model.zero_grad(set_to_none=True)
        if liger:
            loss = liger_policy_pass(model, micro, advantages, normalizer, cfg, 24, ref=ref)
        else:
            loss = policy_pass(model, micro, advantages, normalizer, cfg, ref=ref)["loss"]
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    base_loss, base_grads = update(False, Kernels.AUTO)
    assert len(micro_batches(encoded, max_tokens=max_tokens)) > 1  # the accumulation over micro-batches is exercised
    for padded, kernels, liger in [(True, Kernels.AUTO, False), (False, Kernels.EAGER, False),
                                   (False, Kernels.AUTO, True)]:
        loss, grads = update(padded, kernels, liger)
        # All fp32: the paths differ only in summation order (chunked vs full log-softmax, packed vs padded
        # attention masks, Liger's per-sequence chunks), as in tests/kernels' comparison with Liger.
        assert loss == pytest.approx(base_loss, rel=1e-5, abs=1e-7), (padded, kernels, liger)
        assert grads.keys() == base_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], base_grads[name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name} ({padded}, {kernels}, {liger}): {m}")


def test_liger_recomputes_the_layers_as_ril_fast_does(tmp_path_factory, one_thread, bench):  # noqa: F811
    """With activation checkpointing (--activation-checkpointing, as the qwen3vl-4b stage runs) both providers of the
    policy update recompute each decoder layer in the backward: the same work, and the same memory bound."""
    from _baselines import liger_policy_pass  # bench/, on sys.path since the fixture ran

    from ril_fast.distributed import decoder_blocks
    from ril_fast.microbatch import micro_batches
    from ril_fast.models import enable_activation_checkpointing, load
    from ril_fast.policy import LossConfig, policy_pass

    model, processor = load(tiny_folder(tmp_path_factory, "qwen2_5_vl"), device="cpu")
    enable_activation_checkpointing(model)
    encoded = [processor.encode(s) for s in random_samples([1, 0, 1, 0])]
    micro = micro_batches(encoded, max_tokens=120)
    advantages, normalizer, cfg = torch.randn(len(encoded)), torch.tensor(float(len(encoded) * 24)), LossConfig()
    runs = []
    # A pre-hook: the recomputation stops once it has what the backward needs, before the MLP's forward hooks.
    hooks = [block.mlp.register_forward_pre_hook(lambda *_: runs.append(1)) for block in decoder_blocks(model)]
    counts = {}
    for name, update in (("ril_fast", lambda: policy_pass(model, micro, advantages, normalizer, cfg)),
                         ("liger", lambda: liger_policy_pass(model, micro, advantages, normalizer, cfg, 24))):
        runs.clear()
        update()
        counts[name] = len(runs)
    for hook in hooks:
        hook.remove()
    assert counts == dict.fromkeys(counts, 2 * len(decoder_blocks(model)) * len(micro))  # forward, then recomputed


def test_the_rollout_baseline_samples_as_the_trainer_does(tmp_path, monkeypatch, bench):
    """The rollout baseline's prompts and sampling settings are what the trainer's rollout phase passes to
    sample_responses, every setting at a value other than its default (rollout.top_k was once left out: the
    baseline sampled from the whole vocabulary), the seed aside (the trainer's is one per step and rank)."""
    from _baselines import rollout_inputs  # bench/, on sys.path since the fixture ran

    from ril_fast import train
    from ril_fast.config import load_config
    from ril_fast.data import load_examples

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"How many {i}?", "answer": str(i),
                                        "images": []}) + "\n"
                            for i in range(4)))
    cfg = load_config([f"train_data={data}", "group_size=3", "max_new_tokens=7", "rollout.temperature=0.7",
                       "rollout.top_p=0.9", "rollout.top_k=5", "rollout.batch_size=6", "batch.questions_per_step=2"])
    prompts, settings = rollout_inputs(cfg, rank=0, world_size=1)

    class Sampled(Exception):
        pass

    passed = {}

    def sample_responses(model, processor, examples, **kwargs):
        passed.update(kwargs, examples=examples)
        raise Sampled

    monkeypatch.setattr(train, "sample_responses", sample_responses)
    run = SimpleNamespace(cfg=cfg, student=None, processor=SimpleNamespace(forget_prompts=lambda: None))
    with pytest.raises(Sampled):
        train.collect_outputs(run, load_examples(data)[:2], seed=11)
    assert passed.pop("examples") == prompts and passed.pop("seed") == 11 and settings.pop("seed") == cfg.seed
    assert settings == passed
    assert passed == dict(group_size=3, max_new_tokens=7, temperature=0.7, top_p=0.9, top_k=5, max_batch=6)


def test_a_configuration_that_cannot_fit_is_a_row_not_a_crash(tmp_path, monkeypatch, one_thread, bench):  # noqa: F811
    """When the trainer refuses a configuration before loading (too little free memory), the benchmark records
    it as a row saying so, as it does a CUDA out-of-memory error, and ends normally."""
    from ril_fast import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**20)  # 1 MiB
    out = tmp_path / "throughput.csv"
    monkeypatch.setattr(sys, "argv", [str(BENCH / "throughput.py"), "--preset", "tiny", "--steps", "1",
                                      "--no-baselines", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    runpy.run_path(str(BENCH / "throughput.py"), run_name="__main__")
    rows = list(csv.DictReader(out.open()))
    assert [(r["phase"], r["layout"], r["kernels"]) for r in rows] == [("step", "packed", "auto")]  # as measured rows
    assert rows[0]["note"].startswith("does not fit (refused before loading): student=")  # cut at 300 characters
    assert "the models need" in rows[0]["note"]


def test_a_baseline_out_of_memory_is_a_row_and_the_measured_rows_stay(tmp_path, monkeypatch, capsys,
                                                                       one_thread, bench):  # noqa: F811
    """Liger's policy update running out of GPU memory (simulated): the configuration's measured phases and the
    other baselines are written all the same, Liger's row says what happened, and no ratio to it is printed."""
    import _baselines  # bench/, on sys.path since the fixture ran

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    monkeypatch.setattr(_baselines, "liger_policy_pass", out_of_memory)
    out = tmp_path / "throughput.csv"
    monkeypatch.setattr(sys, "argv", [str(BENCH / "throughput.py"), "--preset", "tiny", "--steps", "1", "--warmup",
                                      "0", "--reps", "1", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    runpy.run_path(str(BENCH / "throughput.py"), run_name="__main__")
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    phases = {r["phase"] for r in rows if not r["phase"].endswith("_isolated")}
    assert phases == set(bench["PHASES"]) | {"communication", "step"}
    isolated = {(r["phase"], r["provider"]): r for r in rows if r["phase"].endswith("_isolated")}
    assert set(isolated) == {("policy_update_isolated", "ril_fast"), ("policy_update_isolated", "liger"),
                             ("rollout_isolated", "ril_fast"), ("rollout_isolated", "hf_generate")}
    liger = isolated["policy_update_isolated", "liger"]
    assert not liger["seconds"] and liger["note"] == ("out of memory: CUDA out of memory. Tried to allocate 2.00 GiB "
                                                      "(simulated) (this rank)")
    assert all(float(r["seconds"]) > 0 for k, r in isolated.items() if k[1] != "liger")
    assert "x the time of plain HF generate" in printed and "Liger's speed" not in printed


def test_a_configuration_out_of_memory_is_freed_and_each_finished_one_written_at_once(tmp_path, monkeypatch, capsys,
                                                                                      one_thread, bench):  # noqa: F811
    """The base configuration running out of GPU memory in its step (simulated): its run is freed before the next
    configuration loads (its traceback held it), each configuration's rows are in the CSV before the next one
    starts (a stage killed at its time limit keeps them), and no ratio is printed against the missing base."""
    import weakref

    from ril_fast import train

    setup, train_step, seen = train.setup, train.train_step, []

    def watched_setup(cfg):
        if seen:
            earlier = [student() for student in seen]
            rows = list(csv.DictReader(out.open())) if out.exists() else []
            seen_at.append((Path(cfg.output_dir).name, all(s is None for s in earlier),
                            sorted({(r["layout"], r["kernels"]) for r in rows})))
        run = setup(cfg)
        seen.append(weakref.ref(run.student))
        return run

    def failing_step(run, step, **kwargs):
        if Path(run.cfg.output_dir).name == "packed-fused":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return train_step(run, step, **kwargs)

    seen_at = []
    monkeypatch.setattr(train, "setup", watched_setup)
    monkeypatch.setattr(train, "train_step", failing_step)
    out = tmp_path / "throughput.csv"
    monkeypatch.setattr(sys, "argv", [str(BENCH / "throughput.py"), "--preset", "tiny", "--compare", "--steps", "1",
                                      "--warmup", "0", "--no-baselines", "--workdir", str(tmp_path / "work"),
                                      "--out", str(out)])
    runpy.run_path(str(BENCH / "throughput.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert seen_at == [("padded-fused", True, [("packed", "auto")]),
                       ("packed-eager", True, [("packed", "auto"), ("padded", "auto")])]
    rows = list(csv.DictReader(out.open()))
    assert [r["note"] for r in rows if r["layout"] == "packed" and r["kernels"] == "auto"] == [
        "out of memory: CUDA out of memory (simulated)"]
    assert {(r["layout"], r["kernels"]) for r in rows} == {("packed", "auto"), ("padded", "auto"), ("packed", "eager")}
    assert "### padded + fused" in printed and "### packed + eager" in printed and "side by side" not in printed


# ----------------------------------------------------------------------------------------------------
# From step records to rows, without running a step
# ----------------------------------------------------------------------------------------------------
def _rows(bench, *, rl_only: bool, world: int, n_student: int, optimizer_s: float = 0.5) -> dict[str, dict]:
    """``phase_rows`` of one made-up measured step (4 outputs of 20 tokens, no images) -> {phase: row}."""
    from types import SimpleNamespace

    from ril_fast.config import Config
    from ril_fast.flops import Sample, Shapes

    args = SimpleNamespace(rl_only=rl_only, preset="7b", layers=None)
    cfg = Config.from_dict({"student": "x", "train_data": "x", "teachers": [] if rl_only else ["t"],
                            "output_dir": "unused", "mu": 1, "beta": 0.0})
    times = {"rollout": 3.0, "disc_update": 1.0, "judge": 0.1, "disc_score": 0.5, "old_ref_logprobs": 1e-5,
             "policy_update": 2.0, "optimizer": optimizer_s}
    if rl_only:  # the trainer times no disc_update then, but still an empty disc_score block
        del times["disc_update"]
        times["disc_score"] = 1e-5
    metrics = {"step_time_s": sum(times.values()) + 0.1, "mfu": 0.0,
               **{f"time/{p}": t for p, t in times.items()}, **{f"peak_bytes/{p}": 2**30 for p in times}}
    encoded = [SimpleNamespace(length=20, prompt_len=12, response_len=8, image_grid_thw=None, pixel_values=None)
               for _ in range(4)]
    students = [Sample(20, 12, 8, [])] * (4 if rl_only else 2)
    record = dict(metrics=metrics, prompts=[Sample(12, 12, 0, [])], students=students,
                  teachers=[] if rl_only else [Sample(20, 12, 8, [])] * 2, encoded=encoded)
    shapes = Shapes(hidden=8, vocab=8, decoder_params=1000, attention_layers=1, query_width=8)
    rows = bench["phase_rows"](args, cfg, shapes, [record], n_student=n_student, world=world, peak_tflops=1.0,
                               copy_gbps=3350.0, comms=None)
    return {r["phase"]: r for r in rows}


def test_the_optimizer_bandwidth_is_per_device(bench):
    """Under FSDP2 each of N ranks steps AdamW over its 1/N shard (the time: the slowest rank's), so the
    optimiser row's GB/s, beside a per-device copy peak, is ADAMW_BYTES_PER_PARAM × P / N per second."""
    from ril_fast.flops import ADAMW_BYTES_PER_PARAM

    params = 8_000_000_000
    one, eight = (_rows(bench, rl_only=False, world=w, n_student=params)["optimizer"] for w in (1, 8))
    assert one["gb_per_s"] == pytest.approx(ADAMW_BYTES_PER_PARAM * params / 0.5 / 1e9, rel=1e-3)
    assert eight["gb_per_s"] == pytest.approx(ADAMW_BYTES_PER_PARAM * params / 8 / 0.5 / 1e9, rel=1e-3)
    assert "1/8 shard" in eight["note"] and "per device" in eight["note"] and "shard" not in one["note"]


def test_rl_only_reports_no_discriminator_phase(bench):
    """With --rl-only the trainer times an empty disc_score block: no row for it (it had the tokens/s of
    every token), and none for disc_update; with a discriminator both are rows with tokens/s."""
    rl = _rows(bench, rl_only=True, world=1, n_student=10)
    assert "disc_score" not in rl and "disc_update" not in rl
    assert {"rollout", "judge", "old_ref_logprobs", "policy_update", "optimizer", "step"} <= rl.keys()
    assert rl["policy_update"]["tokens_per_s"] == pytest.approx(80 / 2.0, rel=1e-3)
    ril = _rows(bench, rl_only=False, world=1, n_student=10)
    assert ril["disc_score"]["tokens_per_s"] == pytest.approx(80 / 0.5, rel=1e-3)
    assert ril["disc_update"]["tokens_per_s"] == pytest.approx(80 / 1.0, rel=1e-3)


# ----------------------------------------------------------------------------------------------------
# Communication of a profiled step
# ----------------------------------------------------------------------------------------------------
def test_collectives_count_once_per_phase_on_a_gpu_trace(monkeypatch, bench):
    """On a GPU, kineto mirrors each record_function range as a CUDA-side "gpu_user_annotation" event of the
    same name: the phases are read from the CPU-side ranges only, so 0.2 s of NCCL inside policy_update is
    0.2 s of it (it read 0.4 s, twice the total)."""
    from types import SimpleNamespace

    import _probe  # bench/, on sys.path since the fixture ran

    monkeypatch.setattr(_probe, "CUDA", True)  # the GPU branch: NCCL kernels on the device

    def event(name, start, end, device):  # times in microseconds, as torch.profiler's events
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                               device_type=getattr(torch.autograd.DeviceType, device))

    events = [event("phase/policy_update", 0, 1_000_000, "CPU"),
              event("phase/policy_update", 20_000, 990_000, "CUDA"),  # its gpu_user_annotation mirror
              event("phase/optimizer", 1_000_000, 1_200_000, "CPU"),
              event("phase/optimizer", 1_010_000, 1_190_000, "CUDA"),
              event("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL", 100_000, 300_000, "CUDA"),
              event("ncclDevKernel_AllGather_RING_LL", 1_050_000, 1_100_000, "CUDA"),
              event("nccl:all_gather", 1_040_000, 1_060_000, "CPU")]  # the CPU-side call: not device time
    comms = _probe.collective_seconds(SimpleNamespace(events=lambda: events))
    assert comms == pytest.approx({"total": 0.25, "policy_update": 0.2, "optimizer": 0.05})


def test_collectives_of_a_cpu_profile(monkeypatch, bench):
    """A real torch.profiler trace on the CPU: gloo's op inside its c10d op counts once, in the phase it ran
    in; a phase without collectives has none."""
    import time

    import _probe  # bench/, on sys.path since the fixture ran
    from torch.profiler import ProfilerActivity, profile, record_function

    monkeypatch.setattr(_probe, "CUDA", False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("phase/policy_update"):
            time.sleep(0.01)
            with record_function("c10d::allreduce_"), record_function("gloo:all_reduce"):
                time.sleep(0.02)
        with record_function("phase/judge"):
            time.sleep(0.01)
    comms = _probe.collective_seconds(prof)
    assert comms["total"] >= 0.02  # the 20 ms slept inside the c10d op
    assert comms["policy_update"] == pytest.approx(comms["total"]) and comms["judge"] == 0


# ----------------------------------------------------------------------------------------------------
# The CSV files
# ----------------------------------------------------------------------------------------------------
def test_an_older_header_gains_the_new_columns(tmp_path, bench):
    """A results file written before columns were added: append_csv rewrites it under the new header (every old
    value kept under its column, the new columns empty in the old rows), then appends; a header with a column
    the benchmark lacks is still an error."""
    from _common import append_csv  # bench/, on sys.path since the fixture ran

    old_columns = ["date", "device", "phase", "seconds", "note"]
    path = tmp_path / "throughput.csv"
    append_csv(path, [dict(date="d0", device="H200", phase="rollout", seconds=38.23, note="AdamW, ~32 B/param"),
                      dict(date="d0", device="H200", phase="step", seconds=90.72)], old_columns)
    columns = ["date", "git_sha", "device", "phase", "seconds", "seed", "note"]
    append_csv(path, [dict(date="d1", git_sha="abc", device="H100", phase="step", seconds=1.5, seed=0, note="n")],
               columns)
    with path.open(newline="") as f:
        assert next(csv.reader(f)) == columns
    rows = list(csv.DictReader(path.open(newline="")))
    assert rows == [dict(date="d0", git_sha="", device="H200", phase="rollout", seconds="38.23", seed="",
                         note="AdamW, ~32 B/param"),
                    dict(date="d0", git_sha="", device="H200", phase="step", seconds="90.72", seed="", note=""),
                    dict(date="d1", git_sha="abc", device="H100", phase="step", seconds="1.5", seed="0", note="n")]
    assert not (tmp_path / "throughput.csv.tmp").exists()
    with pytest.raises(ValueError, match="they lack its \\['git_sha', 'seed'\\]"):
        append_csv(path, [], old_columns)  # the file's git_sha and seed would be lost
    with pytest.raises(ValueError, match="they lack its \\['seconds'\\]"):
        append_csv(path, [], [c for c in columns if c != "seconds"] + ["extra"])
    assert list(csv.DictReader(path.open(newline=""))) == rows  # untouched by the refusals
    twice = tmp_path / "twice.csv"
    twice.write_text("date,seed,seed\nd0,1,2\n")
    with pytest.raises(ValueError, match="twice.csv:1: its header repeats the columns \\['seed'\\]"):
        append_csv(twice, [], columns)


def test_the_committed_results_stay_appendable(tmp_path, bench):
    """bench/results/throughput.csv (rows of earlier GPU sessions) has a header this benchmark can append to: each
    of its columns is still one of COLUMNS; appending to a copy keeps every old value."""
    from _common import append_csv  # bench/, on sys.path since the fixture ran

    committed = BENCH / "results" / "throughput.csv"
    with committed.open(newline="") as f:
        assert set(next(csv.reader(f))) <= set(bench["COLUMNS"])
    copy = tmp_path / "throughput.csv"
    copy.write_bytes(committed.read_bytes())
    before = list(csv.DictReader(copy.open(newline="")))
    append_csv(copy, [dict(phase="step", seed=0)], bench["COLUMNS"])
    after = list(csv.DictReader(copy.open(newline="")))
    assert len(after) == len(before) + 1 and after[-1]["phase"] == "step" and after[-1]["seed"] == "0"
    assert all(a[k] == v for b, a in zip(before, after) for k, v in b.items())
