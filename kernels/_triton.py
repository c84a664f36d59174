"""What every kernel file needs to know about the Triton runtime it runs on."""

import os

import torch


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``).

    The interpreter must be switched on before the ``@triton.jit`` decorators run, so this reads the
    environment variable rather than any Triton state. Kernels use it as a ``tl.constexpr`` flag to
    upcast bf16 operands to fp32 before ``tl.dot`` and arithmetic, which the interpreter gets wrong
    (triton issue #11584).
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, *tensors: torch.Tensor) -> str:
    """Resolve ``impl`` ("auto" | "triton" | "torch") for the device of ``tensors``.

    "auto" picks Triton on CUDA and the PyTorch path elsewhere. "triton" on a CPU tensor is allowed
    only under the interpreter, which is how the tests exercise the kernels without a GPU.
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "auto":
        return "triton" if on_cuda else "torch"
    if impl == "triton" and not on_cuda and not interpreting():
        raise RuntimeError(
            "impl='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing ril_fast.kernels, or use impl='torch'"
        )
    return impl
