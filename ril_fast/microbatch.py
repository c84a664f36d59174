"""A step's responses → packed micro-batches, the same number on every rank.

Both updates of Algorithm 2 (the discriminator's, Eq. 1, and the policy's, Eq. 2) run over all
responses of the step, packed under a token budget. Under FSDP every rank must run the same number of
forward/backward passes, so a rank with fewer micro-batches first splits its heaviest ones and, when no
micro-batch can be split further, adds "filler" micro-batches: a copy of one of its responses with
weight 0, which moves no parameter but keeps the collectives in step.

Samples that share images (a question's 2G responses) are binned together where they fit, so the
vision tower runs once per image in each update; a group over the token budget is cut into as few
chunks as fit, one image encoding each (``packing.first_fit_decreasing``).

The vision tower is an FSDP unit of its own, so in each micro-batch it must run on every rank or on
none: ``agree_images`` tells which micro-batches carry images on some rank, and a rank whose matching
micro-batch has none gets a zero-weight image filler added to it: ``image_filler()``, a blank image with
an empty question and response (a few dozen tokens on Qwen-VL, one 448-pixel tile's more on InternVL), by
which that micro-batch may exceed ``max_tokens`` (a copy of a real image response could have doubled it).

``padded=True`` lays the same micro-batches out right-padded (``PaddedBatch``) instead of packed: the
baseline that packing is measured against (``bench/throughput.py``); every consumer reads both.
"""

from dataclasses import dataclass

import torch

from ril_fast import distributed
from ril_fast.packing import PackedBatch, PaddedBatch, first_fit_decreasing, image_groups, pack, pad
from ril_fast.processor import Encoded, ModelKind, Processor


@dataclass
class MicroBatch:
    """One packed micro-batch of a rank's responses.

    ``batch``: the packed (or, for comparisons, right-padded) samples; ``index``: each sample's position
    in the step's response list; ``weight (S,)`` fp32: 1 for real samples, 0 for a filler copy.
    """

    batch: PackedBatch | PaddedBatch
    index: list[int]
    weight: torch.Tensor

    @property
    def real(self) -> list[int]:
        """Positions of the real samples (weight 1), fillers left out: a filler's ``index`` names another
        response, and its tokens are no work of the step."""
        return [k for k, w in enumerate(self.weight.tolist()) if w > 0]

    def per_token(self, values: torch.Tensor) -> torch.Tensor:
        """Broadcast per-sample ``values (S,)`` to the micro-batch's response tokens ``(R,)``."""
        counts = torch.tensor(self.batch.response_lengths, device=values.device)
        return values.repeat_interleave(counts, output_size=sum(self.batch.response_lengths))  # no host sync


def micro_batches(encoded: list[Encoded], max_tokens: int, agree=None, padded: bool = False, agree_images=None,
                  image_filler=None) -> list[MicroBatch]:
    """Pack ``encoded`` (one rank's responses) into micro-batches of at most ``max_tokens`` tokens.

    ``agree(n) -> m`` turns this rank's count into the count every rank must reach (the all-reduced
    maximum under FSDP; omitted: no padding). To reach it the heaviest micro-batches are split, then
    zero-weight fillers are added. ``agree_images(flags) -> flags``: whether each micro-batch has images
    on this rank -> on any rank (omitted: no image fillers); ``image_filler() -> Encoded``: the small
    zero-weight sample with an image added where this rank has none (see the module docstring; needed
    with ``agree_images``). ``padded``: the same
    micro-batches, right-padded to their longest sample (``max_tokens`` still bounds their real tokens)
    instead of packed.
    """
    if (agree_images is None) != (image_filler is None):
        raise ValueError("agree_images and image_filler go together: pass both or neither")
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
    if len(bins) < count and not encoded:
        raise ValueError("a rank with no responses cannot run the other ranks' micro-batches")
    shortest = min(range(len(encoded)), key=lambda i: lengths[i]) if encoded else None
    groups = [([encoded[i] for i in b], b, [1.0] * len(b)) for b in bins]
    groups += [([encoded[shortest]], [shortest], [0.0]) for _ in range(count - len(bins))]
    if agree_images is not None:
        has = [any(e.pixel_values is not None for e in samples) for samples, _, _ in groups]
        filler = None
        for (samples, index, weight), here, anywhere in zip(groups, has, agree_images(has)):
            if anywhere and not here:
                filler = filler or image_filler()
                samples.append(filler)
                index.append(index[0])  # any valid position: its weight is 0
                weight.append(0.0)
    return [MicroBatch(layout(samples), index, torch.tensor(weight)) for samples, index, weight in groups]


def rank_agreement(processor: Processor, device: torch.device) -> dict:
    """The ``agree``, ``agree_images`` and ``image_filler`` arguments of :func:`micro_batches` for the
    ranks of the default process group (max-reduced counts and image flags; ``device``: this rank's).
    ``image_filler`` encodes a blank 28x28 image with an empty question and response."""
    from PIL import Image

    def agree(n: int) -> int:
        return int(distributed.all_reduce_max(torch.tensor(n, device=device)))

    def agree_images(flags: list[bool]) -> list[bool]:
        return distributed.all_reduce_max(torch.tensor(flags, dtype=torch.int32, device=device)).bool().tolist()

    def image_filler() -> Encoded:
        return processor.encode({"question": "", "response": "", "images": [Image.new("RGB", (28, 28))]})

    if processor.kind is ModelKind.TEXT:
        return dict(agree=agree)
    return dict(agree=agree, agree_images=agree_images, image_filler=image_filler)


def encode_all(processor: Processor, samples: list[dict]) -> list[Encoded]:
    """Encode every sample dict (``{"images", "question", "response"}``) with the model's processor."""
    return [processor.encode(s) for s in samples]


def sync_gradients(model, last: bool) -> None:
    """Set FSDP2's gradient reduction for the next backward of an accumulation over micro-batches (``last``: its
    final micro-batch). Where a copy of the weights is sharded over several ranks, every micro-batch
    reduce-scatters, so a rank keeps only its shard of the gradients (unsharded they would take 4 bytes per
    parameter of the whole model on every rank), and only the last all-reduces across copies (HSDP: the one
    exchange between nodes). On one rank per copy they accumulate unsharded and are reduced once, at the last
    (the shard is the whole gradient: reducing earlier would only copy). A no-op for an unsharded model."""
    if not hasattr(model, "set_requires_gradient_sync"):
        return
    if distributed.copy_ranks(model) > 1:
        model.set_requires_gradient_sync(True)
        model.set_requires_all_reduce(last)
    else:
        model.set_requires_gradient_sync(last)
