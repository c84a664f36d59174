"""Shared test tools: the project's one tolerance rule, output poisoning, random PPO ratios kept off the clip
bounds, counters of what a model saves for the backward and what its vision tower is given, and the processes
below a launcher."""

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, computed in fp64."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_rule(out: torch.Tensor, ref_same: torch.Tensor, ref64: torch.Tensor, atol: float, what: str = ""):
    """The one tolerance rule (flash-attention's): the kernel's error against the fp64 reference is at
    most twice the error of the eager reference run in the kernel's own dtype, plus ``atol``.

    ``out``: the kernel's result; ``ref_same``: the eager reference in the input dtype (its error is
    what that dtype costs anyway); ``ref64``: the eager reference in fp64.
    """
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten poisoned output?)"
    err, base = max_err(out, ref64), max_err(ref_same, ref64)
    assert err <= 2 * base + atol, f"{what}: error {err:.3e} > 2 x reference error {base:.3e} + atol {atol:.1e}"


def nudge_off_clip_bounds(lp: torch.Tensor, old: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """Move old log-probs whose ratio ``exp(lp - old)`` lies within 1e-4 of a clip bound (``1 - eps_low``,
    ``1 + eps_high``) by 1%: there two computations of the ratio (fp32 and fp64, packed and unpacked) may take
    different branches of the PPO min (a gradient of rho*A versus 0), which no tolerance should have to absorb."""
    rho = torch.exp(lp.double() - old.double())
    near = ((rho - (1 - eps_low)).abs() < 1e-4) | ((rho - (1 + eps_high)).abs() < 1e-4)
    return torch.where(near, old - 0.01, old)


def gated_delta_rule_in_dtype(query, key, value, g, beta, initial_state=None, output_final_state=False,
                              use_qk_l2norm_in_kernel=False, **kwargs):
    """transformers' Qwen3.5 gated delta rule (its per-token PyTorch form, the same arithmetic) computed in the
    inputs' dtype: transformers' own runs in fp32 whatever the model's dtype, so an fp64 Qwen3.5 is an fp64
    oracle only with this in its place (:func:`fp64_oracle`)."""
    heads = value.shape[-2]
    if key.shape[-2] != heads:  # each query/key head serves consecutive value heads
        query, key = (x.repeat_interleave(heads // key.shape[-2], dim=2) for x in (query, key))
    q, k, v, b, decay = (x.transpose(1, 2) for x in (query, key, value, beta, g))  # (B, H, T, ...)
    if use_qk_l2norm_in_kernel:
        q, k = (x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6) for x in (q, k))
    q = q / q.shape[-1] ** 0.5
    state = value.new_zeros(*v.shape[:2], k.shape[-1], v.shape[-1]) if initial_state is None else initial_state.to(v)
    out = []
    for t in range(q.shape[2]):
        state = state * decay[:, :, t].exp()[..., None, None]
        delta = (v[:, :, t] - (state * k[:, :, t, :, None]).sum(-2)) * b[:, :, t, None]
        state = state + k[:, :, t, :, None] * delta[..., None, :]
        out.append((state * q[:, :, t, :, None]).sum(-2))
    return torch.stack(out, 2).transpose(1, 2), state if output_final_state else None


@contextlib.contextmanager
def fp64_oracle():
    """Inside the block an fp64 model computes in fp64 throughout, so it is an oracle for the same model in
    fp32. transformers computes parts of its models in fp32 whatever their dtype: RMSNorm (``.to(float32)``),
    rotary tables, eager attention's softmax, and Qwen3.5's decay ``g`` (``A_log.float()``), gated norm and
    recurrence. Here an fp64 tensor stays fp64 when cast to fp32 (``Tensor.float``, ``Tensor.to``,
    ``softmax(dtype=float32)``) and Qwen3.5's recurrence is :func:`gated_delta_rule_in_dtype`; tensors of other
    dtypes are cast as usual. Without it, an "fp64" Qwen3.5's packed and separate gradients differed by ~1e-6
    and its fp32 roundings made the tolerance rule's reference error a noisy draw. Yields a list with one entry
    per recurrence call (its dtype), so a test can check that the oracle's recurrence ran (a transformers that
    bound the function elsewhere would bypass it)."""
    from transformers.models.qwen3_5 import modeling_qwen3_5

    calls = []

    def rule(*args, **kwargs):
        calls.append(args[0].dtype)
        return gated_delta_rule_in_dtype(*args, **kwargs)

    def to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if self.dtype == torch.float64 and out.dtype == torch.float32:
            out = real_to(self, device=out.device).contiguous(memory_format=kwargs.get("memory_format",
                                                                                         torch.preserve_format))
        return out

    def softmax(input, *args, dtype=None, **kwargs):
        return real_softmax(input, *args, dtype=None if input.dtype == torch.float64 else dtype, **kwargs)

    real_rule, real_to, real_float = modeling_qwen3_5.torch_chunk_gated_delta_rule, torch.Tensor.to, torch.Tensor.float
    real_softmax = torch.nn.functional.softmax
    modeling_qwen3_5.torch_chunk_gated_delta_rule = rule
    torch.Tensor.to = to
    torch.Tensor.float = lambda self, *a, **k: self if self.dtype == torch.float64 else real_float(self, *a, **k)
    torch.nn.functional.softmax = softmax
    try:
        yield calls
    finally:
        modeling_qwen3_5.torch_chunk_gated_delta_rule = real_rule
        torch.Tensor.to, torch.Tensor.float, torch.nn.functional.softmax = real_to, real_float, real_softmax


def assert_grads_close_rule(grads: dict, grads_same: dict, grads64: dict, atol: float, what: str = "",
                            rtol: float = 1e-6):
    """The tolerance rule (:func:`assert_close_rule`) on a model's whole gradient, its parameters' gradients
    ``{name: tensor}`` flattened into one vector: the error against the fp64 gradients is at most twice that of
    the reference computation in the same dtype, plus ``atol`` and ``rtol`` times the largest fp64 entry.
    Over the whole vector, not parameter by parameter: a small parameter whose gradient sums many cancelling
    terms (Qwen3.5's ``A_log``) can come out of the reference's summation order nearly exact and out of
    another's at a few 1e-6. The ``rtol`` floor: one fp32 reduction over a packed row's thousands of tokens
    (a convolution's weight gradient) rounds differently from per-sample sums added up, by ~1e-6 of the
    gradient's scale, whichever is nearer the fp64 value in a given draw."""
    assert grads.keys() == grads_same.keys() == grads64.keys(), what
    names = sorted(grads)
    flat = [torch.cat([g[n].flatten().double() for n in names]) for g in (grads, grads_same, grads64)]
    worst = max(names, key=lambda n: max_err(grads[n], grads64[n]))
    assert_close_rule(*flat, atol=atol + rtol * flat[2].abs().max().item(), what=f"{what} (largest error in {worst})")


def poison_empty(monkeypatch):
    """Make every ``torch.empty``/``torch.empty_like`` call return NaN-filled (or int max) memory, so an
    element a kernel fails to write shows up as a wrong value instead of as a lucky zero."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).max)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


@contextlib.contextmanager
def saved_for_backward():
    """Inside the block, the bytes of each tensor autograd saves for the backward are appended to the list
    it yields."""
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        yield sizes


@contextlib.contextmanager
def vision_rows_seen(model):
    """Inside the block, the rows a VLM's vision tower is given (Qwen-VL's patches, InternVL's tiles), one
    entry per forward, are appended to the list it yields."""
    seen = []
    tower = getattr(model.base_model, "visual", None) or model.base_model.vision_tower
    hook = tower.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["pixel_values"]).shape[0]), with_kwargs=True)
    try:
        yield seen
    finally:
        hook.remove()


def fsdp_states_seen(blocks: list) -> tuple[list, list]:
    """Hooks on ``blocks`` that run after FSDP's forward pre-hook (FSDP prepends its own) and record each
    block's FSDP training state: FORWARD when FSDP's pre-hook ran, IDLE when the block ran bare
    (``distributed.bare_blocks``) -> (the states seen, the hook handles to remove)."""
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, args: seen.append(m._get_fsdp_state()._training_state))
               for b in blocks]
    return seen, handles


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own, so killing
    torchrun's process group alone would leave them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run_tree(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)``, except that on the timeout
    the launcher and every process below it are killed (``subprocess.run`` kills torchrun alone, and the ranks of a
    script without ``ril_fast.train``'s parent-death signal ran on), then ``TimeoutExpired`` is raised."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=60)  # (its pipes close once every process holding them is gone)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
