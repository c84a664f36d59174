"""Models: packed log-probs and discriminator logits equal one-sample-at-a-time ones, values and gradients.

Tolerance: fp32 on CPU, packed and separate runs do the same arithmetic per sample up to summation
order in the matmuls, so they agree to ~1e-6; 1e-5 is the issue's bound. A negative control shows the
comparison can fail: packing without position restarts lets samples attend to each other (~1e-1).
"""

import contextlib
import inspect
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ril_fast import attention
from ril_fast.discriminator import Discriminator
from ril_fast.kernels.disc_head import disc_head_torch
from ril_fast.models import (Attn, _check_attention, enable_activation_checkpointing, last_hidden_states,
                             lm_head_weight, load, meta_model, packed_logprobs, recomputing, response_logprobs)
from ril_fast.packing import pack, pad
from ril_fast.processor import UnsupportedModel
from helpers import (assert_close_rule, assert_grads_close_rule, fp64_oracle, max_err, saved_for_backward,
                     vision_rows_seen)
from models_fixtures import (TEXT_FAMILIES, one_thread, random_samples, shared_image_samples,  # noqa: F401
                            text_family, tiny_folder)

ARCHS = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5", "qwen2", "internvl", "internvl3_5")
ATOL = 1e-5
# image counts of the samples packed together: none, one and two images (of random sizes), mixed
MIX = {"qwen2_5_vl": [1, 0, 2, 1, 0], "qwen2_vl": [2, 0, 1, 0], "qwen3_vl": [1, 2, 0, 1], "qwen3_5": [0, 1, 2, 0],
       "qwen2": [0, 0, 0, 0], "internvl": [1, 0, 2], "internvl3_5": [2, 1, 0]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, one_thread):  # noqa: F811
    return {a: tiny_folder(tmp_path_factory, a) for a in ARCHS}


@pytest.fixture(scope="module")
def loaded(folders):
    return {a: load(folders[a], device="cpu") for a in ARCHS}


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _weighted_loss(lps, weights):
    return sum((w * lp).sum() for w, lp in zip(weights, lps))


def _assert_logprobs_close(out, ref_same, ref64, what):
    """fp32 log-probs held to the tolerance rule against the fp64 model, plus 1e-6 of their scale: Qwen3.5's
    recurrence carries one layer's fp32 rounding into log-probs of ~-8 at ~1e-5, at a fixed 1e-5 bound."""
    assert_close_rule(out, ref_same, ref64, atol=1e-6 * (1 + ref64.abs().max().item()), what=what)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_logprobs_match_separate(arch, folders, loaded):
    """``packed=True`` runs one forward over all the samples, ``False`` one per sample. In fp64
    (``helpers.fp64_oracle``), packed log-probs and gradients equal separate ones to 1e-10 of their scale: packing is
    exact. In fp32, log-probs and gradients are held to the tolerance rule against the
    separate fp64 ones (``helpers.assert_grads_close_rule``: packed fp32 within twice the error of separate fp32,
    plus 1e-6 of the scale). A fixed bound does not fit every fp32 gradient: Qwen3.5's ``dt_bias`` / ``A_log``
    and convolution gradients sum many cancelling terms, and two summation orders differ by up to ~2e-5
    relative to the gradient (4 of 25 seeds over 1e-5)."""
    model, proc = loaded[arch]
    model64, _ = load(folders[arch], dtype=torch.float64, device="cpu")
    samples = random_samples(MIX[arch])
    weights = None
    results = []
    for m, packed in ((model, True), (model, False), (model64, False), (model64, True)):
        m.zero_grad(set_to_none=True)
        forwards = []
        hook = m.base_model.register_forward_hook(lambda *_: forwards.append(1))
        with fp64_oracle() if m is model64 else contextlib.nullcontext() as rule_calls:
            lps = response_logprobs(m, proc, samples, packed=packed)
        hook.remove()
        assert len(forwards) == (1 if packed else len(samples)), f"{arch}: {len(forwards)} forwards, packed={packed}"
        assert m is not model64 or bool(rule_calls) == (arch == "qwen3_5")  # Qwen3.5's oracle recurrence ran
        weights = weights or [torch.randn_like(lp) for lp in lps]
        _weighted_loss(lps, [w.to(lps[0].dtype) for w in weights]).backward()
        results.append(([lp.detach() for lp in lps], _grads(m)))
    (lp_p, g_p), (lp_s, g_s), (lp_64, g_64), (lp_64p, g_64p) = results
    lp_64, lp_64p = torch.cat(lp_64), torch.cat(lp_64p)
    err64 = max_err(lp_64p, lp_64)
    assert err64 <= 1e-10 * (1 + lp_64.abs().max().item()), f"{arch}: fp64 packed log-probs off by {err64:.1e}"
    for n, g in g_64.items():
        assert max_err(g_64p[n], g) <= 1e-10 * (1 + g.abs().max().item()), f"{arch}: {n}"
    assert [lp.shape for lp in lp_p] == [lp.shape for lp in lp_s]
    err = max(max_err(a, b) for a, b in zip(lp_p, lp_s))
    print(f"{arch}: packed vs separate log-probs max abs diff {err:.2e}")
    _assert_logprobs_close(torch.cat(lp_p), torch.cat(lp_s), lp_64, what=arch)
    assert g_p.keys() == g_s.keys() == g_64.keys()
    if arch != "qwen2":  # the vision tower is in the graph
        assert any(n.startswith(("model.visual", "model.vision_tower")) for n in g_p)
    assert_grads_close_rule(g_p, g_s, g_64, atol=1e-6, what=arch)


