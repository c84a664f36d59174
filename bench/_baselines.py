"""What two phases are measured against, alone and on the same inputs as ril_fast's own path.

Policy update: Liger's ``LigerFusedLinearGRPOLoss(loss_type="dr_grpo")`` does the job of
``token_logprobs`` + ``dr_grpo_loss`` (LM head, log-probs and the token-level Dr.GRPO loss without the
full logits; tests/kernels use it as the outside oracle); the decoder pass before it is the same.

Rollout: the trainer samples through its FSDP2 model (parameters gathered once per call); the baseline
is plain ``generate`` on an unsharded model of the same weights in the compute dtype, loaded on its own.
"""

import contextlib
import statistics
import sys
import time

import torch
from _common import CUDA, RssPeak, synchronize, unless_out_of_memory

from ril_fast import distributed
from ril_fast.data import load_examples, to_sample
from ril_fast.distributed import call
from ril_fast.flops import Sample, Shapes, rollout_flops, training_flops
from ril_fast.metrics import real_tokens
from ril_fast.microbatch import micro_batches, rank_agreement, sync_gradients
from ril_fast.models import last_hidden_states, lm_head_weight, load, logits_temperature, recomputing
from ril_fast.policy import LossConfig, frozen_logprobs, global_outputs, normalizer, policy_pass
from ril_fast.rollout import sample_responses, sampling_settings


def measure(fn, reps: int, after=None) -> tuple[float, int, object]:
    """(median seconds, peak bytes, last result) of ``reps`` calls of ``fn`` after one warm-up call (Liger
    compiles in it on GPU). Peak: the CUDA allocator's; on CPU, the resident size. ``after()`` runs after
    each call, untimed."""
    times, peak, result = [], 0, None
    for rep in range(reps + 1):
        synchronize()
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        with (contextlib.nullcontext() if CUDA else RssPeak()) as watch:
            start = time.perf_counter()
            result = fn()
            synchronize()
            seconds = time.perf_counter() - start
        if after is not None:
            after()
        if rep:
            times.append(seconds)
            peak = max(peak, torch.cuda.max_memory_allocated() if CUDA else watch.bytes)
    return statistics.median(times), peak, result


# ----------------------------------------------------------------------------------------------------
# Policy update: ril_fast's kernels vs Liger
# ----------------------------------------------------------------------------------------------------
def _liger_loss(model, batch, advantages, mask_weight, ref, loss_fn):
    """Liger's dr_grpo loss of one micro-batch: the decoder's response rows padded to (S, R_max, H)."""
    hidden = last_hidden_states(model, batch).flatten(0, 1)
    rows = batch.response_rows
    lengths = batch.response_lengths

    def padded(x):
        return torch.nn.utils.rnn.pad_sequence(list(x.split(lengths)), batch_first=True)

    mask = padded(mask_weight.repeat_interleave(torch.tensor(lengths, device=mask_weight.device)))
    loss, _ = loss_fn(padded(hidden.index_select(0, rows)), lm_head_weight(model), padded(batch.targets[rows]),
                      mask, advantages, ref_per_token_logps=padded(ref) if ref is not None else None)
    return loss


def liger_policy_pass(model, micro, advantages: torch.Tensor, normalizer: torch.Tensor, cfg: LossConfig,
                      max_new_tokens: int, ref: list[torch.Tensor] | None = None, compiled: bool = CUDA) -> float:
    """What ``ril_fast.policy.policy_pass`` does (μ = 1: on-policy), with Liger's
    ``LigerFusedLinearGRPOLoss(loss_type="dr_grpo")`` in place of ``token_logprobs`` + ``dr_grpo_loss`` (at the
    temperature ``packed_logprobs`` folds a head's logit scale into: ``models.logits_temperature``).

    Liger divides each micro-batch's sum by its S sequences × L_max; rescaling by S × L_max / normalizer
    gives ril_fast's global normaliser. ``compiled``: Liger's own torch.compile of its per-chunk loss (its
    default; off on CPU, where compiling takes minutes). Returns the summed loss (equal to policy_pass's up
    to rounding).
    """
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(beta=cfg.beta, use_ref_model=ref is not None, loss_type="dr_grpo",
                                       max_completion_length=max_new_tokens, epsilon_low=cfg.eps_low,
                                       epsilon_high=cfg.eps_high, compiled=compiled,
                                       temperature=logits_temperature(distributed.unwrap(model), cfg.temperature))
    device = distributed.compute_device(model)
    total = torch.zeros((), device=device)
    with recomputing(model):  # as policy_pass: with batch.activation_checkpointing, both recompute each layer
        for k, mb in enumerate(micro):
            sync_gradients(model, k == len(micro) - 1)
            loss = call(model, _liger_loss, mb.batch.to(device), advantages[mb.index].to(device), mb.weight.to(device),
                        ref[k] if ref else None, loss_fn)
            loss = loss * (len(mb.index) * max_new_tokens) / normalizer
            loss.backward()
            total += loss.detach()
    return float(total)


