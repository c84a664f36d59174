"""``python -m ril_fast.preflight``: the trainer's checks before loading, run for GPUs this machine lacks, with the
lengths and the memory plan they rest on; its exit status says whether the trainer would start. The trainer's set-up
refuses the same students before any model loads, and its command line says a model it cannot train in one line."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from models_fixtures import one_thread, text_family, tiny_folder  # noqa: F401
from transformers import AutoConfig

from ril_fast import activations, memory, train
from ril_fast.config import ConfigError, load_config
from ril_fast.data import DataError, load_examples
from ril_fast.demo import build_demo
from ril_fast.models import load
from ril_fast.preflight import _kv_cache, _remembered, length_limit, main, meta_student, prompt_key
from ril_fast.processor import Processor


@pytest.fixture(scope="module")
def demo(tmp_path_factory, one_thread):  # noqa: F811
    return build_demo(tmp_path_factory.mktemp("demo"), max_train=16, max_test=4)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """Eight text-only questions and a teacher's answers to them, for the text-only students of test_models."""
    folder = tmp_path_factory.mktemp("text_data")
    rows = [dict(id=f"q{i}", question=f"What is {i} plus {i}?", answer=str(2 * i), images=[]) for i in range(8)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "t.jsonl").write_text("".join(json.dumps(dict(id=r["id"], response=f"It is {r['answer']}.")) + "\n"
                                           for r in rows))
    return folder


def _text_args(student, data, **extra) -> list[str]:
    args = dict(student=student, train_data=data / "train.jsonl", teachers=data / "t.jsonl", max_new_tokens=16,
                **{"batch.questions_per_step": 2}, **extra)
    return [f"{k}={v}" for k, v in args.items()]


