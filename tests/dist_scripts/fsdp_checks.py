"""FSDP2 checks on a tiny Qwen2.5-VL, run by tests/test_distributed.py on one or more CPU ranks (gloo).

    torchrun --standalone --nproc_per_node=2 tests/dist_scripts/fsdp_checks.py MODEL_DIR OUT.json
    python tests/dist_scripts/fsdp_checks.py MODEL_DIR OUT.json          # one rank, no torchrun env
    torchrun --standalone --nproc_per_node=4 tests/dist_scripts/fsdp_checks.py MODEL_DIR OUT.json 2   # HSDP

The optional third argument is ``shard_ranks`` for every ``shard_model`` call (2 of 4 ranks: HSDP, two
sharded replicas).

Every rank measures; errors are max-reduced over ranks and rank 0 writes them to OUT.json, where the
test asserts on them. One check raises instead, on every rank at once (the launch fails with its message): ranks
with different numbers of responses must agree on one number of micro-batches. Each rank's data comes from a seed
of its rank, so every rank can rebuild every other rank's batch and compute the single-process reference: the SUM
over ranks of the unsharded model's gradients.
"""

import contextlib
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp_param_group  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from transformers import AutoConfig  # noqa: E402

from ril_fast import distributed, memory, rollout  # noqa: E402
from ril_fast.discriminator import Discriminator  # noqa: E402
from ril_fast.imitation import disc_probs  # noqa: E402
from ril_fast.microbatch import MicroBatch, micro_batches, rank_agreement, sync_gradients  # noqa: E402
from ril_fast.models import load, packed_logprobs  # noqa: E402
from ril_fast.packing import pack  # noqa: E402
from ril_fast.policy import frozen_logprobs  # noqa: E402
from ril_fast.processor import Encoded  # noqa: E402
from ril_fast.rollout import sample_responses  # noqa: E402
from tests.models_fixtures import random_samples  # noqa: E402

IMAGES = [1, 0, 2]  # images per sample of a rank's batch (the vision tower runs on every rank)


class AllGatherCounter:
    """Counts FSDP2's parameter all-gathers: each call of ``foreach_all_gather`` is one collective for
    one FSDP module's parameters (FSDP skips it on a 1-rank mesh, so the count stays 0 there)."""

    def __init__(self):
        self.count = 0
        self._real = fsdp_param_group.foreach_all_gather

    def _counted(self, *args, **kwargs):
        self.count += 1
        return self._real(*args, **kwargs)

    @contextlib.contextmanager
    def counting(self):
        self.count = 0
        fsdp_param_group.foreach_all_gather = self._counted
        try:
            yield self
        finally:
            fsdp_param_group.foreach_all_gather = self._real


def rank_data(proc, rank: int):
    """Rank ``rank``'s packed batch and upstream weights (R,) fp32, the same on every process."""
    with torch.random.fork_rng():
        torch.manual_seed(1000 + rank)
        samples = random_samples(IMAGES)
        batch = pack([proc.encode(s) for s in samples])
        weights = torch.randn(sum(batch.response_lengths))
    return samples, batch, weights


def logprobs(model, batch) -> torch.Tensor:
    """Packed response log-probs (R,) fp32; a sharded model runs them as its root's forward."""
    if isinstance(model, distributed.Sharded):
        return model(batch, fn=packed_logprobs).logprobs
    return packed_logprobs(model, batch).logprobs


def summed_loss(model, batch, weights) -> torch.Tensor:
    """A loss summed over the rank's tokens, as the trainer's (normalised by a global count, here 1)."""
    return (weights * logprobs(model, batch)).sum()


def summed_grads(model, data) -> dict:
    """The single-process reference: Σ over ``data``'s (batch, weights) of the gradients of each
    summed loss (the model's gradients are left cleared)."""
    out = {}
    for batch, weights in data:
        model.zero_grad(set_to_none=True)
        summed_loss(model, batch, weights).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                out[n] = out.get(n, 0) + p.grad
    model.zero_grad(set_to_none=True)
    return out


def full_grads(model) -> dict:
    """Parameter gradients as full tensors (a collective for sharded ones: every rank calls it)."""
    out = {}
    for n, p in distributed.unwrap(model).named_parameters():
        if p.grad is not None:
            g = p.grad
            out[n] = (g.full_tensor() if isinstance(g, DTensor) else g).float()
    return out


def grad_err(got: dict, want: dict) -> float:
    """Largest error relative to each tensor's scale; inf when the parameter sets differ."""
    if got.keys() != want.keys():
        return float("inf")
    return max(((got[n] - want[n]).abs().max() / (1 + want[n].abs().max())).item() for n in want)


