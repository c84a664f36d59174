"""The two updates of Algorithm 2 over packed micro-batches: Eq. 2 (policy) and Eq. 1 (discriminator).

Micro-batching must not change the math: the gradient accumulated over many small micro-batches (with
zero-weight fillers) equals the gradient of the same loss computed in one pass from one-sample-at-a-time
log-probs and the eager Dr.GRPO reference.
"""

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import fsdp_states_seen, max_err, nudge_off_clip_bounds, saved_for_backward
from models_fixtures import one_rank, one_thread, random_samples, shared_image_samples, tiny_folder  # noqa: F401

from ril_fast import distributed, imitation, policy
from ril_fast.discriminator import Discriminator
from ril_fast.imitation import disc_pass, disc_probs
from ril_fast.kernels.grpo_loss import dr_grpo_loss_ref
from ril_fast.microbatch import encode_all, micro_batches, rank_agreement
from ril_fast.models import enable_activation_checkpointing, load, response_logprobs
from ril_fast.policy import LossConfig, frozen_logprobs, optimizer_step, policy_pass

L_MAX = 24


@pytest.fixture(scope="module")
def qwen_vl(tmp_path_factory, one_thread):  # noqa: F811
    path = tiny_folder(tmp_path_factory, "qwen2_5_vl")
    return path, *load(path, device="cpu")


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_micro_batches_cover_every_response_and_meet_the_agreed_count(qwen_vl):
    _, _, proc = qwen_vl
    encoded = encode_all(proc, random_samples([1, 0, 2, 0, 1, 0]))
    lengths = [e.length for e in encoded]
    budget = max(lengths) + 10
    micro = micro_batches(encoded, budget)
    assert sorted(i for mb in micro for i in mb.index) == list(range(len(encoded)))
    assert all(sum(lengths[i] for i in mb.index) <= budget for mb in micro)
    more = micro_batches(encoded, budget, agree=lambda n: n + 3)  # split first, then fillers
    assert len(more) == len(micro) + 3
    real = [i for mb in more for i, w in zip(mb.index, mb.weight) if w == 1]
    assert sorted(real) == list(range(len(encoded)))
    many = micro_batches(encoded, budget, agree=lambda n: len(encoded) + 2)  # only fillers can add more
    assert len(many) == len(encoded) + 2
    assert sum(int((mb.weight == 0).sum()) for mb in many) == 2


def test_image_fillers_put_images_where_another_rank_has_them(qwen_vl):
    """When another rank has images in a micro-batch (FSDP runs the vision tower as one unit: all ranks
    or none), an image-less one gets a zero-weight blank-image filler, never a copy of a (possibly long) real
    response, so it exceeds the budget by the filler's length at most; real responses are unchanged."""
    _, _, proc = qwen_vl
    everywhere = lambda flags: [True] * len(flags)  # noqa: E731 - another rank has images in each one
    filler = rank_agreement(proc, torch.device("cpu"))["image_filler"]
    for counts in ([0, 0, 1, 0], [0, 0]):
        encoded = encode_all(proc, random_samples(counts))
        budget = max(e.length for e in encoded) + 5
        plain = micro_batches(encoded, budget)
        micro = micro_batches(encoded, budget, agree_images=everywhere, image_filler=filler)
        assert all(mb.batch.pixel_values is not None for mb in micro)
        assert any(p.batch.pixel_values is None for p in plain) or 1 in counts
        blank = filler().length
        for p, m in zip(plain, micro, strict=True):
            extra = [] if p.batch.pixel_values is not None else [0.0]
            assert m.index[:len(p.index)] == p.index and m.weight.tolist() == p.weight.tolist() + extra
            assert m.batch.lengths == p.batch.lengths + [blank] * len(extra)
            assert sum(m.batch.lengths) <= budget + blank * len(extra)
        unchanged = micro_batches(encoded, budget, agree_images=lambda f: f, image_filler=filler)
        assert [m.index for m in unchanged] == [p.index for p in plain]
    with pytest.raises(ValueError, match="image_filler"):
        micro_batches(encoded, budget, agree_images=everywhere)
    with pytest.raises(ValueError, match="image_filler"):
        micro_batches(encoded, budget, image_filler=filler)


