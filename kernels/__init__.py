"""Triton kernels of ril_fast, each with an eager PyTorch reference. Import as ``ril_fast.kernels``.

This folder is installed as ``ril_fast.kernels`` (see setup.py). When Python runs from the repository
root, the folder is also visible as a top-level ``kernels``, the name of Hugging Face's kernels
package, which transformers probes (and imports) to decide whether hub kernels are available. Under
that wrong name this module therefore exports nothing and has no ``__version__``, so the probe reads
"not available" and nothing of ours is executed.
"""

if __name__ == "ril_fast.kernels":
    from .disc_head import Pool, disc_head
    from .grpo_loss import GRPOStats, dr_grpo_loss
    from .logprobs import TokenLogprobs, token_logprobs

    __all__ = ["GRPOStats", "Pool", "TokenLogprobs", "disc_head", "dr_grpo_loss", "token_logprobs"]
