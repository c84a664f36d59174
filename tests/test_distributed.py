"""FSDP2 sharding, summed gradients and gathered generation, on CPU ranks (gloo) under torchrun.

Each launch runs tests/dist_scripts/fsdp_checks.py once (one process start-up costs seconds, so the
script measures everything and writes a JSON report that the tests below assert on). Launches: two
ranks under torchrun, one rank under torchrun, one rank from plain ``python`` (no torchrun
environment): the same code path; and four ranks as HSDP (``shard_ranks=2``: two replicas, each sharded
over two ranks), where every check holds as for plain FSDP.

Tolerances: fp32 sharded and unsharded runs do the same arithmetic (the all-gathered parameters are
bitwise the originals; the gradient sum over 2 ranks is one addition), so they agree exactly; 1e-6
leaves room for a different reduction order elsewhere. bf16 follows the project's rule: at most twice
the error of the unsharded model run in bf16, plus 1e-3.
"""

import copy
import json
import os
import resource
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import run_tree
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from ril_fast.discriminator import Discriminator
from ril_fast.distributed import (Sharded, _reshards_after_forward, call, decoder_blocks, fsdp_modules, gathered,
                                  shard_model, shard_size, vision_tower)
from ril_fast.models import load, packed_logprobs
from ril_fast.packing import pack
from tests.models_fixtures import one_rank, one_thread, random_samples, tiny_folder  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "fsdp_checks.py"
EXACT = 1e-6
LAUNCHES = {  # the launcher, the script's arguments after the model folder and the report, and the ranks of a copy
    "torchrun2": (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], [], 2),
    "torchrun1": (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"], [], 1),
    "python": ([], [], 1),
    "hsdp4": (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"], ["2"], 2),  # 2 copies x 2 shards
    # 2 whole copies (a 2 x 1 mesh): unlike 2 x 2, it tells the mesh's copy and shard dimensions apart
    "shard1x2": (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], ["1"], 1),
}


def _launch(kind: str, folder: Path, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    launcher, args, _ = LAUNCHES[kind]
    cmd = [sys.executable, *launcher, str(SCRIPT), str(folder), str(out), *args]
    cpu = lambda: (lambda r: r.ru_utime + r.ru_stime)(resource.getrusage(resource.RUSAGE_CHILDREN))  # noqa: E731
    t0, c0 = time.perf_counter(), cpu()
    proc = run_tree(cmd, env=env, cwd=ROOT, timeout=120)  # a hang fails here, its processes killed
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, f"{kind} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    res = json.loads(out.read_text())
    res["wall_s"], res["kind"] = elapsed, kind
    res["cpu_s"] = cpu() - c0  # the launcher's and its ranks' (waited for by it), whatever else the machine runs
    print(f"{kind}: {elapsed:.1f} s wall, {res['cpu_s']:.1f} s CPU, {res['seconds']:.1f} s inside: {res}")
    return res


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory, "qwen2_5_vl")


@pytest.fixture(scope="module", params=list(LAUNCHES))
def report(request, folder, tmp_path_factory):
    return _launch(request.param, folder, tmp_path_factory.mktemp(request.param) / "report.json")


# ----------------------------------------------------------------------------------------------------
# Which modules become FSDP units (no process group needed)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5", "qwen2", "internvl", "internvl3_5"])
def test_units_found(arch, tmp_path_factory, one_thread):  # noqa: F811
    model, _ = load(tiny_folder(tmp_path_factory, arch), device="cpu")
    blocks = decoder_blocks(model)
    assert len(blocks) == model.config.get_text_config().num_hidden_layers == 2
    assert all("DecoderLayer" in type(b).__name__ for b in blocks)
    vision = vision_tower(model)
    if arch == "qwen2":
        assert vision is None
    else:
        assert vision is (model.model.visual if arch.startswith("qwen") else model.model.vision_tower)
        assert not set(vision.modules()) & {m for b in blocks for m in b.modules()}


def test_units_found_in_discriminator(tmp_path_factory, one_thread):  # noqa: F811
    disc, _ = Discriminator.from_student(tiny_folder(tmp_path_factory, "qwen2_5_vl"), device="cpu")
    assert vision_tower(disc) is disc.backbone.visual
    assert len(decoder_blocks(disc)) == 2


