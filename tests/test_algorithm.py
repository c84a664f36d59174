"""Algorithm 2 as train.py runs it, driven in-process on the demo's tiny student: a step's phases in order (μ
discriminator updates before the scoring, π_old's log-probs only when μ > 1 and π_ref's only when β > 0, μ policy
updates each stepping the scheduler once), the discriminator's labels (student 1, teacher 0), the sampling seed per
(seed, step, rank), the learning rate logged for the step's first update, set-up's choices on one rank (nothing
read from rank 0, no fused AdamW unless offloaded, the reference unsharded and frozen, the teacher judge cached),
and the loop's schedule of pre-training, evaluations and metrics lines (its steps stubbed)."""

import dataclasses
import random
import shutil

import pytest
import torch
from models_fixtures import one_thread  # noqa: F401

from ril_fast import train
from ril_fast.config import load_config
from ril_fast.demo import build_demo
from ril_fast.distributed import fsdp_modules
from ril_fast.judge import CachedJudge
from ril_fast.metrics import read_metrics
from ril_fast.rewards import STUDENT


@pytest.fixture(scope="module")
def demo(tmp_path_factory, one_thread):  # noqa: F811
    return build_demo(tmp_path_factory.mktemp("demo"), max_train=32, max_test=8)


def _args(demo, out, **extra):
    args = dict(student=demo.student, train_data=demo.train, teachers=",".join(map(str, demo.teachers)),
                eval_data=demo.test, eval_every=0, eval_max_examples=2, steps=3, group_size=2, max_new_tokens=11,
                output_dir=out, progress="false", seed=3, **{"batch.questions_per_step": 2,
                                                             "disc.pretrain_steps": 0})
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


@pytest.mark.parametrize("mu, beta", [(2, 0.1), (1, 0.0)])
def test_a_step_runs_algorithm_2s_phases_in_order(demo, tmp_path, monkeypatch, mu, beta):
    """Set-up on one rank: no model is read on rank 0 alone (``from_rank0``), AdamW is torch's default (fused only
    when offloaded), the reference exists only for β > 0, unsharded (one rank, not offloaded) and frozen; the
    teacher judge caches the student's judge, which judges the student outputs itself; the teacher draws come from a
    generator of (seed, rank). A step: the rollout, μ discriminator updates on labels 1 for the student's outputs
    and 0 for the teachers', the judge, the discriminator's scores (after its updates), π_old's log-probs only for
    μ > 1 and π_ref's only for β > 0 (before any policy update), then μ policy updates each followed by its
    optimiser step and one scheduler step; the logged lr is the one the first update used. (Two pre-training steps
    first, for μ = 1: each samples with its own seed, unlike the step's.)"""
    shards = []
    shard_model = train.distributed.shard_model

    def shard(model, **kw):
        shards.append(kw["from_rank0"])
        return shard_model(model, **kw)

    monkeypatch.setattr(train.distributed, "shard_model", shard)
    run = train.setup(load_config(_args(demo, tmp_path / "run", mu=mu, beta=beta)))
    cfg = run.cfg
    assert shards == [False, False]  # student and discriminator; the reference (one rank, not offloaded) is not
    assert all(not g.get("fused") for opt in (run.optimizer, run.disc_optimizer) for g in opt.param_groups)
    if beta:
        assert isinstance(run.reference, torch.nn.Module) and not fsdp_modules(run.reference)
        assert not any(p.requires_grad for p in run.reference.parameters())
    else:
        assert run.reference is None
    assert isinstance(run.teacher_judge, CachedJudge) and run.teacher_judge.judge is run.judge
    assert not isinstance(run.judge, CachedJudge)
    assert run.rng.getstate() == random.Random(f"{cfg.seed}:{run.dist.rank}").getstate()

    events, seeds, labels, judged = [], [], [], []

    def recorded(name, fn, note=None):
        def call(*a, **k):
            events.append(name(*a, **k) if callable(name) else name)
            if note:
                note(*a, **k)
            return fn(*a, **k)
        return call

    monkeypatch.setattr(train, "sample_responses", recorded("rollout", train.sample_responses,
                                                            lambda *a, **k: seeds.append(k["seed"])))
    monkeypatch.setattr(train, "disc_pass", recorded("disc_update", train.disc_pass,
                                                     lambda model, micro, y, *a, **k: labels.append(y.clone())))
    monkeypatch.setattr(train, "answer_rewards", recorded("judge", train.answer_rewards,
                                                          lambda *a: judged.append(a)))
    monkeypatch.setattr(train, "disc_probs", recorded("disc_score", train.disc_probs))
    monkeypatch.setattr(train, "frozen_logprobs", recorded(
        lambda model, *a: "old" if model is run.student else "ref" if model is run.reference else "?",
        train.frozen_logprobs))
    monkeypatch.setattr(train, "policy_pass", recorded("policy_update", train.policy_pass))
    monkeypatch.setattr(train, "optimizer_step", recorded(
        lambda model, opt, clip: "disc_step" if opt is run.disc_optimizer else "step", train.optimizer_step))
    monkeypatch.setattr(run.scheduler, "step", recorded("schedule", run.scheduler.step))

    if mu == 1:
        for _ in range(2):
            train.pretrain_disc_step(run)
        assert events == ["rollout", "disc_update", "disc_step"] * 2
        assert len(set(seeds)) == 2, seeds  # fresh samples each pre-training step
        events.clear()
    lr, updates = run.scheduler.get_last_lr()[0], run.scheduler.last_epoch
    metrics = train.train_step(run, step=1)
    run.log.close()

    frozen = (["old"] if mu > 1 else []) + (["ref"] if beta else [])
    assert events == (["rollout"] + ["disc_update", "disc_step"] * mu + ["judge", "disc_score"] + frozen
                      + ["policy_update", "step", "schedule"] * mu), events
    assert len(set(seeds)) == len(seeds), seeds  # the step's seed is none of the pre-training's
    student_judge, teacher_judge, samples, sources = judged[0]
    assert student_judge is run.judge and teacher_judge is run.teacher_judge
    want = torch.tensor([float(s == STUDENT) for s in sources])
    assert 0 < want.sum() < len(want)  # both kinds of output in the batch
    for y in labels[-mu:]:
        assert torch.equal(y, want), (y, sources)
    assert run.scheduler.last_epoch == updates + mu
    assert metrics["lr"] == lr != run.scheduler.get_last_lr()[0], (metrics["lr"], lr)  # in warm-up: it moved


