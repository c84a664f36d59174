"""Phase: the policy update of Algorithm 2 — μ passes of Eq. 2 over the step's 2G outputs per question.

    loss = −Σ_i Σ_t mask · [min(ρ A_i, clip(ρ, 1−ε_low, 1+ε_high) A_i) − β k3] / (outputs × L_max)

The normaliser is the number of outputs over ALL ranks times L_max, counted once per step
(:func:`global_outputs`, :func:`normalizer`): every micro-batch's loss is divided by it, so summing the
gradients over micro-batches and ranks gives the gradient of the one loss above. FSDP must therefore sum,
not average, across ranks (see ``ril_fast.distributed``). Log-probs come from
``ril_fast.models.packed_logprobs``: the decoder's last hidden states of the response rows go through
``kernels.token_logprobs`` with the LM head weight, so the (tokens × vocabulary) logits are never built.
"""

from dataclasses import dataclass

import torch

from ril_fast import distributed
from ril_fast.config import Config
from ril_fast.distributed import all_reduce_sum, bare_blocks, call, compute_device, gathered
from ril_fast.kernels import dr_grpo_loss
from ril_fast.microbatch import MicroBatch, sync_gradients
from ril_fast.models import Kernels, packed_logprobs, recomputing


@dataclass
class LossConfig:
    """Eq. 2's constants: clip range, KL weight and the sampling temperature the log-probs use; and
    which code computes the log-probs and the loss (``ril_fast.models.Kernels``). The trainer's are
    :meth:`from_config`'s; the defaults serve tests and benchmarks that set a few."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0
    temperature: float = 1.0
    kernels: Kernels = Kernels.AUTO

    @classmethod
    def from_config(cls, cfg: Config) -> "LossConfig":
        """The run's: ``loss.eps_low``, ``loss.eps_high``, ``beta``, ``rollout.temperature`` (the rollout's τ) and
        ``loss.kernels``."""
        return cls(eps_low=cfg.loss.eps_low, eps_high=cfg.loss.eps_high, beta=cfg.beta,
                   temperature=cfg.rollout.temperature, kernels=cfg.loss.kernels)


def global_outputs(n: int, device: torch.device) -> torch.Tensor:
    """The step's number of outputs over all ranks (``n`` this rank's), counted once, as a 0-dim fp32 tensor on
    ``device``: Eq. 1's divisor, and with L_max Eq. 2's (:func:`normalizer`)."""
    return distributed.all_reduce_sum(torch.tensor(float(n), device=device))


def normalizer(n_global: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Eq. 2's divisor: the step's outputs over all ranks (:func:`global_outputs`) times L_max (0-dim fp32)."""
    return n_global * max_new_tokens


@torch.no_grad()
def frozen_logprobs(model, micro: list[MicroBatch], temperature: float,
                    kernels: Kernels | str = Kernels.AUTO) -> list[torch.Tensor]:
    """Per micro-batch, the response tokens' log-probs ``(R,)`` fp32 under ``model`` without a graph:
    π_old at the start of a step (μ > 1) and π_ref (β > 0). A sharded model's parameters are gathered
    once for all micro-batches (``gathered``), not per micro-batch, and its decoder blocks then run
    without FSDP's hooks (``bare_blocks``)."""
    device = compute_device(model)
    with gathered(model), bare_blocks(model):
        return [call(model, packed_logprobs, mb.batch.to(device), temperature=temperature, kernels=kernels).logprobs
                for mb in micro]


def policy_pass(model, micro: list[MicroBatch], advantages: torch.Tensor, normalizer: torch.Tensor,
                cfg: LossConfig, old: list[torch.Tensor] | None = None,
                ref: list[torch.Tensor] | None = None) -> dict:
    """One accumulation of Eq. 2's gradient over ``micro`` (gradients are added to ``.grad``).

    ``advantages (n,)`` fp32 per response of the step (indexed by ``MicroBatch.index``); ``normalizer``
    a 0-dim tensor (global outputs × L_max); ``old``/``ref``: per-micro-batch log-probs from
    :func:`frozen_logprobs`, or None (on-policy / no KL). Returns the loss summed over all ranks and
    token-weighted means of the kernel's statistics over all ranks, as floats.
    """
    device = compute_device(model)
    totals = torch.zeros(5, device=device)  # loss, kl·tokens, clip·tokens, ratio·tokens, tokens
    with recomputing(model):
        for k, mb in enumerate(micro):
            sync_gradients(model, k == len(micro) - 1)
            batch = mb.batch.to(device)
            lp = call(model, packed_logprobs, batch, temperature=cfg.temperature, kernels=cfg.kernels).logprobs
            adv = mb.per_token(advantages[mb.index].to(device))
            mask = mb.per_token(mb.weight.to(device))
            loss, stats = dr_grpo_loss(lp, adv, mask, old_logprobs=old[k] if old else None,
                                       ref_logprobs=ref[k] if ref else None, beta=cfg.beta,
                                       eps_low=cfg.eps_low, eps_high=cfg.eps_high, normalizer=normalizer,
                                       impl=Kernels(cfg.kernels).impl)
            loss.backward()
            tokens = mask.sum()
            totals += torch.stack([loss.detach(), stats.kl * tokens, stats.clip_fraction * tokens,
                                   stats.ratio * tokens, tokens])
    loss, kl, clip, ratio, tokens = all_reduce_sum(totals).tolist()
    tokens = max(tokens, 1.0)
    return dict(loss=loss, kl=kl / tokens, clip_frac=clip / tokens, ratio=ratio / tokens)


def optimizer_step(model, optimizer, grad_clip: float) -> dict:
    """Clip the gradient norm, step and zero the gradients; a non-finite norm skips the step.

    Returns ``grad_norm`` (before clipping) and ``skipped`` (1.0 when the step was skipped).
    """
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    norm = float(norm)
    finite = torch.isfinite(torch.tensor(norm)).item()
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(grad_norm=norm, skipped=0.0 if finite else 1.0)