def _args(demo, **extra) -> list[str]:
    args = dict(student=demo.student, train_data=demo.train, teachers=",".join(map(str, demo.teachers)),
                eval_data=demo.test, max_new_tokens=12, **{"batch.questions_per_step": 4})
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def test_it_reports_the_lengths_the_run_would_see(demo, capsys):
    """The prompt lengths it prints are those of the prompts' real encodings (images decoded and processed), and
    the teacher responses' those of their tokenisation; the demo's tiny models fit."""
    assert main(["--gpus", "2", *_args(demo)]) == 0
    out = capsys.readouterr().out
    _, processor = load(demo.student, device="cpu")
    rows = [json.loads(line) for line in demo.train.read_text().splitlines()]
    lengths = sorted(processor.encode_prompt(r["question"], [demo.train.parent / p for p in r["images"]]).prompt_len
                     for r in rows)
    assert f"training examples that fit: {len(rows)}; held-out: 4" in out
    assert f"prompt tokens, images included: min {lengths[0]}, median {lengths[len(lengths) // 2]}, 99th percentile " \
           f"{lengths[-1]}, max {lengths[-1]}; batch.max_tokens 4096 leaves 4084 beside max_new_tokens=12" in out
    texts = [json.loads(line)["response"] for path in demo.teachers for line in path.read_text().splitlines()]
    tokens = sorted(len(processor.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    assert f"teacher responses' tokens (end of turn included): min {tokens[0]}, median " \
           f"{tokens[len(tokens) // 2]}" in out
    assert "memory: " in out and "sharded over 2 rank(s)" in out
    # G = 2 outputs of each of the 2 questions a rank gets in one generate call, padded to the longest prompt.
    kv = memory.kv_cache_bytes(AutoConfig.from_pretrained(demo.student), 4 * (lengths[-1] + 12), gpu=True)
    assert f"rollout KV cache: up to {kv / 2**30:.3g} GiB a rank (4 sequences of at most {lengths[-1]} + 12 " \
           f"tokens" in out


def test_a_real_sized_student_is_planned_from_its_config_alone(demo, tmp_path, tmp_path_factory, capsys):
    """A Qwen2.5-VL-3B-shaped config beside the tiny tokenizer (the tiny weights, of other shapes, are never read):
    refused on one 80 GiB GPU with the trainer's words, planned on eight, the numbers those of ``memory.plan``."""
    student = shutil.copytree(tiny_folder(tmp_path_factory, "qwen2_5_vl"), tmp_path / "student")
    config = json.loads((student / "config.json").read_text())
    config["text_config"].update(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                 num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                 layer_types=["full_attention"] * 36, tie_word_embeddings=True,
                                 max_position_embeddings=128000)
    config["tie_word_embeddings"] = True  # as the real 3B: 3.75 B parameters
    config["vision_config"].update(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                   out_hidden_size=2048)
    (student / "config.json").write_text(json.dumps(config))
    plans = {n: memory.plan(AutoConfig.from_pretrained(student), disc=True, reference=False, gpu=True, shard=n,
                            copies=1) for n in (1, 8)}
    assert 3.7e9 < plans[1].student_params < 3.8e9
    assert main(["--gpus", "1", "--gpu-gib", "80", *_args(demo, student=student)]) == 1
    assert f"error: student={student}: the models need {plans[1].describe()}, but this rank has 80 GiB free" in \
        capsys.readouterr().err
    eight = ["--gpus", "8", "--gpu-gib", "80"]
    assert main([*eight, *_args(demo, student=student, **{"batch.questions_per_step": 8})]) == 0
    out = capsys.readouterr().out
    assert f"memory: {plans[8].describe()}; {80 - plans[8].per_rank / 2**30:.3g} GiB of each GPU left" in out
    assert "lower rollout.batch_size" not in out
    # 64 sequences of 30,000 new tokens: 36 layers x 2 x 2 KV heads x 128 x 2 bytes = 36.9 kB a token, 71 GB.
    long = {"batch.questions_per_step": 8, "group_size": 64, "max_new_tokens": 30000, "batch.max_tokens": 40000}
    assert main([*eight, *_args(demo, student=student, **long)]) == 0
    assert "GiB a rank (64 sequences of at most" in (out := capsys.readouterr().out)
    assert f"more than the {80 - plans[8].per_rank / 2**30:.3g} GiB left: lower rollout.batch_size" in out


def test_an_update_micro_batchs_activations_are_estimated_with_what_to_change(demo, capsys):
    """It prints what one update micro-batch of batch.max_tokens keeps for its backward on a GPU: the estimate of
    ``ril_fast.activations`` (bf16; the larger update; the vision tower over the prompt with the most image tokens,
    counted here from its real encoding); where that exceeds the GPU's memory the plan leaves, what to change
    (checkpointing while it is off, the token budget); never a refusal: the exit status is the checks'."""
    _, processor = load(demo.student, device="cpu")
    config = AutoConfig.from_pretrained(demo.student)
    rows = [json.loads(line) for line in demo.train.read_text().splitlines()]
    images = max(int((processor.encode_prompt(r["question"], [demo.train.parent / p for p in r["images"]]).input_ids
                      == config.image_token_id).sum()) for r in rows)
    left = 78 - memory.plan(config, disc=True, reference=False, gpu=True, shard=1).per_rank / 2**30

    def words(recomputed: bool, disc: bool = True) -> tuple[float, str]:
        gib = activations.activation_bytes(config, 4096, checkpointing=recomputed, gpu=True, disc=disc,
                                           image_tokens=images) / 2**30
        update = "the larger of the policy's and the discriminator's update" if disc else "the policy update"
        layers = "layers recomputed" if recomputed else "every layer's activations kept"
        return gib, (f"activations of one update micro-batch of batch.max_tokens=4096: ~{gib:.3g} GiB a rank (bf16, "
                     f"{update}, {layers}; the vision tower over one prompt's images, {images} image tokens)")

    (kept, said), (recomputed, said_recomputed) = words(False), words(True)
    assert images > 0 and 0 < recomputed < kept
    assert main(_args(demo)) == 0
    assert f"{said}\n" in capsys.readouterr().out  # it fits: nothing to change
    # A GPU with room for the plan and the recomputed activations only: the advice, the same exit status.
    gib = repr(78 - left + (kept + recomputed) / 2)
    assert main(["--gpu-gib", gib, *_args(demo)]) == 0
    assert f"{said}: more than the {(kept + recomputed) / 2:.3g} GiB left: set batch.activation_checkpointing=true " \
           f"or lower batch.max_tokens\n" in capsys.readouterr().out
    checkpointed = _args(demo, **{"batch.activation_checkpointing": "true"})
    assert main(["--gpu-gib", gib, *checkpointed]) == 0
    assert f"{said_recomputed}\n" in capsys.readouterr().out
    gib = repr(78 - left + recomputed / 2)  # not even recomputed: the token budget alone is left to change
    assert main(["--gpu-gib", gib, *checkpointed]) == 0
    assert f"{said_recomputed}: more than the {recomputed / 2:.3g} GiB left: lower batch.max_tokens\n" in \
        capsys.readouterr().out
    assert main(_args(demo, teachers="")) == 0  # RL only: no discriminator
    assert f"{words(False, disc=False)[1]}\n" in capsys.readouterr().out


def test_offloaded_the_hosts_memory_is_checked_when_given(demo, capsys):
    """With batch.cpu_offload the plan's host bytes a rank are checked against --host-gib shared by the GPUs of a
    node (--gpus-per-node, else --gpus up to 8), as the trainer shares the CPU's memory among the ranks on it; without
    --host-gib the run is not refused and the output says what was not checked."""
    offload = _args(demo, **{"batch.cpu_offload": "true"})
    plan = memory.plan(AutoConfig.from_pretrained(demo.student), disc=True, reference=False, gpu=True, shard=2,
                       offload=True)
    assert main(["--gpus", "2", *offload]) == 0
    assert f"the host's memory ({plan.host_per_rank / 2**30:.3g} GiB a rank: --host-gib)" in capsys.readouterr().out
    enough = 2 * plan.host_per_rank / 2**30  # two GPUs on the node
    assert main(["--gpus", "2", "--host-gib", str(enough), *offload]) == 0
    assert "host's memory" not in capsys.readouterr().out
    assert main(["--gpus", "2", "--host-gib", str(enough * 0.99), *offload]) == 1
    assert "but this rank's share of the CPU's available memory is" in capsys.readouterr().err
    assert main(["--gpus", "2", "--gpus-per-node", "1", "--host-gib", str(enough / 2), *offload]) == 0
    # 16 GPUs: 8 a node unless told, each rank of a node with its share of the node's memory
    plan = memory.plan(AutoConfig.from_pretrained(demo.student), disc=True, reference=False, gpu=True, shard=16,
                       offload=True)
    enough, offload = 8 * plan.host_per_rank / 2**30, _args(demo, **{"batch.cpu_offload": "true",
                                                                    "batch.questions_per_step": 16})
    assert main(["--gpus", "16", "--host-gib", str(enough), *offload]) == 0
    assert "host's memory" not in capsys.readouterr().out
    assert main(["--gpus", "16", "--host-gib", str(enough * 0.99), *offload]) == 1
    assert "but this rank's share of the CPU's available memory is" in capsys.readouterr().err


def test_what_the_trainer_would_refuse_is_an_error(demo, capsys, tmp_path, monkeypatch):
    (tmp_path / "not_a_demo").mkdir()
    (tmp_path / "not_a_demo" / "mine.txt").write_text("kept")
    monkeypatch.setenv("RIL_FAST_DEMO", str(tmp_path / "not_a_demo"))  # a folder the demo cannot be built in
    assert main([]) == 1
    assert "error: the built-in demo cannot be built in " in capsys.readouterr().err
    assert main(_args(demo, **{"batch.max_tokens": 20})) == 1
    assert f"error: {demo.train}:1: the prompt takes" in capsys.readouterr().err
    assert main(["--gpus", "6", *_args(demo, **{"batch.shard_ranks": 4})]) == 1
    assert "error: batch.shard_ranks=4: must divide the number of GPUs (6)" in capsys.readouterr().err


@pytest.mark.parametrize("model_type, refusal", [
    ("gpt2", None), ("opt", None),  # configs that name no num_key_value_heads: every head is a key-value head
    ("bloom", "computes its attention itself"), ("gemma2", "soft-caps its attention logits"),
])
def test_a_text_student_is_planned_or_refused_as_the_trainer_would(model_type, refusal, text_data, tmp_path_factory,
                                                                    tmp_path, capsys, monkeypatch,
                                                                    one_thread):  # noqa: F811
    """A text-only student the trainer trains gets its plan and its KV cache (GPT-2 and OPT, whose configs have no
    num_key_value_heads, died of an AttributeError); one that ``models.load`` would refuse is refused with its words,
    naming student=, by this command and by the trainer's set-up before any model loads (the trainer refused it only
    in ``load``, in a 77-line traceback)."""
    folder = text_family(tmp_path_factory, model_type)
    status = main(_text_args(folder, text_data))
    out, err = capsys.readouterr()
    if refusal is None:
        assert status == 0, err
        _, processor = load(folder, device="cpu")
        longest = max(processor.encode_prompt(f"What is {i} plus {i}?", []).prompt_len for i in range(8))
        kv = memory.kv_cache_bytes(AutoConfig.from_pretrained(folder), 4 * (longest + 16), gpu=True)  # G = 2 of 2
        assert f"rollout KV cache: up to {kv / 2**30:.3g} GiB a rank (4 sequences of at most {longest} + 16 " in out
        return
    words = rf"^student={folder}: model type '{model_type}' {refusal}"
    assert status == 1 and f"error: student={folder}: model type '{model_type}' {refusal}" in err
    loaded = []
    monkeypatch.setattr(train, "load", lambda *a, **k: loaded.append(a))
    with pytest.raises(ConfigError, match=words):
        train.setup(load_config(_text_args(folder, text_data, output_dir=tmp_path / "run", progress="false")))
    assert not loaded and not (tmp_path / "run").exists()


def test_the_trainer_says_a_model_it_cannot_train_in_one_line(text_data, tmp_path_factory, tmp_path):
    """A model ril_fast cannot train found out only in a forward (GPT-BigCode's layers drop the position ids, so its
    packed samples would see each other: ``ril_fast.attention``) stops ``python -m ril_fast.train`` with one
    ``error:`` line, as a ConfigError does, not a traceback."""
    folder = text_family(tmp_path_factory, "gpt_bigcode")
    done = subprocess.run([sys.executable, "-m", "ril_fast.train", *_text_args(folder, text_data, steps=1),
                           f"output_dir={tmp_path / 'run'}", "progress=false"], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith("error: GPTBigCodeAttention gets neither position ids nor sample "
                                                   "boundaries"), done.stderr[-3000:]
    assert "Traceback" not in done.stderr and done.stderr.count("error") == 1, done.stderr[-3000:]


# Phi-3 128k's rotary scaling, tiny: the short factors up to 48 positions, the long ones beyond (head_dim 16); Phi-3's
# config takes the original context from its own field.
_LONGROPE = dict(rope_scaling=dict(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[4.0] * 8),
                 original_max_position_embeddings=48)


@pytest.mark.parametrize("model_type, extra, limit", [
    ("mistral", dict(sliding_window=8), (8, "the model's sliding window")),  # every layer slides
    ("mistral", dict(sliding_window=None), (512, "the model's context")),
    ("gemma3_text", dict(sliding_window=8), (8, "the model's sliding window")),  # one layer in 6 slides
    ("gemma3_text", dict(sliding_window=8, layer_types=["full_attention"] * 2), (512, "the model's context")),
    ("qwen2", dict(sliding_window=8), (512, "the model's context")),  # use_sliding_window=False: none slides
    ("qwen2", dict(sliding_window=8, use_sliding_window=True, max_window_layers=1), (8, "the model's sliding window")),
    ("mistral", dict(sliding_window=4096), (512, "the model's context")),  # a window past the context changes nothing
    ("phi3", _LONGROPE, (48, "the model's original context (LongRoPE)")),
    ("gemma3_text", dict(rope_parameters=dict(  # per layer type, as Gemma 3's: one of them LongRoPE
        full_attention=dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 8, long_factor=[4.0] * 8,
                            original_max_position_embeddings=48),
        sliding_attention=dict(rope_type="default", rope_theta=10000.0)), layer_types=["full_attention"] * 2),
     (48, "the model's original context (LongRoPE)")),
    ("phi3", {}, (512, "the model's context")),
])
def test_a_sliding_window_bounds_a_sample_as_the_context_does(model_type, extra, limit):
    """ril_fast's attention has no sliding window, so a sample longer than the window some layer attends within is
    refused in the forward: the window, where a layer slides and it is the shorter, is the model's limit."""
    config = AutoConfig.for_model(model_type, num_hidden_layers=2, max_position_embeddings=512, hidden_size=64,
                                  num_attention_heads=4, **extra)
    assert length_limit(config) == limit


@pytest.mark.parametrize("model_type, refusal", [
    ("phi", "model type 'phi' adds a bias to its logits"),  # its LM head: models._check_attention
    ("mamba", "its MambaMixer layers carry state along the sequence"),  # recurrence.per_sample
    ("qwen2", None),
])
def test_the_meta_student_is_refused_as_load_refuses_it(model_type, refusal):
    """``meta_student`` (the check before any model loads) refuses what ``load`` refuses, its LM head and layers
    that carry state along the sequence included, as a ConfigError naming ``student=``; a student ril_fast trains
    is built on the meta device."""
    small = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2)
    if model_type != "mamba":
        small.update(intermediate_size=128, num_attention_heads=4)
    config = AutoConfig.for_model(model_type, **small)
    if refusal is None:
        assert next(meta_student("DIR", config).parameters()).is_meta
        return
    with pytest.raises(ConfigError, match=rf"^student=DIR: {refusal}"):
        meta_student("DIR", config)


def test_a_rollouts_kv_cache_counts_a_ranks_questions_rounded_up():
    """4 questions a step over 8 GPUs: a rank gets at most one (rounded up, not down to none), its G = 8 responses
    8 sequences in the rollout's generate call."""
    from types import SimpleNamespace as NS

    cfg = NS(max_new_tokens=12, group_size=8, rollout=NS(batch_size=64), batch=NS(questions_per_step=4))
    config = AutoConfig.for_model("qwen2", vocab_size=1000, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4)
    kv, words = _kv_cache(cfg, config, 8, [100], [])
    assert kv == memory.kv_cache_bytes(config, 8 * (100 + 12), gpu=True) / 2**30 > 0
    assert "(8 sequences of at most 100 + 12 tokens, bf16)" in words


def test_packing_is_exact_within_longropes_original_context_only(tmp_path_factory, one_thread):  # noqa: F811
    """Why LongRoPE's original context bounds a sample: transformers picks the rotary factors of a whole forward from
    its longest position, so a packed row holding a sample past 48 tokens turns the short one beside it (here by
    1e-3 at least, with random weights); samples within it pack exactly."""
    from models_fixtures import random_samples

    from ril_fast.models import response_logprobs

    model, processor = load(text_family(tmp_path_factory, "phi3", **_LONGROPE), device="cpu")
    assert length_limit(model.config) == (48, "the model's original context (LongRoPE)")
    short, other = dict(images=[], question="what is x ?", response="x = 4 ."), random_samples([0])[0]
    long = dict(other, question=" ".join(["the red circle"] * 30) + "?")
    assert [processor.encode(s).length for s in (short, long)][0] <= 48 < processor.encode(long).length
    within = dict(short, question="and y ?", response="y = 2 .")
    with torch.no_grad():
        alone = response_logprobs(model, processor, [short], packed=False)[0]
        beside_long = response_logprobs(model, processor, [short, long], packed=True)[0]
        beside_short = response_logprobs(model, processor, [short, within], packed=True)[0]
    assert (beside_long - alone).abs().max() > 1e-3
    assert (beside_short - alone).abs().max() < 1e-5


def test_prompts_a_sliding_window_cannot_hold_are_refused_before_any_model_loads(text_data, tmp_path_factory,
                                                                               tmp_path, capsys, monkeypatch):
    """A sliding window shorter than a prompt and max_new_tokens stopped the trainer at its first forward (after
    every model had loaded, in the middle of a rollout): now this command and the trainer's set-up name the
    example's line first, as for the context, and held-out examples too."""
    folder = text_family(tmp_path_factory, "mistral", sliding_window=32)
    assert main(_text_args(folder, text_data)) == 1
    err = capsys.readouterr().err
    assert f"error: {text_data / 'train.jsonl'}:1: the prompt takes " in err
    assert "with max_new_tokens=16 that exceeds the model's sliding window (32 tokens)" in err
    loaded = []
    monkeypatch.setattr(train, "load", lambda *a, **k: loaded.append(a))
    with pytest.raises(DataError, match="exceeds the model's sliding window"):
        train.setup(load_config(_text_args(folder, text_data, output_dir=tmp_path / "run", progress="false")))
    assert not loaded
    long = dict(id="l", question="What is 1 plus 1? " * 8, answer="2", images=[])  # 85 tokens
    (tmp_path / "long.jsonl").write_text(json.dumps(long))
    held_out = _text_args(folder, text_data, eval_data=tmp_path / "long.jsonl")
    assert main([*held_out, "max_new_tokens=8"]) == 1  # the training prompts fit: 21 + 8 tokens
    assert f"error: {tmp_path / 'long.jsonl'}:1: the prompt takes " in capsys.readouterr().err


def test_the_kv_cache_is_that_of_the_larger_generate_call(demo, tmp_path, capsys):
    """Evaluation's generate (up to rollout.batch_size held-out prompts a rank, padded to the longest) can hold more
    than a rollout's: the larger is reported, and named, and it is the one checked against the memory left."""
    rows = [json.loads(line) for line in demo.test.read_text().splitlines()]
    rows[0]["question"] = "Look closely at the picture before you answer. " * 100 + rows[0]["question"]
    rows[0]["images"] = [str(demo.test.parent / p) for p in rows[0]["images"]]
    for r in rows[1:]:
        r["images"] = [str(demo.test.parent / p) for p in r["images"]]
    held_out = tmp_path / "test.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, processor = load(demo.student, device="cpu")
    longest = max(processor.encode_prompt(r["question"], r["images"]).prompt_len for r in rows)
    train_rows = [json.loads(line) for line in demo.train.read_text().splitlines()]
    train_longest = max(processor.encode_prompt(r["question"], [demo.train.parent / p for p in r["images"]]).prompt_len
                        for r in train_rows)
    config = AutoConfig.from_pretrained(demo.student)
    rollout = memory.kv_cache_bytes(config, 8 * (train_longest + 12), gpu=True) / 2**30  # G = 2 of 4 questions
    evaluation = memory.kv_cache_bytes(config, 4 * (longest + 12), gpu=True) / 2**30  # the 4 held-out prompts
    assert evaluation > 2 * rollout
    plan = memory.plan(config, disc=True, reference=False, gpu=True, shard=1)
    gib = plan.per_rank / 2**30 + (rollout + evaluation) / 2  # room for a rollout's, not for evaluation's
    assert main(["--gpu-gib", repr(gib), *_args(demo, eval_data=held_out)]) == 0
    out = capsys.readouterr().out
    assert f"evaluation's KV cache: up to {evaluation:.3g} GiB a rank (4 held-out prompts of at most {longest} + 12 " \
           f"tokens, bf16; a rollout's: up to {rollout:.3g} GiB): more than the {gib - plan.per_rank / 2**30:.3g} " \
           f"GiB left: lower rollout.batch_size" in out


def test_each_prompt_and_response_is_counted_once(demo, capsys, monkeypatch):
    """The lengths it prints are those the data checks counted: no prompt or teacher response is tokenised twice
    (the training set's were, ~36% of the command's time on 100k examples)."""
    counted = {"prompt_lengths": [], "response_lengths": []}
    for name, key in (("prompt_lengths", lambda p: (p[0], tuple(p[1]))), ("response_lengths", lambda t: t)):
        real = getattr(Processor, name)
        monkeypatch.setattr(Processor, name, lambda self, items, real=real, name=name, key=key: (
            counted[name].extend(map(key, items)) or real(self, items)))
    assert main(_args(demo)) == 0
    assert "teacher responses' tokens" in capsys.readouterr().out
    prompts = {(e.question, tuple(e.image_sizes)) for path in (demo.train, demo.test) for e in load_examples(path)}
    texts = {json.loads(line)["response"] for path in demo.teachers for line in path.read_text().splitlines()}
    assert sorted(counted["prompt_lengths"]) == sorted(prompts)  # each distinct prompt once
    assert sorted(counted["response_lengths"]) == sorted(texts)


def test_a_remembered_count_tells_prompts_apart_by_their_images(demo):
    """The same question about images of other sizes is another prompt (more image tokens): remembered counts are
    keyed by both, and each equals what the processor counts afresh."""
    _, processor = load(demo.student, device="cpu")
    prompts = [("What shape is in the image?", [(64, 64)]), ("What shape is in the image?", [(256, 192)]),
               ("What shape is in the image?", [(64, 64), (64, 64)]), ("What shape is in the image?", [])]
    want = processor.prompt_lengths(prompts)
    assert len(set(want)) == len(prompts)
    counted = _remembered(processor.prompt_lengths, key=prompt_key)
    assert counted(prompts[:1]) == want[:1] and counted(prompts) == want and counted(prompts[::-1]) == want[::-1]