def test_an_empty_model_reads_no_weights(folder, tmp_path):
    """load(empty=True), for the ranks that receive their weights from rank 0: the modules on the meta device, with
    a normal load's parameter names, shapes and dtypes, buffers and generation settings, from a folder whose weight
    files cannot be read (control: a normal load of it fails)."""
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    for weights in copy.glob("*.safetensors"):
        weights.write_bytes(b"not weights")
    empty, _ = load(copy, device="cpu", empty=True)
    full, _ = load(folder, device="cpu")
    assert all(p.is_meta for p in empty.parameters()) and all(b.is_meta for b in empty.buffers())
    assert [(n, p.shape, p.dtype) for n, p in empty.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in full.named_parameters()]
    assert [n for n, _ in empty.named_buffers()] == [n for n, _ in full.named_buffers()]
    assert empty.generation_config.to_dict() == full.generation_config.to_dict()
    disc, _ = Discriminator.from_student(copy, device="cpu", empty=True)
    assert {p.device.type for p in disc.parameters()} == {"meta"}
    with pytest.raises(Exception, match="(?i)safetensors|header|deserializ"):
        load(copy, device="cpu")


def test_a_launch_that_hangs_is_killed_with_what_it_started(tmp_path):
    """The tests' launcher on its timeout: a worker in a session of its own (as torchrun starts its ranks) goes too."""
    import subprocess

    worker = tmp_path / "worker.pid"
    script = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(300)'], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
              f"open({str(worker)!r}, 'w').write(str(p.pid)); time.sleep(300)")
    with pytest.raises(subprocess.TimeoutExpired):
        run_tree([sys.executable, "-c", script], timeout=5)
    stat, deadline = Path(f"/proc/{int(worker.read_text())}/stat"), time.monotonic() + 10
    while True:
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":  # dead, its parent gone too
                break
        except OSError:  # gone
            break
        assert time.monotonic() < deadline, "the worker outlived the launch"
        time.sleep(0.05)


def test_layers_inside_a_vision_tower_are_no_decoder_blocks():
    """A vision tower whose blocks are a ``layers`` list too (LLaVA's CLIP encoder): they stay in the tower's unit."""
    model = nn.Module()
    model.vision_tower = nn.Module()
    model.vision_tower.encoder = nn.Module()
    model.vision_tower.encoder.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    model.language_model = nn.Module()
    model.language_model.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])
    assert vision_tower(model) is model.vision_tower
    assert decoder_blocks(model) == list(model.language_model.layers)


def test_shard_ranks_must_be_a_positive_divisor(one_rank):
    """One rank: 0 (all ranks) and 1 shard over it; a negative count or one over the ranks is refused."""
    assert shard_size(0) == shard_size(1) == 1
    for bad in (-1, 2):
        with pytest.raises(ValueError, match=f"shard_ranks={bad}: must divide the number of ranks \\(1\\)"):
            shard_size(bad)


def test_on_rank0_waits_on_a_gloo_group_of_its_own(monkeypatch):
    """Over several ranks on_rank0 makes one gloo group with ON_RANK0_TIMEOUT (not the default group's 10 minutes)
    the first time, waits on it every time, and hands rank 0's result over it (collectives replaced by fakes)."""
    from ril_fast import distributed

    made, sent = [], []
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "_WAITING", {})
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed.dist, "new_group", lambda **kw: made.append(kw) or f"group {len(made)}")
    monkeypatch.setattr(distributed.dist, "broadcast_object_list", lambda box, src, group: sent.append(group))
    assert distributed.on_rank0(lambda: 5) == 5 and distributed.on_rank0(lambda: 6) == 6
    assert made == [{"backend": "gloo", "timeout": distributed.ON_RANK0_TIMEOUT}] and sent == ["group 1"] * 2


def test_leaving_the_group_forgets_its_meshes_and_groups(one_rank):
    """destroy() drops the meshes and on_rank0's group made for the group it leaves (they hold its communicators);
    the 1-rank group is made again afterwards."""
    from ril_fast import distributed

    shard_model(nn.Sequential(nn.Linear(2, 2)), mixed_precision=False)
    distributed._WAITING[torch.distributed.group.WORLD] = "on_rank0's group"
    assert distributed._MESHES
    distributed.destroy()
    try:
        assert not distributed._MESHES and not distributed._WAITING
    finally:
        distributed.init()  # one_rank's group (module-scoped) back for the tests after this one


