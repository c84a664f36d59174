"""Process group and FSDP2 sharding, hand-rolled on torch.distributed (no accelerate, no HF Trainer).

    python -m ril_fast.train ...                          one process: a 1-rank group on a HashStore
    torchrun --nproc_per_node=N -m ril_fast.train ...     N ranks, rendezvous from torchrun's env

Both launches take the same code path: there is always a process group (nccl on CUDA, gloo on CPU),
and ``shard_model`` always wraps with FSDP2, so parameters are DTensors even on one rank. It returns
the root unit ``Sharded(model)``; code that reaches into the model past its ``forward`` (packed
log-probs through ``base_model`` and the LM head weight) runs as the root's forward:
``sharded(batch, fn=packed_logprobs)``.

Wrap order (shared/STYLE.md): each decoder block, the vision tower as one unit, then the root. Over
several nodes, ``shard_ranks`` = the GPUs of a node makes it HSDP (each node holds a sharded copy; only
gradients cross nodes). Gradients are summed over ranks, not averaged: the trainer already divides the
Dr.GRPO loss by a global normaliser (all outputs of the step on all ranks), so FSDP's default
1/world_size would divide a second time. ``gathered`` keeps every parameter unsharded through a rollout phase, so HF
``generate`` all-gathers once per phase instead of once per generated token.
"""

import contextlib
import dataclasses
import datetime
import os
import pickle
import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

# Attribute names of a vision tower in transformers' VLMs (Qwen-VL: visual; InternVL, LLaVA: vision_tower).
_VISION_NAMES = ("visual", "vision_tower", "vision_model")