def test_fp64_oracle_runs_the_kernels_in_fp64(tmp_path_factory, one_thread):  # noqa: F811
    """The fp64 model these tests hold fp32 to goes through ``packed_logprobs`` with the default kernels: they
    must compute in fp64 too (token_logprobs' torch path), or the oracle is only fp32-accurate. Log-probs,
    entropies and every parameter's gradient equal the eager full-logits reference's to 1e-12 of their scale
    (an fp32 head left ~1e-7)."""
    model64, proc = load(tiny_folder(tmp_path_factory, "qwen2"), dtype=torch.float64, device="cpu")
    batch = pack([proc.encode(s) for s in random_samples([0, 0, 0])])
    weights, results = None, []
    for kernels in ("auto", "eager"):
        model64.zero_grad(set_to_none=True)
        with fp64_oracle():
            out = packed_logprobs(model64, batch, return_entropy=True, kernels=kernels)
        assert out.logprobs.dtype == out.entropy.dtype == torch.float64
        weights = weights or [torch.randn_like(out.logprobs) for _ in range(2)]
        (weights[0] * out.logprobs + weights[1] * out.entropy).sum().backward()
        results.append(([out.logprobs.detach(), out.entropy.detach()], _grads(model64)))
    (outs, grads), (outs_eager, grads_eager) = results
    assert grads.keys() == grads_eager.keys() and grads
    pairs = [*zip(["logprobs", "entropy"], outs, outs_eager), *((n, grads[n], g) for n, g in grads_eager.items())]
    for name, a, b in pairs:
        assert max_err(a, b) <= 1e-12 * b.abs().max().item(), f"{name}: off by {max_err(a, b):.1e}"


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2"])
def test_negative_control_no_restart_leaks(arch, loaded):
    """Without restarting text positions the samples attend to each other: the check above can fail."""
    model, proc = loaded[arch]
    batch = pack([proc.encode(s) for s in random_samples(MIX[arch][:3])])
    with torch.no_grad():
        good = packed_logprobs(model, batch).logprobs
        T = batch.input_ids.shape[1]
        if batch.position_ids.ndim == 3:
            batch.position_ids[0, 0] = torch.arange(T)
        else:
            batch.position_ids[0] = torch.arange(T)
        bad = packed_logprobs(model, batch).logprobs
    assert max_err(good, bad) > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_against_hf_forward(arch, temperature, loaded):
    """Outside oracle: transformers' own forward of one sample (it builds the mrope positions itself),
    full logits, log_softmax(logits / τ) at the response targets."""
    model, proc = loaded[arch]
    sample = random_samples([MIX[arch][2]])[0]
    enc = proc.encode(sample)
    ours = response_logprobs(model, proc, [sample], temperature=temperature)[0]
    kw = dict(input_ids=enc.input_ids[None], use_cache=False)
    if enc.pixel_values is not None:
        kw["pixel_values"] = enc.pixel_values
    if enc.image_grid_thw is not None:
        kw["image_grid_thw"] = enc.image_grid_thw
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        kw["mm_token_type_ids"] = (enc.input_ids[None] == proc.image_token_id).int()
    with torch.no_grad():
        logits = model(**kw).logits[0].double() / temperature
    rows = torch.arange(enc.prompt_len - 1, enc.length - 1)
    oracle = logits[rows].log_softmax(-1).gather(1, enc.input_ids[rows + 1, None]).squeeze(1)
    assert max_err(ours, oracle) <= ATOL


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen2"])
def test_padded_matches_packed(arch, folders, loaded):
    model, proc = loaded[arch]
    model64, _ = load(folders[arch], dtype=torch.float64, device="cpu")
    enc = [proc.encode(s) for s in random_samples(MIX[arch])]
    with torch.no_grad():
        packed = packed_logprobs(model, pack(enc)).logprobs
        padded = packed_logprobs(model, pad(enc, proc.tokenizer.pad_token_id)).logprobs
        with fp64_oracle():
            ref = packed_logprobs(model64, pack(enc)).logprobs
    _assert_logprobs_close(padded, packed, ref, what=arch)


