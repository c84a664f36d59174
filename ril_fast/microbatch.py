"""A step's responses → packed micro-batches, the same number on every rank.

Both updates of Algorithm 2 (the discriminator's, Eq. 1, and the policy's, Eq. 2) run over all
responses of the step, packed under a token budget. Under FSDP every rank must run the same number of
forward/backward passes, so a rank with fewer micro-batches first splits its heaviest ones and, when no
micro-batch can be split further, adds "filler" micro-batches: a copy of one of its responses with
weight 0, which moves no parameter but keeps the collectives in step.

Samples that share images (a question's 2G responses) are binned together where they fit, so the
vision tower runs once per image in each update (``packing.image_inputs``).

``padded=True`` lays the same micro-batches out right-padded (``PaddedBatch``) instead of packed: the
baseline that packing is measured against (``bench/throughput.py``); every consumer reads both.
"""

from dataclasses import dataclass

import torch

from ril_fast.packing import (Encoded, PackedBatch, PaddedBatch, Processor, first_fit_decreasing, image_groups, pack,
                              pad)


@dataclass
class MicroBatch:
    """One packed micro-batch of a rank's responses.

    ``batch``: the packed (or, for comparisons, right-padded) samples; ``index``: each sample's position
    in the step's response list; ``weight (S,)`` fp32: 1 for real samples, 0 for a filler copy.
    """

    batch: PackedBatch | PaddedBatch
    index: list[int]
    weight: torch.Tensor

    def per_token(self, values: torch.Tensor) -> torch.Tensor:
        """Broadcast per-sample ``values (S,)`` to the micro-batch's response tokens ``(R,)``."""
        counts = torch.tensor(self.batch.response_lengths, device=values.device)
        return values.repeat_interleave(counts)


def micro_batches(encoded: list[Encoded], max_tokens: int, agree=None, padded: bool = False) -> list[MicroBatch]:
    """Pack ``encoded`` (one rank's responses) into micro-batches of at most ``max_tokens`` tokens.

    ``agree(n) -> m`` turns this rank's count into the count every rank must reach (the all-reduced
    maximum under FSDP; omitted: no padding). To reach it the heaviest micro-batches are split, then
    zero-weight fillers are added. ``padded``: the same micro-batches, right-padded to their longest
    sample (``max_tokens`` still bounds their real tokens) instead of packed.
    """
    layout = pad if padded else pack
    lengths = [e.length for e in encoded]
    bins = first_fit_decreasing(lengths, max_tokens, image_groups(encoded)) if encoded else []
    count = agree(len(bins)) if agree is not None else len(bins)
    while len(bins) < count:
        splittable = [b for b in bins if len(b) > 1]
        if not splittable:
            break
        big = max(splittable, key=lambda b: sum(lengths[i] for i in b))
        bins.remove(big)
        bins += [big[:len(big) // 2], big[len(big) // 2:]]  # halves of a bin keep most image groups whole
    out = [MicroBatch(layout([encoded[i] for i in b]), b, torch.ones(len(b))) for b in bins]
    if len(out) < count and not encoded:
        raise ValueError("a rank with no responses cannot run the other ranks' micro-batches")
    while len(out) < count:
        shortest = min(range(len(encoded)), key=lambda i: lengths[i])
        out.append(MicroBatch(layout([encoded[shortest]]), [shortest], torch.zeros(1)))
    return out


def encode_all(processor: Processor, samples: list[dict]) -> list[Encoded]:
    """Encode every sample dict (``{"images", "question", "response"}``) with the model's processor."""
    return [processor.encode(s) for s in samples]


def model_device(model) -> torch.device:
    """The device of a model's parameters."""
    return next(model.parameters()).device


def sync_gradients(model, enabled: bool) -> None:
    """FSDP2: reduce-scatter gradients only on the last micro-batch of an accumulation (a no-op for an
    unsharded model)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