@pytest.mark.parametrize("layout", ["shared", "fillers", "image fillers"])
@pytest.mark.parametrize("mu_old,beta", [(False, 0.0), (True, 0.1)])
def test_policy_gradient_equals_one_pass_reference(qwen_vl, mu_old, beta, layout, tmp_path):
    """Eq. 2 accumulated over small micro-batches + fillers == the eager loss over separate forwards.
    "shared": two responses per prompt, as in a group, so micro-batches encode shared images once.
    Asymmetric clip range (eps_low 0.1, eps_high 0.3): off-policy, ratios in (0.7, 0.9) and (1.1, 1.3) take
    different branches of the min with eps_low and eps_high swapped."""
    _, model, proc = qwen_vl
    samples = shared_image_samples(tmp_path, [1, 0, 2], 2) if layout == "shared" else random_samples([1, 0, 2, 1, 0])
    advantages = torch.randn(len(samples))
    n_outputs = len(samples)
    cfg = LossConfig(beta=beta, temperature=0.9, eps_low=0.1, eps_high=0.3)
    encoded = encode_all(proc, samples)
    longest = max(e.length for e in encoded)
    if layout == "shared":  # room for three samples per micro-batch: samples share one (order matters)
        micro = micro_batches(encoded, 3 * longest + 5, agree=lambda n: n + 1)
        assert any(len(mb.index) > 1 for mb in micro)
        assert any(mb.batch.vision_index is not None for mb in micro)  # a prompt's images encoded once
    elif layout == "image fillers":  # as if another rank had images in every micro-batch
        singles = lambda n: len(encoded) + 1  # noqa: E731 - one response per micro-batch, then a filler
        micro = micro_batches(encoded, longest + 5, agree=singles, agree_images=lambda flags: [True] * len(flags),
                              image_filler=rank_agreement(proc, torch.device("cpu"))["image_filler"])
        plain = micro_batches(encoded, longest + 5, agree=singles)
        without_images = sum(p.batch.pixel_values is None for p in plain)
        assert without_images >= 2  # the two text-only responses, at least
        assert sum(int((m.weight == 0).sum()) for m in micro) == 1 + without_images
    else:  # one sample per micro-batch, then zero-weight fillers
        micro = micro_batches(encoded, longest + 5, agree=lambda n: len(encoded) + 2)
        assert sum(int((mb.weight == 0).sum()) for mb in micro) == 2
    with torch.no_grad():  # stand-ins for π_old and π_ref: the model's own log-probs, shifted
        base = frozen_logprobs(model, micro, cfg.temperature)
    # Ratios within 1e-4 of a clip bound are moved off it: the packed and one-at-a-time log-probs differ in
    # their last bits and could take different branches of the min there (a gradient of rho*A versus 0).
    old = [nudge_off_clip_bounds(b, b + 0.2 * torch.randn_like(b), cfg.eps_low, cfg.eps_high)
           for b in base] if mu_old else None
    ref = [b + 0.2 * torch.randn_like(b) for b in base] if beta else None
    normalizer = torch.tensor(float(n_outputs * L_MAX))
    if mu_old:  # both bounds matter: a token of ratio 1.2 with A > 0 and one of 0.8 with A < 0, each of which
        # takes the other branch of the min when eps_low and eps_high are swapped (besides the random ratios)
        advantages[:2] = advantages[:2].abs() * torch.tensor([1.0, -1.0])
        for sign, rho in ((1, 1.2), (-1, 0.8)):
            k, t = next((k, t) for k, mb in enumerate(micro)
                        for t, a in enumerate(mb.per_token(advantages[mb.index] * mb.weight)) if sign * a > 0)
            old[k][t] = base[k][t] - math.log(rho)

    model.zero_grad(set_to_none=True)
    stats = policy_pass(model, micro, advantages, normalizer, cfg, old=old, ref=ref)
    got = _grads(model)

    # The reference: one forward per sample, tokens concatenated in sample order.
    model.zero_grad(set_to_none=True)
    lps = response_logprobs(model, proc, samples, packed=False, temperature=cfg.temperature)
    order = {}
    for k, mb in enumerate(micro):
        for j, (i, w) in enumerate(zip(mb.index, mb.weight)):
            if w == 1:
                order[i] = (k, j)

    def per_sample(per_mb):  # micro-batch tensors → the same values in sample order
        out = []
        for i in range(n_outputs):
            k, j = order[i]
            offsets = [0] + torch.tensor(micro[k].batch.response_lengths).cumsum(0).tolist()
            out.append(per_mb[k][offsets[j]:offsets[j + 1]])
        return torch.cat(out)

    lp = torch.cat(lps)
    adv = torch.cat([advantages[i].expand(len(x)) for i, x in enumerate(lps)])
    loss, *_ = dr_grpo_loss_ref(lp, adv, torch.ones_like(lp), per_sample(old) if old else None,
                                per_sample(ref) if ref else None, beta, cfg.eps_low, cfg.eps_high,
                                normalizer)
    loss.backward()
    want = _grads(model)
    assert got.keys() == want.keys()
    err = max(max_err(got[n], want[n]) / (1e-3 + want[n].abs().max().item()) for n in want)
    assert err < 1e-4, f"relative gradient error {err:.2e}"
    assert abs(stats["loss"] - loss.item()) <= 1e-5 * (1 + abs(loss.item()))


