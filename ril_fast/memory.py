"""The memory a run's models take before any activation, checked before any of them loads.

A student too big for the machine would otherwise fail late and unclearly: a CUDA out-of-memory error
while loading the second or third model, or on a CPU the kernel's OOM killer ending the process with no
message at all. :func:`plan` counts the parameters on the meta device (no memory, no weights) and
:func:`shortfall` compares what one rank will hold with what its device has free:

    trained state   fp32 weights + AdamW's two fp32 moments (12 B/param) of the student and the
                    discriminator, sharded over the ranks of a copy (``batch.shard_ranks``)
    gradients       the updated model's fp32 gradients (4 B/param of the student, the larger): sharded where a
                    copy is sharded over several ranks (reduce-scattered at every micro-batch:
                    ``microbatch.sync_gradients``; offloaded, in the CPU's memory, except that with several
                    copies (HSDP) FSDP sums the reduce-scattered gradients on the device until the all-reduce
                    across copies at a step's last micro-batch), whole on a rank that holds a whole copy
                    (accumulated unsharded over a step's micro-batches, on the device)
    reference       π_ref, only when β > 0 (bf16 on a GPU, fp32 on a CPU): sharded like the student where a
                    copy is sharded over several ranks, else whole; offloaded with the trained state
    gathered        the student's weights gathered for a rollout (bf16 on a GPU, fp32 on a CPU): a copy beside
                    the shards on every rank, even on one CPU rank, whose whole "shard" FSDP2 still copies into
                    its own all-gather buffers; a sharded reference gathered for its pass takes as much, at
                    another time

With ``batch.cpu_offload`` on GPUs the trained state, the sharded gradients and the reference move to the CPU's
memory, checked against each rank's share of the CPU's available memory; the GPU keeps the gathered student
and, on one rank per copy, the accumulated gradients. Pinned (``batch.offload_pinned``, the
default), FSDP's offloaded weights and gradients go through torch's pinned-memory cache, which rounds each
tensor up to a power of two and keeps freed ones (both models' gradients): the plan counts them so (a
shard of 1.24 GB takes 2 GiB).

Activations come on top (``batch.max_tokens`` bounds them: ``ril_fast.activations`` estimates what one update
micro-batch keeps, and ``python -m ril_fast.preflight`` prints it beside the plan, never refusing a run over it),
as does one unsharded unit (a decoder block, the vision tower, or the embeddings and head) while each model is being
sharded, so passing the check is necessary, not sufficient; failing it means the run cannot fit.
"""

import os
from dataclasses import dataclass

import torch

from ril_fast.flops import softmax_attention

STATE_BYTES = 12  # fp32 weights + AdamW's two fp32 moments, per trained parameter
GRADIENT_BYTES = 4  # fp32 gradients, per parameter of the model being updated