@dataclasses.dataclass(frozen=True)
class Dist:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the one that logs and writes files)."""
        return self.rank == 0


def init(cpu_collectives: bool = False) -> Dist:
    """Join (or create) the default process group and pick this process's device.

    Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the group is torchrun's; without
    them a 1-process group on an in-memory store. Backend nccl on CUDA (device ``cuda:LOCAL_RANK``, made
    current), gloo on CPU; ``cpu_collectives`` adds gloo beside nccl on CUDA for collectives on CPU tensors
    (``shard_model``'s ``cpu_offload``: the gradient norm over offloaded shards). The first call decides;
    calling it again returns the same ``Dist``.
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl" if cpu_collectives else "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def world_size() -> int:
    """Ranks in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` (any shape and dtype, on this rank's device) over all ranks, in place; returns it."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise max of ``tensor`` (any shape and dtype, on this rank's device) over all ranks, in place;
    returns it."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order (``[obj]`` without a group)."""
    if world_size() > 1:
        out = [None] * world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


ON_RANK0_TIMEOUT = datetime.timedelta(hours=2)  # how long the other ranks wait for rank 0's work in on_rank0
_WAITING: dict = {}  # default group -> the gloo group on_rank0 waits on


def on_rank0(fn):
    """``fn()`` computed on rank 0 alone and its result (picklable) sent to every rank: for work every rank
    would otherwise repeat on shared storage, such as reading every image file of a data set (128 ranks would
    read it 128 times). An exception ``fn`` raises there is raised on every rank, so that none waits for a
    result that never comes (one that cannot travel goes as a RuntimeError with its words). The other ranks
    wait on a CPU (gloo) group of their own for up to ``ON_RANK0_TIMEOUT``, not the default group's timeout
    (NCCL's: 10 minutes), and the result never passes through a GPU. Without a group, ``fn()``."""
    if world_size() == 1:
        return fn()
    group = _WAITING.get(dist.group.WORLD)
    if group is None:  # every rank calls on_rank0 at the same points, so every rank makes the group here
        group = _WAITING[dist.group.WORLD] = dist.new_group(backend="gloo", timeout=ON_RANK0_TIMEOUT)
    box, raised = [None], None
    if dist.get_rank() == 0:
        try:
            result = fn()
            box[0] = pickle.dumps((result, None))  # here, so that a result that cannot travel is an error too
        except Exception as e:  # noqa: BLE001 - every rank raises it below
            result, raised, box[0] = None, e, pickle.dumps((None, _travelling(e)))
    dist.broadcast_object_list(box, src=0, group=group)
    if raised is not None:
        raise raised  # rank 0's own, with its traceback into ``fn``; the others raise its copy
    if dist.get_rank() == 0 and result is not None:
        return result
    result, error = pickle.loads(box[0])
    if error is not None:
        raise error
    return result


def _travelling(e: Exception) -> Exception:
    """``e`` if it survives pickling on its way to the other ranks, else a RuntimeError with its words."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any failure to rebuild it
        return RuntimeError(f"on rank 0: {type(e).__name__}: {e}")


def barrier() -> None:
    """Wait until every rank gets here (no-op without a group)."""
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_initialized():
        _MESHES.clear()
        _WAITING.clear()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# FSDP2
# ----------------------------------------------------------------------------------------------------
def vision_tower(model: nn.Module) -> nn.Module | None:
    """The outermost submodule named like a vision tower (``model.visual``, ``model.model.visual``,
    ``...vision_tower``), or None for a text-only model."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in _VISION_NAMES:
            return module
    return None


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The language model's decoder blocks: the children of every ``ModuleList`` named ``layers``
    outside the vision tower (``model.layers``, ``model.language_model.layers``, ...)."""
    vision = vision_tower(model)
    inside_vision = set(vision.modules()) if vision is not None else set()
    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers" and module not in inside_vision:
            blocks.extend(module)
    return blocks


def _sum_gradients(module: FSDPModule) -> None:
    """Make FSDP sum gradients over ranks instead of averaging them.

    torch >= 2.8 (2.11 on the GPU machines, 2.13 here): ``set_gradient_divide_factor(1.0)``, plus
    ``set_force_sum_reduction_for_comms(True)`` so the reduce-scatter is a plain SUM (with the factor
    alone FSDP uses ``PREMUL_SUM(1/factor)``, which gloo rejects) and the post-division by 1.0 is
    skipped. Older torch: ``set_reduce_scatter_divide_factor(1.0)``.
    """
    if hasattr(module, "set_gradient_divide_factor"):
        module.set_gradient_divide_factor(1.0)
    else:
        module.set_reduce_scatter_divide_factor(1.0)
    if hasattr(module, "set_force_sum_reduction_for_comms"):
        module.set_force_sum_reduction_for_comms(True)


def _sum_over_ranks(grad: torch.Tensor) -> torch.Tensor:
    """Gradient hook of a parameter FSDP does not manage: this backward's contribution summed over ranks
    (each backward's own, before accumulation into ``.grad``, so accumulation stays a plain sum)."""
    return all_reduce_sum(grad.clone())


def _mean_over_ranks(grad: torch.Tensor) -> torch.Tensor:
    """:func:`_sum_over_ranks` over the number of ranks: ``shard_model(sum_gradients=False)``, FSDP's mean."""
    return all_reduce_sum(grad.clone()) / world_size()


class Sharded(nn.Module):
    """The root FSDP unit around a model: ``sharded.module`` is the model itself.

    Why a wrapper: FSDP gathers the root's parameters (embeddings, final norm, LM head, discriminator
    head) in the root's forward hooks, but ril_fast reaches into models past their ``forward``
    (``models.packed_logprobs`` runs ``model.base_model`` and hands the LM head weight to a kernel).
    Running such a function as this wrapper's forward puts all of it inside the root's forward, so
    FSDP gathers, and after backward reduce-scatters, every parameter it touches:

        sharded(batch)                                  # = model(batch)
        sharded(batch, fn=packed_logprobs, temperature=t)   # = packed_logprobs(model, batch, ...)
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, fn=None, **kwargs):
        """``fn(self.module, *args, **kwargs)``, or ``self.module(*args, **kwargs)`` without ``fn``."""
        return self.module(*args, **kwargs) if fn is None else fn(self.module, *args, **kwargs)


def call(model: nn.Module, fn, *args, **kwargs):
    """``fn(model, *args, **kwargs)``, run as the root's forward when ``model`` is :class:`Sharded` (so
    FSDP gathers the root's parameters for it); a plain call otherwise."""
    if isinstance(model, Sharded):
        return model(*args, fn=fn, **kwargs)
    return fn(model, *args, **kwargs)


def shard_size(shard_ranks: int = 0) -> int:
    """The ranks that shard one copy of the parameters: ``shard_ranks``, or all ranks when 0. ValueError
    (its message starting ``shard_ranks=N:``) unless that divides the number of ranks."""
    world = world_size()
    shard = shard_ranks or world
    if shard < 1 or world % shard:
        raise ValueError(f"shard_ranks={shard_ranks}: must divide the number of ranks ({world}), e.g. the GPUs of "
                         f"one node; 0 shards over all ranks")
    return shard


def shard_model(model: nn.Module, *, mixed_precision: bool, sum_gradients: bool = True,
                reshard_after_forward: bool | None = None, shard_ranks: int = 0, cpu_offload: bool = False,
                pin_memory: bool = True, device: torch.device | None = None, from_rank0: bool = False) -> Sharded:
    """Shard ``model`` with FSDP2 over the ranks of the default group -> the root unit ``Sharded(model)``.

    ``fully_shard`` on each decoder block, on the vision tower as one unit, then on the root (the
    embeddings, the final norm, the LM head or discriminator head). ``mixed_precision``: parameters
    all-gathered in bf16, gradients reduced in fp32 (for CUDA); else plain fp32 (CPU). The model must have
    the same weights on every rank, on this rank's ``device`` (default: where its parameters are) or in the
    CPU's memory: FSDP moves each unit to ``device`` as it shards it, so a GPU never holds more of the
    unsharded model than one unit (a decoder block, the vision tower, or the root's embeddings and head).
    ``from_rank0``: only rank 0's model holds the weights; the other ranks' were built empty on the meta device
    (``ril_fast.models.load(empty=True)``) and receive their shard of every parameter, and a copy of every
    buffer, from rank 0 over the process group, so that one process reads the checkpoint, not every rank of
    every node (not with ``cpu_offload``). ``sum_gradients`` (default) makes the
    gradient reduction a sum over ranks: the caller's loss carries the global normaliser. Parameters
    (of ``model``, shared with the result; names gain a ``module.`` prefix on the wrapper) become
    DTensors sharded on dim 0 (``p.full_tensor()`` gathers one), except 0-d ones, which FSDP cannot
    shard: they stay replicated plain tensors (an optimizer using foreach kernels must not mix them with
    DTensors in one param group: :func:`optimizer_groups`). Call the result, not ``model``: see
    :class:`Sharded`. For generation see :func:`gathered`.

    ``shard_ranks``: how many ranks shard one copy of the parameters; 0 (default): all of them (FSDP). A
    divisor of the world size, such as the GPUs of a node, is HSDP: each ``shard_ranks`` consecutive ranks
    (one node under torchrun) shard a copy, the copies are replicas, and only the gradients cross between
    them (reduce-scattered within a copy, then all-reduced across copies); all-gathers stay within a copy.

    ``reshard_after_forward``: whether the blocks and the vision tower free their gathered parameters after
    forward and gather them again for backward (default: only when a copy is sharded over more than one
    rank). On one rank a shard is the whole parameter, and gathering again repeats the copies and the bf16
    cast of every parameter (24-block tiny Qwen2.5-VL, bf16: 10,928 -> 10,292 ops per forward + backward);
    keeping them costs one gathered copy of the model (bf16 on a GPU: 2 bytes per parameter) from a forward
    to its backward, which frees it.

    ``cpu_offload``: the shards (fp32 weights, their gradients, and so the optimizer's moments, which follow the
    weights) live in the CPU's memory, pinned when the model is on a GPU and ``pin_memory``; each unit copies its
    shard to the GPU to all-gather it and its gradient back after the reduce-scatter, and the optimizer steps on
    the CPU. The GPU holds gathered weights, gradients until they are reduced, and activations, for copies
    between CPU and GPU every forward and backward (FSDP2's ``CPUOffloadPolicy``). 0-d parameters, which FSDP
    does not manage, stay on the device. Forwards still run on the model's device: see :func:`compute_device`.
    On GPUs the process group needs a CPU backend for the gradient norm over the offloaded shards:
    ``init(cpu_collectives=True)``.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if from_rank0 and cpu_offload:
        raise ValueError("from_rank0 does not go with cpu_offload: every rank loads its own weights then")
    if device.type == "meta":
        raise ValueError("an empty model (on the meta device) needs the device to shard it onto: device=")
    if from_rank0:  # the others wait while rank 0 reads the weights (minutes for a large student on slow storage) on
        on_rank0(lambda: None)  # on_rank0's own group, not in the broadcast below: NCCL's would time out at 10
    # Rank 0's unsharded weights, for the others' shards (held here while FSDP moves the model's own).
    weights = {f"module.{k}": v for k, v in model.state_dict().items()} if from_rank0 and dist.get_rank() == 0 \
        else None
    shard = shard_size(shard_ranks)
    mesh = _mesh(device.type, shard)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision else MixedPrecisionPolicy())
    if reshard_after_forward is None:
        reshard_after_forward = shard > 1
    offload = CPUOffloadPolicy(pin_memory=pin_memory and device.type == "cuda") if cpu_offload else OffloadPolicy()
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, offload_policy=offload,
                    reshard_after_forward=reshard_after_forward)
    vision = vision_tower(model)
    if vision is not None:
        fully_shard(vision, mesh=mesh, mp_policy=policy, offload_policy=offload,
                    reshard_after_forward=reshard_after_forward)
    # FSDP cannot shard 0-d parameters (the discriminator's bias): they stay plain, replicated tensors
    # whose gradients are summed over ranks by a hook.
    scalars = {p for p in model.parameters() if p.ndim == 0}
    for p in scalars:
        if not p.is_meta:
            p.data = p.data.to(device)
    # The root's parameters are used first in forward and first in backward: keeping them gathered in
    # between saves an all-gather (torch's own default for the root). The root passes its inputs on
    # uncast: they include fp32 tensors for ``fn`` (reference log-probs) that must stay fp32.
    root_policy = dataclasses.replace(policy, cast_forward_inputs=False)
    root = fully_shard(Sharded(model).train(model.training), mesh=mesh, mp_policy=root_policy,
                       offload_policy=offload, reshard_after_forward=False,
                       **({"ignored_params": scalars} if scalars else {}))
    if sum_gradients:
        for module in fsdp_modules(root):
            _sum_gradients(module)
    if from_rank0:
        _receive_from_rank0(root, weights, _mesh_device(mesh))
    for p in model.parameters():  # after filling: an empty model's 0-d parameters are new objects then
        if p.ndim == 0 and p.requires_grad:  # (a frozen one takes no hook) summed, or averaged as FSDP averages
            p.register_hook(_sum_over_ranks if sum_gradients else _mean_over_ranks)
    # Make it the root now rather than at its first forward, so that ``gathered`` can unshard before
    # any forward has run.
    root._get_fsdp_state()._lazy_init()
    return root


def _receive_from_rank0(root: nn.Module, weights: dict | None, device: torch.device) -> None:
    """Fill the sharded ``root`` on every rank from rank 0's unsharded ``weights`` (its state dict with the root's
    names; None on the other ranks, whose models are empty on the meta device): parameters and persistent buffers
    are broadcast one at a time and each rank keeps its shard; the other buffers (rotary frequencies) are copied."""
    if weights is None:
        root.to_empty(device=device)
    set_model_state_dict(root, weights or {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in root.buffers():
        dist.broadcast(buffer, src=0)


def _mesh_device(mesh) -> torch.device:
    """The device FSDP puts a unit on for ``mesh`` (this rank's current accelerator, or the CPU)."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.accelerator.current_device_index())


_MESHES: dict = {}  # (default group, device type, shard) -> mesh: the models of a run share one


def _mesh(device_type: str, shard: int):
    """The device mesh of ``shard``-rank copies over all ranks, made once per process group: each 2-D (HSDP)
    mesh has process groups of its own (NCCL communicators, with GPU buffers), which the student, the
    discriminator and the reference share."""
    world = world_size()
    key = (dist.group.WORLD, device_type, shard)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(device_type, (world,)) if shard == world else \
            init_device_mesh(device_type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))
    return _MESHES[key]


def copy_ranks(model: nn.Module) -> int:
    """How many ranks shard one copy of ``model``'s parameters (``shard_model``'s ``shard_ranks``; 1 for a model
    that is not sharded)."""
    param = next((p for p in model.parameters() if isinstance(p, DTensor)), None)
    return 1 if param is None else param.device_mesh.size(param.device_mesh.ndim - 1)


def compute_device(model: nn.Module) -> torch.device:
    """The device ``model``'s forwards run on, where its inputs go: for a model sharded by :func:`shard_model`,
    the device of its mesh (where FSDP gathers the weights to, also when their shards live on the CPU:
    ``cpu_offload``); otherwise its parameters' device."""
    param = next(model.parameters())
    return _mesh_device(param.device_mesh) if isinstance(param, DTensor) else param.device


def optimizer_groups(model: nn.Module) -> list[dict]:
    """``model``'s parameters as optimizer param groups: the sharded ones (DTensors), then the 0-d ones
    FSDP leaves as plain tensors (a discriminator head's bias). Kept apart, an optimizer's foreach or
    fused kernels (CUDA's default) never mix the two kinds in one call."""
    params = list(model.parameters())
    groups = [[p for p in params if p.ndim > 0], [p for p in params if p.ndim == 0]]
    return [{"params": group} for group in groups if group]


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    """Every FSDP-wrapped module of ``model``, outermost first (empty if not sharded)."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a :class:`Sharded` root (the model itself otherwise)."""
    return model.module if isinstance(model, Sharded) else model


def _param_groups(module: FSDPModule) -> list:
    """FSDP's parameter groups of ``module`` (a list in torch 2.13; one group or None in 2.11)."""
    state = module._get_fsdp_state()
    if hasattr(state, "_fsdp_param_groups"):
        return state._fsdp_param_groups
    return [state._fsdp_param_group] if state._fsdp_param_group is not None else []


def _reshards_after_forward(module: FSDPModule) -> bool:
    """Whether ``module`` frees its gathered parameters after forward (FSDP keeps it per param group)."""
    return any(g.post_forward_mesh_info is not None for g in _param_groups(module))


_HELD: "weakref.WeakSet[FSDPModule]" = weakref.WeakSet()  # FSDP modules kept gathered by a gathered()


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Keep every parameter of a sharded model gathered inside the block (for generation).

    ``model``: the :class:`Sharded` root (or a part of it whose root is already held by an enclosing
    ``gathered``). On entry every FSDP module all-gathers its parameters once (on every rank, in the
    same order, so ranks that go on to run different numbers of forwards, or no vision tower, cannot
    deadlock) and stops resharding after forward; on exit the reshard settings come back and the
    gathered parameters are freed. Forwards inside the block run no collectives. Memory: the whole
    unsharded model (in the mixed-precision param dtype) on every rank. Nested calls and unsharded
    models pass through.
    """
    modules = [m for m in fsdp_modules(model) if m not in _HELD]
    before = [_reshards_after_forward(m) for m in modules]
    order = _forward_order(modules)
    recorded = len(order)
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
    for handle in [m.unshard(async_op=True) for m in modules]:
        handle.wait()
    _HELD.update(modules)
    try:
        if any(isinstance(p, DTensor) for p in model.parameters()):
            raise RuntimeError("some parameters are still sharded: their FSDP root is outside this module; "
                               "pass the Sharded module that shard_model returned")
        yield model
    finally:
        _forget_forward_order(modules, order, recorded)
        for m, reshard in zip(modules, before):
            _HELD.discard(m)
            m.set_reshard_after_forward(reshard, recurse=False)
            m.reshard()


@contextlib.contextmanager
def bare_blocks(model: nn.Module):
    """Inside the block, the decoder blocks of ``model`` that an enclosing :func:`gathered` holds run
    without FSDP's forward hooks, for no-grad forwards only (generation, the frozen log-probs, the
    discriminator's scores).

    Held parameters are already gathered, so the hooks have nothing left to do but cost: per block and
    per forward they cast the inputs (already in the parameters' dtype), wait on FSDP's streams and
    record the forward order, hundreds of Python calls per generated token (a 24-block tiny model
    decodes 1.3-1.4x faster on the CPU without them, token for token the same; its packed scoring passes
    run 1.15x faster in bf16, 1.09x in fp32, bit for bit the same). The hooks of the vision tower and the
    root stay (they run once per ``generate`` or micro-batch), as do hooks that are not FSDP's. Blocks
    not held keep theirs (they must gather). On exit every block has its own hooks back, in order.
    """
    if torch.is_grad_enabled():
        raise RuntimeError("bare_blocks is for no-grad forwards: without FSDP's hooks a backward would not "
                           "reduce-scatter the gradients")
    saved = []
    for block in decoder_blocks(model):
        if not (isinstance(block, FSDPModule) and block in _HELD):
            continue
        state = block._get_fsdp_state()
        saved.append((block, block._forward_pre_hooks, block._forward_hooks))
        block._forward_pre_hooks = _without(block._forward_pre_hooks, state)
        block._forward_hooks = _without(block._forward_hooks, state)
    try:
        yield model
    finally:
        for block, pre_hooks, hooks in saved:
            block._forward_pre_hooks, block._forward_hooks = pre_hooks, hooks


def _without(hooks: dict, state) -> dict:
    """A copy of a module's hook dict without the hooks that are methods of the FSDP ``state``."""
    return type(hooks)((k, h) for k, h in hooks.items() if getattr(h, "__self__", None) is not state)


def _forward_order(modules: list[FSDPModule]) -> list:
    """FSDP's record of the order in which units finished forward (shared by all units of a root)."""
    return modules[0]._get_fsdp_state()._comm_ctx.post_forward_order if modules else []


def _forget_forward_order(modules: list[FSDPModule], order: list, keep: int) -> None:
    """Drop what the forwards inside ``gathered`` added to FSDP's forward-order record.

    FSDP appends every unit's forward to the record (no_grad ones too) and clears it only at the end of
    a backward, which prefetches from it: the next backward would all-gather the unit that ran last in
    generation, which it does not need (an extra all-gather per step, seen in tests/test_distributed.py before
    :func:`bare_blocks`; since, the trainer's forwards inside record only the root, which stays gathered through
    the backward, and no test can tell this call from its absence: it stays for forwards run with the hooks).
    """
    del order[keep:]
    for m in modules:
        for group in _param_groups(m):
            group._post_forward_indices[:] = [i for i in group._post_forward_indices if i < keep]
