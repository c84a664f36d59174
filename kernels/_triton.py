"""What every kernel file needs to know about the Triton runtime it runs on."""

import os

import torch

# Triton reads TRITON_INTERPRET as each @triton.jit decorator runs, i.e. as the kernel modules are imported (each
# imports this module first): its value then decides for good whether our kernels are interpreted.
_INTERPRETED_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``).

    True only if the variable was set when ``ril_fast.kernels`` was imported, and still is. Triton reads it
    as the ``@triton.jit`` decorators run, so set later it leaves the kernels compiled for a GPU (on CPU
    tensors their launch fails with "0 active drivers"); and Triton reads it again as a process's first
    launch imports more of Triton, so unset in between, that launch fails too. Kernels use this as a
    ``tl.constexpr`` flag to upcast bf16 operands to fp32 before ``tl.dot`` and arithmetic, which the
    interpreter gets wrong (triton issue #11584).
    """
    return _INTERPRETED_AT_IMPORT and os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, *tensors: torch.Tensor) -> str:
    """Resolve ``impl`` ("auto" | "triton" | "torch") for the device of ``tensors``.

    "auto" picks Triton on CUDA and the PyTorch path elsewhere. "triton" on a CPU tensor is allowed
    only under the interpreter (:func:`interpreting`), which is how the tests exercise the kernels without
    a GPU.
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "auto":
        return "triton" if on_cuda else "torch"
    if impl == "triton" and not on_cuda and not interpreting():
        raise RuntimeError(
            "impl='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before the "
            "first import of ril_fast.kernels and leave it set, or use impl='torch'"
        )
    return impl