@pytest.mark.parametrize("layout", ["split", "fillers", "image fillers"])
def test_disc_pass_is_eq1_and_learns(qwen_vl, layout):
    """Eq. 1's gradient and accuracy over micro-batches (split, with zero-weight fillers, with blank-image
    fillers) == BCE over separate forwards, and ``disc_probs`` == each response's own score: a filler
    neither trains nor scores; a few updates separate student-style from teacher-style text."""
    path, _, proc = qwen_vl
    disc, _ = Discriminator.from_student(path, device="cpu", init_std=0.02)
    student = random_samples([1, 0, 1, 0])
    teacher = [dict(s, response="The answer is clearly stated here: " + s["response"])
               for s in random_samples([0, 1, 0, 1])]
    samples = student + teacher
    labels = torch.tensor([1.0] * len(student) + [0.0] * len(teacher))
    encoded = encode_all(proc, samples)
    budget = max(e.length for e in encoded) + 5
    if layout == "split":
        micro = micro_batches(encoded, budget, agree=lambda n: n + 1)
    else:  # one response per micro-batch, then fillers: whole zero-weight copies, or a blank image beside a
        # text-only response (as if another rank had images in every micro-batch)
        images = dict(agree_images=lambda flags: [True] * len(flags),
                      image_filler=rank_agreement(proc, torch.device("cpu"))["image_filler"])
        singles = lambda n: len(encoded) + 2  # noqa: E731
        micro = micro_batches(encoded, budget, agree=singles, **(images if layout == "image fillers" else {}))
        without_images = sum(mb.batch.pixel_values is None for mb in micro_batches(encoded, budget, agree=singles))
        assert without_images >= 4  # the four text-only responses, at least
        fillers = sum(int((mb.weight == 0).sum()) for mb in micro)
        assert fillers == 2 + (without_images if layout == "image fillers" else 0)
    n = torch.tensor(float(len(samples)))

    disc.zero_grad(set_to_none=True)
    stats = disc_pass(disc, micro, labels, n)
    got = _grads(disc)
    disc.zero_grad(set_to_none=True)
    logits = torch.cat([disc(micro_batches([e], 10**6)[0].batch) for e in encoded])
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    loss.backward()
    want = _grads(disc)
    err = max(max_err(got[k], want[k]) / (1e-3 + want[k].abs().max().item()) for k in want)
    assert err < 1e-4 and abs(stats["disc_loss"] - loss.item()) < 1e-5
    assert stats["disc_accuracy"] == ((logits.detach() >= 0).float() == labels).float().mean().item()
    scores = torch.sigmoid(logits.detach())
    accuracy = lambda t: ((scores >= t).float() == labels).float().mean().item()  # noqa: E731
    ranked = scores.sort().values  # r_sim's disc.threshold: one between two scores that counts otherwise than 0.5
    threshold = next(t for t in ((ranked[1:] + ranked[:-1]) / 2).tolist() if accuracy(t) != stats["disc_accuracy"])
    assert disc_pass(disc, micro, labels, n, threshold=threshold)["disc_accuracy"] == accuracy(threshold)
    probs = disc_probs(disc, micro, len(samples))
    assert max_err(probs, torch.sigmoid(logits.detach())) < 1e-5
    if layout != "split":
        return

    opt = torch.optim.AdamW(disc.parameters(), lr=3e-3)
    for _ in range(30):
        disc_pass(disc, micro, labels, n)
        optimizer_step(disc, opt, grad_clip=1.0)
    probs = disc_probs(disc, micro, len(samples))
    assert ((probs >= 0.5).float() == labels).all(), probs


