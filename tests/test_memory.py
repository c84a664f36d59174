"""ril_fast/memory.py: the memory plan counts what the trainer's models really hold, and a student that cannot
fit is refused before any model loads."""

import math

import pytest
import torch
from models_fixtures import random_samples, tiny_folder

from ril_fast import distributed, memory, train
from ril_fast.config import ConfigError, load_config
from ril_fast.demo import build_demo
from ril_fast.discriminator import Discriminator
from ril_fast.distributed import _param_groups, fsdp_modules
from ril_fast.microbatch import sync_gradients
from ril_fast.models import load, meta_model, packed_logprobs
from ril_fast.packing import pack
from ril_fast.preflight import DoesNotFit, check_memory


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5", "internvl", "internvl3_5", "qwen2"])
def test_plan_counts_the_models_as_loaded(arch, tmp_path_factory):
    """Parameter counts from the meta device equal the loaded student's and discriminator's; fp32 weights and
    AdamW's moments after a step are the plan's 12 bytes per trained parameter; the gradients FSDP2 accumulates
    over micro-batches (sync off until the last) are the plan's, whole on the rank; the student gathered for a
    rollout is the plan's, an fp32 copy beside the shards even on one rank."""
    from transformers import AutoConfig

    folder = tiny_folder(tmp_path_factory, arch)
    student, processor = load(folder, device="cpu")
    disc, _ = Discriminator.from_student(folder, device="cpu")
    p = memory.plan(AutoConfig.from_pretrained(folder), disc=True, reference=True, gpu=False, shard=1)
    assert p.student_params == sum(x.numel() for x in student.parameters())
    assert p.disc_params == sum(x.numel() for x in disc.parameters())
    held = 0
    for model in (student, disc):
        optimizer = torch.optim.AdamW(model.parameters())
        for x in model.parameters():
            x.grad = torch.zeros_like(x)
        optimizer.step()
        held += _bytes(model.parameters()) + _bytes(t for s in optimizer.state.values() for k, t in s.items()
                                                    if k != "step")  # AdamW's step counters aside
    assert p.trained_state == held
    assert p.reference == _bytes(student.parameters())  # fp32 on a CPU
    # FSDP2 with gradient sync off (every micro-batch but a step's last) keeps each gradient unsharded, in fp32.
    distributed.init()
    student.zero_grad(set_to_none=True)
    sharded = distributed.shard_model(student, mixed_precision=False)
    sync_gradients(sharded, False)
    batch = pack([processor.encode(s) for s in random_samples([1, 0] if arch != "qwen2" else [0, 0])])
    sharded(batch, fn=packed_logprobs).logprobs.sum().backward()
    params = [fp for u in fsdp_modules(sharded) for g in _param_groups(u) for fp in g.fsdp_params]
    accumulated = [fp.unsharded_param.grad if fp.unsharded_accumulated_grad is None else fp.unsharded_accumulated_grad
                   for fp in params]  # the latter where gradients are reduced in another dtype (bf16 on GPUs)
    assert all(a is not None and a.dtype == torch.float32 for a in accumulated)
    assert all(fp.sharded_param.grad is None for fp in params)  # nothing sharded until the last micro-batch
    assert p.gradients == _bytes(accumulated) == _bytes(student.parameters())  # the larger model's
    # Gathered for a rollout, FSDP2 copies even a whole "shard" (one rank) into all-gather buffers of its own.
    shards = {fp.sharded_param._local_tensor.untyped_storage().data_ptr() for fp in params}
    with distributed.gathered(sharded):
        buffers = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for fp in params
                   for t in fp.all_gather_outputs if t.untyped_storage().size()}
    assert buffers and not set(buffers) & shards
    assert p.gathered == sum(buffers.values()) and p.per_rank == held + p.gradients + p.reference + p.gathered