def test_the_sampling_seed_is_distinct_per_seed_step_and_rank():
    """``_seed``: every (run seed, step, rank) its own sampling seed, pre-training's negative steps and the ends of
    the seed's range included."""
    seeds = {}
    for seed in (0, 1, 7, -5, 2**31 - 1, -(2**31) + 1):
        for step in (*range(-3, 4), 349, 350):
            for rank in range(4):
                run = dataclasses.make_dataclass("R", ["cfg", "dist"])(
                    cfg=dataclasses.make_dataclass("C", ["seed"])(seed), dist=dataclasses.make_dataclass(
                        "D", ["rank"])(rank))
                seeds[seed, step, rank] = train._seed(run, step)
    assert len(set(seeds.values())) == len(seeds)


def test_the_loop_pretrains_evaluates_and_logs_on_schedule(demo, tmp_path, monkeypatch):
    """``main``'s loop with its step, pre-training step and evaluation stubbed: disc.pretrain_steps pre-training
    steps, then an evaluation logged as step 0; steps 1..steps in order, an evaluation after every eval_every-th step
    but the last (whose evaluation is the run's final one, on a line of its own), and a metrics line every
    log_every-th step and at every evaluation."""
    trained, evaluated, pretrained = [], [], []
    monkeypatch.setattr(train, "pretrain_disc_step", lambda run: pretrained.append(run.counters["pretrained"]))
    monkeypatch.setattr(train, "train_step", lambda run, step: trained.append(step) or {"step": step, "loss": 0.5})
    monkeypatch.setattr(train, "evaluate_now", lambda run: evaluated.append(len(trained)) or {"eval_accuracy": 0.25})
    args = dict(steps=6, eval_every=3, log_every=2, checkpoint_every=0, **{"disc.pretrain_steps": 2})
    out = train.main(_args(demo, tmp_path / "run", **args))
    assert pretrained == [0, 1]
    assert trained == list(range(1, 7))
    assert evaluated == [0, 3, 6]  # step 6 (a multiple of eval_every) is evaluated once, as the run's last
    records = read_metrics(out / "metrics.jsonl")
    assert [(r["step"], "eval_accuracy" in r) for r in records] == [
        (0, True), (2, False), (3, True), (4, False), (6, False), (6, True)]


def test_weights_a_student_folder_lacks_start_alike_for_one_seed(demo, tmp_path):
    """transformers initialises the weights a folder lacks from torch's global generator: set-up seeds it with
    ``seed`` before each model loads, so such a weight starts the same in π_θ, π_ref and D_φ (Algorithm 2's
    π_ref ← π_θ_init, D_φ from the same initial weights) and in every run of that seed (and on every rank that reads
    the folder), whatever drew from the generator before; another seed draws it anew."""
    from safetensors.torch import load_file, save_file

    from ril_fast.distributed import unwrap

    student = tmp_path / "student"
    shutil.copytree(demo.student, student)
    (weights,) = student.glob("*.safetensors")
    state = load_file(str(weights))
    name = "layers.0.mlp.up_proj.weight"
    (missing,) = [k for k in state if k.endswith(name)]
    del state[missing]
    save_file(state, str(weights), metadata={"format": "pt"})

    def initialised(seed: int, out: str) -> list[torch.Tensor]:
        torch.rand(int(torch.randint(1, 100, ())))  # the generator drawn from before set-up, a different amount
        run = train.setup(load_config(_args(demo, tmp_path / out, student=student, seed=seed, beta=0.1)))
        run.log.close()
        found = []
        for model in (run.student, run.reference, run.disc):
            (param,) = [p for n, p in unwrap(model).named_parameters() if n.endswith(name)]
            found.append((param.full_tensor() if hasattr(param, "full_tensor") else param).detach().float().clone())
        return found

    first = initialised(3, "a")
    assert all(torch.equal(first[0], other) for other in first[1:])
    assert torch.equal(first[0], initialised(3, "b")[0]) and not torch.equal(first[0], initialised(4, "c")[0])
