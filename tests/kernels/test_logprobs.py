"""token_logprobs against the eager fp64 reference: both impls, fp32 and bf16, forward and backward."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_close_rule, nudge_off_clip_bounds, poison_empty

import ril_fast.kernels.logprobs as lp_mod
from ril_fast.kernels import token_logprobs
from ril_fast.kernels.logprobs import token_logprobs_reference

IMPLS = ["torch", "triton"]
# (N, V, H): every size the issue names appears at least once; 32003 and 151936 are real-vocab-like.
SHAPES = [(1, 97, 64), (37, 1000, 8), (341, 32003, 96), (37, 32003, 8), (341, 97, 96), (16, 151936, 64)]
# atol, as a fraction of each output's natural scale (below). fp32: 1e-5, because single fp32 logits of
# magnitude ~15 already differ by up to ~6e-6 between two fp32 matmuls of the same operands (tiles vs
# one GEMM), and those errors pass on to every output; the max-error of the eager fp32 reference is
# sometimes luckily small, so 2x it alone flakes. bf16: one bf16 ulp (2^-8), because the interpreter's
# fp32 → bf16 casts truncate where torch rounds (shared/ENVIRONMENT.md).
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2.0**-8)]
NAMES = ["logprobs", "kl", "entropy", "d_hidden", "d_weight"]


def _inputs(N, V, H, dtype, device, temperature=1.0, edges=()):
    """Hidden states and head scaled so logits have a realistic spread (std ~3), targets and a
    reference policy near the true one (so exp(ref - lp) stays moderate, as in training), on ``device``.
    ``edges``: token ids some rows (at random positions) must target; the rest are random."""
    hidden = torch.randn(N, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) * 3 / H**0.5).to(dtype)
    targets = torch.randint(0, V, (N,), device=device)
    assert len(edges) <= N
    targets[torch.randperm(N, device=device)[:len(edges)]] = torch.tensor(edges, dtype=targets.dtype, device=device)
    true = token_logprobs_reference(hidden.double(), weight.double(), targets, temperature=temperature).logprobs
    ref = (true + 0.3 * torch.randn(N, dtype=torch.float64, device=device)).float()
    return hidden, weight, targets, ref


def _run(fn, hidden, weight, targets, ref, grads, temperature, **kw):
    """Outputs and input gradients of fn under the upstream gradients ``grads``, all in fp64."""
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    out = fn(hidden, weight, targets, temperature=temperature, ref_logprobs=ref, return_entropy=True, **kw)
    sum((o.double() * g.double()).sum() for o, g in zip(out, grads)).backward()
    assert hidden.grad.dtype == hidden.dtype and weight.grad.dtype == weight.dtype
    return [t.detach().double() for t in (*out, hidden.grad, weight.grad)]


def _check(impl, N, V, H, dtype, atol_rel, temperature, device, edges=()):
    hidden, weight, targets, ref = _inputs(N, V, H, dtype, device, temperature, edges)
    grads = [torch.randn(N, device=device) for _ in range(3)]
    args = (targets, ref, grads, temperature)
    ref64 = _run(token_logprobs_reference, hidden.double(), weight.double(), args[0], ref.double(), *args[2:])
    same = _run(token_logprobs_reference, hidden, weight, *args)
    out = _run(token_logprobs, hidden, weight, *args, impl=impl)
    # Each output's scale is its largest magnitude, except kl: a function of lp alone, its error is lp's
    # error times |d kl / d lp| = |1 - exp(ref - lp)|.
    lp64 = ref64[0]
    scales = [r.abs().max().item() for r in ref64]
    scales[1] = lp64.abs().max().item() * (1 - torch.exp(ref.double() - lp64)).abs().max().item()
    for name, o, s, r, scale in zip(NAMES, out, same, ref64, scales):
        assert_close_rule(o, s, r, atol_rel * scale, f"{impl} {dtype} N={N} V={V} H={H} {name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,atol_rel", DTYPES)
@pytest.mark.parametrize("N,V,H", SHAPES)
def test_matches_reference(impl, N, V, H, dtype, atol_rel, monkeypatch, device):
    if impl == "triton":
        poison_empty(monkeypatch)
    _check(impl, N, V, H, dtype, atol_rel, temperature=float(torch.empty(1).uniform_(0.5, 1.5)), device=device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,atol_rel", DTYPES)
@pytest.mark.parametrize("N,V,H", [(37, 1000, 8), (9, 97, 64)])
def test_many_vocab_chunks(impl, N, V, H, dtype, atol_rel, monkeypatch, device):
    """Force vocabulary chunks of ~100 columns (the real budget gives one chunk at test sizes) and,
    for Triton, a forward split over several vocabulary slices: targets land in every chunk, and some exactly
    on the first and last id of each chunk and of each forward slice (a target read by two, or by none, shows)."""
    monkeypatch.setitem(lp_mod._CHUNK_BYTES, device.type, 4 * N * 100)
    monkeypatch.setattr(lp_mod, "_num_sms", lambda device: 8)
    cfg = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, UPCAST=True, DOT_PRECISION="ieee")
    monkeypatch.setattr(lp_mod, "_blocks", lambda h: cfg)
    if impl == "triton":
        poison_empty(monkeypatch)
    step = lp_mod._vocab_chunk(torch.empty(N, H, dtype=dtype, device=device), V)  # the torch path's, and backward's
    assert step == min(V, 100)
    width = lp_mod._vocab_slice(N, V, cfg, device)  # the Triton forward's, several tiles of BLOCK_V each
    assert width % cfg["BLOCK_V"] == 0 and 3 <= -(-V // width) <= 8 and width not in (step, V)
    edges = sorted({v for size in (step, width) for v0 in range(0, V, size) for v in (v0, min(v0 + size, V) - 1)})
    _check(impl, N, V, H, dtype, atol_rel, temperature=0.8, device=device, edges=edges)


@pytest.mark.parametrize("impl", IMPLS)
def test_optional_outputs_and_partial_grads(impl, device):
    """No ref and no entropy: those outputs are None; only hidden needs a gradient (a frozen head)."""
    N, V, H = 37, 1000, 64
    hidden, weight, targets, _ = _inputs(N, V, H, torch.float32, device)
    h = hidden.clone().requires_grad_()
    out = token_logprobs(h, weight, targets, impl=impl)
    assert out.kl is None and out.entropy is None and out.logprobs.dtype == torch.float32
    g = torch.randn(N, device=device)
    (out.logprobs * g).sum().backward()
    h64 = hidden.double().requires_grad_()
    (token_logprobs_reference(h64, weight.double(), targets).logprobs * g.double()).sum().backward()
    assert torch.allclose(h.grad.double(), h64.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_unused_kl_gives_finite_gradients(impl, device):
    """ref_logprobs given but only the log-probs feed the loss (kl and entropy unused), with one row's target so
    unlikely that ref − lp > 88.7: exp(ref − lp) overflows fp32 and kl is inf there, but the gradients must stay
    finite and equal the reference's. (Autograd used to hand the backward zeros for kl, and 0 · inf is NaN in
    that row of d hidden and in every row of d weight.)"""
    N, V, H = 5, 97, 16
    weight = torch.randn(V, H, device=device) / H**0.5
    hidden = torch.randn(N, H, device=device)
    targets = torch.randint(0, V, (N,), device=device)
    w0 = weight[targets[0]]
    hidden[0] = -120 * w0 / w0.dot(w0)  # the target's logit is -120, the others ~N(0, 30²)
    ref = torch.zeros(N, device=device)
    g = torch.randn(N, device=device, dtype=torch.float64)

    def grads(fn, hidden, weight, **kw):  # only the log-probs feed the loss: kl and entropy go unused
        hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fn(hidden, weight, targets, ref_logprobs=ref.to(hidden.dtype), return_entropy=True, **kw)
        (out.logprobs.double() * g).sum().backward()
        return out.logprobs.detach().double(), out.kl.detach(), hidden.grad.double(), weight.grad.double()

    lp64, *_, dh64, dw64 = grads(token_logprobs_reference, hidden.double(), weight.double())
    assert lp64[0] < -89, "the test needs ref − lp past fp32's exp overflow in row 0"
    _, _, dh_same, dw_same = grads(token_logprobs_reference, hidden, weight)
    _, kl, dh, dw = grads(token_logprobs, hidden, weight, impl=impl)
    assert torch.isinf(kl[0])
    for name, o, s, r in (("d_hidden", dh, dh_same, dh64), ("d_weight", dw, dw_same, dw64)):
        assert_close_rule(o, s, r, 1e-5 * r.abs().max().item(), f"{impl} {name}")


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_fp64_inputs_are_computed_in_fp64(impl, monkeypatch, device):
    """fp64 inputs (the tests' fp64 model oracle) are computed in fp64 throughout: log-probs, kl, entropy and
    both gradients equal the fp64 eager reference to ~1e-12 of their scale (fp32 accumulators would leave
    ~1e-7), over several vocabulary chunks. "auto" takes the torch path for them, on a GPU too; "triton",
    whose kernels accumulate in fp32, refuses them."""
    N, V, H = 37, 1000, 64
    monkeypatch.setitem(lp_mod._CHUNK_BYTES, device.type, 8 * N * 300)  # 4 chunks of ≤ 300 columns
    hidden, weight, targets, ref = _inputs(N, V, H, torch.float64, device, 0.8)
    grads = [torch.randn(N, device=device, dtype=torch.float64) for _ in range(3)]
    ref64 = _run(token_logprobs_reference, hidden, weight, targets, ref.double(), grads, 0.8)
    out = _run(token_logprobs, hidden, weight, targets, ref.double(), grads, 0.8, impl=impl)
    for name, o, r in zip(NAMES, out, ref64):
        err, scale = (o - r).abs().max().item(), r.abs().max().item()
        assert err <= 1e-12 * scale, f"{impl} fp64 {name}: error {err:.1e} of a scale {scale:.1e}"
    with torch.no_grad():
        got = token_logprobs(hidden, weight, targets, ref_logprobs=ref, return_entropy=True, impl=impl)
    assert [t.dtype for t in got] == [torch.float64] * 3
    with pytest.raises(ValueError, match="float64"):
        token_logprobs(hidden, weight, targets, impl="triton")


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl, monkeypatch, device):
    """A transposed hidden (column stride N), a column-sliced weight (column stride 2) and strided targets and
    ref give what their contiguous copies give (the kernels read rows with unit column stride)."""
    if impl == "triton":
        poison_empty(monkeypatch)
    N, V, H = 37, 1000, 64
    hidden, weight, targets, ref = _inputs(N, V, H, torch.float32, device)
    transposed = lambda x: x.T.contiguous().T  # noqa: E731  same values, column-major
    spread = lambda x: torch.stack([x, x], -1).flatten(-2)[..., ::2]  # noqa: E731  same values, column stride 2

    def strided(h, w, t, **kw):
        h, w, t, kw["ref_logprobs"] = transposed(h), spread(w), spread(t), spread(kw["ref_logprobs"])
        assert h.stride() == (1, N) and w.stride() == (2 * H, 2) and t.stride() == kw["ref_logprobs"].stride() == (2,)
        return token_logprobs(h, w, t, **kw)

    grads = [torch.randn(N, device=device) for _ in range(3)]
    ref64 = _run(token_logprobs_reference, hidden.double(), weight.double(), targets, ref.double(), grads, 0.9)
    contiguous = _run(token_logprobs, hidden, weight, targets, ref, grads, 0.9, impl=impl)
    out = _run(strided, hidden, weight, targets, ref, grads, 0.9, impl=impl)
    for name, o, c, r in zip(NAMES, out, contiguous, ref64):
        assert_close_rule(o, c, r, 1e-5 * r.abs().max().item(), f"{impl} non-contiguous {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_inputs_and_empty(impl, device):
    """Under no_grad nothing is saved for backward; an empty batch returns empty outputs."""
    hidden, weight, targets, ref = _inputs(5, 97, 16, torch.float32, device)
    with torch.no_grad():
        out = token_logprobs(hidden, weight, targets, ref_logprobs=ref, impl=impl)
    assert out.logprobs.grad_fn is None and out.kl.shape == (5,)
    assert (out.kl >= -1e-6).all(), "k3 is non-negative"
    empty = token_logprobs(hidden[:0], weight, targets[:0], return_entropy=True, impl=impl)
    assert empty.logprobs.shape == (0,) and empty.entropy.shape == (0,) and empty.kl is None


def test_bad_input_errors():
    hidden, weight, targets, ref = _inputs(4, 97, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="targets must lie in"):
        token_logprobs(hidden, weight, torch.tensor([0, 1, 97, 2]))
    with pytest.raises(ValueError, match="share a dtype"):
        token_logprobs(hidden.bfloat16(), weight, targets)
    with pytest.raises(ValueError, match="weight"):
        token_logprobs(hidden, weight[:, :8], targets)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="impl"):
        token_logprobs(hidden, weight, targets, impl="cuda")


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import torch
    from ril_fast.kernels import token_logprobs

    def kib(field):  # from /proc/self/status: VmRSS is the resident size, VmHWM its peak for this process
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))

    N, H, V = 8192, 256, 151936
    hidden = torch.randn(N, H, requires_grad=True)
    weight = (torch.randn(V, H) / H**0.5).requires_grad_()
    targets = torch.randint(0, V, (N,))
    grad = torch.randn(N)
    try:  # "5" resets VmHWM to the current resident size (Linux >= 4.0)
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pass  # then the peak includes the imports: the check only gets stricter
    before = kib("VmRSS")
    (token_logprobs(hidden, weight, targets, impl="torch").logprobs * grad).sum().backward()
    peak = kib("VmHWM")  # before the check below, whose temporaries are the test's, not the kernel's
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    print((peak - before) * 1024, N * V * 4)
    """
)


