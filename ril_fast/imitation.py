"""Phase: the discriminator D_φ — Eq. 1 updates (pre-training, then μ per batch) and scoring for r_sim.

    Eq. 1   maximise  1/N Σ_i [ log D(q, o_i^(s)) + log(1 − D(q, o_i^(t))) ]

i.e. binary cross-entropy with label 1 for student text and 0 for teacher text, summed over every
response of the step on every rank and divided by their global count (counted once per step, like the
policy's normaliser). The paper's N counts (student, teacher) pairs, so its loss is twice this one: the
same direction and, AdamW being blind to a constant scale (up to its ε), the same steps; the logged
``disc_loss`` is the mean BCE per response (ln 2 for an untrained head). D(q, o) = sigmoid(logit) is the
probability that o is the student's; the similarity reward is r_sim = 1[D < disc.threshold] (0.5, the
spec's), and ``disc_accuracy`` reads D ≥ disc.threshold as "student": the fraction of responses whose r_sim
agrees with who wrote them.
"""

import torch
import torch.nn.functional as F

from ril_fast.distributed import all_reduce_sum, bare_blocks, compute_device, gathered
from ril_fast.microbatch import MicroBatch, sync_gradients
from ril_fast.models import recomputing


def disc_pass(disc, micro: list[MicroBatch], labels: torch.Tensor, normalizer: torch.Tensor,
              threshold: float = 0.5) -> dict:
    """Accumulate Eq. 1's gradient over ``micro`` into ``disc``'s ``.grad``.

    ``labels (n,)`` fp32 per response of the step (1 student, 0 teacher), indexed by ``MicroBatch.index``;
    ``normalizer``: 0-dim tensor, the global number of responses. Returns the loss summed over all ranks
    and the accuracy (D ≥ ``threshold``, r_sim's ``disc.threshold``, read as "student") over every rank's real
    (non-filler) responses, as the scores stood before this pass's gradient.
    """
    device = compute_device(disc)
    totals = torch.zeros(3, device=device)  # loss, correct, count
    with recomputing(disc):
        for k, mb in enumerate(micro):
            sync_gradients(disc, k == len(micro) - 1)
            logits = disc(mb.batch.to(device))
            y = labels[mb.index].to(device)
            w = mb.weight.to(device)
            loss = (w * F.binary_cross_entropy_with_logits(logits, y, reduction="none")).sum() / normalizer
            loss.backward()
            correct = ((torch.sigmoid(logits.detach().float()) >= threshold).float() == y).float()
            totals += torch.stack([loss.detach(), (w * correct).sum(), w.sum()])
    loss, correct, count = all_reduce_sum(totals).tolist()
    return dict(disc_loss=loss, disc_accuracy=correct / max(count, 1.0))


@torch.no_grad()
def disc_probs(disc, micro: list[MicroBatch], n: int) -> torch.Tensor:
    """D = sigmoid(logit) ``(n,)`` fp32 (on CPU) for the step's ``n`` responses, in response order.
    The parameters are gathered once for all micro-batches (``gathered``), the decoder blocks then run
    without FSDP's hooks (``bare_blocks``), and the scores stay on the device until the last one."""
    device = compute_device(disc)
    probs = torch.zeros(n, device=device)
    scored = torch.zeros(n, dtype=torch.bool, device=device)
    with gathered(disc), bare_blocks(disc):
        for mb in micro:
            p = torch.sigmoid(disc(mb.batch.to(device))).float()
            rows = torch.tensor(mb.real, dtype=torch.long, device=device)
            index = torch.tensor([mb.index[k] for k in mb.real], dtype=torch.long, device=device)
            probs[index] = p[rows]
            scored[index] = True
    probs, scored = probs.cpu(), scored.cpu()
    if not scored.all():
        raise RuntimeError("some responses were in no micro-batch")
    if bad := int((~torch.isfinite(probs)).sum()):  # NaN < threshold is False: it would pass as r_sim = 0
        raise RuntimeError(f"the discriminator scored {bad} of {n} responses NaN: its weights or activations are "
                           f"no longer finite")
    return probs
