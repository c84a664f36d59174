"""disc_head (pooled d → 1 discriminator head) against a per-sequence fp64 oracle, both impls.

The oracle below loops over sequences with ``hidden[s:e].mean(0)`` / ``hidden[e - 1]``: independent of
both the Triton kernels and the torch path's prefix-sum trick. Run in the input dtype it is also the
"same-dtype eager reference" of the tolerance rule.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from ril_fast.kernels.disc_head import Pool, disc_head
from helpers import assert_close_rule, poison_empty

# (dtype of hidden, dtype of weight and bias, atol, rtol); the tolerance added to the rule is
# atol + rtol · max|fp64 reference|.
DTYPES = [
    # fp32: the kernel sums in a different order than torch; a few fp32 ulps of the largest value.
    (torch.float32, torch.float32, 1e-6, 1e-5),
    # bf16: one bf16 ulp (2^-7 relative) of the largest value, since the interpreter truncates
    # fp32 -> bf16 casts instead of rounding (d hidden, d weight come back in bf16).
    (torch.bfloat16, torch.bfloat16, 1e-6, 8e-3),
    # bf16 hidden, fp32 head (the usual mixed-precision set-up): same reasoning.
    (torch.bfloat16, torch.float32, 1e-6, 8e-3),
]
DTYPE_IDS = ["fp32", "bf16", "bf16-fp32head"]

# (N, H, layout, index dtype): odd sizes, every range layout, both index dtypes.
CASES = [
    (1, 8, "packed", torch.int32),
    (37, 64, "packed", torch.int64),
    (37, 96, "gaps", torch.int32),
    (37, 8, "singles", torch.int64),
    (341, 96, "packed", torch.int32),
    (341, 64, "gaps", torch.int64),
    (341, 96, "singles", torch.int32),
]
CASE_IDS = [f"N{n}-H{h}-{layout}-{str(i).removeprefix('torch.')}" for n, h, layout, i in CASES]


def _randint(lo: int, hi: int) -> int:
    """Uniform in [lo, hi], from torch's (seeded) generator."""
    return int(torch.randint(lo, hi + 1, ()))