_FAR_ROWS = """
import sys, torch
from ril_fast.kernels import logprobs
V, H, S = 2304, 16, 1 << 20  # weight rows S elements apart: rows from 2048 on start past 2^31
N, S_H = 9, 256 * S  # hidden rows S_H apart in the same store (columns H..2H of every 256th): row 8 past 2^31
try:  # 9 GiB of address space; only the touched rows take memory
    store = torch.empty(V * S)
except RuntimeError:
    sys.exit(3)
weight = store.as_strided((V, H), (S, 1))  # the launchers take a row stride; token_logprobs passes its own
hidden = store.as_strided((N, H), (S_H, 1), H)
assert hidden.storage_offset() + (N - 1) * S_H >= 2**31 and (N - 1) * S_H < V * S
dense, dense_h = torch.randn(V, H) * 0.5, torch.randn(N, H)
weight.copy_(dense)
hidden.copy_(dense_h)
targets = torch.tensor([5, 2047, 2048, V - 1, 0, 1, 2303, 1024, 4])
lse, zt, _ = logprobs._forward_triton(hidden, weight, targets, 1.0, False)
want_lse, want_zt, _ = logprobs._forward_torch(dense_h, dense, targets, 1.0, False)
g = torch.randn(N)
d = logprobs._dlogits_triton(hidden, weight, targets, 0, lse, None, g, None, 1.0)
want_d = logprobs._dlogits_torch(dense_h, dense, targets, 0, want_lse, None, g, None, 1.0)
errors = [(a - b).abs().max().item() for a, b in ((lse, want_lse), (zt, want_zt), (d, want_d))]
print("max errors (lse, target logit, d logits)", errors)
# fp32 both ways (IEEE dots): logits of |z| < ~10 agree to ~1e-6; a wrong row is off by O(1)
sys.exit(0 if max(errors) < 1e-4 else 1)
"""