def compare_policy_update(run, encoded: list, shapes: Shapes, reps: int) -> list[dict]:
    """The policy-update phase alone (one μ pass, gradients discarded), through ril_fast's configured
    kernels and through Liger, on the micro-batches of ``encoded`` (the last measured step's outputs).
    Returns one dict per provider: seconds (median of ``reps``), peak bytes, loss, FLOPs and tokens (every
    token of the micro-batches' real samples, fillers left out, as the trainer counts a step's tokens)."""
    cfg = run.cfg
    device = run.dist.device
    micro = micro_batches(encoded, cfg.batch.max_tokens, padded=cfg.batch.padded,
                          **rank_agreement(run.processor, device))
    # Group-centred rewards in {0, 1, 2} (r_sim + r_ans) over groups of G (RL only) or 2G outputs.
    group = cfg.group_size * (1 if run.disc is None else 2)
    gen = torch.Generator().manual_seed(cfg.seed)
    rewards = torch.randint(0, 3, (len(encoded) // group, group), generator=gen).float()
    advantages = (rewards - rewards.mean(1, keepdim=True)).flatten()
    divisor = normalizer(global_outputs(len(encoded), device), cfg.max_new_tokens)  # as the trainer's step
    loss_cfg = LossConfig.from_config(cfg)
    ref = frozen_logprobs(run.reference, micro, cfg.rollout.temperature, kernels=cfg.loss.kernels) \
        if run.reference is not None else None
    flops = training_flops(shapes, [Sample.of(e) for e in encoded], head=True)
    tokens = real_tokens(micro)
    def liger(compiled: bool = CUDA):
        return liger_policy_pass(run.student, micro, advantages, divisor, loss_cfg, cfg.max_new_tokens, ref=ref,
                                 compiled=compiled)

    providers = {
        "ril_fast": lambda: policy_pass(run.student, micro, advantages, divisor, loss_cfg, ref=ref)["loss"],
        "liger": liger,
    }
    def timed(name, fn) -> dict:
        note = ""
        try:
            seconds, peak, loss = measure(fn, reps, after=lambda: run.optimizer.zero_grad(set_to_none=True))
        except torch._dynamo.exc.TorchDynamoException as e:
            if name != "liger":
                raise
            # Seen with torch 2.11 on an H200: dynamo fails building the guards of Liger's compiled chunk
            # loss once the micro-batch shapes vary. Time Liger's uncompiled path rather than nothing.
            run.optimizer.zero_grad(set_to_none=True)
            note = f"Liger's torch.compile failed ({type(e).__name__}): its uncompiled path"
            print(f"{note}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
            seconds, peak, loss = measure(lambda: liger(compiled=False), reps,
                                          after=lambda: run.optimizer.zero_grad(set_to_none=True))
        return dict(provider=name, seconds=seconds, peak=peak, loss=loss, flops=flops, tokens=tokens, note=note)

    results = []
    for name, fn in providers.items():
        results.append(unless_out_of_memory(name, lambda: timed(name, fn)))
        run.optimizer.zero_grad(set_to_none=True)  # an out-of-memory error leaves gradients behind
    return results


# ----------------------------------------------------------------------------------------------------
# Rollout: the trainer's FSDP2 model vs plain HF generate on an unsharded one
# ----------------------------------------------------------------------------------------------------
def rollout_inputs(cfg, rank: int, world_size: int) -> tuple[list[dict], dict]:
    """This rank's share of the first batch of questions as rollout prompts, and the sampling settings
    of the trainer's rollout phase (``rollout.sampling_settings``) with ``seed`` as the run's."""
    examples = load_examples(cfg.train_data)[:cfg.batch.questions_per_step][rank::world_size]
    settings = dict(sampling_settings(cfg), seed=cfg.seed)
    return [to_sample(e) for e in examples], settings


def time_rollout(provider: str, model, processor, prompts: list[dict], settings: dict, shapes: Shapes,
                 reps: int) -> dict:
    """One rollout call of ``model`` on ``prompts``, timed: seconds (median of ``reps``), peak bytes,
    generated tokens and model FLOPs."""
    seconds, peak, rollouts = measure(lambda: sample_responses(model, processor, prompts, **settings), reps)
    shaped = [Sample.of(processor.encode(dict(p, response=""))) for p in prompts]
    students = [Sample(p.prompt + n, p.prompt, n, p.grids) for p, group in zip(shaped, rollouts)
                for n in (len(r.token_ids) + (not r.truncated) for r in group)]
    return dict(provider=provider, seconds=seconds, peak=peak, tokens=sum(s.response for s in students),
                flops=rollout_flops(shapes, shaped, students, settings["group_size"]))


def plain_generate(cfg, prompts: list[dict], settings: dict, shapes: Shapes, reps: int) -> dict:
    """:func:`time_rollout` of an unsharded model loaded from the student folder in the compute dtype
    (bf16 on GPU, fp32 on CPU), freed afterwards."""
    device = distributed.init().device
    model, processor = load(cfg.student, dtype=torch.bfloat16 if CUDA else torch.float32, device=device)
    try:
        return time_rollout("hf_generate", model, processor, prompts, settings, shapes, reps)
    finally:
        del model
        if CUDA:
            torch.cuda.empty_cache()