@pytest.mark.parametrize("batcher", [pack, pad])
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5", "internvl", "internvl3_5"])
def test_shared_images_encoded_once(arch, batcher, folders, loaded, tmp_path):
    """Responses to one prompt share its images: the vision tower sees the distinct images (Qwen-VL's
    patches, InternVL's tiles) only, and log-probs and gradients equal those of every sample encoding its
    own copy of the pixels. Gradients sum the copies in another order, so they are held to the tolerance
    rule against the fp64 model (``helpers.assert_grads_close_rule``): a projector weight's gradient of ~12 summed
    over hundreds of rows differs by ~1e-5 between two fp32 summation orders."""
    model, proc = loaded[arch]
    samples = shared_image_samples(tmp_path, [1, 2, 0, 1], responses=3)
    shared = [proc.encode(s) for s in samples]
    own = [e if e.pixel_values is None else replace(e, pixel_values=e.pixel_values.clone()) for e in shared]
    weights, results = None, []
    with vision_rows_seen(model) as seen:  # patch or tile rows the vision tower is given, per forward
        for encoded in (shared, own):
            batch = batcher(encoded)
            model.zero_grad(set_to_none=True)
            lp = packed_logprobs(model, batch).logprobs
            weights = torch.randn_like(lp) if weights is None else weights
            (weights * lp).sum().backward()
            results.append((lp.detach(), _grads(model), batch))
    (lp_a, g_a, a), (lp_b, g_b, b) = results
    model64, _ = load(folders[arch], dtype=torch.float64, device="cpu")
    with fp64_oracle():
        (weights.double() * packed_logprobs(model64, b).logprobs).sum().backward()
    g_64 = _grads(model64)
    assert a.vision_index is not None and b.vision_index is None
    if not arch.startswith("internvl"):
        assert torch.equal(a.image_grid_thw, b.image_grid_thw) and len(a.vision_grid_thw) == 4  # 1 + 2 + 1 images
    per_prompt = [e.pixel_values.shape[0] for e in shared[:4] if e.pixel_values is not None]
    assert seen == [sum(per_prompt), 3 * sum(per_prompt)]
    print(f"{arch}: shared vs own images: log-probs max abs diff {max_err(lp_a, lp_b):.2e}")
    assert max_err(lp_a, lp_b) <= ATOL
    assert g_a.keys() == g_b.keys() == g_64.keys() and any("visual" in n or "vision_tower" in n for n in g_a)
    assert_grads_close_rule(g_a, g_b, g_64, atol=1e-6, what=arch)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_5", "internvl"])