def test_offloaded_shards_of_a_cpu_model_are_not_pinned(one_rank):
    """cpu_offload of a model on the CPU: its shards stay where they are, not pinned (pinning is for copies to a
    GPU), whatever ``pin_memory`` says."""
    from ril_fast.distributed import _param_groups

    sharded = shard_model(nn.Sequential(nn.Linear(2, 2)), mixed_precision=False, cpu_offload=True, pin_memory=True)
    (group,) = _param_groups(sharded)
    assert group.offload_policy.pin_memory is False and not any(p.pin_memory for p in group.fsdp_params)
    assert all(p.offload_to_cpu for p in group.fsdp_params)


def test_weights_from_rank0_wait_on_its_own_group_and_refuse_offload(one_rank, monkeypatch):
    """from_rank0: the ranks first wait for rank 0 through on_rank0 (its 2-hour gloo group, not NCCL's 10 minutes,
    while rank 0 reads the weights), then receive them; with cpu_offload (every rank loads its own) it is refused."""
    from ril_fast import distributed

    with pytest.raises(ValueError, match="from_rank0 does not go with cpu_offload"):
        shard_model(nn.Sequential(nn.Linear(2, 2)), mixed_precision=False, from_rank0=True, cpu_offload=True)
    waited = []
    monkeypatch.setattr(distributed, "on_rank0", lambda fn: waited.append(fn()))
    model = nn.Sequential(nn.Linear(2, 2))
    want = {k: v.clone() for k, v in model.state_dict().items()}
    sharded = shard_model(model, mixed_precision=False, from_rank0=True)
    assert waited == [None]
    assert all(torch.equal(p.full_tensor(), want[n.removeprefix("module.")]) for n, p in sharded.named_parameters())


def test_sharded_wrapper_calls_through():
    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    wrapper = Sharded(lin)
    assert torch.equal(wrapper(x), lin(x))
    assert torch.equal(wrapper(x, fn=lambda m, v, scale: m(v) * scale, scale=2.0), lin(x) * 2)


class _CopyCount(TorchDispatchMode):
    """Counts the copies (``copy_``, ``_to_copy``, split copies) that the ops inside the block run."""

    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.copies += "copy" in func.__name__
        return func(*args, **(kwargs or {}))


def test_one_rank_keeps_the_gathered_blocks_from_forward_to_backward(folder, one_rank, one_thread):  # noqa: F811
    """On one rank the blocks and the vision tower do not free their gathered parameters after forward
    (the backward would repeat every parameter's copies to gather them again): fewer copies, the same
    log-probs and gradients bit for bit as resharding, and every parameter sharded again after backward."""
    model, proc = load(folder, device="cpu")
    batch = pack([proc.encode(s) for s in random_samples([1, 0, 2])])
    weights = torch.randn(sum(batch.response_lengths))
    runs = {}
    for reshard in (None, True):
        sharded = shard_model(copy.deepcopy(model), mixed_precision=False, reshard_after_forward=reshard)
        units = fsdp_modules(sharded)[1:]  # all but the root, which always keeps its parameters
        assert len(units) == 3 and [_reshards_after_forward(u) for u in units] == [bool(reshard)] * 3
        with _CopyCount() as counted:
            lp = call(sharded, packed_logprobs, batch).logprobs
            (lp * weights).sum().backward()
        assert all(isinstance(p, DTensor) for p in sharded.parameters())
        runs[reshard] = lp.detach(), {n: p.grad.full_tensor() for n, p in sharded.named_parameters()}, counted.copies
    (lp_kept, grads_kept, copies_kept), (lp_resharded, grads_resharded, copies_resharded) = runs[None], runs[True]
    assert torch.equal(lp_kept, lp_resharded)
    assert grads_kept.keys() == grads_resharded.keys()
    assert all(torch.equal(grads_kept[n], grads_resharded[n]) for n in grads_kept)
    assert copies_kept < copies_resharded


