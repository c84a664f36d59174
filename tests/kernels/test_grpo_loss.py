"""Dr.GRPO loss (kernels/grpo_loss.py): Triton and torch paths against an fp64 reference, a hand-computed case,
and Liger's LigerFusedLinearGRPOLoss(loss_type="dr_grpo") as an outside oracle."""

import importlib
import math

import pytest
import torch
from helpers import assert_close_rule, nudge_off_clip_bounds, poison_empty

from ril_fast.kernels.grpo_loss import GRPOStats, dr_grpo_loss, dr_grpo_loss_ref

IMPLS = ["torch", "triton"]
L_MAX = 16  # generation budget of the synthetic batches: tokens are laid out as ceil(N / L_MAX) rows of L_MAX

# Tolerance: assert_close_rule's atol, as a multiple of the quantity's magnitude scale; 1e-6 is ~8 fp32 ulps.
# The scale is the sum (for the loss and the stats) or the largest per-token value (for the gradient) of the
# absolute operands: that bounds what any fp32 summation order can lose (the kernel sums per block, then over
# blocks; torch sums in its own order) and what one ulp of a different exp() costs before cancellation.
ATOL_REL = 1e-6

# (name, with old_logprobs, with ref_logprobs, beta, eps_low, eps_high, normalizer as tensor, mask dtype)
CASES = [
    ("on_policy", False, False, 0.0, 0.2, 0.2, False, torch.bool),
    ("off_policy_asym", True, False, 0.0, 0.2, 0.28, True, torch.float32),
    ("off_policy_kl", True, True, 0.04, 0.1, 0.3, False, torch.float32),
    ("on_policy_kl", False, True, 0.1, 0.2, 0.2, True, torch.bool),
    ("kl_stat_beta0", True, True, 0.0, 0.25, 0.15, False, torch.bool),
]