def test_plan_shards_the_trained_state_only():
    """Over 4 ranks the trained state, the gradients and the reference are split; the gathered student is whole on
    each (bf16 on GPUs); without a discriminator or a reference their bytes are gone."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    one = memory.plan(config, disc=True, reference=True, gpu=True, shard=1)
    four = memory.plan(config, disc=True, reference=True, gpu=True, shard=4)
    n = one.student_params
    assert one.reference == one.gathered == four.gathered == 4 * four.reference == 2 * n  # every dim 0 divides by 4
    assert one.gradients == 4 * four.gradients == 4 * n
    assert four.per_rank == -(-one.trained_state // 4) + n + n // 2 + 2 * n < one.per_rank
    bare = memory.plan(config, disc=False, reference=False, gpu=True, shard=1)
    assert bare.disc_params == bare.reference == 0 and bare.trained_state == 12 * n and bare.per_rank == 18 * n
    # A dim 0 that 4 does not divide (a vocabulary of 1,001): FSDP2 pads each shard to ceil(dim 0 / 4) rows.
    odd = Qwen2Config(**{**config.to_dict(), "vocab_size": 1001})
    shapes = [p.shape for p in Qwen2ForCausalLM(odd).parameters()]
    padded = sum(-(-s[0] // 4) * math.prod(s[1:]) for s in shapes)
    four = memory.plan(odd, disc=True, reference=True, gpu=True, shard=4)
    assert four.reference == 2 * padded and four.gradients == 4 * padded > 4 * -(-sum(s.numel() for s in shapes) // 4)


def test_offload_moves_the_trained_state_to_the_cpu():
    """batch.cpu_offload on GPUs: the device keeps the accumulated gradients and the gathered student; the CPU's memory
    each rank's share of the trained state, of the sharded gradients and of the bf16 reference, pinned tensors rounded
    up to powers of two as torch's pinned cache does (fp32 weights, both models' gradients, the reference; AdamW's
    moments are not pinned), or pageable and exact; each is checked against its own free memory. On CPUs there is
    nowhere else to put it: the plan is the plain one."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    student = Qwen2ForCausalLM(config)
    disc = [p.numel() for p in student.model.parameters()] + [64, 1]  # the backbone and the d -> 1 head
    numels = [p.numel() for p in student.parameters()] + disc
    s, d = student.num_parameters(), sum(disc)
    plain = memory.plan(config, disc=True, reference=True, gpu=True, shard=1)
    pinned = memory.plan(config, disc=True, reference=True, gpu=True, shard=1, offload=True)
    pageable = memory.plan(config, disc=True, reference=True, gpu=True, shard=1, offload=True, pinned=False)
    assert plain.host_per_rank == 0 and pageable.host_per_rank == 12 * (s + d) + 4 * s + 2 * s  # + bf16 reference
    reference = [p.numel() for p in student.parameters()]
    assert pinned.host_per_rank == sum(2 * 2 ** math.ceil(math.log2(4 * n)) + 8 * n for n in numels) + \
        sum(2 ** math.ceil(math.log2(2 * n)) for n in reference)
    assert pageable.host_per_rank < pinned.host_per_rank < 2 * pageable.host_per_rank
    for off in (pinned, pageable):  # the device keeps the accumulated gradients and the gathered student
        assert off.per_rank == plain.per_rank - plain.trained_state - plain.reference == 4 * s + plain.gathered
        assert off.reference == plain.reference == 2 * s
    assert memory.plan(config, disc=True, reference=True, gpu=False, shard=2, offload=True) == \
        memory.plan(config, disc=True, reference=True, gpu=False, shard=2)
    # Over 2 ranks each holds a shard: FSDP2 pads dim 0 to a multiple of 2 (the 0-d bias it leaves whole).
    def half(shape):
        return math.ceil(shape[0] / 2) * math.prod(shape[1:]) if shape else 1

    student_shapes = [p.shape for p in student.parameters()]
    disc_shapes = [p.shape for p in student.model.parameters()] + [torch.Size([64]), torch.Size([])]
    two = memory.plan(config, disc=True, reference=True, gpu=True, shard=2, offload=True, pinned=False)
    assert two.host_per_rank == 12 * sum(map(half, student_shapes + disc_shapes)) + 6 * sum(map(half, student_shapes))
    assert two.gradients == 0 and two.per_rank == two.gathered
    # HSDP, two copies of two: the reduce-scattered gradients wait on the device for the all-reduce across copies.
    hsdp = memory.plan(config, disc=True, reference=True, gpu=True, shard=2, copies=2, offload=True, pinned=False)
    assert hsdp.gradients == 4 * sum(map(half, student_shapes)) and hsdp.per_rank == two.per_rank + hsdp.gradients
    assert hsdp.host_per_rank == two.host_per_rank
    # The device check suggests offloading until it is on; then the CPU's memory is checked too, and a pinned
    # plan that does not fit there suggests pageable memory.
    assert "batch.cpu_offload=true" in memory.shortfall(plain, plain.per_rank - 1)
    assert memory.shortfall(plain, plain.per_rank, host_available=0) is None  # nothing on the host to check
    assert "batch.cpu_offload" not in memory.shortfall(pinned, pinned.per_rank - 1)
    assert memory.shortfall(pinned, pinned.per_rank, host_available=pinned.host_per_rank) is None
    short = memory.shortfall(pinned, pinned.per_rank, host_available=pinned.host_per_rank - 1)
    assert "CPU's available memory" in short and "batch.offload_pinned=false" in short
    assert "offload_pinned" not in memory.shortfall(pageable, 0, host_available=0)
    assert "pinned)" in pinned.describe() and "CPU" not in plain.describe()


