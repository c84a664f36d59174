"""bench/throughput.py: the tiny preset runs every configuration and reports every phase (a smoke test: no
speed is asserted), and the configurations it compares compute the same update."""

import csv
import runpy
import sys
from pathlib import Path

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
    for r in rows:
        assert r["device"] and r["git_sha"] and r["date"] and r["preset"] == "tiny" and r["world_size"] == "1"
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
        assert float(r["seconds"]) > 0 and float(r["tflop"]) > 0
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
    assert float(phases["rollout"]["prompt_tokens"]) > 0


def test_compared_configurations_compute_the_same_update(tmp_path_factory, one_thread, bench):  # noqa: F811
    """Packed and padded micro-batches, fused and eager kernels, and the Liger provider: the same Eq. 2
    loss and gradients on the same outputs (a side-by-side is only fair if the work is the same)."""
    from _baselines import liger_policy_pass  # bench/, on sys.path since the fixture ran

    from ril_fast.microbatch import micro_batches
    from ril_fast.models import Kernels, load
    from ril_fast.policy import LossConfig, frozen_logprobs, policy_pass

    model, processor = load(tiny_folder(tmp_path_factory, "qwen2_5_vl"), device="cpu")
    reference, _ = load(tiny_folder(tmp_path_factory, "qwen2_5_vl"), device="cpu")
    with torch.no_grad():  # a reference that differs from the student, so the KL term is not zero
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    encoded = [processor.encode(s) for s in random_samples([1, 0, 2, 1, 1, 0])]
    advantages = torch.randn(len(encoded))
    normalizer = torch.tensor(float(len(encoded) * 24))

    def update(padded: bool, kernels: Kernels, liger: bool = False):
        micro = micro_batches(encoded, max_tokens=160, padded=padded)
        cfg = LossConfig(beta=0.1, temperature=0.9, kernels=kernels)
        ref = frozen_logprobs(reference, micro, cfg.temperature, kernels=kernels)
        model.zero_grad(set_to_none=True)
        if liger:
            loss = liger_policy_pass(model, micro, advantages, normalizer, cfg, 24, ref=ref)
        else:
            loss = policy_pass(model, micro, advantages, normalizer, cfg, ref=ref)["loss"]
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    base_loss, base_grads = update(False, Kernels.AUTO)
    assert len(micro_batches(encoded, max_tokens=160)) > 1  # the accumulation over micro-batches is exercised
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