def test_disc_probs_refuse_a_nan_score(qwen_vl):
    """A discriminator whose output is NaN is an error: NaN < threshold is False, so it would pass as r_sim = 0."""
    path, _, proc = qwen_vl
    disc, _ = Discriminator.from_student(path, device="cpu", init_std=0.02)
    micro = micro_batches(encode_all(proc, random_samples([1, 0, 1])), 10**6)
    assert torch.isfinite(disc_probs(disc, micro, 3)).all()
    with torch.no_grad():
        disc.weight[0] = float("nan")
    with pytest.raises(RuntimeError, match="scored 3 of 3 responses NaN"):
        disc_probs(disc, micro, 3)


def test_optimizer_step_skips_a_non_finite_gradient():
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    before = layer.weight.detach().clone()
    layer(torch.full((1, 3), float("nan"))).sum().backward()
    out = optimizer_step(layer, opt, grad_clip=1.0)
    assert out["skipped"] == 1.0 and torch.equal(layer.weight, before) and layer.weight.grad is None
    layer(torch.ones(1, 3)).sum().backward()
    out = optimizer_step(layer, opt, grad_clip=1.0)
    assert out["skipped"] == 0.0 and not torch.equal(layer.weight, before)


def test_optimizer_step_without_clipping_applies_the_whole_gradient():
    """grad_clip = 0 means no clipping (config.py): a gradient of norm ~73 is applied whole and its norm reported;
    a positive grad_clip scales it down to that norm."""
    for clip in (0.0, 2.0):
        layer = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(layer.parameters(), lr=1.0)
        before = [p.detach().clone() for p in layer.parameters()]
        layer(torch.full((1, 3), 30.0)).sum().backward()  # d weight = 30 everywhere, d bias = 1
        grads = [p.grad.clone() for p in layer.parameters()]
        norm = torch.cat([g.flatten() for g in grads]).norm().item()
        out = optimizer_step(layer, opt, grad_clip=clip)
        assert out["grad_norm"] == pytest.approx(norm, rel=1e-6) and out["skipped"] == 0.0
        scale = min(1.0, clip / norm) if clip > 0 else 1.0
        for p, b, g in zip(layer.parameters(), before, grads, strict=True):
            torch.testing.assert_close(p.detach(), b - scale * g, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("update", ["policy", "disc"])
def test_sharded_accumulation_over_micro_batches_equals_unsharded(qwen_vl, update, one_rank):  # noqa: F811
    """On one FSDP2 rank, a pass over several micro-batches (gradient reduction only at the last:
    ``sync_gradients``) leaves in the sharded gradients what the unsharded model accumulates."""
    path, _, proc = qwen_vl
    samples = random_samples([1, 0, 2, 1, 0])
    encoded = encode_all(proc, samples)
    micro = micro_batches(encoded, max(e.length for e in encoded) + 5)  # about one response per micro-batch
    assert len(micro) >= 3
    if update == "policy":
        model, _ = load(path, device="cpu")
        advantages, cfg = torch.randn(len(samples)), LossConfig(eps_low=0.1, eps_high=0.3)

        def run(m):
            return policy_pass(m, micro, advantages, torch.tensor(float(len(samples) * L_MAX)), cfg)
    else:
        model, _ = Discriminator.from_student(path, device="cpu", init_std=0.02)
        labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])

        def run(m):
            return disc_pass(m, micro, labels, torch.tensor(float(len(samples))))

    sharded = distributed.shard_model(copy.deepcopy(model), mixed_precision=False)
    model.zero_grad(set_to_none=True)
    want_stats = run(model)
    want = _grads(model)
    got_stats = run(sharded)
    got = {n.removeprefix("module."): p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
           for n, p in sharded.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for n in want:
        err, scale = max_err(got[n], want[n]), want[n].abs().max().item()
        assert err <= 1e-6 * (1 + scale), f"{n}: sharded gradient off by {err:.2e} (largest entry {scale:.2e})"
    assert got_stats == pytest.approx(want_stats, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("update", ["policy", "disc"])
def test_updates_recompute_with_activation_checkpointing(qwen_vl, update):
    """With activation checkpointing enabled, both updates keep under half the bytes for the backward
    (the layers recompute theirs) and accumulate the same gradients; their models stay in eval mode."""
    path, _, proc = qwen_vl
    samples = random_samples([1, 0, 2, 1])
    micro = micro_batches(encode_all(proc, samples), 10**6)
    if update == "policy":
        model, _ = load(path, device="cpu")
        backbone = model
        cfg, advantages = LossConfig(), torch.randn(len(samples))

        def run():
            return policy_pass(model, micro, advantages, torch.tensor(100.0), cfg)
    else:
        model, _ = Discriminator.from_student(path, device="cpu", init_std=0.02)
        model.eval()  # as the trainer keeps it
        backbone = model.backbone
        labels = torch.tensor([1.0, 0.0, 1.0, 0.0])

        def run():
            return disc_pass(model, micro, labels, torch.tensor(4.0))

    def saved_and_grads():
        model.zero_grad(set_to_none=True)
        with saved_for_backward() as saved:
            run()
        return sum(saved), _grads(model)

    stored, want = saved_and_grads()
    enable_activation_checkpointing(backbone)
    kept, got = saved_and_grads()
    assert kept < stored / 2, (kept, stored)
    assert not any(m.training for m in model.modules())
    assert got.keys() == want.keys()
    for n in want:
        assert max_err(got[n], want[n]) <= 1e-6 * (1 + want[n].abs().max().item()), n


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl", "qwen3_5", "internvl", "qwen2"])
def test_sharded_bf16_scoring_passes_run_blocks_bare(arch, tmp_path_factory, monkeypatch, one_rank):  # noqa: F811
    """The no-grad passes of a sharded bf16 model (π_old / π_ref log-probs, the discriminator's scores) run
    its decoder blocks without FSDP's hooks and give, bit for bit, what the hooked blocks give (FSDP's
    input casts were no-ops there) over several micro-batches."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    path = tiny_folder(tmp_path_factory, arch)
    model, proc = load(path, device="cpu")
    disc, _ = Discriminator.from_student(path, device="cpu", init_std=0.1)
    student = distributed.shard_model(model, mixed_precision=True)
    disc = distributed.shard_model(disc, mixed_precision=True)
    encoded = encode_all(proc, random_samples([0] * 5 if arch == "qwen2" else [1, 0, 2, 1, 0]))
    micro = micro_batches(encoded, 2 * max(e.length for e in encoded))
    assert len(micro) > 1
    blocks = distributed.decoder_blocks(student) + distributed.decoder_blocks(disc)
    assert len(blocks) == 4  # the tiny models' 2 blocks each
    seen, handles = fsdp_states_seen(blocks)
    bare = frozen_logprobs(student, micro, 0.9), disc_probs(disc, micro, len(encoded))
    bare_seen, seen[:] = seen[:], []
    monkeypatch.setattr(policy, "bare_blocks", contextlib.nullcontext)  # the blocks keep FSDP's hooks
    monkeypatch.setattr(imitation, "bare_blocks", contextlib.nullcontext)
    hooked = frozen_logprobs(student, micro, 0.9), disc_probs(disc, micro, len(encoded))
    for h in handles:
        h.remove()
    assert all(torch.equal(a, b) for a, b in zip(bare[0], hooked[0], strict=True))
    assert torch.equal(bare[1], hooked[1]) and not bare[1].isnan().any()
    assert len(bare_seen) == len(seen) == 2 * 2 * len(micro)  # each model's 2 blocks, per micro-batch
    assert set(bare_seen) == {TrainingState.IDLE} and set(seen) == {TrainingState.FORWARD}
