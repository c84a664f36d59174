"""The discriminator's logits against an independent computation: each sample alone through a plain HF forward of
the backbone (eager attention, no packing, the model's own mrope positions), its response rows pooled by hand
(from ``prompt_len`` / ``response_len``, the end-of-turn token included), the head applied by hand.

``tests/test_models.py`` checks packed against separate samples through the discriminator's own code; here the
reference shares none of its pooling or row arithmetic, so a wrong pool mode or response range shows."""

import pytest
import torch
from helpers import assert_close_rule, fp64_oracle
from models_fixtures import one_thread, random_samples, tiny_folder  # noqa: F401

from ril_fast.discriminator import Discriminator
from ril_fast.models import load
from ril_fast.packing import pack, pad

# The tolerance rule's atol, as a fraction of the largest |logit| of the fp64 reference: a few fp32 ulps (the
# discriminator's attention and head kernels sum in another order than the eager reference).
ATOL_REL = 1e-6


@pytest.fixture(scope="module")
def qwen_vl(tmp_path_factory, one_thread):  # noqa: F811
    """The tiny Qwen2.5-VL folder, its processor and its backbone (no LM head) with eager attention in fp32 and
    fp64: the reference's models."""
    path = tiny_folder(tmp_path_factory, "qwen2_5_vl")
    (base32, proc), (base64, _) = (load(path, dtype=d, attn="eager", device="cpu", lm_head=False)
                                   for d in (torch.float32, torch.float64))
    return path, proc, base32, base64


def _by_hand(backbone, proc, encoded, weight, bias, pool: str) -> torch.Tensor:
    """Logits (S,) in the backbone's dtype: each sample alone through ``backbone``'s plain forward (HF finds the
    image tokens from ``mm_token_type_ids``, as its own processor gives them), the rows ``[P, P + R)`` of its
    response pooled (``pool``: their mean, or row ``P + R - 1``), then ``· weight + bias``."""
    dtype = next(backbone.parameters()).dtype
    logits = []
    for e in encoded:
        ids = e.input_ids[None]
        kw = {}
        if e.pixel_values is not None:
            kw = dict(pixel_values=e.pixel_values.to(dtype), image_grid_thw=e.image_grid_thw,
                      mm_token_type_ids=(ids == proc.image_token_id).int())
        hidden = backbone(input_ids=ids, **kw).last_hidden_state[0]
        assert hidden.shape[0] == e.prompt_len + e.response_len
        rows = hidden[e.prompt_len:e.prompt_len + e.response_len]
        pooled = rows.mean(0) if pool == "mean" else rows[-1]
        logits.append(pooled @ weight.to(dtype) + bias.to(dtype))
    return torch.stack(logits)


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_logits_pool_each_responses_own_rows(qwen_vl, pool):
    """``disc(batch)``, packed and padded, == the pooled response rows of each sample alone through the head, in
    fp32 to the tolerance rule (fp64 oracle); a response's last row is its end-of-turn token."""
    path, proc, base32, base64 = qwen_vl
    disc, _ = Discriminator.from_student(path, pool=pool, init_std=0.125, device="cpu")
    with torch.no_grad():
        disc.bias.fill_(float(torch.randn(())))
    encoded = [proc.encode(s) for s in random_samples([1, 0, 2, 1, 0])]
    assert all(e.input_ids[-1].item() == proc.end_token_id for e in encoded)  # the end-of-turn token is pooled
    with torch.no_grad():
        same = _by_hand(base32, proc, encoded, disc.weight, disc.bias, pool)
        with fp64_oracle():
            ref64 = _by_hand(base64, proc, encoded, disc.weight.double(), disc.bias.double(), pool)
        for layout, batch in (("packed", pack(encoded)), ("padded", pad(encoded))):
            got = disc(batch)
            assert got.dtype == torch.float32
            assert_close_rule(got, same, ref64, ATOL_REL * ref64.abs().max().item(), f"{pool} {layout}")