def test_rows_past_2_31_elements():
    """Row offsets are 64-bit: a head whose V·H (or a packed row whose N·H) passes 2^31 elements is read right
    (with 32-bit offsets the interpreter read elsewhere and crashed; a GPU would read wrong rows silently).
    Here strided weight and hidden tensors share one store, weight rows 2^20 and hidden rows 2^28 elements
    apart, so only a few MiB are touched; run apart, as a wrong address ends the process."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _FAR_ROWS], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode == 3:
        pytest.skip("this machine refuses 9 GiB of address space")
    assert run.returncode == 0, run.stdout + run.stderr


_LATE_FLAG = """
import os, sys, torch
from ril_fast.kernels import token_logprobs
os.environ["TRITON_INTERPRET"] = sys.argv[1]  # after the kernels were decorated
args = torch.randn(3, 16), torch.randn(10, 16), torch.tensor([1, 2, 3])
try:
    out = token_logprobs(*args, impl="triton")
except RuntimeError as e:
    assert "needs the Triton interpreter" in str(e), e
    print("refused")
else:
    torch.testing.assert_close(out.logprobs, token_logprobs(*args, impl="torch").logprobs)
    print("ran")
"""


@pytest.mark.parametrize("at_import,later,expected", [("0", "1", "refused"), ("1", "0", "refused"),
                                                      ("1", "1", "ran")])
def test_interpreter_flag_set_or_unset_after_import(at_import, later, expected):
    """TRITON_INTERPRET counts as ril_fast.kernels is imported, when Triton reads it to decorate the kernels, and
    must stay set (Triton reads it again at a first launch). Changed in between, impl="triton" on CPU tensors is
    refused with resolve_impl's message: switched on late, it used to reach Triton, which failed with "0 active
    drivers". In a fresh process, since the module reads it at import."""
    env = dict(os.environ, TRITON_INTERPRET=at_import, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _LATE_FLAG, later], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.split()[-1] == expected