def test_gathered_gives_each_unit_its_reshard_setting_back(folder, one_rank, one_thread):  # noqa: F811
    """Inside gathered() no unit frees its parameters after forward; on exit each unit has its own setting back (one
    rank: the blocks and the vision tower keep them by default and free them when asked; the root always keeps
    them), and every parameter is sharded again."""
    model, _ = load(folder, device="cpu")
    for reshard in (None, True):
        sharded = shard_model(copy.deepcopy(model), mixed_precision=False, reshard_after_forward=reshard)
        units = fsdp_modules(sharded)
        before = [_reshards_after_forward(u) for u in units]
        assert before == [False] + [bool(reshard)] * 3
        with gathered(sharded):
            assert not any(_reshards_after_forward(u) for u in units)
            assert not any(isinstance(p, DTensor) for p in sharded.parameters())
        assert [_reshards_after_forward(u) for u in units] == before
        assert all(isinstance(p, DTensor) for p in sharded.parameters())


# ----------------------------------------------------------------------------------------------------
# Under torchrun
# ----------------------------------------------------------------------------------------------------
def test_process_group(report):
    W = report["world_size"]
    assert report["rank_device"] == "cpu" and report["is_main"] and report["init_again_same"]
    assert report["rank_sum"] == W * (W + 1) // 2 and report["rank_max"] == [W - 1, 0]


def test_launch_is_fast_and_sharded(report):
    """Fast in CPU time (~16 s for two ranks under torchrun, 6-8 s for one): work repeated or threads
    oversubscribing the cores show there, while wall time also counts waiting for cores a busy machine gives
    to others. A launch that hangs fails _launch's timeout."""
    assert report["cpu_s"] < 60
    assert report["fsdp_modules"] == 4  # 2 decoder blocks + vision tower + root
    assert report["params_are_dtensors"] and report["params_are_dtensors_after"]
    two_d = report["world_size"] > LAUNCHES[report["kind"]][2]  # several copies: HSDP's 2-D mesh
    assert report["placements"] == ["(Replicate(), Shard(dim=0))" if two_d else "(Shard(dim=0),)"]
    assert report["whole_copy_ranks"] == 1  # shard_ranks=1 in the same process: whole copies, a mesh of their own


def test_forward_equals_unsharded(report):
    assert report["forward_err"] <= EXACT
    assert report["disc_forward_err"] <= EXACT


def test_gradients_are_the_sum_over_ranks(report):
    """One backward of each rank's summed loss: gradient = Σ_ranks of single-process gradients."""
    assert report["grad_names_match"] and report["grad_has_vision"] and report["grad_params"] > 50
    assert report["grad_err_vs_sum"] <= EXACT
    # the discriminator, over two accumulated backwards, with its 0-d bias outside FSDP
    assert report["disc_grad_err_vs_sum"] <= EXACT and report["disc_bias_grad_err"] <= EXACT
    assert report["disc_optimizer_step"]
    # sum_gradients=False: every gradient the mean over ranks, the bias's (a hook's) too; a frozen one takes no hook
    assert report["disc_mean_grad_err"] <= EXACT and report["disc_mean_bias_grad_err"] <= EXACT
    assert report["disc_frozen_shards"] == report["disc_fsdp_modules"]
    # Two micro-batches accumulated as the trainer does (microbatch.sync_gradients): the same sum. A copy sharded
    # over several ranks reduce-scatters at every micro-batch, so no rank keeps a whole gradient in between; a rank
    # holding a whole copy accumulates the whole gradient and reduces once.
    assert report["copy_ranks"] == LAUNCHES[report["kind"]][2]
    assert report["accumulated_grad_err_vs_sum"] <= EXACT
    assert report["accumulated_whole_gradients"] == (report["copy_ranks"] == 1)
    # HSDP (2 copies of 2): FSDP sums each micro-batch's reduce-scattered gradients on the device until the deferred
    # all-reduce, offloaded or not; the memory plan of an offloaded run counts them (and nothing with one copy).
    hsdp = report["world_size"] > report["copy_ranks"] > 1
    assert (report["accumulated_partial_bytes"] > 0) == hsdp
    if report["copy_ranks"] > 1:
        assert report["plan_offloaded_gradient_bytes"] == report["accumulated_partial_bytes"]


def test_images_on_one_rank_only(report):
    """Rank 0 has images, the others none: their micro-batch gets a zero-weight image filler, so the vision
    tower's collectives match (without it gloo fails on mismatched sizes), and the gradient is still the
    sum over ranks of the real responses' gradients."""
    assert report["mixed_images_fillers"] == (1 if report["world_size"] > 1 else 0)
    assert report["mixed_images_grad_err_vs_sum"] <= EXACT