@dataclass(frozen=True)
class Plan:
    """Bytes before any activation: ``per_rank`` is what one rank holds on its device, ``host_per_rank`` what it
    holds in the CPU's memory besides (offloaded); the rest say why."""

    student_params: int
    disc_params: int  # 0 without a discriminator (RL only)
    trained_state: int  # over all ranks of a copy together
    gradients: int  # per rank, on the device
    reference: int  # per rank
    gathered: int  # per rank
    shard: int  # ranks the trained state is sharded over
    host_per_rank: int = 0  # bytes in the CPU's memory besides the device: the offloaded state and gradients
    pinned: bool = False  # the offloaded weights and gradients are in pinned memory

    @property
    def offload(self) -> bool:
        """Whether the trained state is in the CPU's memory (GPU ranks with ``batch.cpu_offload``)."""
        return self.host_per_rank > 0

    @property
    def per_rank(self) -> int:
        """Bytes one rank holds on its device: its share of the trained state and the reference (unless offloaded),
        the accumulated gradients, the gathered student."""
        kept = 0 if self.offload else -(-self.trained_state // self.shard) + self.reference
        return kept + self.gradients + self.gathered

    def describe(self) -> str:
        """The plan in words, in GiB."""
        def gib(n: int) -> str:
            return f"{n / 2**30:.3g} GiB"

        def count(n: int) -> str:
            return f"{n / 1e9:.3g} B" if n >= 1e9 else f"{n / 1e6:.3g} M"

        disc = f" and the discriminator ({count(self.disc_params)})" if self.disc_params else ""
        where = (f", in the CPU's memory with their sharded gradients ({gib(self.host_per_rank)} per rank"
                 f"{', pinned' if self.pinned else ''})") if self.offload else ""
        return (f"{gib(self.per_rank)} per rank before any activation: fp32 weights and AdamW moments of the student "
                f"({count(self.student_params)} parameters){disc}, {gib(self.trained_state)} sharded over "
                f"{self.shard} rank(s){where}"
                + (f"; the student's fp32 gradients on the device, {gib(self.gradients)}" if self.gradients else "")
                + (f"; the reference, {gib(self.reference)}{' (its shard)' if self.shard > 1 else ''}"
                   f"{', in the CPU' if self.offload else ''}" if self.reference else "")
                + (f"; the student gathered for rollouts, {gib(self.gathered)}" if self.gathered else ""))


def plan(config, *, disc: bool, reference: bool, gpu: bool, shard: int, copies: int = 1, offload: bool = False,
         pinned: bool = True, model: torch.nn.Module | None = None) -> Plan:
    """The memory plan of a student of transformers ``config``: with a discriminator (``disc``), a reference
    model (``reference``), on GPUs (bf16 copies) or CPUs, its trained state sharded over ``shard`` ranks in each of
    ``copies`` replicas (HSDP: the ranks are ``shard * copies``) and, on GPUs, offloaded to the CPU's memory
    (``offload``; on CPUs that is where it is anyway), in pinned memory or not (``pinned``). ``model``: the student
    already built on the meta device (``ril_fast.models.meta_model(config)``), else built here."""
    from ril_fast.models import meta_model

    model = meta_model(config) if model is None else model
    shapes = [p.shape for p in model.parameters()]
    # The discriminator: the student's backbone (no LM head) and a d -> 1 head.
    disc_shapes = [p.shape for p in model.base_model.parameters()] + [
        torch.Size([config.get_text_config().hidden_size]), torch.Size([])] if disc else []
    student, disc_params = (sum(s.numel() for s in group) for group in (shapes, disc_shapes))
    copy = 2 if gpu else 4  # bytes per parameter of an unsharded copy: bf16 on a GPU, fp32 on a CPU
    trained, frozen = shapes + disc_shapes, shapes if reference else []

    def shards(group, nbytes: int, pin: bool = False) -> int:  # one rank's shards of ``group``, pinned or not
        return sum((_pinned if pin else int)(nbytes * _shard_numel(s, shard)) for s in group)

    host = 0
    if offload and gpu and pinned:  # pinned fp32 weights and gradients (both models' stay cached), AdamW's moments,
        # the reference's pinned weights
        host = 2 * shards(trained, GRADIENT_BYTES, pin=True) + shards(trained, STATE_BYTES - 4) + \
            shards(frozen, copy, pin=True)
    elif offload and gpu:  # weights and moments, the student's sharded gradients (the discriminator's are freed), the
        # reference's weights
        host = shards(trained, STATE_BYTES) + shards(shapes, GRADIENT_BYTES) + shards(frozen, copy)
    # Gradients on the device, one rank's shard of them (the whole on a rank that holds a whole copy, accumulated
    # there); sharded over several ranks and offloaded they go to the CPU with the rest, unless HSDP's deferred
    # all-reduce holds them (FSDP2 sums its partial results on the device).
    gradients = 0 if offload and gpu and shard > 1 and copies == 1 else shards(shapes, GRADIENT_BYTES)
    reference = shards(frozen, copy)
    return Plan(student_params=student, disc_params=disc_params, trained_state=STATE_BYTES * (student + disc_params),
                gradients=gradients, reference=reference,
                gathered=copy * student, shard=shard, host_per_rank=host,
                pinned=offload and gpu and pinned)


def kv_cache_bytes(config, tokens: int, *, gpu: bool) -> int:
    """Bytes of the KV cache a rollout's generate builds for ``tokens`` positions in all (sequences x length),
    bf16 on a GPU, fp32 on a CPU: keys and values of every softmax-attention layer (a hybrid model's
    linear-attention layers keep a fixed-size state instead, not counted), for each of its key-value heads (every
    attention head where the config names no ``num_key_value_heads``: GPT-2, OPT, BioGPT)."""
    text = config.get_text_config()
    layers, head_dim = softmax_attention(text)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return tokens * layers * 2 * heads * head_dim * (2 if gpu else 4)


def _shard_numel(shape: torch.Size, shard: int) -> int:
    """Elements of one rank's shard of a parameter: FSDP2 pads dim 0 to a multiple of the ranks (a 0-d one,
    which FSDP leaves alone, is whole)."""
    if not shape:
        return 1
    return -(-shape[0] // shard) * shape[1:].numel()


def _pinned(nbytes: int) -> int:
    """What torch's pinned-memory cache takes for ``nbytes``: the next power of two."""
    return 1 << max(nbytes - 1, 0).bit_length()


def available_bytes(device: torch.device) -> int | None:
    """Memory free for this rank: the GPU's free bytes, or on a CPU the machine's available memory shared by
    the ranks on it (torchrun's ``LOCAL_WORLD_SIZE``); None where it cannot be read (no /proc/meminfo)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    return kib * 1024 // int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def shortfall(p: Plan, available: int | None, host_available: int | None = None) -> str | None:
    """Why ``p`` cannot fit in ``available`` bytes of this rank's device, or (offloaded) in ``host_available`` bytes
    of the CPU's memory for this rank; None when it may. None for either: not known, not checked."""
    if available is not None and p.per_rank > available:
        offload = "" if p.offload else ", batch.cpu_offload=true (the trained state in the CPU's memory)"
        return (f"the models need {p.describe()}, but this rank has {available / 2**30:.3g} GiB free: use more GPUs "
                f"(torchrun; the trained state is sharded over batch.shard_ranks, 0 = all ranks){offload}, beta=0 (no "
                f"reference model), or a smaller student")
    if host_available is not None and p.host_per_rank > host_available:
        pageable = ", batch.offload_pinned=false (pageable memory: no rounding up, slower copies)" if p.pinned else ""
        return (f"the models need {p.describe()}, but this rank's share of the CPU's available memory is "
                f"{host_available / 2**30:.3g} GiB: use more nodes (torchrun){pageable}, or a smaller student")
    return None