def test_memory_torch_path():
    """Forward + backward at N=8192, H=256, V=151936 (fp32) raises peak process memory by at most 10%
    of the N·V·4 bytes the eager logits alone would take (the bound includes d weight itself).

    Run in a fresh process and read from its own VmHWM (peak resident size), reset once the inputs exist.
    Not ru_maxrss: Linux carries the parent's peak over fork + exec into it, so under pytest it reports
    the test runner's size.
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    delta, logits_bytes = map(int, out.stdout.split())
    print(f"peak rise {delta / 2**20:.0f} MiB = {delta / logits_bytes:.1%} of the eager logits")
    assert delta <= 0.10 * logits_bytes


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_into_loss_matches_liger(impl, device):
    """Outside oracle for the whole policy-loss path: hidden states → token_logprobs → dr_grpo_loss equals
    Liger's LigerFusedLinearGRPOLoss(loss_type="dr_grpo") (= TRL's formula), loss and both gradients."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    from ril_fast.kernels import dr_grpo_loss

    B, T, H, V, L_max = 3, 11, 32, 1000, 16
    hidden = torch.randn(B, T, H, device=device)
    weight = torch.randn(V, H, device=device) * 3 / H**0.5
    ids = torch.randint(0, V, (B, T), device=device)
    attn = (torch.arange(T, device=device)[None, :] < torch.randint(1, T + 1, (B, 1), device=device)).long()
    adv = torch.randn(B, device=device)
    temperature = 0.9
    with torch.no_grad():
        lp0 = token_logprobs_reference(hidden.reshape(-1, H), weight, ids.reshape(-1),
                                       temperature=temperature).logprobs.reshape(B, T)
    # Liger's and our defaults clip the ratio to [0.8, 1.2]
    old = nudge_off_clip_bounds(lp0, lp0 + 0.1 * torch.randn_like(lp0), 0.2, 0.2)
    ref = lp0 + 0.1 * torch.randn_like(lp0)
    liger = LigerFusedLinearGRPOLoss(beta=0.05, use_ref_model=True, loss_type="dr_grpo", max_completion_length=L_max,
                                     compiled=False, temperature=temperature)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = liger(h1, w1, ids, attn, adv, ref_per_token_logps=ref, old_per_token_logps=old)[0]
    expected.backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp = token_logprobs(h2.reshape(-1, H), w2, ids.reshape(-1), temperature=temperature, impl=impl).logprobs
    loss, _ = dr_grpo_loss(lp, adv[:, None].expand(B, T).reshape(-1), attn.reshape(-1).bool(),
                           old_logprobs=old.reshape(-1), ref_logprobs=ref.reshape(-1), beta=0.05,
                           normalizer=B * L_max, impl=impl)
    loss.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-5 * h1.grad.abs().max().item())
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-4, atol=1e-5 * w1.grad.abs().max().item())


def test_package_never_importable_as_kernels(tmp_path):
    """From the repository root the folder kernels/ is on sys.path as a top-level `kernels`, the name of
    Hugging Face's package, which transformers imports to probe it. Under that name ours must export
    nothing and have no version, so transformers reads "not available"."""
    root = lp_mod.__file__.rsplit("/kernels/", 1)[0]
    code = ("import kernels, transformers.utils.import_utils as iu; "
            "assert not hasattr(kernels, 'token_logprobs') and not hasattr(kernels, '__version__'); "
            "assert not iu.is_kernels_available(); print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}  # which would keep cwd off sys.path
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
