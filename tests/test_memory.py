"""ril_fast/memory.py: the memory plan counts what the trainer's models really hold, and a student that cannot
fit is refused before any model loads."""

import pytest
import torch
from models_fixtures import tiny_folder

from ril_fast import memory, train
from ril_fast.config import ConfigError, load_config
from ril_fast.demo import build_demo
from ril_fast.discriminator import Discriminator
from ril_fast.models import load


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "internvl", "qwen2"])
def test_plan_counts_the_models_as_loaded(arch, tmp_path_factory):
    """Parameter counts from the meta device equal the loaded student's and discriminator's; fp32 weights and
    AdamW's moments after a step are the plan's 12 bytes per trained parameter."""
    from transformers import AutoConfig

    folder = tiny_folder(tmp_path_factory, arch)
    student, _ = load(folder, device="cpu")
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
    gradients = _bytes(student.parameters())  # the larger model's, fp32
    assert p.trained_state == held + gradients
    assert p.reference == _bytes(student.parameters())  # fp32 on a CPU
    assert p.gathered == 0 and p.per_rank == held + gradients + p.reference  # one CPU rank: no extra copy


def test_plan_shards_the_trained_state_only():
    """Over 4 ranks the trained state is split; the reference and the gathered student are whole on each (bf16
    on GPUs); without a discriminator or a reference their bytes are gone."""
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    one = memory.plan(config, disc=True, reference=True, gpu=True, shard=1)
    four = memory.plan(config, disc=True, reference=True, gpu=True, shard=4)
    n = one.student_params
    assert one.reference == one.gathered == four.reference == four.gathered == 2 * n
    assert four.per_rank == -(-one.trained_state // 4) + 4 * n < one.per_rank
    bare = memory.plan(config, disc=False, reference=False, gpu=True, shard=1)
    assert bare.disc_params == bare.reference == 0 and bare.trained_state == 16 * n


def test_offload_moves_the_trained_state_to_the_cpu():
    """batch.cpu_offload on GPUs: the device keeps the reference and the gathered student, the CPU's memory each
    rank's share of the trained state, and each is checked against its own free memory. On CPUs there is
    nowhere else to put it: the plan is the plain one."""
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    plain = memory.plan(config, disc=True, reference=True, gpu=True, shard=2)
    off = memory.plan(config, disc=True, reference=True, gpu=True, shard=2, offload=True)
    assert plain.host_per_rank == 0 and off.host_per_rank == plain.trained_share == -(-plain.trained_state // 2)
    assert off.per_rank == plain.per_rank - plain.trained_share == plain.reference + plain.gathered
    assert memory.plan(config, disc=True, reference=True, gpu=False, shard=2, offload=True) == \
        memory.plan(config, disc=True, reference=True, gpu=False, shard=2)
    # The device check suggests offloading until it is on; then the CPU's memory is checked too.
    assert "batch.cpu_offload=true" in memory.shortfall(plain, plain.per_rank - 1)
    assert memory.shortfall(plain, plain.per_rank, host_available=0) is None  # nothing on the host to check
    assert "batch.cpu_offload" not in memory.shortfall(off, off.per_rank - 1)
    assert memory.shortfall(off, off.per_rank, host_available=off.host_per_rank) is None
    assert "CPU's available memory" in memory.shortfall(off, off.per_rank, host_available=off.host_per_rank - 1)
    assert "in the CPU's memory" in off.describe() and "CPU" not in plain.describe()


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
    assert "and the discriminator" in str(e.value) and not loaded and isinstance(e.value, train.DoesNotFit)
    monkeypatch.undo()
    train.setup(load_config(args)).log.close()