def _make_inputs(n, with_old, with_ref, eps_low, eps_high, mask_dtype, device):
    lp = -3 * torch.rand(n, device=device)  # log-probs in (-3, 0]
    adv = torch.randn(n, device=device)
    mask = torch.rand(n, device=device) < 0.8
    if n >= 2 * L_MAX:  # one whole response of padding, and a padded segment straddling rows
        row = int(torch.randint(n // L_MAX, ()))
        mask[row * L_MAX : (row + 1) * L_MAX] = False
        start = int(torch.randint(n - n // 4, ()))
        mask[start : start + n // 4] = False
    # std 0.3 in log space puts ~half the ratios outside [0.8, 1.2]: both branches of the min are hit
    old = nudge_off_clip_bounds(lp, lp + 0.3 * torch.randn(n, device=device), eps_low, eps_high) if with_old else None
    ref = lp + 0.3 * torch.randn(n, device=device) if with_ref else None
    return lp, adv, mask.to(mask_dtype), old, ref


def _run(fn, lp, adv, mask, old, ref, g, dtype, **kw):
    """Loss, stats and d(loss * g)/d logprobs with every tensor input cast to ``dtype``."""
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    lp = lp.detach().to(dtype).clone().requires_grad_()
    m = mask if mask.dtype == torch.bool else mask.to(dtype)
    loss, *stats = fn(lp, cast(adv), m, cast(old), cast(ref), **kw)
    (loss * g.to(dtype)).backward()
    return loss.detach(), [s.detach() for s in stats], lp.grad


def _call(impl):
    def fn(lp, adv, mask, old, ref, **kw):
        loss, stats = dr_grpo_loss(lp, adv, mask, old_logprobs=old, ref_logprobs=ref, impl=impl, **kw)
        assert isinstance(stats, GRPOStats)
        for s in (loss, *stats):
            assert s.dim() == 0 and s.dtype == torch.float32
        assert not any(s.requires_grad for s in stats)
        return (loss, *stats)

    return fn


def _ref(lp, adv, mask, old, ref, **kw):
    return dr_grpo_loss_ref(lp, adv, mask, old, ref, upcast=False, **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [1, 37, 341, 4099, 12301])  # 12,301: 4 blocks of the interpreter's 4,096
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_fp64_reference(impl, n, case, device, monkeypatch):
    _, with_old, with_ref, beta, eps_low, eps_high, norm_as_tensor, mask_dtype = case
    lp, adv, mask, old, ref = _make_inputs(n, with_old, with_ref, eps_low, eps_high, mask_dtype, device)
    normalizer = math.ceil(n / L_MAX) * L_MAX
    if norm_as_tensor:
        normalizer = torch.tensor(float(normalizer), device=device)
    kw = dict(beta=beta, eps_low=eps_low, eps_high=eps_high, normalizer=normalizer)
    g = torch.randn((), device=device)  # random upstream gradient

    ref32 = _run(_ref, lp, adv, mask, old, ref, g, torch.float32, **kw)
    ref64 = _run(_ref, lp, adv, mask, old, ref, g, torch.float64, **kw)
    if impl == "triton":
        poison_empty(monkeypatch)
    out = _run(_call(impl), lp, adv, mask, old, ref, g, torch.float32, **kw)

    # magnitude scales for the atol (see ATOL_REL), from the fp64 inputs. k3 = exp(d) - d - 1 cancels (it is
    # ~d^2/2 for small d), so its fp32 error is relative to the operands exp(d) + |d| + 1, not to k3 itself.
    lp64, m64, adv64 = lp.double(), mask.double(), adv.double()
    rho = torch.exp(lp64 - old.double()) if with_old else torch.ones_like(lp64)
    k3_ops = torch.zeros_like(lp64)
    if with_ref:
        d = ref.double() - lp64
        k3_ops = torch.exp(d) + d.abs() + 1
    count, norm = m64.sum().clamp(min=1), float(normalizer)
    token_scale = rho.clamp(min=1) * adv64.abs() + beta * k3_ops
    scales = [(m64 * token_scale).sum() / norm, (m64 * k3_ops).sum() / count, 1.0, (m64 * rho).sum() / count]
    names = ["loss", "kl", "clip_fraction", "ratio"]
    for o, r32, r64, s, name in zip([out[0], *out[1]], [ref32[0], *ref32[1]], [ref64[0], *ref64[1]], scales, names):
        assert_close_rule(o, r32, r64, ATOL_REL * float(s), f"{impl} {name}")
    grad_scale = abs(g.item()) / norm * (m64 * token_scale).max().item() if n else 0.0
    assert_close_rule(out[2], ref32[2], ref64[2], ATOL_REL * grad_scale, f"{impl} d loss/d logprobs")
    if not with_ref:
        assert out[1][0].item() == 0.0
    if with_old:  # the inputs really did exercise the clipped branch of the min
        assert ((rho < 1 - eps_low) | (rho > 1 + eps_high)).any() or n < 100


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed(impl, device, monkeypatch):
    """Six tokens with numbers worked out by hand (eps 0.2, beta 0.5, normalizer 4):

    t | rho | A  | mask | ref-lp | policy term           | k3           | d term/d lp | d k3/d lp
    0 | 1.5 | +1 |  1   |  ln 2  | min(1.5, 1.2)  = 1.2  | 1 - ln 2     | 0 (clipped) | 1 - 2   = -1
    1 | 0.5 | +2 |  1   |  0     | min(1.0, 1.6)  = 1.0  | 0            | rho A = 1   | 0
    2 | 0.5 | -1 |  1   | -ln 2  | min(-.5, -.8)  = -0.8 | ln 2 - 1/2   | 0 (clipped) | 1 - 1/2 = 1/2
    3 | 2.0 | +3 |  0   |  0     | (masked out)
    4 | 1.5 |  0 |  1   |  0     | min(0, 0)      = 0    | 0            | rho A = 0   | 0
    5 | 0.5 |  0 |  1   |  0     | min(0, 0)      = 0    | 0            | rho A = 0   | 0

    sum of terms = 1.2 + 1.0 - 0.8 - 0.5 (1 - ln 2 + ln 2 - 1/2) = 1.15, so loss = -1.15 / 4 = -0.2875;
    grad_t = -(d term - beta d k3) / 4 = [-0.125, -0.25, 0.0625, 0, 0, 0]; kl = (1/2) / 5; clip = 2/5;
    ratio = 4.5 / 5. Tokens 4 and 5 (A = 0, as in a dead group) have ratios outside [0.8, 1.2] but are not clipped:
    TRL's clip ratio counts a token only where the clipped side of the min is strictly smaller, which needs A != 0.
    """
    if impl == "triton":
        poison_empty(monkeypatch)
    f = dict(device=device, dtype=torch.float32)
    lp = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5, -0.25], **f, requires_grad=True)
    old = lp.detach() - torch.log(torch.tensor([1.5, 0.5, 0.5, 2.0, 1.5, 0.5], **f))
    ref = lp.detach() + torch.tensor([math.log(2), 0.0, -math.log(2), 0.0, 0.0, 0.0], **f)
    adv = torch.tensor([1.0, 2.0, -1.0, 3.0, 0.0, 0.0], **f)
    mask = torch.tensor([True, True, True, False, True, True], device=device)
    loss, stats = dr_grpo_loss(lp, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.5, normalizer=4, impl=impl)
    loss.backward()
    close = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.item(), -0.2875, **close)
    torch.testing.assert_close(lp.grad.tolist(), [-0.125, -0.25, 0.0625, 0.0, 0.0, 0.0], **close)
    torch.testing.assert_close([s.item() for s in stats], [0.5 / 5, 2 / 5, 4.5 / 5], **close)

    # On-policy (old = None): rho = 1 in value but d rho / d lp = 1, so the gradient is -A / normalizer.
    lp = torch.tensor([-0.7, -1.3], **f, requires_grad=True)
    loss, stats = dr_grpo_loss(lp, torch.tensor([2.0, -3.0], **f), torch.ones(2, **f), normalizer=2, impl=impl)
    loss.backward()
    assert loss.item() == 0.5 and lp.grad.tolist() == [-1.0, 1.5]
    assert [s.item() for s in stats] == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("impl", IMPLS)
def test_weighted_mask_statistics_are_weighted_means(impl, device, monkeypatch):
    """A float mask weighs each token: the loss sums weight x term, the statistics are weighted means (also where
    the weights add up to less than 1), computed here in fp64 from the formulas."""
    if impl == "triton":
        poison_empty(monkeypatch)
    n = 53
    lp = (-3 * torch.rand(n, device=device, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(n, device=device, dtype=torch.float64)
    old = nudge_off_clip_bounds(lp.detach(), lp.detach() + 0.3 * torch.randn_like(adv), 0.2, 0.2)
    ref = lp.detach() + 0.3 * torch.randn_like(adv)
    for total in (7.0, 0.3):  # the weights' sum
        w = torch.rand(n, device=device, dtype=torch.float64) * (torch.rand(n, device=device) < 0.7)
        w = w * total / w.sum()
        rho = torch.exp(lp.detach() - old)
        k3 = torch.exp(ref - lp.detach()) - (ref - lp.detach()) - 1
        term = torch.minimum(rho * adv, rho.clamp(0.8, 1.2) * adv) - 0.1 * k3
        clipped = (((rho < 0.8) & (adv < 0)) | ((rho > 1.2) & (adv > 0))).double()
        expected = [-(w * term).sum() / 5.0, (w * k3).sum() / total, (w * clipped).sum() / total,
                    (w * rho).sum() / total]
        loss, stats = dr_grpo_loss(lp.float(), adv.float(), w.float(), old_logprobs=old.float(),
                                   ref_logprobs=ref.float(), beta=0.1, normalizer=5.0, impl=impl)
        torch.testing.assert_close([loss.item(), *(x.item() for x in stats)], [e.item() for e in expected],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_on_the_clip_bounds_the_unclipped_branch_counts(impl, device, monkeypatch):
    """With eps_low = eps_high = 0, on-policy every ratio sits exactly on both bounds: no token is clipped, the
    gradient is -A / normalizer (a strict comparison at the bound; '<=' would zero every gradient)."""
    if impl == "triton":
        poison_empty(monkeypatch)
    lp = (-3 * torch.rand(29, device=device)).requires_grad_()
    adv, mask = torch.randn(29, device=device), torch.ones(29, device=device)
    for old in (None, lp.detach()):
        lp.grad = None
        loss, stats = dr_grpo_loss(lp, adv, mask, old_logprobs=old, eps_low=0.0, eps_high=0.0, normalizer=4.0,
                                   impl=impl)
        loss.backward()
        torch.testing.assert_close(lp.grad, -adv / 4.0)
        assert stats.clip_fraction.item() == 0.0 and stats.ratio.item() == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy: exp, and
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # inf x 0 before its where
@pytest.mark.parametrize("impl", IMPLS)
def test_a_masked_out_token_counts_for_nothing_whatever_its_values(impl, device, monkeypatch):
    """A masked-out token whose ratio or k3 would overflow (log-ratios of 100 nats) changes no loss, statistic or
    gradient: exp(100) x 0 would be NaN."""
    if impl == "triton":
        poison_empty(monkeypatch)
    n = 41
    lp0 = -3 * torch.rand(n, device=device)
    adv, mask = torch.randn(n, device=device), torch.rand(n, device=device) < 0.8
    old, ref = lp0 + 0.3 * torch.randn(n, device=device), lp0 + 0.3 * torch.randn(n, device=device)
    out = int(torch.nonzero(~mask)[0]) if (~mask).any() else 0
    mask[out] = False
    results = []
    for extreme in (False, True):
        o, r = old.clone(), ref.clone()
        if extreme:
            o[out], r[out] = lp0[out] - 100.0, lp0[out] + 100.0
        lp = lp0.clone().requires_grad_()
        loss, stats = dr_grpo_loss(lp, adv, mask, old_logprobs=o, ref_logprobs=r, beta=0.1, normalizer=8.0,
                                   impl=impl)
        loss.backward()
        results.append([loss.detach(), *stats, lp.grad])
    for a, b in zip(*results):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [0, 1, 341])
def test_nothing_to_train_on(impl, n, device, monkeypatch):
    """N = 0 or every token masked: loss, stats and gradient are exactly 0 (means over no tokens are 0)."""
    if impl == "triton":
        poison_empty(monkeypatch)
    lp = (-3 * torch.rand(n, device=device)).requires_grad_()
    noise = lambda: lp.detach() + 0.3 * torch.randn(n, device=device)  # noqa: E731
    loss, stats = dr_grpo_loss(
        lp, torch.randn(n, device=device), torch.zeros(n, dtype=torch.bool, device=device),
        old_logprobs=noise(), ref_logprobs=noise(), beta=0.1, normalizer=torch.tensor(16.0, device=device), impl=impl,
    )  # fmt: skip
    (loss * torch.randn((), device=device)).backward()
    assert loss.item() == 0.0 and all(s.item() == 0.0 for s in stats)
    assert lp.grad.shape == (n,) and (lp.grad == 0).all()


def test_triton_is_deterministic(device, monkeypatch):
    """Bitwise reproducible: each program writes its block's five sums into its own column of the (5, n_blocks)
    partials buffer (no atomics, which would add in whatever order the GPU runs the programs), and torch adds the
    columns up afterwards. The interpreter runs programs in order, so two runs would agree even with atomics;
    the buffer is checked instead: NaN-filled before the launch, every column holds exactly its block's sums
    (computed here in fp64) and the results are the sums of those columns. On a GPU, two runs are also
    compared bitwise."""
    module = importlib.import_module("ril_fast.kernels.grpo_loss")
    monkeypatch.setattr(module, "_block", lambda: 64)  # 65 blocks of 4,099 tokens: 64 column boundaries
    real_kernel, launches = module._dr_grpo_fwd_kernel, []

    class Recorded:  # the kernel, with each launch's grid and partials buffer kept
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, args[5]))
                return real_kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, "_dr_grpo_fwd_kernel", Recorded())
    poison_empty(monkeypatch)
    n, block, beta, normalizer = 4099, 64, 0.1, 4112
    lp, adv, mask, old, ref = _make_inputs(n, True, True, 0.2, 0.2, torch.bool, device)
    results = []
    for _ in range(2):
        x = lp.clone().requires_grad_()
        loss, stats = dr_grpo_loss(x, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=beta, normalizer=normalizer,
                                   impl="triton")  # fmt: skip
        loss.backward()
        results.append(torch.stack([loss.detach(), *stats]).tolist() + x.grad.tolist())
    assert results[0] == results[1]

    n_blocks = math.ceil(n / block)
    (grid, partials), _ = launches
    assert grid == (n_blocks,) and partials.shape == (5, n_blocks)
    columns = []  # each block's [loss numerator, mask count, kl sum, clip count, ratio sum], fp64
    for b in range(n_blocks):
        cut = slice(b * block, (b + 1) * block)  # normalizer -1: the "loss" is the block's numerator Σ mask·term
        term, kl, clip, ratio = dr_grpo_loss_ref(lp[cut].double(), adv[cut].double(), mask[cut], old[cut].double(),
                                                 ref[cut].double(), beta, 0.2, 0.2, -1.0)  # fmt: skip
        count = mask[cut].sum().double()
        columns.append(torch.stack([term, count, kl * count, clip * count, ratio * count]))
    expected = torch.stack(columns, 1)
    assert torch.isfinite(partials).all(), "a column of the partials was never written"
    torch.testing.assert_close(partials.double(), expected, rtol=1e-5, atol=1e-5)
    sums = partials.sum(dim=1)
    denom = sums[1].clamp(min=1)
    assert results[0][:4] == [-(sums[0] / normalizer).item(), *(sums[2:] / denom).tolist()]


def test_rejects_bad_inputs():
    lp, adv, mask = torch.zeros(8), torch.zeros(8), torch.ones(8, dtype=torch.bool)
    bad = [
        dict(logprobs=torch.zeros(2, 4), advantages=torch.zeros(2, 4), mask=torch.ones(2, 4)),  # not (N,)
        dict(advantages=torch.zeros(7)),
        dict(mask=torch.ones(9)),
        dict(old_logprobs=torch.zeros(8, 1)),
        dict(ref_logprobs=torch.zeros(8, dtype=torch.long)),
        dict(normalizer=torch.tensor([16.0])),  # a tensor normalizer must be 0-dim
        dict(normalizer=0),
        dict(eps_low=-0.1),
    ]
    for override in bad:
        args = dict(logprobs=lp, advantages=adv, mask=mask, normalizer=16) | override
        with pytest.raises(ValueError):
            dr_grpo_loss(args.pop("logprobs"), args.pop("advantages"), args.pop("mask"), **args)
    with pytest.raises(ValueError):
        dr_grpo_loss(lp, adv, mask, normalizer=16, impl="cuda")


# ---------------------------------------------------------------------------------------------------------------
# Outside oracle: Liger's fused linear + Dr.GRPO loss (equal to TRL's dr_grpo loss, see ENVIRONMENT.md)
# ---------------------------------------------------------------------------------------------------------------


def _eager_logprobs(hidden, weight, ids):
    """log softmax(hidden @ weight^T)[ids], (B, T) fp32: plain torch, so the oracle test depends on no kernel."""
    return torch.log_softmax((hidden @ weight.t()).float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "with_old,with_ref,beta,eps_low,eps_high",
    [(True, False, 0.0, 0.2, 0.2), (True, True, 0.1, 0.2, 0.28), (False, True, 0.04, 0.2, 0.2)],
    ids=["off_policy", "off_policy_kl_asym", "on_policy_kl"],
)
def test_matches_liger(impl, with_old, with_ref, beta, eps_low, eps_high, device):
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    B, T, H, V, L = 4, 7, 16, 50, 10  # L = max_completion_length > T, so the normaliser is not the token count
    hidden = torch.randn(B, T, H, device=device)
    weight = 0.5 * torch.randn(V, H, device=device)
    ids = torch.randint(V, (B, T), device=device)
    attn = torch.ones(B, T, dtype=torch.long, device=device)
    attn[1, 4:] = 0  # padded tail
    attn[2] = 0  # a response with no tokens at all
    attn[3, int(torch.randint(1, T, ())) :] = 0
    adv = torch.randn(B, device=device)
    with torch.no_grad():
        lp0 = _eager_logprobs(hidden, weight, ids)
    old = nudge_off_clip_bounds(lp0, lp0 + 0.3 * torch.randn_like(lp0), eps_low, eps_high) if with_old else None
    ref = lp0 + 0.3 * torch.randn_like(lp0) if with_ref else None
    g = torch.randn((), device=device)

    liger_loss_fn = chunked.LigerFusedLinearGRPOLoss(
        beta=beta, compiled=False, use_ref_model=with_ref, epsilon_low=eps_low, epsilon_high=eps_high,
        loss_type="dr_grpo", max_completion_length=L,
    )  # fmt: skip
    h_liger = hidden.clone().requires_grad_()
    liger_loss, liger_metrics = liger_loss_fn(h_liger, weight, ids, attn, adv, ref_per_token_logps=ref,
                                              old_per_token_logps=old)  # fmt: skip
    (liger_loss * g).backward()

    h_ours = hidden.clone().requires_grad_()
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    loss, stats = dr_grpo_loss(
        flat(_eager_logprobs(h_ours, weight, ids)), flat(adv[:, None].expand(B, T)), flat(attn.bool()),
        old_logprobs=flat(old), ref_logprobs=flat(ref), beta=beta, eps_low=eps_low, eps_high=eps_high,
        normalizer=B * L, impl=impl,
    )  # fmt: skip
    (loss * g).backward()

    # Both sides are fp32; the log-probs differ by rounding only (eager log_softmax vs Liger's online one).
    torch.testing.assert_close(loss, liger_loss.detach(), rtol=1e-5, atol=1e-7)
    grad_scale = h_liger.grad.abs().max().item()
    torch.testing.assert_close(h_ours.grad, h_liger.grad, rtol=1e-4, atol=1e-5 * grad_scale)
    assert grad_scale > 0
    # Liger's metrics: [mean k3 KL (only when beta != 0), clip ratio], both means over masked tokens.
    torch.testing.assert_close(stats.clip_fraction, liger_metrics[-1].float(), rtol=1e-6, atol=1e-7)
    if beta != 0.0:
        torch.testing.assert_close(stats.kl, liger_metrics[0].float(), rtol=1e-5, atol=1e-7)