def test_activation_checkpointing_saves_memory_not_numbers(arch, folders):
    """Inside ``recomputing`` the layers keep their inputs only (the bytes saved for the backward drop by
    more than half even in a 2-layer model) and the log-probs and gradients are those of a plain pass;
    outside it, and after it, nothing is in training mode and nothing is recomputed."""
    model, proc = load(folders[arch], device="cpu")
    batch = pack([proc.encode(s) for s in random_samples([1, 0, 2])])
    weights = None

    def run(context):
        nonlocal weights
        model.zero_grad(set_to_none=True)
        with context, saved_for_backward() as saved:
            lp = packed_logprobs(model, batch).logprobs
        weights = torch.randn_like(lp) if weights is None else weights
        (weights * lp).sum().backward()
        return lp.detach(), _grads(model), sum(saved)

    lp_a, g_a, stored = run(contextlib.nullcontext())
    enable_activation_checkpointing(model)
    lp_b, g_b, kept = run(recomputing(model))
    assert not any(m.training for m in model.modules())
    _, _, outside = run(contextlib.nullcontext())
    print(f"{arch}: bytes saved for the backward: {stored} stored, {kept} recomputed")
    assert kept < stored / 2 and outside == stored
    assert max_err(lp_a, lp_b) <= ATOL and g_a.keys() == g_b.keys()
    for n in g_a:
        assert max_err(g_a[n], g_b[n]) <= ATOL, n


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5"])
def test_patch_embedding_runs_as_a_matmul(arch, loaded):
    """The vision tower's patch Conv3d (stride = kernel: one window per patch) runs as a matmul over the
    flattened patches: the Conv3d's values and weight gradient, its parameter untouched."""
    model, _ = loaded[arch]
    proj = model.base_model.visual.patch_embed.proj
    assert "forward" in proj.__dict__ and isinstance(proj, torch.nn.Conv3d)
    patches = torch.randn(37, proj.in_channels, *proj.kernel_size)
    outs, grads = [], []
    for forward in (proj, lambda x: torch.nn.Conv3d.forward(proj, x).flatten(1)):
        proj.weight.grad = None
        out = forward(patches)
        (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
        outs.append(out.detach())
        grads.append(proj.weight.grad.clone())
    proj.weight.grad = None
    assert outs[0].shape == (37, proj.out_channels)
    assert max_err(outs[0], outs[1]) <= ATOL * (1 + outs[1].abs().max().item())
    assert max_err(grads[0], grads[1]) <= ATOL * (1 + grads[1].abs().max().item())


@pytest.mark.parametrize("attn", [Attn.SDPA, Attn.EAGER])
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen2", "internvl"])
def test_attention_paths_agree(arch, attn, folders, loaded):
    """The default attention (``ril_varlen``, reached through transformers' AttentionInterface; on CPU its
    padded-batch SDPA) equals transformers' SDPA and eager paths, packed and padded; the vision towers
    go through the same attention function. Held to the tolerance rule against transformers' path in fp64
    (``helpers.assert_close_rule``, plus 1e-6 of the log-probs' scale): Qwen3.5's fp32 recurrence carries
    one attention layer's rounding into log-probs of ~-8 at ~1e-5 (a fixed 1e-5 failed a CI seed)."""
    ours, proc = loaded[arch]
    assert ours.config.get_text_config()._attn_implementation == "ril_varlen"
    other, _ = load(folders[arch], attn=attn, device="cpu")
    other64, _ = load(folders[arch], attn=attn, device="cpu", dtype=torch.float64)
    assert other.config._attn_implementation == attn.value
    enc = [proc.encode(s) for s in random_samples(MIX[arch])]
    with torch.no_grad():
        for batch in (pack(enc), pad(enc, proc.tokenizer.pad_token_id)):
            a = packed_logprobs(ours, batch).logprobs
            b = packed_logprobs(other, batch).logprobs
            with fp64_oracle():
                ref = packed_logprobs(other64, batch).logprobs
            _assert_logprobs_close(a, b, ref, what=f"{arch}/{attn.value}")


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5"])
def test_vision_tower_one_attention_call_per_layer(arch, loaded, monkeypatch):
    """The Qwen-VL vision tower calls the attention function once per layer with every window's (Qwen3-VL:
    every image's) boundaries (not once per window), and its output equals the per-window SDPA path."""
    model, proc = loaded[arch]
    visual = model.base_model.visual
    assert visual.config._attn_implementation == attention.VISION_NAME
    calls = []
    real = attention.varlen_attention_forward

    def counting(module, query, *args, **kwargs):
        calls.append(kwargs.get("cu_seq_lens_q"))
        return real(module, query, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, attention.VISION_NAME, counting)
    enc = [proc.encode(s) for s in random_samples([2, 1])]
    batch = pack(enc)
    with torch.no_grad():
        ours = visual(batch.pixel_values, grid_thw=batch.image_grid_thw).pooler_output
        windows = [int(c.numel()) - 1 for c in calls]
        monkeypatch.setattr(visual.config, "_attn_implementation", "sdpa")
        reference = visual(batch.pixel_values, grid_thw=batch.image_grid_thw).pooler_output
    assert len(calls) == len(visual.blocks) and all(c is not None for c in calls)
    if arch in ("qwen3_vl", "qwen3_5"):  # no windows: each image attends to itself
        assert windows == [len(batch.image_grid_thw)] * len(calls)
    else:
        assert max(windows) > len(enc), "the test images must span several windows"
    assert max_err(ours, reference) <= ATOL


_LIGER_SCRIPT = """
import sys, warnings
from ril_fast.models import _apply_liger, load
for lm_head in (True, False):  # the student, and the discriminator's backbone (the base VLM)
    model, _ = load(sys.argv[1], device="cpu", lm_head=lm_head)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # _apply_liger warns instead of raising when Liger cannot patch
        _apply_liger(model, model.config.model_type)
    text = model.base_model.language_model
    print(text.norm._get_name(), text.layers[0].mlp._get_name())  # Liger renames the modules it patches
"""


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5", "internvl", "internvl3_5"])
def test_liger_patches_the_vlms_decoder(arch, folders):
    """Liger's RMSNorm and SwiGLU modules replace the decoder's (as ``load`` does on CUDA). In a fresh
    process: Liger patches transformers' classes for the whole process, and its kernels do not run under
    the Triton interpreter. Their numerics are checked on a GPU (``test_varlen_flash_vs_sdpa_bf16_gpu``
    compares against a CPU model that Liger never touched)."""
    out = subprocess.run([sys.executable, "-c", _LIGER_SCRIPT, str(folders[arch])], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    # Liger has no SwiGLU patch for Qwen3-VL, and gives Qwen3.5 its Qwen3-MoE expert's module
    mlp = {"qwen3_vl": "Qwen3VLTextMLP", "qwen3_5": "LigerQwen3MoeSwiGLUMLP"}.get(arch, "LigerSwiGLUMLP")
    assert out.stdout.split() == ["LigerRMSNorm", mlp] * 2


_GPU_SCRIPT = """
import json, sys, torch
sys.path.insert(0, sys.argv[4])
from models_fixtures import random_samples
from ril_fast.models import Attn, load, response_logprobs
torch.backends.cudnn.allow_tf32 = False  # the vision tower's patch convolution: plain fp32, as on the CPU
torch.manual_seed(int(sys.argv[3]))
samples = random_samples(json.loads(sys.argv[2]))
out = {}
# The CPU model first: on CUDA, load applies Liger, which patches transformers for the whole process.
for name, dtype, attn, device in (("cpu", torch.float32, Attn.SDPA, "cpu"),
                                  ("fp32", torch.float32, Attn.VARLEN, "cuda"),
                                  ("sdpa", torch.bfloat16, Attn.SDPA, "cuda"),
                                  ("varlen", torch.bfloat16, Attn.VARLEN, "cuda")):
    model, proc = load(sys.argv[1], dtype=dtype, attn=attn, device=device)
    with torch.no_grad():
        out[name] = torch.cat(response_logprobs(model, proc, samples)).double().cpu()
print(json.dumps({k: float((v - out["cpu"]).abs().max()) for k, v in out.items() if k != "cpu"}))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen2"])
def test_varlen_flash_vs_sdpa_bf16_gpu(arch, folders):
    """GPU, against the CPU model in fp32 (transformers' SDPA, no Liger): the GPU model in fp32 (ril_varlen,
    Liger's kernels) agrees to fp32 rounding, and the varlen kernel in bf16 is as close as SDPA in bf16.
    In a fresh process, because Liger patches transformers for the whole process."""
    seed = int(torch.randint(1 << 30, ()))
    tests = str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", _GPU_SCRIPT, str(folders[arch]), json.dumps(MIX[arch]), str(seed),
                          tests], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    err = json.loads(out.stdout.strip().splitlines()[-1])
    print(err)
    assert err["fp32"] <= 1e-3, "fp32 on the GPU (Liger, ril_varlen) vs fp32 on the CPU"
    assert err["varlen"] <= 2 * err["sdpa"] + 1e-2


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2"])
def test_a_model_loads_in_eval_mode_with_or_without_its_weights(arch, folders):
    """``load`` hands back a model in eval mode (no dropout in a rollout or a log-prob pass), the empty one a rank
    fills from rank 0's weights too: transformers' ``from_config`` builds it in training mode."""
    for empty in (False, True):
        model, _ = load(folders[arch], device="cpu", empty=empty)
        assert next(model.parameters()).is_meta == empty
        assert not any(m.training for m in model.modules()), (arch, empty)


def test_a_key_error_other_than_the_attention_class_is_raised_as_it_is(folders, monkeypatch):
    """A KeyError naming the attention implementation at build time is a family that keeps its own table of
    attention classes (refused as computing its attention itself); any other KeyError is a fault of its own, raised
    as it is, not reported as that refusal."""
    import ril_fast.models as models

    attn_implementation = Attn("auto").resolve()
    for key, raised in (("rope_theta", KeyError), (attn_implementation, UnsupportedModel)):
        class Failing:
            @staticmethod
            def from_pretrained(*args, key=key, **kwargs):
                raise KeyError(key)

        monkeypatch.setattr(models, "model_class", lambda config, lm_head=True: Failing)
        with pytest.raises(raised) as e:
            load(folders["qwen2"], device="cpu")
        assert (e.value.args == (key,)) if raised is KeyError else "computes its attention itself" in str(e.value)


def test_a_head_that_is_not_a_linear_map_is_refused():
    """An LM head of another module than ``nn.Linear`` (here one doubling the logits, with the output embedding
    as its only weight) is refused: ``packed_logprobs`` would take ``hidden @ Wᵀ`` for its logits."""
    class ScaledHead(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def forward(self, x):
            return 2 * x @ self.weight.T

    model = meta_model(AutoConfig.for_model("qwen2", vocab_size=1000, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4))
    model.lm_head = ScaledHead(model.lm_head.weight)
    with pytest.raises(UnsupportedModel, match=r"^DIR: model type 'qwen2' computes its logits with a ScaledHead, not "
                                               r"a linear output embedding"):
        _check_attention(model, "DIR")


def test_hidden_states_and_head_shapes(loaded):
    model, proc = loaded["qwen2_5_vl"]
    batch = pack([proc.encode(s) for s in random_samples([1, 0])])
    with torch.no_grad():
        hidden = last_hidden_states(model, batch)
    assert hidden.shape == (1, sum(batch.lengths), 64)
    assert lm_head_weight(model).shape == (len(proc.tokenizer), 64)


# ----------------------------------------------------------------------------------------------------
# Discriminator
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,pool", [("qwen2_5_vl", "last"), ("qwen2_5_vl", "mean"), ("qwen2_vl", "last"),
                                       ("qwen3_vl", "mean"), ("qwen3_5", "last"), ("qwen2", "mean"),
                                       ("internvl", "last"), ("internvl3_5", "mean")])
def test_discriminator_packed_matches_separate(arch, pool, folders):
    """Logits to 1e-5; gradients held to the tolerance rule against the separate samples in fp64 (as in
    ``test_packed_logprobs_match_separate``)."""
    disc, proc = Discriminator.from_student(folders[arch], pool=pool, init_std=0.125, device="cpu")
    disc64, _ = Discriminator.from_student(folders[arch], pool=pool, dtype=torch.float64, device="cpu")
    disc64.load_state_dict(disc.state_dict())  # the same random head
    enc = [proc.encode(s) for s in random_samples(MIX[arch])]
    upstream = torch.randn(len(enc))
    def separate64(e):  # the head's eager reference: the Triton / chunked head takes bf16 and fp32 only
        batch = pack([e])
        hidden = last_hidden_states(disc64.backbone, batch).flatten(0, 1)
        return disc_head_torch(hidden, disc64.weight, disc64.bias, batch.resp_starts, batch.resp_ends, pool=disc64.pool)

    results = []
    for d, run in ((disc, lambda: disc(pack(enc))), (disc, lambda: torch.cat([disc(pack([e])) for e in enc])),
                   (disc64, lambda: torch.cat([separate64(e) for e in enc]))):
        d.zero_grad(set_to_none=True)
        with fp64_oracle() if d is disc64 else contextlib.nullcontext():
            logits = run()
        (logits * upstream.to(logits.dtype)).sum().backward()
        results.append((logits.detach(), _grads(d)))
    (l_p, g_p), (l_s, g_s), (_, g_64) = results
    assert l_p.shape == (len(enc),) and l_p.dtype == torch.float32
    err = max_err(l_p, l_s)
    print(f"{arch}/{pool}: discriminator packed vs separate logits max abs diff {err:.2e}")
    assert err <= ATOL
    assert {"weight", "bias"} <= g_p.keys() and any(n.startswith("backbone.") for n in g_p)
    assert_grads_close_rule(g_p, g_s, g_64, atol=1e-6, what=f"{arch}/{pool}")


def test_discriminator_starts_from_the_student(folders, loaded):
    student, proc = loaded["qwen2_5_vl"]
    disc, _ = Discriminator.from_student(folders["qwen2_5_vl"], device="cpu")
    base = student.model.state_dict()
    ours = disc.backbone.state_dict()
    assert base.keys() == ours.keys() and all(torch.equal(base[k], ours[k]) for k in base)
    assert not any("lm_head" in n for n, _ in disc.named_parameters())
    with torch.no_grad():
        logits = disc(pack([proc.encode(s) for s in random_samples([1, 0])]))
    assert torch.equal(logits, torch.zeros(2))  # zero head: D = 1/2 for everything


def test_discriminator_save_load_round_trip(folders, tmp_path):
    disc, proc = Discriminator.from_student(folders["qwen2_5_vl"], pool="mean", init_std=0.3, device="cpu")
    with torch.no_grad():
        for p in disc.backbone.parameters():  # as if trained: no longer the student's weights
            p.add_(torch.randn_like(p) * 0.01)
        disc.bias.fill_(0.25)
    disc.save(tmp_path / "disc", proc)
    again, proc2 = Discriminator.load(tmp_path / "disc", device="cpu")
    assert again.pool == disc.pool
    a, b = disc.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    samples = random_samples([2, 0, 1])
    with torch.no_grad():
        assert torch.equal(disc(pack([proc.encode(s) for s in samples])),
                           again(pack([proc2.encode(s) for s in samples])))


# GPT-J computes its attention itself before transformers 5.24 (refused) and through the interface from 5.24 on, with
# a bias in its LM head (refused too).
GPTJ_5_24 = Version(transformers.__version__) >= Version("5.24")
@pytest.mark.parametrize("model_type", ["llama", "mistral", "gemma3_text", "phi3", "gpt2", "opt", "biogpt"])
def test_text_families_packed_match_separate(model_type, tmp_path_factory, one_thread):  # noqa: F811
    """Text-only causal LMs whose layers call transformers' attention interface with the position ids: packed log-probs
    (one forward) equal one-sample-at-a-time ones (a forward each; a sliding window longer than every sample changes
    nothing)."""
    model, processor = load(text_family(tmp_path_factory, model_type), device="cpu")
    samples = random_samples([0, 0, 0, 0])
    forwards = []
    model.base_model.register_forward_hook(lambda *_: forwards.append(1))
    with torch.no_grad():
        packed = torch.cat(response_logprobs(model, processor, samples, packed=True))
        assert len(forwards) == 1  # one forward over the 4 samples
        separate = torch.cat(response_logprobs(model, processor, samples, packed=False))
    assert len(forwards) == 1 + len(samples)
    assert max_err(packed, separate) <= ATOL


@pytest.mark.parametrize("model_type, extra", [
    ("granite", dict(logits_scaling=8.0)),  # logits / s
    ("cohere", dict(logit_scale=0.0625)), ("cohere2", dict(logit_scale=0.25)),  # logits · s
    ("hyperclovax", dict(logits_scaling=4.0)),  # logits · s, under Granite's name
])
def test_scaled_logits_against_hf_forward(model_type, extra, tmp_path_factory, one_thread):  # noqa: F811
    """Outside oracle for heads that scale their logits by a config value: transformers' own forward of one sample,
    log_softmax(logits / τ) at the response targets, equals ril_fast's log-probs, whose kernels take the scale
    folded into τ (ignoring it put them 0.3-0.9 off)."""
    model, proc = load(text_family(tmp_path_factory, model_type, **extra), device="cpu")
    sample = random_samples([0])[0]
    enc = proc.encode(sample)
    ours = response_logprobs(model, proc, [sample], temperature=0.7)[0]
    with torch.no_grad():
        logits = model(input_ids=enc.input_ids[None], use_cache=False).logits[0].double() / 0.7
    rows = torch.arange(enc.prompt_len - 1, enc.length - 1)
    oracle = logits[rows].log_softmax(-1).gather(1, enc.input_ids[rows + 1, None]).squeeze(1)
    assert max_err(ours, oracle) <= ATOL


@pytest.mark.parametrize("model_type, extra, where, words", [
    ("bloom", dict(), "load", "computes its attention itself"),  # its own causal mask, over the whole packed row
    ("gptj", dict(), "load",  # its own table of attention classes; from 5.24 on, a bias in its LM head
     "adds a bias to its logits" if GPTJ_5_24 else "computes its attention itself"),
    ("gemma2", dict(), "load", "soft-caps its attention logits"),
    ("phi", dict(), "load", "adds a bias to its logits"),
    ("gemma3_text", dict(final_logit_softcapping=30.0), "load", r"soft-caps its logits \(final_logit_softcapping=30.0"),
    ("gpt_oss", dict(), "load", "adds attention sinks to the softmax of its GptOssAttention layers"),
    ("deepseek_v3", dict(), "load", "has values of 8 dims per head and queries and keys of 24"),
    ("gpt_bigcode", dict(), "forward", "gets neither position ids nor sample boundaries"),  # drops the position ids
    ("mistral", dict(sliding_window=8), "forward", "sliding window of 8 tokens and a sample here is"),  # too long
    ("doge", dict(), "load", "builds its own attention mask in its DogeAttention layers"),  # a dynamic 4-D one
])
def test_text_families_ril_fast_cannot_pack_are_refused(model_type, extra, where, words, tmp_path_factory,
                                                        one_thread):  # noqa: F811
    """A family whose packed samples would see each other, or whose attention or LM head ril_fast's cannot stand for,
    is refused (at load where its config or classes tell, else at its first packed forward), never trained silently
    wrong."""
    folder = text_family(tmp_path_factory, model_type, **extra)
    if where == "load":
        with pytest.raises(UnsupportedModel, match=rf"^{folder}: model type '{model_type}' {words}"):
            load(folder, device="cpu")
        return
    model, processor = load(folder, device="cpu")
    with pytest.raises(UnsupportedModel, match=words), torch.no_grad():
        response_logprobs(model, processor, random_samples([0, 0, 0]), packed=True)


@pytest.mark.parametrize("model_type, extra, words", [
    ("phi", dict(), "adds a bias to its logits"),
    ("gemma3_text", dict(final_logit_softcapping=30.0), "soft-caps its logits"),
    ("gpt_oss", TEXT_FAMILIES["gpt_oss"], "adds attention sinks"),
    ("doge", TEXT_FAMILIES["doge"], "builds its own attention mask in its DogeAttention layers"),
    ("deepseek_v3", TEXT_FAMILIES["deepseek_v3"], "has values of 8 dims per head"),
    ("modernbert-decoder", dict(decoder_bias=False, pad_token_id=0),  # its dense + norm before the decoder
     r"computes its logits with more than its output embedding .* \(lm_head.dense.weight, lm_head.norm.weight\)"),
    ("llama", dict(logits_multiplier=2.0), "sets logits_multiplier=2.0, a setting of its logits ril_fast does not"),
    *[(t, TEXT_FAMILIES.get(t, {}), None) for t in ("qwen2", "llama", "granite", "cohere", "hyperclovax")],
    ("laguna", {}, None),  # moe_router_logit_softcapping=0.0: a setting of its router's logits, not of the LM head's
])
def test_meta_model_refused_as_load_refuses(model_type, extra, words):
    """``_check_attention`` refuses on the meta-device model (no weights: what ``ril_fast.preflight.meta_student`` hands
    it) what ``load`` refuses, and passes the families ril_fast trains (None)."""
    config = AutoConfig.for_model(model_type, vocab_size=1000, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, **extra)
    model = meta_model(config)
    assert next(model.parameters()).is_meta
    with pytest.raises(UnsupportedModel, match=rf"^DIR: model type '{model_type}' {words}") if words \
            else contextlib.nullcontext():
        _check_attention(model, "DIR")