def make_ranges(n: int, layout: str, idx_dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random disjoint non-empty ranges of [0, n), listed in random order.

    packed: back-to-back sequences that cover every row; gaps: responses with prompt rows between
    them (rows no range covers); singles: ranges of length 1.
    """
    if layout == "packed":
        s = _randint(1, min(20, n))
        cuts = (torch.randperm(n - 1)[: s - 1] + 1).sort().values
        bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([n])])
        starts, ends = bounds[:-1], bounds[1:]
    elif layout == "gaps":
        s = _randint(1, min(20, (n + 1) // 2))
        b = torch.randperm(n + 1)[: 2 * s].sort().values
        starts, ends = b[0::2], b[1::2]
    else:
        s = _randint(1, min(20, n))
        starts = torch.randperm(n)[:s]
        ends = starts + 1
    perm = torch.randperm(len(starts))
    return starts[perm].to(device, idx_dtype), ends[perm].to(device, idx_dtype)


def oracle(hidden, weight, bias, starts, ends, pool):
    """Per-sequence loop in hidden's dtype (weight and bias cast to it)."""
    w, b = weight.to(hidden.dtype), bias.to(hidden.dtype)
    pooled = [hidden[e - 1] if pool == "last" else hidden[s:e].mean(0) for s, e in zip(starts.tolist(), ends.tolist())]
    return torch.stack(pooled) @ w + b


def value_and_grads(fn, hidden, weight, bias, g, dtype=None):
    """fn's output and the grads of (hidden, weight, bias) for upstream gradient g; inputs cast to
    dtype when given (the fp64 reference)."""
    leaves = [(t.to(dtype) if dtype else t).detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    out = fn(*leaves)
    out.backward(g.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def pooled_rows(n, starts, ends, pool, device):
    """Bool (N,): the rows some sequence pools (only the last row of each range for "last")."""
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    for s, e in zip(starts.tolist(), ends.tolist()):
        mask[(e - 1) if pool == "last" else slice(s, e)] = True
    return mask


def check_against_oracle(hidden, weight, bias, starts, ends, pool, impl, atol, rtol, monkeypatch):
    """Forward and backward (random upstream gradient) of disc_head against the oracle in the input
    dtype and in fp64, with the tolerance rule; dtypes; exact zeros off the pooled rows."""
    g = torch.randn(len(starts), device=hidden.device)
    ref64 = value_and_grads(lambda h, w, b: oracle(h, w, b, starts, ends, pool), hidden, weight, bias, g, torch.float64)
    ref = value_and_grads(lambda h, w, b: oracle(h, w, b, starts, ends, pool), hidden, weight, bias, g)
    if impl == "triton":
        poison_empty(monkeypatch)
    got = value_and_grads(lambda h, w, b: disc_head(h, w, b, starts, ends, pool=pool, impl=impl),
                          hidden, weight, bias, g)
    assert got[0].dtype == torch.float32
    assert [t.dtype for t in got[1:]] == [hidden.dtype, weight.dtype, bias.dtype]
    for name, out, same, r64 in zip(["logits", "d hidden", "d weight", "d bias"], got, ref, ref64):
        assert_close_rule(out, same, r64, atol + rtol * r64.abs().max().item(), f"{impl} {pool} {name}")
    off = ~pooled_rows(hidden.shape[0], starts, ends, pool, hidden.device)
    assert (got[1][off] == 0).all(), "d hidden is not exactly zero on rows no sequence pools"
    assert (got[1][~off] != 0).any() or (g == 0).all(), "d hidden is zero on every pooled row"


def random_head(n, h, dtype, wdtype, device):
    """hidden ~ N(0, 1); weight scaled by 1/sqrt(H) so the logits are O(1)."""
    hidden = torch.randn(n, h, device=device).to(dtype)
    weight = (torch.randn(h, device=device) / h**0.5).to(wdtype)
    bias = torch.randn((), device=device).to(wdtype)
    return hidden, weight, bias


@pytest.mark.parametrize("dtype,wdtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,h,layout,idx_dtype", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("pool", ["last", "mean"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_matches_oracle(impl, pool, n, h, layout, idx_dtype, dtype, wdtype, atol, rtol, device, monkeypatch):
    hidden, weight, bias = random_head(n, h, dtype, wdtype, device)
    starts, ends = make_ranges(n, layout, idx_dtype, device)
    check_against_oracle(hidden, weight, bias, starts, ends, pool, impl, atol, rtol, monkeypatch)


@pytest.mark.parametrize("pool", ["last", "mean"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_real_hidden_size(impl, pool, device, monkeypatch):
    """H = 3584 (Qwen2.5-VL-7B): several H blocks on the GPU, the interpreter's largest block here."""
    _, _, atol, rtol = DTYPES[2]
    hidden, weight, bias = random_head(37, 3584, torch.bfloat16, torch.float32, device)
    starts, ends = make_ranges(37, "gaps", torch.int64, device)
    check_against_oracle(hidden, weight, bias, starts, ends, pool, impl, atol, rtol, monkeypatch)


@pytest.mark.parametrize("dtype,wdtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["packed", "gaps"])
@pytest.mark.parametrize("pool", ["last", "mean"])
def test_many_blocks(pool, layout, dtype, wdtype, atol, rtol, device, monkeypatch):
    """GPU-sized blocks take H in several blocks (the interpreter's own take it in one, up to 4096) and a mean's
    rows several at a time: small blocks here, H = 100 in 7 of 16 (the last cut short), rows 4 at a time."""
    module = importlib.import_module("ril_fast.kernels.disc_head")  # the package's attribute is the function
    monkeypatch.setattr(module, "_blocks", lambda H, mean: ((4 if mean else 1), 16))
    hidden, weight, bias = random_head(341, 100, dtype, wdtype, device)
    starts, ends = make_ranges(341, layout, torch.int64, device)
    check_against_oracle(hidden, weight, bias, starts, ends, pool, "triton", atol, rtol, monkeypatch)


@pytest.mark.parametrize("dtype,wdtype,atol,rtol", DTYPES[:2], ids=DTYPE_IDS[:2])
@pytest.mark.parametrize("pool", ["last", "mean"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_overlapping_ranges(impl, pool, dtype, wdtype, atol, rtol, device, monkeypatch):
    """Ranges that share rows (one range repeated, so "last" shares a row too): the backward sums
    every range's contribution."""
    n = 41
    hidden, weight, bias = random_head(n, 64, dtype, wdtype, device)
    starts = torch.randint(0, n, (10,))
    ends = starts + 1 + (torch.rand(10) * (n - starts)).long()
    starts, ends = torch.cat([starts, starts[:1]]), torch.cat([ends, ends[:1]])
    assert (ends <= n).all() and (ends > starts).all()
    check_against_oracle(hidden, weight, bias, starts.to(device), ends.to(device), pool, impl, atol, rtol, monkeypatch)


@pytest.mark.parametrize("pool", ["last", "mean"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_non_contiguous_inputs(impl, pool, device, monkeypatch):
    """A transposed hidden (column stride N), a strided weight and strided starts / ends give what their
    contiguous copies give (the kernels read hidden rows with unit column stride, weight and indices densely)."""
    _, _, atol, rtol = DTYPES[0]
    n, h = 341, 96
    hidden, weight, bias = random_head(n, h, torch.float32, torch.float32, device)
    starts, ends = make_ranges(n, "gaps", torch.int64, device)
    spread = lambda t: torch.stack([t, t], -1).flatten()[::2]  # noqa: E731  t's values, at stride 2
    s_starts, s_ends = spread(starts), spread(ends)
    assert s_starts.stride() == s_ends.stride() == (2,)
    g = torch.randn(len(starts), device=device)
    oracle_fn = lambda hh, w, b: oracle(hh, w, b, starts, ends, pool)  # noqa: E731
    ref64 = value_and_grads(oracle_fn, hidden, weight, bias, g, torch.float64)
    if impl == "triton":
        poison_empty(monkeypatch)
    contiguous = value_and_grads(lambda hh, w, b: disc_head(hh, w, b, starts, ends, pool=pool, impl=impl),
                                 hidden, weight, bias, g)

    def strided(hh, w, b):
        hh, w = hh.T.contiguous().T, spread(w)
        assert hh.stride() == (1, n) and w.stride() == (2,)
        return disc_head(hh, w, b, s_starts, s_ends, pool=pool, impl=impl)

    got = value_and_grads(strided, hidden, weight, bias, g)
    for name, out, same, r64 in zip(["logits", "d hidden", "d weight", "d bias"], got, contiguous, ref64):
        assert_close_rule(out, same, r64, atol + rtol * r64.abs().max().item(), f"{impl} {pool} strided {name}")


@pytest.mark.parametrize("starts,ends,match", [
    ([0, 3], [2, 3], "empty"),
    ([5], [2], "empty"),
    ([0], [42], "N = 41"),
    ([-1], [2], "starts"),
])
@pytest.mark.parametrize("pool", ["last", "mean"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bad_ranges_raise(impl, pool, starts, ends, match, device):
    hidden, weight, bias = random_head(41, 8, torch.float32, torch.float32, device)
    with pytest.raises(ValueError, match=match):
        disc_head(hidden, weight, bias, torch.tensor(starts, device=device), torch.tensor(ends, device=device),
                  pool=pool, impl=impl)


@pytest.mark.parametrize("what", ["weight shape", "bias shape", "hidden dtype", "index dtype", "lengths", "pool"])
def test_bad_arguments_raise(what, device):
    hidden, weight, bias = random_head(9, 8, torch.float32, torch.float32, device)
    starts, ends = torch.tensor([0, 4], device=device), torch.tensor([4, 9], device=device)
    kwargs = {}
    if what == "weight shape":
        weight = weight[:7]
    elif what == "bias shape":
        bias = bias.reshape(1)
    elif what == "hidden dtype":
        hidden = hidden.half()
    elif what == "index dtype":
        starts = starts.float()
    elif what == "lengths":
        ends = ends[:1]
    else:
        kwargs["pool"] = "max"
    with pytest.raises(ValueError):
        disc_head(hidden, weight, bias, starts, ends, **kwargs)


@pytest.mark.parametrize("pool", ["last", "mean"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_no_sequences(impl, pool, device):
    hidden, weight, bias = [t.requires_grad_() for t in random_head(9, 8, torch.bfloat16, torch.float32, device)]
    empty = torch.zeros(0, dtype=torch.int32, device=device)
    out = disc_head(hidden, weight, bias, empty, empty, pool=pool, impl=impl)
    assert out.shape == (0,) and out.dtype == torch.float32
    out.sum().backward()
    assert all(t.grad is not None and (t.grad == 0).all() for t in (hidden, weight, bias))


def test_auto_and_pool_enum(device):
    """"auto" is the path resolve_impl names for the device; Pool members and their strings agree."""
    hidden, weight, bias = random_head(37, 64, torch.float32, torch.float32, device)
    starts, ends = make_ranges(37, "packed", torch.int64, device)
    expected = "triton" if device.type == "cuda" else "torch"
    for pool in Pool:
        ref = disc_head(hidden, weight, bias, starts, ends, pool=pool.value, impl=expected)
        assert torch.equal(disc_head(hidden, weight, bias, starts, ends, pool=pool), ref)
        other = disc_head(hidden, weight, bias, starts, ends, pool=Pool.MEAN if pool is Pool.LAST else Pool.LAST)
        assert not torch.equal(other, ref)


@pytest.mark.parametrize("pool", ["last", "mean"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bce_training_separates(impl, pool, device):
    """sigmoid(disc_head) trained with BCE (Eq. 1) through a learnable projection of the hidden
    states: a few Adam steps separate "student" from "teacher" sequences, so every gradient points
    the right way."""
    n_seq, length, gap, h = 12, 3, 2, 16
    n = n_seq * (length + gap)
    labels = (torch.arange(n_seq) % 2).float()[torch.randperm(n_seq)].to(device)  # 1 = student
    starts = torch.arange(n_seq, device=device) * (length + gap) + gap
    ends = starts + length
    u = F.normalize(torch.randn(h, device=device), dim=0)
    feats = torch.randn(n, h, device=device)  # prompt rows stay pure noise
    for s in range(n_seq):
        feats[starts[s]:ends[s]] += 3.0 * (2 * labels[s] - 1) * u
    proj = torch.nn.Parameter(torch.eye(h, device=device) + 0.1 * torch.randn(h, h, device=device))
    weight = torch.nn.Parameter(0.1 * torch.randn(h, device=device))
    bias = torch.nn.Parameter(torch.zeros((), device=device))
    opt = torch.optim.Adam([proj, weight, bias], lr=0.05)
    losses = []
    for _ in range(20):
        d = torch.sigmoid(disc_head(feats @ proj, weight, bias, starts, ends, pool=pool, impl=impl))
        loss = F.binary_cross_entropy(d, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        d = torch.sigmoid(disc_head(feats @ proj, weight, bias, starts, ends, pool=pool, impl=impl))
    assert ((d > 0.5).float() == labels).all(), f"accuracy {((d > 0.5).float() == labels).float().mean():.2f}"
    assert losses[-1] < 0.5 * losses[0], losses