def test_divide_factor_is_what_makes_the_sum(report):
    """Control: with FSDP's default divide factor the gradient is the MEAN over ranks."""
    assert report["default_grad_err_vs_mean"] <= EXACT
    if report["world_size"] > 1:
        assert report["default_grad_err_vs_sum"] > 0.1


def test_frozen_reference_is_sharded_like_the_student(report):
    """The trainer's reference where a copy is sharded: a frozen model sharded without gradient hooks gives the
    unsharded model's log-probs, and a rank holds its shard, the bytes the memory plan counts."""
    assert report["reference_logprobs_err"] <= EXACT and report["models_share_one_mesh"]
    assert report["reference_bytes"] == report["reference_plan_bytes"]
    if report["copy_ranks"] == 1:
        assert report["reference_bytes"] == report["student_bytes"]
    else:  # half, padded: rank 0's shard of a parameter has the larger half of its rows
        assert report["student_bytes"] / 2 <= report["reference_bytes"] < 0.6 * report["student_bytes"]


def test_only_rank_0_reads_the_weights(report):
    """shard_model(from_rank0=True): the models of ranks other than 0 are built empty and receive rank 0's weights:
    the unsharded model's log-probs and buffers, and a discriminator whose gradients (its plain 0-d bias's too) are
    the sum over ranks."""
    assert report["from_rank0_others_empty"] and report["from_rank0_buffers_equal"]
    assert report["from_rank0_forward_err"] <= EXACT and report["from_rank0_disc_grad_err_vs_sum"] <= EXACT


def test_mixed_precision(report):
    assert report["bf16_gathered_param_dtypes"] == ["torch.bfloat16"]
    assert report["bf16_grad_dtypes"] == ["torch.float32"]
    assert report["bf16_fn_input_dtype"] == "torch.float32"
    assert report["bf16_forward_err"] <= 2 * report["bf16_unsharded_forward_err"] + 1e-3
    assert report["bf16_grad_err_vs_sum"] <= 2 * report["bf16_unsharded_grad_err_vs_sum"] + 1e-3


def test_generation_inside_gathered(report):
    """Same tokens as the unsharded model; one all-gather per FSDP unit per rollout call instead of the
    blocks' all-gathers at every generated token; resharded afterwards."""
    assert report["greedy_same_tokens_gathered"] and report["greedy_same_tokens_plain"]
    assert report["sampled_same_tokens"]  # rank-local prompts, G=4, per-rank seeds
    assert report["nested_same_tokens"] and report["inner_alone_refused"]
    if LAUNCHES[report["kind"]][2] == 1:  # a rank holds a whole copy (1 rank, or 2 x 1): FSDP runs no all-gather
        assert report["gathers_sampling"] == report["gathers_forward_before_rollout"] == 0
        return
    units, steps = report["fsdp_modules"], max(report["generated_lengths"])
    # one per unit (the root may still be gathered from an earlier no-grad forward: FSDP keeps it)
    assert report["gathers_generate_gathered"] <= units and report["gathers_sampling"] == units
    blocks = units - 2
    assert report["gathers_generate_plain"] >= blocks * steps  # 34 for 16 tokens
    assert report["gathers_nested"] == units  # the enclosing gathered() only
    assert report["gathers_forward_before_rollout"] == units
    assert report["gathers_step_after_rollout"] == report["gathers_step_before_rollout"]
    # resharding restored: a training step gathers as before any rollout (the forward order recorded
    # during generation is forgotten: no stale backward prefetch), the root stays gathered between
    # forwards, the other units gather again in each forward
    assert report["gathers_two_forwards_after_rollout"] == 1 + 2 * (units - 1)
    # no-grad passes over 3 micro-batches: one gather per unit (3 per unit but the root without
    # gathered()); the root is still gathered from the forwards just above
    assert report["gathers_frozen_logprobs_3_micro"] == units - 1 and report["frozen_logprobs_err"] < 1e-5
    assert report["gathers_disc_probs_3_micro"] == report["disc_fsdp_modules"]
    assert report["disc_probs_err"] < 1e-5
