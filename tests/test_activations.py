"""ril_fast/activations.py: the estimate of what one update micro-batch keeps for its backward is what autograd
saves in the trainer's own updates (``policy_pass``, ``disc_pass``), with and without activation checkpointing, in
fp32 and bf16, on tiny students of each family; and it scales with the tokens as the formulas say."""

import pytest
import torch
from models_fixtures import one_thread, random_samples, tiny_folder  # noqa: F401
from transformers import AutoConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from ril_fast import activations
from ril_fast.discriminator import Discriminator
from ril_fast.imitation import disc_pass
from ril_fast.microbatch import encode_all, micro_batches
from ril_fast.kernels import dr_grpo_loss
from ril_fast.models import _apply_liger, enable_activation_checkpointing, load, meta_model, packed_logprobs
from ril_fast.policy import LossConfig, policy_pass


def _tensors(x):
    """Every tensor in ``x`` (nested lists, tuples and dicts)."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _saved(model, run, batch) -> tuple[dict, list[dict]]:
    """What ``run()`` makes autograd save, by storage (each counted once: several saved tensors share one), leaving
    out the parameters and the batch's own tensors (ids, positions, pixels: held for the step anyway) -> (bytes by
    storage, and for each call of a checkpointable layer (decoder layer, vision block) the storages its inputs hold
    and those it saved, less its inputs: what its recomputation holds again). Inside a checkpointed layer autograd
    saves nothing through these hooks (the checkpoint's own take over); what it keeps is that layer's inputs."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {t.untyped_storage().data_ptr() for t in _tensors(vars(batch))}
    saved, calls, inside = {}, [], []

    def before(module, args, kwargs):
        inputs = {s.data_ptr(): s.nbytes() for s in (t.untyped_storage() for t in _tensors((args, kwargs)))
                  if s.data_ptr() not in skip}
        calls.append((inputs, {}))
        inside.append(calls[-1])

    def after(module, args, kwargs, output):
        inside.pop()

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            saved[s.data_ptr()] = s.nbytes()
            if inside and s.data_ptr() not in inside[-1][0]:
                inside[-1][1][s.data_ptr()] = s.nbytes()
        return t

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    hooks = [h for m in layers for h in (m.register_forward_pre_hook(before, with_kwargs=True),
                                         m.register_forward_hook(after, with_kwargs=True))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        for h in hooks:
            h.remove()
    return saved, calls


def _measured(model, backbone, run, batch) -> tuple[int, int]:
    """Peak bytes ``run()`` holds for the backward, without and with activation checkpointing (enabled on
    ``backbone`` as the trainer does): every saved storage once; checkpointed, what is saved outside the layers and
    every layer's inputs, plus the most that one layer's recomputation saves beside them (measured without)."""
    saved, calls = _saved(model, run, batch)
    recomputed = max((sum(own.values()) for _, own in calls), default=0)
    enable_activation_checkpointing(backbone)
    kept, calls = _saved(model, run, batch)
    for inputs, _ in calls:
        kept.update(inputs)
    return sum(saved.values()), sum(kept.values()) + recomputed


# (arch, image counts of the samples of each micro-batch): two or three token counts each, images of random sizes
CASES = {"qwen2": ([0] * 3, [0] * 7), "qwen2_5_vl": ([1, 0, 1], [1, 0, 2, 0, 1, 1]), "internvl": ([1, 0], [1, 0, 2]),
         "qwen2_vl": ([1, 0], [2, 1, 0, 1]), "qwen3_vl": ([1, 0], [2, 1, 0, 1]), "internvl3_5": ([1, 0], [2, 0, 1])}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", CASES)
def test_the_estimate_is_what_the_updates_save(arch, dtype, tmp_path_factory, one_thread):  # noqa: F811
    """For the policy's and the discriminator's updates of tiny students (a text LM; Qwen2.5-VL; InternVL; Qwen2-VL's
    LayerNorm and QuickGELU tower; Qwen3-VL's q/k norms, DeepStack and interpolated positions; InternVL3.5's Qwen3
    decoder with q/k norms), with and without activation checkpointing, fp32 and bf16 (the CPU's code: its padded
    attention, eager loss and pooled head), at two token counts: the estimate is at most the bytes autograd really saves, and short of them by no more than
    what it leaves out on purpose: 24 bytes a sample (the discriminator's pooled range's end, labels, weights and
    BCE), 8 bytes (the loss's normaliser) and, checkpointed, the vision tower's int32 sequence and window
    boundaries its blocks keep (4 bytes each, and one more a list)."""
    folder = tiny_folder(tmp_path_factory, arch)
    student, processor = load(folder, device="cpu", dtype=dtype)
    disc, _ = Discriminator.from_student(folder, device="cpu", dtype=dtype, init_std=0.02)
    disc.eval()  # as the trainer keeps it
    widths = activations.Widths.of_model(student)
    e = torch.finfo(dtype).bits // 8
    for counts in CASES[arch]:
        micro = micro_batches(encode_all(processor, random_samples(counts)), 10**6)
        assert len(micro) == 1
        batch, n = micro[0].batch, len(counts)
        qwen = batch.image_grid_thw is not None
        grids = [tuple(g) for g in (batch.vision_grid_thw if batch.vision_grid_thw is not None
                                    else batch.image_grid_thw).tolist()] if qwen else []
        tiles = len(batch.pixel_values) if batch.pixel_values is not None and not qwen else 0
        sequences = sum(t for t, _, _ in grids) + tiles
        # Qwen2.5-VL's windows, of ``side`` patches a side; its boundaries' storage has room for those of the grid
        # padded by a whole window (transformers' get_vision_window_index), empty ones dropped only from the view
        side = widths.vision.window * widths.vision.merge if grids else 0
        windows = sum(t * (h // side + 1) * (w // side + 1) for t, h, w in grids) if side else 0
        runs = {"policy": (student, lambda: policy_pass(student, micro, torch.randn(n), torch.tensor(100.0),
                                                          LossConfig())),
                "disc": (disc, lambda: disc_pass(disc, micro, torch.randint(0, 2, (n,)).float(), torch.tensor(1.0)))}
        for head, (model, run) in runs.items():
            plain, kept = _measured(model, getattr(model, "backbone", model), run, batch)
            p = activations.parts(widths, batch.input_ids.shape[1], dtype_bytes=e, gpu=False, head=head,
                                  responses=len(batch.response_rows), lengths=batch.lengths, grids=grids, tiles=tiles)
            left_out = 24 * n + 8
            print(f"{arch} {str(dtype)[6:]} {head} T={batch.input_ids.shape[1]}: measured {plain} B, estimated "
                  f"{p.peak(False)} B; checkpointed: measured {kept} B, estimated {p.peak(True)} B")
            assert 0 <= plain - p.peak(False) <= left_out, (head, counts)
            assert 0 <= kept - p.peak(True) <= left_out + 4 * (sequences + windows + 2), (head, counts)
            assert p.peak(True) < p.peak(False)
            model.zero_grad(set_to_none=True)
        student, _ = load(folder, device="cpu", dtype=dtype)  # fresh models, checkpointing off, for the next count
        disc, _ = Discriminator.from_student(folder, device="cpu", dtype=dtype, init_std=0.02)
        disc.eval()


@pytest.mark.parametrize("arch", ["qwen2", "qwen2_5_vl", "internvl"])
def test_the_gpu_estimate_is_linear_in_tokens(arch, tmp_path_factory):
    """On a GPU (flash-attention: no padding, no mask) every term is per token or per patch: twice the tokens and
    twice the image tokens give exactly twice the bytes, with checkpointing or without; the policy's head at most
    the discriminator's (its Triton head keeps every row's final hidden state); bf16 takes half of fp32 and a bit
    more (the RMSNorms' fp32 values)."""
    config = AutoConfig.from_pretrained(tiny_folder(tmp_path_factory, arch))
    model = meta_model(config)
    images = 0 if arch == "qwen2" else 16  # 4 InternVL tiles, or one Qwen-VL image of 64 patches

    def bytes_(tokens, checkpointing, **kw):
        return activations.activation_bytes(config, tokens, checkpointing=checkpointing, gpu=True, model=model,
                                            image_tokens=images * tokens // 1000, **kw)

    for checkpointing in (False, True):
        one, two = bytes_(1000, checkpointing), bytes_(2000, checkpointing)
        assert two == 2 * one > 0
        assert not checkpointing or one < bytes_(1000, False)
        assert bytes_(1000, checkpointing, disc=False) <= one
    w = activations.Widths.of_model(model)
    for head in ("policy", "disc"):
        bf16 = activations.parts(w, 1000, dtype_bytes=2, gpu=True, head=head).peak(False)
        fp32 = activations.parts(w, 1000, dtype_bytes=4, gpu=True, head=head).peak(False)
        assert 0.5 < bf16 / fp32 < 0.75


@pytest.mark.parametrize("arch", ["qwen2", "qwen2_5_vl", "internvl"])
def test_preflights_figure_is_the_gpu_code_over_the_image_tokens_patches(arch, tmp_path_factory):
    """``activation_bytes(gpu=True)``, what preflight prints, is the larger update's bytes in bf16 with the GPU's code
    and Liger's kernels (the terms the tests above measure), its vision tower over m² patches an image token (Qwen-VL:
    any grid of as many patches gives the same on a GPU) or a tile per tile's tokens (InternVL); on a CPU, fp32 and
    the CPU's code over one sample."""
    config = AutoConfig.from_pretrained(tiny_folder(tmp_path_factory, arch))
    model = meta_model(config)
    w = activations.Widths.of_model(model)
    tokens, images = 600, (0 if arch == "qwen2" else 32)  # 32 image tokens: 128 patches, or 8 InternVL tiles
    vision = {} if not images else dict(tiles=8) if arch == "internvl" else dict(grids=[(2, 8, 8)])
    assert activations.liger_applies(config.model_type)
    for checkpointing in (False, True):
        def estimate(**kw):
            return max(activations.parts(w, tokens, head=head, **kw).peak(checkpointing) for head in ("policy", "disc"))

        assert activations.activation_bytes(config, tokens, checkpointing=checkpointing, gpu=True,
                                            image_tokens=images, model=model) == \
            estimate(dtype_bytes=2, gpu=True, liger=True, **vision)
        assert activations.activation_bytes(config, tokens, checkpointing=checkpointing, gpu=False, disc=False,
                                            model=model) == \
            activations.parts(w, tokens, dtype_bytes=4, gpu=False).peak(checkpointing)


def _liger_on_the_cpu(monkeypatch) -> None:
    """Let Liger's RMSNorm, SwiGLU and RoPE autograd Functions run on the CPU: their Triton launchers stood in for by
    torch code giving the same outputs (what a Function saves for its backward is its Python's choice, not the
    kernel's; the backward kernels stay Triton, so only forwards run). Liger patches transformers' modules as well as
    the model: every attribute of the loaded ``transformers.models`` modules is put back after the test."""
    import sys

    import liger_kernel.ops.rms_norm
    import liger_kernel.ops.rope
    import liger_kernel.ops.swiglu

    for name, module in list(sys.modules.items()):
        if name.startswith("transformers.models.") and module is not None:
            for key, value in list(vars(module).items()):
                monkeypatch.setattr(module, key, value)

    def rms_norm_forward(X, W, eps, offset, casting_mode, row_mode):
        rows = X.view(-1, X.shape[-1])
        rstd = torch.rsqrt(rows.float().pow(2).mean(-1) + eps)
        Y = (rows.float() * rstd[:, None] * (offset + W.float())).to(X.dtype)
        return Y.view(X.shape), rows, rstd, 0, 0, casting_mode

    def swiglu_forward(a, b, gate_multiplier=1.0):
        a, b = a.view(-1, a.shape[-1]), b.view(-1, b.shape[-1])
        return a, b, (torch.nn.functional.silu(a.float()) * b.float()).to(a.dtype)

    def rope_forward(q, k, cos, sin, position_ids=None, unsqueeze_dim=1, rotary_dim=None):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        with torch.no_grad():  # in place, as the kernel
            for x in (q, k):
                x.copy_(x * cos + torch.cat([-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]], -1) * sin)
        return q, k, cos.squeeze(unsqueeze_dim), sin.squeeze(unsqueeze_dim)

    monkeypatch.setattr(liger_kernel.ops.rms_norm, "rms_norm_forward", rms_norm_forward)
    monkeypatch.setattr(liger_kernel.ops.swiglu, "swiglu_forward", swiglu_forward)
    monkeypatch.setattr(liger_kernel.ops.rope, "rope_forward", rope_forward)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["qwen2", "qwen2_5_vl"])
def test_liger_kernels_save_what_the_estimate_says(arch, dtype, tmp_path_factory, monkeypatch,
                                                   one_thread):  # noqa: F811
    """With Liger's kernels applied as ``ril_fast.models`` applies them on a GPU (``_apply_liger``: the decoder's
    RMSNorms and SwiGLU MLPs, Qwen2.5-VL's vision blocks' RMSNorms), the policy's forward saves what the estimate's
    ``liger`` terms say, to the loss's 0-d normaliser (4 bytes); and less than without them."""
    _liger_on_the_cpu(monkeypatch)
    student, processor = load(tiny_folder(tmp_path_factory, arch), device="cpu", dtype=dtype)
    widths = activations.Widths.of_model(student)  # before Liger swaps modules
    _apply_liger(student, student.config.model_type)
    patched = [n for n, m in student.named_modules() if "Liger" in m.forward.__qualname__]
    assert any(n.endswith("layers.0.mlp") for n in patched) and any(n.endswith("input_layernorm") for n in patched)
    counts = [0] * 3 if arch == "qwen2" else [1, 0, 1]
    batch = micro_batches(encode_all(processor, random_samples(counts)), 10**6)[0].batch

    def policy_forward():  # policy_pass's forward: the log-probs and the loss
        lp = packed_logprobs(student, batch).logprobs
        dr_grpo_loss(lp, torch.randn(len(lp)), torch.ones(len(lp)), normalizer=torch.tensor(100.0))

    saved = sum(_saved(student, policy_forward, batch)[0].values())
    grids = [tuple(g) for g in batch.image_grid_thw.tolist()] if batch.image_grid_thw is not None else []
    estimate = {liger: activations.parts(widths, batch.input_ids.shape[1], dtype_bytes=torch.finfo(dtype).bits // 8,
                                         gpu=False, liger=liger, responses=len(batch.response_rows),
                                         lengths=batch.lengths, grids=grids).peak(False) for liger in (False, True)}
    print(f"{arch} {str(dtype)[6:]}: with Liger measured {saved} B, estimated {estimate[True]} B "
          f"({estimate[False]} B without)")
    assert 0 <= saved - estimate[True] <= 4 and estimate[True] < estimate[False]


def test_a_vlm_of_another_family_is_refused_not_estimated_without_its_tower():
    """Gemma 3 builds as a causal LM on the meta device, its tower named as InternVL's: its widths are refused by name
    (as ``load`` refuses the model), not read with InternVL's settings or left without the tower."""
    from ril_fast.processor import UnsupportedModel

    model = meta_model(AutoConfig.for_model("gemma3"))
    with pytest.raises(UnsupportedModel, match="model type 'gemma3' is a vision-language model ril_fast does not"):
        activations.Widths.of_model(model)


_GPU_SCRIPT = """
import dataclasses, json, sys, torch
sys.path.insert(0, sys.argv[3])
from models_fixtures import random_samples
from test_activations import _measured
from ril_fast import activations
from ril_fast.discriminator import Discriminator
from ril_fast.imitation import disc_pass
from ril_fast.microbatch import encode_all, micro_batches
from ril_fast.models import load
from ril_fast.policy import LossConfig, policy_pass
folder, arch = sys.argv[1], sys.argv[2]
torch.manual_seed(int(sys.argv[4]))
rows = []
for counts in json.loads(sys.argv[5]):
    # as the trainer's updates run on a GPU: bf16, ril_varlen (flash-attention), Liger's kernels (load applies them)
    student, processor = load(folder, device="cuda", dtype=torch.bfloat16)
    disc, _ = Discriminator.from_student(folder, device="cuda", dtype=torch.bfloat16, init_std=0.02)
    disc.eval()
    micro = micro_batches(encode_all(processor, random_samples(counts)), 10**6)
    micro = [dataclasses.replace(mb, batch=mb.batch.to("cuda")) for mb in micro]  # the batch's own tensors skipped
    batch, n = micro[0].batch, len(counts)
    qwen = batch.image_grid_thw is not None
    grids = [tuple(g) for g in (batch.vision_grid_thw if batch.vision_grid_thw is not None
                                else batch.image_grid_thw).tolist()] if qwen else []
    tiles = len(batch.pixel_values) if batch.pixel_values is not None and not qwen else 0
    widths = activations.Widths.of_model(student)
    liger = activations.liger_applies(student.config.model_type)
    runs = {"policy": (student, lambda: policy_pass(student, micro, torch.randn(n), torch.tensor(100.0),
                                                      LossConfig())),
            "disc": (disc, lambda: disc_pass(disc, micro, torch.randint(0, 2, (n,)).float(), torch.tensor(1.0)))}
    for head, (model, run) in runs.items():
        plain, kept = _measured(model, getattr(model, "backbone", model), run, batch)
        p = activations.parts(widths, batch.input_ids.shape[1], dtype_bytes=2, gpu=True, liger=liger, head=head,
                              responses=len(batch.response_rows), lengths=batch.lengths, grids=grids, tiles=tiles)
        rows.append(dict(head=head, samples=n, layers=len(p.layers), tokens=batch.input_ids.shape[1],
                         measured=plain, estimated=p.peak(False), measured_kept=kept, estimated_kept=p.peak(True)))
print(json.dumps(rows))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("arch", ["qwen2", "qwen2_5_vl", "internvl"])
def test_the_gpu_estimate_is_what_a_gpu_update_saves(arch, tmp_path_factory):
    """On a GPU, in a fresh process (Liger patches transformers for the whole process): what autograd saves in the
    trainer's bf16 updates with flash-attention, the Triton heads and loss and Liger's kernels, measured as on the
    CPU, against ``activations.parts(gpu=True)``, whose GPU terms are read from those kernels' code. Left out on
    purpose, as on the CPU: 24 bytes a sample and 8 a batch, the vision tower's boundaries; on a GPU also
    flash-attention's RNG state and boundaries per call (16 bytes and 4 a sample and more, a layer). Not yet run on
    a GPU when written (2026-11-25): the first GPU session checks the band (the printed rows say by how much)."""
    import json
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    counts = [[0] * 3, [0] * 5] if arch == "qwen2" else [[1, 0, 1], [1, 0, 2, 1]]
    out = subprocess.run([sys.executable, "-c", _GPU_SCRIPT, str(tiny_folder(tmp_path_factory, arch)), arch, tests,
                          str(int(torch.randint(1 << 30, ()))), json.dumps(counts)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for row in json.loads(out.stdout.splitlines()[-1]):
        print(arch, row)
        left_out = 24 * row["samples"] + 8 + row["layers"] * (16 + 8 * (row["samples"] + 2))
        assert 0 <= row["measured"] - row["estimated"] <= left_out, row
        assert 0 <= row["measured_kept"] - row["estimated_kept"] <= left_out, row
