"""Shared test tools: the project's one tolerance rule, output poisoning, and counters of what a model
saves for the backward and what its vision tower is given."""

import contextlib

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