def max_over_ranks(x: float) -> float:
    return distributed.all_reduce_max(torch.tensor([x], dtype=torch.float64)).item()


def main(folder: str, out_path: str, shard_ranks: int = 0) -> None:
    shard_model = functools.partial(distributed.shard_model, shard_ranks=shard_ranks)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    d = distributed.init()
    res = {"world_size": d.world_size, "rank_device": str(d.device), "is_main": d.is_main,
           "init_again_same": distributed.init() == d}
    res["rank_sum"] = distributed.all_reduce_sum(torch.tensor(d.rank + 1)).item()  # 1 + 2 + ... + W
    res["rank_max"] = distributed.all_reduce_max(torch.tensor([d.rank, -d.rank])).tolist()
    ref, proc = load(folder, device="cpu")
    samples, batch, weights = rank_data(proc, d.rank)

    # Reference: the sum over ranks of single-process gradients of each rank's summed loss.
    ref_grads = summed_grads(ref, [rank_data(proc, r)[1:] for r in range(d.world_size)])
    with torch.no_grad():
        ref_lp = packed_logprobs(ref, batch).logprobs

    # -- fp32 sharding: forward and summed gradients --------------------------------------------------
    counter = AllGatherCounter()
    model = shard_model(load(folder, device="cpu")[0], mixed_precision=False)
    res["fsdp_modules"] = len(distributed.fsdp_modules(model))
    res["params_are_dtensors"] = all(isinstance(p, DTensor) for p in model.parameters())
    res["placements"] = sorted({str(p.placements) for p in model.parameters()})
    # a model of whole copies (shard_ranks=1) beside it in the same process: a mesh of its own, not the one above
    whole = distributed.shard_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), mixed_precision=False, shard_ranks=1)
    res["whole_copy_ranks"] = distributed.copy_ranks(whole)
    with counter.counting():
        loss = summed_loss(model, batch, weights)
        res["gathers_forward_before_rollout"] = counter.count
        loss.backward()
        res["gathers_step_before_rollout"] = counter.count
    grads = full_grads(model)
    with torch.no_grad():
        res["forward_err"] = max_over_ranks((logprobs(model, batch) - ref_lp).abs().max().item())
    res["grad_params"] = len(grads)
    res["grad_has_vision"] = any(n.startswith("model.visual.") for n in grads)
    res["grad_names_match"] = set(grads) == set(ref_grads)
    res["grad_err_vs_sum"] = max_over_ranks(grad_err(grads, ref_grads))

    # -- images on rank 0 only: image fillers keep the vision tower (its own FSDP unit) in step ----------
    def mixed_data(r):
        with torch.random.fork_rng():
            torch.manual_seed(2000 + r)
            enc = [proc.encode(s) for s in random_samples([1, 0] if r == 0 else [0, 0])]
            return enc, torch.randn(sum(e.response_len for e in enc))

    mixed_ref = summed_grads(ref, [(pack(enc), w) for enc, w in map(mixed_data, range(d.world_size))])
    enc, w = mixed_data(d.rank)
    (mb,) = micro_batches(enc, 10**6, **rank_agreement(proc, d.device))
    fresh = shard_model(load(folder, device="cpu")[0], mixed_precision=False)
    per_sample = w.split([e.response_len for e in enc])  # in response order; the micro-batch's order may differ
    tokens = torch.cat([per_sample[i] if weight else torch.zeros(n)  # a filler's tokens weigh 0
                        for i, weight, n in zip(mb.index, mb.weight.tolist(), mb.batch.response_lengths)])
    summed_loss(fresh, mb.batch, tokens).backward()
    res["mixed_images_fillers"] = int(max_over_ranks(float((mb.weight == 0).sum())))
    res["mixed_images_grad_err_vs_sum"] = max_over_ranks(grad_err(full_grads(fresh), mixed_ref))
    del fresh

    # -- ranks with different numbers of outputs run the same number of micro-batches (rank_agreement's agree) ------
    # Rank r has r + 1 responses of a whole budget each (its own count: r + 1): every rank must end with world_size,
    # the smaller ones by zero-weight fillers. A mismatch would leave the ranks' collectives out of step, so every
    # rank checks the max-reduced counts and raises together (the launch then fails with this message).
    own = micro_batches([Encoded(torch.arange(6), 1) for _ in range(d.rank + 1)], 6,
                        agree=rank_agreement(proc, d.device)["agree"])
    most, fewest = distributed.all_reduce_max(torch.tensor([len(own), -len(own)])).tolist()
    fillers = sum(int((mb.weight == 0).sum()) for mb in own)
    if (most, -fewest, fillers) != (d.world_size, d.world_size, d.world_size - 1 - d.rank):
        raise AssertionError(f"rank {d.rank}: micro-batch counts from {-fewest} to {most} over the ranks "
                             f"({fillers} fillers here): all should be {d.world_size}")

    # -- accumulation over two micro-batches as the trainer runs it (microbatch.sync_gradients) ----------
    acc = shard_model(load(folder, device="cpu")[0], mixed_precision=False)
    for k in range(2):
        sync_gradients(acc, last=k == 1)
        summed_loss(acc, batch, weights / 2).backward()
        if k == 0:  # a copy sharded over several ranks keeps no whole gradient between micro-batches
            params = [p for u in distributed.fsdp_modules(acc) for g in distributed._param_groups(u)
                      for p in g.fsdp_params]
            res["accumulated_whole_gradients"] = any(p.unsharded_param.grad is not None for p in params)
            partial = [g._partial_reduce_output for u in distributed.fsdp_modules(acc)
                       for g in distributed._param_groups(u)]  # HSDP: reduce-scattered, all-reduce deferred
            res["accumulated_partial_bytes"] = sum(t.numel() * t.element_size() for t in partial if t is not None)
    res["accumulated_grad_err_vs_sum"] = max_over_ranks(grad_err(full_grads(acc), ref_grads))
    res["copy_ranks"] = distributed.copy_ranks(acc)
    copies = d.world_size // res["copy_ranks"]
    res["plan_offloaded_gradient_bytes"] = memory.plan(AutoConfig.from_pretrained(folder), disc=False, reference=False,
                                                       gpu=True, shard=res["copy_ranks"], copies=copies,
                                                       offload=True).gradients
    del acc

    # -- control: FSDP's default divide factor gives the mean, not the sum ------------------------------
    default = shard_model(load(folder, device="cpu")[0], mixed_precision=False, sum_gradients=False)
    summed_loss(default, batch, weights).backward()
    default_grads = full_grads(default)
    res["default_grad_err_vs_mean"] = max_over_ranks(
        grad_err(default_grads, {n: g / d.world_size for n, g in ref_grads.items()}))
    res["default_grad_err_vs_sum"] = max_over_ranks(grad_err(default_grads, ref_grads))
    del default, default_grads

    # -- bf16 parameters, fp32 reduction, against an unsharded bf16 model (the tolerance rule's base) ----
    ref16, _ = load(folder, device="cpu", dtype=torch.bfloat16)
    for r in range(d.world_size):
        summed_loss(ref16, *rank_data(proc, r)[1:]).backward()
    ref16_grads = {n: p.grad.float() for n, p in ref16.named_parameters() if p.grad is not None}
    with torch.no_grad():
        res["bf16_unsharded_forward_err"] = max_over_ranks((logprobs(ref16, batch) - ref_lp).abs().max().item())
    res["bf16_unsharded_grad_err_vs_sum"] = grad_err(ref16_grads, ref_grads)
    del ref16, ref16_grads
    mixed = shard_model(load(folder, device="cpu")[0], mixed_precision=True)
    mixed_loss = summed_loss(mixed, batch, weights)
    with torch.no_grad():
        res["bf16_forward_err"] = max_over_ranks((logprobs(mixed, batch) - ref_lp).abs().max().item())
    mixed_loss.backward()
    mixed_grads = full_grads(mixed)
    res["bf16_grad_dtypes"] = sorted({str(p.grad.dtype) for p in mixed.parameters() if p.grad is not None})
    res["bf16_grad_err_vs_sum"] = max_over_ranks(grad_err(mixed_grads, ref_grads))
    # fn's own inputs reach it uncast (fp32 reference log-probs stay fp32); pixels are cast by the tower
    res["bf16_fn_input_dtype"] = mixed(torch.ones(2), fn=lambda m, t: str(t.dtype))
    with distributed.gathered(mixed):
        res["bf16_gathered_param_dtypes"] = sorted({str(p.dtype) for p in mixed.parameters()})
    del mixed, mixed_grads

    # -- generation inside gathered(): same tokens, one all-gather per FSDP module --------------------------
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # every rank builds the same examples for the un-gathered comparison
    shared = random_samples([2, 1])
    new_tokens = 16
    want = sample_responses(ref, proc, shared, max_new_tokens=new_tokens, greedy=True)
    with counter.counting():
        got = sample_responses(model, proc, shared, max_new_tokens=new_tokens, greedy=True)
        res["gathers_generate_gathered"] = counter.count
    res["greedy_same_tokens_gathered"] = got == want
    # Without gathered(): FSDP re-gathers each block at every generated token. generate() calls the
    # inner HF model, past the root's hooks, so the root's own parameters are gathered by hand here.
    # The ranks must run the same number of forwards then: the same examples, greedy, on every rank.
    with counter.counting():
        real = rollout.gathered
        rollout.gathered = lambda m: contextlib.nullcontext(m)
        model.unshard()  # the root's own parameters only (not recursive)
        units = distributed.fsdp_modules(model)
        order = distributed._forward_order(units)
        recorded = len(order)
        try:
            plain = sample_responses(model, proc, shared, max_new_tokens=new_tokens, greedy=True)
        finally:
            rollout.gathered = real
            model.reshard()
            distributed._forget_forward_order(units, order, recorded)  # as gathered() does on exit
        res["gathers_generate_plain"] = counter.count
    res["greedy_same_tokens_plain"] = plain == want
    res["generated_lengths"] = [len(r[0].token_ids) for r in want]

    # Rank-local sampling: different prompts per rank, different lengths, no collectives inside.
    seed = 100 + d.rank
    want = sample_responses(ref, proc, samples, group_size=4, max_new_tokens=new_tokens, seed=seed)
    with counter.counting():
        got = sample_responses(model, proc, samples, group_size=4, max_new_tokens=new_tokens, seed=seed)
        res["gathers_sampling"] = counter.count
    res["sampled_same_tokens"] = bool(max_over_ranks(float(got != want)) == 0)

    # Nested: a rollout inside an enclosing gathered() gathers nothing more; the inner HF model alone
    # (its root's parameters still sharded) is refused with a clear error.
    with counter.counting(), distributed.gathered(model):
        again = sample_responses(model, proc, samples, group_size=4, max_new_tokens=new_tokens, seed=seed)
        inner = sample_responses(distributed.unwrap(model), proc, samples, group_size=4,
                                 max_new_tokens=new_tokens, seed=seed)
        res["nested_same_tokens"] = again == inner == got
        res["gathers_nested"] = counter.count
    try:
        sample_responses(distributed.unwrap(model), proc, samples, max_new_tokens=2)
        res["inner_alone_refused"] = False
    except RuntimeError as e:
        res["inner_alone_refused"] = "Sharded" in str(e)

    # After gathered(): sharded again, and forward gathers as before.
    res["params_are_dtensors_after"] = all(isinstance(p, DTensor) for p in model.parameters())
    with counter.counting():
        summed_loss(model, batch, weights).backward()
        res["gathers_step_after_rollout"] = counter.count
    with torch.no_grad(), counter.counting():
        logprobs(model, batch)
        logprobs(model, batch)
        res["gathers_two_forwards_after_rollout"] = counter.count
    # A step's no-grad passes (here π_old over 3 micro-batches) gather once, not per micro-batch.
    micro = [MicroBatch(batch, list(range(len(batch.lengths))), torch.ones(len(batch.lengths)))] * 3
    with counter.counting():
        old = frozen_logprobs(model, micro, temperature=1.0)
        res["gathers_frozen_logprobs_3_micro"] = counter.count
    with torch.no_grad():
        res["frozen_logprobs_err"] = max_over_ranks(max((lp - logprobs(model, batch)).abs().max().item()
                                                        for lp in old))
    # A frozen model sharded as the trainer shards the reference where a copy is sharded (no gradients): the
    # unsharded model's log-probs, and rank 0 holds the memory plan's bytes of it.
    frozen = shard_model(load(folder, device="cpu")[0].requires_grad_(False), mixed_precision=False,
                         sum_gradients=False)
    res["reference_logprobs_err"] = max_over_ranks(max((lp - ref_lp).abs().max().item()
                                                       for lp in frozen_logprobs(frozen, micro, temperature=1.0)))
    plan = memory.plan(AutoConfig.from_pretrained(folder), disc=False, reference=True, gpu=False,
                       shard=distributed.copy_ranks(frozen))
    res["reference_bytes"] = sum(p.to_local().numel() * p.element_size() for p in frozen.parameters())
    res["reference_plan_bytes"], res["student_bytes"] = plan.reference, 4 * plan.student_params
    meshes = {id(g.mesh_info.mesh) for m in (model, frozen) for u in distributed.fsdp_modules(m)
              for g in distributed._param_groups(u)}
    res["models_share_one_mesh"] = len(meshes) == 1  # one set of process groups (HSDP: communicators of its own)
    del frozen

    # -- the discriminator shards the same way; its 0-d bias stays a plain tensor, summed by a hook ------
    disc_ref, _ = Discriminator.from_student(folder, device="cpu", init_std=0.5)
    disc, _ = Discriminator.from_student(folder, device="cpu")
    disc.load_state_dict(disc_ref.state_dict())
    disc = shard_model(disc, mixed_precision=False)
    res["disc_fsdp_modules"] = len(distributed.fsdp_modules(disc))
    for r in range(d.world_size):
        _, b, _ = rank_data(proc, r)
        (disc_ref(b) * torch.arange(1.0, 4.0)).sum().backward()
    disc_ref_grads = {n: p.grad for n, p in disc_ref.named_parameters() if p.grad is not None}
    logits = disc(batch)
    with torch.no_grad():
        res["disc_forward_err"] = max_over_ranks((logits - disc_ref(batch)).abs().max().item())
    # two backwards (gradient accumulation over micro-batches), half the weight each
    (logits * torch.arange(1.0, 4.0) / 2).sum().backward()
    (disc(batch) * torch.arange(1.0, 4.0) / 2).sum().backward()
    res["disc_grad_err_vs_sum"] = max_over_ranks(grad_err(full_grads(disc), disc_ref_grads))
    res["disc_bias_grad_err"] = max_over_ranks(
        (distributed.unwrap(disc).bias.grad - disc_ref_grads["bias"]).abs().item())
    # sum_gradients=False: the bias averaged over ranks as FSDP averages the rest; a frozen model takes no hook
    averaged = Discriminator.from_student(folder, device="cpu")[0]
    averaged.load_state_dict(disc_ref.state_dict())
    averaged = shard_model(averaged, mixed_precision=False, sum_gradients=False)
    (averaged(batch) * torch.arange(1.0, 4.0)).sum().backward()
    res["disc_mean_bias_grad_err"] = max_over_ranks(
        (distributed.unwrap(averaged).bias.grad - disc_ref_grads["bias"] / d.world_size).abs().item())
    res["disc_mean_grad_err"] = max_over_ranks(
        grad_err(full_grads(averaged), {n: g / d.world_size for n, g in disc_ref_grads.items()}))
    frozen = Discriminator.from_student(folder, device="cpu")[0].requires_grad_(False)
    res["disc_frozen_shards"] = len(distributed.fsdp_modules(shard_model(frozen, mixed_precision=False)))
    del averaged, frozen
    with counter.counting():
        probs = disc_probs(disc, micro, len(batch.lengths))
        res["gathers_disc_probs_3_micro"] = counter.count
    with torch.no_grad():
        res["disc_probs_err"] = max_over_ranks((probs - torch.sigmoid(disc_ref(batch))).abs().max().item())
    # -- only rank 0 reads the weights (the trainer's way over several ranks): the others build the models empty
    # (meta device) and receive their shards and buffers; the discriminator's 0-d bias is a new object there,
    # whose gradient is still summed over ranks
    cpu = torch.device("cpu")
    received = load(folder, device="cpu", weights_on_cpu=True, empty=d.rank != 0)[0]
    res["from_rank0_others_empty"] = bool(max_over_ranks(float(
        all(p.is_meta for p in received.parameters()) != (d.rank != 0))) == 0)
    received = shard_model(received, mixed_precision=False, device=cpu, from_rank0=True)
    with torch.no_grad():
        res["from_rank0_forward_err"] = max_over_ranks((logprobs(received, batch) - ref_lp).abs().max().item())
    res["from_rank0_buffers_equal"] = max_over_ranks(float(not all(
        torch.equal(x, y) for x, y in zip(distributed.unwrap(received).buffers(), ref.buffers())))) == 0
    del received
    head = Discriminator.from_student(folder, device="cpu", weights_on_cpu=True, empty=d.rank != 0)[0]
    if d.rank == 0:
        head.load_state_dict(disc_ref.state_dict())
    head = shard_model(head, mixed_precision=False, device=cpu, from_rank0=True)
    (head(batch) * torch.arange(1.0, 4.0)).sum().backward()
    res["from_rank0_disc_grad_err_vs_sum"] = max_over_ranks(grad_err(full_grads(head), disc_ref_grads))
    del head
    # The trainer's param groups (DTensors, then the plain bias) with the foreach kernels CUDA defaults to.
    torch.optim.AdamW(distributed.optimizer_groups(disc), lr=1e-3, foreach=True).step()
    res["disc_optimizer_step"] = True

    distributed.barrier()
    res["seconds"] = time.perf_counter() - t0
    if d.is_main:
        Path(out_path).write_text(json.dumps(res, indent=1))
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))