def test_a_student_that_cannot_fit_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    """With less memory free than the plan needs, set-up stops before loading any model, naming the student,
    the bytes needed and what to change; with the memory this machine has, the same run sets up."""
    demo = build_demo(tmp_path / "demo", max_train=16, max_test=4)
    args = [f"student={demo.student}", f"train_data={demo.train}", f"teachers={','.join(map(str, demo.teachers))}",
            f"eval_data={demo.test}", f"output_dir={tmp_path / 'run'}", "progress=false", "beta=0.1",
            "batch.questions_per_step=2"]
    loaded = []
    real_load = train.load
    monkeypatch.setattr(train, "load", lambda *a, **k: loaded.append(a) or real_load(*a, **k))
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**20)  # 1 MiB
    with pytest.raises(ConfigError, match=rf"student={demo.student}: the models need [\d.]+ GiB per rank before any "
                                          r"activation: .*the reference, .*, but this rank has 0.000977 GiB free: "
                                          r"use more GPUs") as e:
        train.setup(load_config(args))
    assert "and the discriminator" in str(e.value) and not loaded and isinstance(e.value, DoesNotFit)
    monkeypatch.undo()
    train.setup(load_config(args)).log.close()


def test_offloaded_the_cpus_share_is_checked_before_any_model_loads(tmp_path, monkeypatch):
    """With batch.cpu_offload, ``check_memory`` holds the offloaded state to this rank's share of the CPU's available
    memory as well as the device's: with the GPU roomy and the CPU's share 1 byte it refuses, naming the student and
    the CPU's share; with the CPU's share roomy, or without offloading (nothing on the CPU to check), it passes."""
    demo = build_demo(tmp_path / "demo", max_train=16, max_test=4)
    args = [f"student={demo.student}", f"train_data={demo.train}", f"teachers={','.join(map(str, demo.teachers))}",
            f"output_dir={tmp_path / 'run'}", "progress=false", "batch.questions_per_step=2"]
    gpu = distributed.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))  # only its type is read
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**40 if device.type == "cuda" else 1)
    offloaded = load_config([*args, "batch.cpu_offload=true"])
    with pytest.raises(DoesNotFit, match=rf"^student={demo.student}: the models need [\d.]+ GiB per rank .*, but "
                                         r"this rank's share of the CPU's available memory is 9.31e-10 GiB"):
        check_memory(offloaded, gpu, disc=True)
    check_memory(load_config([*args, "batch.cpu_offload=false"]), gpu, disc=True)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**40)
    check_memory(offloaded, gpu, disc=True)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_5", "internvl", "qwen2", "gpt2", "opt", "biogpt"])
def test_kv_cache_bytes_are_those_generate_keeps(arch, tmp_path_factory):
    """The rollout's KV cache, counted from the config, is the keys and values a real ``generate`` keeps: every
    softmax-attention layer's (Qwen3.5's linear-attention layers hold a fixed state instead), for each row and
    position it has run (the prompt and all new tokens but the last), fp32 here as on a CPU; GPT-2, OPT and BioGPT,
    whose configs name no key-value heads, keep every attention head's."""
    from models_fixtures import TEXT_FAMILIES, text_family
    from transformers import AutoConfig

    folder = text_family(tmp_path_factory, arch) if arch in TEXT_FAMILIES else tiny_folder(tmp_path_factory, arch)
    model, processor = load(folder, device="cpu")
    rows, prompt, new = 3, 7, 5
    ids = torch.randint(100, 500, (rows, prompt))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    kept = [t for layer in out.past_key_values.layers for t in (getattr(layer, "keys", None),
                                                                getattr(layer, "values", None))
            if isinstance(t, torch.Tensor)]
    assert kept and all(t.shape[0] == rows and t.shape[2] == prompt + new - 1 for t in kept)
    assert _bytes(kept) == memory.kv_cache_bytes(AutoConfig.from_pretrained(folder), rows * (prompt + new - 1),
                                                 gpu=False)


