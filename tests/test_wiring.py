"""Settings reach a training step's computation: one step of the demo with non-default values of
rollout.temperature / top_p / top_k, loss.eps_low/eps_high (asymmetric), disc.threshold and disc.pool, each
checked where the trainer uses it (what reaches sample_responses, policy_pass and build_groups, and the
discriminator built)."""

import pytest
import torch
from models_fixtures import one_thread  # noqa: F401

from ril_fast import train
from ril_fast.config import load_config
from ril_fast.demo import build_demo
from ril_fast.distributed import unwrap
from ril_fast.kernels.disc_head import Pool
from ril_fast.models import load
from ril_fast.packing import pack

TAU, TOP_P, TOP_K, EPS_LOW, EPS_HIGH, THRESHOLD = 0.7, 0.95, 40, 0.1, 0.3, 0.3


@pytest.fixture(scope="module")
def demo(tmp_path_factory, one_thread):  # noqa: F811
    return build_demo(tmp_path_factory.mktemp("demo"), max_train=32, max_test=8)


def _independent_logprobs(model, processor, sample: dict, temperature: float) -> torch.Tensor:
    """One sample's response-token log-probs from a plain forward of ``model`` (no ril_fast kernel):
    log_softmax(logits / temperature) at each response token, fp32 ``(R,)``."""
    batch = pack([processor.encode(sample)])
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits[0].float()
    rows = batch.response_rows
    return torch.log_softmax(logits[rows] / temperature, -1).gather(-1, batch.targets[rows, None])[:, 0]


def test_step_uses_the_configured_temperature_clip_range_threshold_and_pool(demo, tmp_path, monkeypatch):
    """With μ = 2 and β > 0 (so π_old and π_ref are both computed): the rollout samples at
    rollout.temperature, top_p and top_k; π_old's and π_ref's log-probs are
    log_softmax(z/τ) at rollout.temperature per sample, as an independent forward gives them (step 1:
    both are the initial student); the loss sees loss.eps_low, loss.eps_high (each its own, not swapped)
    and τ; r_sim = 1[D < disc.threshold] on the probabilities the discriminator gave, and disc_accuracy at
    that threshold; and the
    discriminator pools as disc.pool says."""
    args = dict(student=demo.student, train_data=demo.train, teachers=",".join(map(str, demo.teachers)),
                eval_data=demo.test, eval_every=0, steps=1, group_size=3, max_new_tokens=11,
                output_dir=tmp_path / "run", progress="false", mu=2, beta=0.1, seed=3,
                **{"batch.questions_per_step": 2, "disc.pretrain_steps": 0, "rollout.temperature": TAU,
                   "rollout.top_p": TOP_P, "rollout.top_k": TOP_K,
                   "loss.eps_low": EPS_LOW, "loss.eps_high": EPS_HIGH, "disc.threshold": THRESHOLD,
                   "disc.pool": "mean"})
    run = train.setup(load_config([f"{k}={v}" for k, v in args.items()]))
    seen = {}
    collect, probs_of, build, policy_pass = train.collect_outputs, train.disc_probs, train.build_groups, \
        train.policy_pass

    def record(name, fn):
        return lambda *a, **k: seen.setdefault(name, fn(*a, **k))  # the first call's result

    monkeypatch.setattr(train, "collect_outputs", record("outputs", collect))
    monkeypatch.setattr(train, "disc_probs", record("probs", probs_of))
    monkeypatch.setattr(train, "build_groups", record("groups", build))

    def policy(model, micro, advantages, normalizer, cfg, old=None, ref=None):
        seen.setdefault("policy", (micro, cfg, old, ref))  # the first of the μ updates'
        return policy_pass(model, micro, advantages, normalizer, cfg, old=old, ref=ref)

    monkeypatch.setattr(train, "policy_pass", policy)
    sample = train.sample_responses

    def sampling(*a, **k):
        seen.setdefault("sampling", k)
        return sample(*a, **k)

    monkeypatch.setattr(train, "sample_responses", sampling)
    disc_pass = train.disc_pass

    def disc_update(*a, **k):
        seen.setdefault("disc_pass", k)
        return disc_pass(*a, **k)

    monkeypatch.setattr(train, "disc_pass", disc_update)
    train.train_step(run, step=1)
    run.log.close()

    # disc.pool: the discriminator built pools the mean of a response's rows.
    assert unwrap(run.disc).pool == Pool.MEAN

    # rollout.temperature, top_p, top_k: the rollout's sampling.
    k = seen["sampling"]
    assert (k["temperature"], k["top_p"], k["top_k"], k.get("greedy", False)) == (TAU, TOP_P, TOP_K, False), k

    # loss.eps_low, loss.eps_high, rollout.temperature: the loss's constants.
    micro, cfg, old, ref = seen["policy"]
    assert (cfg.eps_low, cfg.eps_high, cfg.beta, cfg.temperature) == (EPS_LOW, EPS_HIGH, 0.1, TAU)

    # disc.threshold: r_sim = 1[D < 0.3]; some D lies in [0.3, 0.5), where the default threshold decides otherwise.
    probs = seen["probs"].detach().cpu()
    r_sim = torch.cat([g.r_sim for g in seen["groups"]])
    assert torch.equal(r_sim, (probs < THRESHOLD).float()), (probs, r_sim)
    assert ((probs >= THRESHOLD) & (probs < 0.5)).any(), probs
    assert seen["disc_pass"]["threshold"] == THRESHOLD  # disc_accuracy counts as r_sim decides

    # rollout.temperature: π_old and π_ref per sample, against a plain forward of the initial student.
    samples = seen["outputs"][0]
    model, processor = load(demo.student, device="cpu")
    model.eval()
    # fp32 on a CPU (measured: 2e-6); a GPU's forwards run in bf16. τ = 1 instead is 0.58 off here.
    atol, checked = 1e-4 if run.dist.device.type == "cpu" else 5e-2, 0
    for k, mb in enumerate(micro):
        ends = torch.tensor([0] + mb.batch.response_lengths).cumsum(0).tolist()
        for j in mb.real:
            want = _independent_logprobs(model, processor, samples[mb.index[j]], TAU)
            for name, got in (("old", old[k]), ("ref", ref[k])):
                torch.testing.assert_close(got[ends[j]:ends[j + 1]].cpu(), want, rtol=0, atol=atol,
                                           msg=lambda m: f"{name}, output {mb.index[j]}: {m}")
            checked += 1
    assert checked == len(samples) == 2 * 2 * 3  # 2 questions x (G = 3 student + 3 teacher outputs)