def test_available_bytes_are_the_free_memory_shared_by_the_local_ranks(monkeypatch):
    """On a GPU the device's free bytes (not its total); on a CPU /proc/meminfo's MemAvailable (not MemFree) shared
    by the ranks of the node (``LOCAL_WORLD_SIZE``); None where /proc/meminfo cannot be read."""
    import io

    meminfo = "MemTotal:       8000000 kB\nMemFree:         1000000 kB\nMemAvailable:    6000000 kB\n"
    monkeypatch.setattr(memory, "open", lambda path: io.StringIO(meminfo), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert memory.available_bytes(torch.device("cpu")) == 6000000 * 1024
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert memory.available_bytes(torch.device("cpu")) == 6000000 * 1024 // 4

    def unreadable(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr(memory, "open", unreadable, raising=False)
    assert memory.available_bytes(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * 2**30, 80 * 2**30))  # (free, total)
    assert memory.available_bytes(torch.device("cuda", 0)) == 3 * 2**30


def test_kv_cache_on_a_gpu_is_bf16_and_a_sharded_reference_says_so():
    """A GPU's KV cache takes half a CPU's (bf16, not fp32); the plan's words call a reference sharded over ranks
    its shard, and a whole one not."""
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    assert memory.kv_cache_bytes(config, 10, gpu=True) == 10 * 2 * 2 * 2 * 16 * 2 == \
        memory.kv_cache_bytes(config, 10, gpu=False) // 2
    four = memory.plan(config, disc=False, reference=True, gpu=True, shard=4).describe()
    one = memory.plan(config, disc=False, reference=True, gpu=True, shard=1).describe()
    assert "the reference, " in one and "(its shard)" in four and "(its shard)" not in one


def test_set_up_prints_the_activation_estimate_and_what_to_change(tmp_path, monkeypatch, capsys):
    """After the plan, the trainer's memory check prints preflight's estimate of an update micro-batch's activations
    (fp32 on a CPU; the vision tower over the prompt with the most image tokens: the demo's 64) and, where the
    device's free memory less the plan is smaller, what to change; it never refuses the run over it."""
    from transformers import AutoConfig

    from ril_fast.data import load_examples
    from ril_fast.preflight import _activations
    from ril_fast.processor import Processor

    demo = build_demo(tmp_path / "demo", max_train=16, max_test=4)
    args = [f"student={demo.student}", f"train_data={demo.train}", f"teachers={','.join(map(str, demo.teachers))}",
            f"output_dir={tmp_path / 'run'}", "progress=false", "batch.questions_per_step=2"]
    cpu = distributed.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    examples = load_examples(demo.train)
    images = max(sum(Processor.from_pretrained(demo.student).image_tokens(w, h) for w, h in e.image_sizes)
                 for e in examples)
    config = AutoConfig.from_pretrained(demo.student)
    plan = memory.plan(config, disc=True, reference=False, gpu=False, shard=1)
    for recomputed, fix in ((False, "set batch.activation_checkpointing=true or lower batch.max_tokens"),
                            (True, "lower batch.max_tokens")):
        cfg = load_config([*args, f"batch.activation_checkpointing={str(recomputed).lower()}"])
        gib, words = _activations(cfg, config, meta_model(config), images, disc=True, gpu=False)
        assert images == 64 and f"(fp32, the larger of the policy's and the discriminator's update" in words
        monkeypatch.setattr(memory, "available_bytes", lambda device: 2**40)
        check_memory(cfg, cpu, disc=True, examples=examples)
        assert f"\n{words}\n" in capsys.readouterr().out
        left = int(plan.per_rank + gib * 2**30 / 2)  # room for the plan and half the activations
        monkeypatch.setattr(memory, "available_bytes", lambda device: left)
        check_memory(cfg, cpu, disc=True, examples=examples)
        assert f"\n{words}: more than the {(left - plan.per_rank) / 2**30:.3g} GiB left: {fix}\n" in \
            capsys.readouterr().out
