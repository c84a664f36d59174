"""The trainer end to end on a small slice of the demo: every mode runs, learns something, and repeats.

Modes (the paper's ablations and the loop's switches): RL only, one teacher, two teachers; μ = 1 and 2;
β = 0 and > 0; a Qwen2.5-VL and an InternVL student; and two ranks under torchrun (gloo).
"""

import contextlib
import dataclasses
import json
import math
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models_fixtures import one_thread  # noqa: F401
from safetensors.torch import load_file, save_file

import ril_fast.metrics
from ril_fast.demo import build_demo
from ril_fast.distributed import _param_groups, _reshards_after_forward, fsdp_modules
from ril_fast.flops import Sample, phase_flops
from ril_fast.metrics import PhaseTimer, read_metrics
from ril_fast.tiny import make_tiny
from ril_fast import train
from ril_fast.config import load_config
from ril_fast.train import main

STEPS = 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory, one_thread):  # noqa: F811
    return build_demo(tmp_path_factory.mktemp("demo"), max_train=32, max_test=8)


def _args(demo, out, teachers, **extra):
    args = dict(student=demo.student, train_data=demo.train, teachers=",".join(str(t) for t in teachers),
                eval_data=demo.test, eval_every=0, eval_max_examples=4, steps=STEPS, group_size=2,
                max_new_tokens=11, output_dir=out, progress="false", **{"batch.questions_per_step": 2,
                                                                       "disc.pretrain_steps": 1, "seed": 3})
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def _weights(folder):
    return load_file(str(next(folder.glob("*.safetensors"))))


MODES = {
    "rl_only": dict(teachers=0),
    "one_teacher": dict(teachers=1),
    "two_teachers": dict(teachers=2),
    "two_teachers_mu2_beta": dict(teachers=2, mu=2, beta=0.1),
    "rl_only_beta": dict(teachers=0, beta=0.1),
    # Another student family (tiles, no mrope), its own tokenizer re-tokenising the teachers' text.
    "internvl_student_two_teachers_mu2": dict(teachers=2, arch="internvl", mu=2, max_new_tokens=16),
    # Qwen3-VL: DeepStack features from the vision tower, interleaved mrope, learned vision positions.
    "qwen3_vl_student_two_teachers_beta": dict(teachers=2, arch="qwen3_vl", beta=0.1),
    # Qwen3.5: a hybrid decoder (a linear-attention layer, then full attention), with recomputation.
    "qwen3_5_student_one_teacher_mu2": dict(teachers=1, arch="qwen3_5", mu=2,
                                            **{"batch.activation_checkpointing": True}),
}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_runs_and_moves_the_student(demo, tmp_path, mode):
    spec = dict(MODES[mode])
    teachers = demo.teachers[:spec.pop("teachers")]
    student = make_tiny(tmp_path / "student", arch=spec.pop("arch")) if "arch" in spec else demo.student
    out = main(_args(demo, tmp_path / "run", teachers, student=student, **spec))
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    evals = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, STEPS]  # before the first step and after the last
    for r in records:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
    if teachers:
        assert all(0 <= r["disc_accuracy"] <= 1 and "teacher_answer_reward" in r for r in steps)
        assert steps[0]["teacher_answer_reward"] == 1.0  # the demo's templated teachers are always right
    else:
        assert not any("disc_accuracy" in r or "teacher_answer_reward" in r for r in steps)
    before, after = _weights(student), _weights(out / "final")
    assert before.keys() == after.keys()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    # The student moves exactly when some group had a learning signal. With teachers there always is
    # one (the templated teachers are right); RL only from a cold student usually has none: every
    # sample is wrong, every advantage 0 — the zero-reward trap that teacher-guided groups escape.
    signal = any(r["dead_group_fraction"] < 1 for r in steps)
    assert signal or not teachers
    assert bool(moved) == signal, (len(moved), [r["dead_group_fraction"] for r in steps])
    if spec.get("beta"):
        assert (steps[-1]["kl"] > 0) == signal  # the student has left the reference, if it moved
    if spec.get("mu", 1) > 1 and signal:
        assert steps[-1]["ratio"] != 1.0  # the second update sees π_θ ≠ π_old


def test_same_seed_same_metrics(demo, tmp_path):
    """Two runs of one config on one machine log identical step metrics (timings aside)."""
    runs = [read_metrics(main(_args(demo, tmp_path / f"run{i}", demo.teachers)) / "metrics.jsonl") for i in range(2)]
    strip = [[{k: v for k, v in r.items() if not k.startswith("time/") and k not in UNPINNED}
              for r in run] for run in runs]
    assert strip[0] == strip[1]


# demo student, its head tied to its embeddings, DeepStack, hybrid, tiles
@pytest.mark.parametrize("arch", [None, "tied", "qwen3_vl", "qwen3_5", "internvl3_5"])
def test_two_ranks_under_torchrun(demo, tmp_path, arch):
    out = tmp_path / "run"
    if arch == "tied":
        student = _tied_copy(demo.student, tmp_path / "tied")
    else:
        student = demo.student if arch is None else make_tiny(tmp_path / "student", arch=arch)
    # FSDP2, recomputing, and a reference model (β > 0) sharded like the student
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ril_fast.train",
           *_args(demo, out, demo.teachers, student=student,
                  beta=0.1, **{"batch.questions_per_step": 4, "batch.activation_checkpointing": True})]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)
    # Metrics are over both ranks' outputs: the discriminator's BCE after one pre-training step is near
    # ln 2 (0.68 on one rank), not one rank's half of it.
    assert abs(steps[0]["disc_loss"] - math.log(2)) < 0.1, steps[0]["disc_loss"]
    # Step 1 scores the initial student against the reference, which each rank holds a shard of: the same model.
    assert steps[0]["kl"] < 1e-6 and steps[-1]["kl"] > steps[0]["kl"], [r["kl"] for r in steps]
    # final/ is gathered from both ranks' shards: whole tensors, equal to what one process reads from the last
    # step's checkpoint (each rank's own shards would be half of each tensor).
    from ril_fast.export import main as export_main

    export_main([str(out / f"step-{STEPS}"), str(tmp_path / "exported")])
    final, exported = (load_file(str(next(folder.glob("*.safetensors")))) for folder in (out / "final",
                                                                                           tmp_path / "exported"))
    initial = load_file(str(next(Path(student).glob("*.safetensors"))))
    assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in initial.items()}
    assert final.keys() == exported.keys() and all(torch.equal(final[k], exported[k]) for k in final)
    if arch == "tied":  # trained as one tensor, written once, loading tied again
        from transformers import AutoModelForImageTextToText

        embeddings = "model.embed_tokens.weight"  # as the demo student's files name them
        assert "lm_head.weight" not in final and not torch.equal(final[embeddings], initial[embeddings])
        for folder in (out / "final", tmp_path / "exported"):
            loaded = AutoModelForImageTextToText.from_pretrained(folder)
            assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
            assert torch.equal(loaded.lm_head.weight, final[embeddings])


def test_discriminator_takes_its_own_optimiser_settings(demo, tmp_path, monkeypatch):
    """disc.weight_decay and disc.grad_clip go to the discriminator's AdamW and clipping, optim.* to the
    student's only."""
    run = train.setup(load_config(_args(demo, tmp_path / "run", demo.teachers, **{
        "disc.weight_decay": 0.2, "disc.grad_clip": 0.3, "optim.weight_decay": 0.1, "optim.grad_clip": 0.05})))
    assert {g["weight_decay"] for g in run.disc_optimizer.param_groups} == {0.2}
    assert {g["weight_decay"] for g in run.optimizer.param_groups} == {0.1}
    clips, step = [], train.optimizer_step
    monkeypatch.setattr(train, "optimizer_step", lambda model, opt, clip: clips.append(
        (opt is run.disc_optimizer, clip)) or step(model, opt, clip))
    train.train_step(run, step=1)
    run.log.close()
    assert sorted(set(clips)) == [(False, 0.05), (True, 0.3)]


def test_step_metrics_count_every_rank(demo, tmp_path, monkeypatch):
    """tokens_per_s, MFU and the teacher-verdict cache's hit rate are over all ranks' outputs, as the
    rewards are, and the peak memory is the largest rank's: a second rank is simulated by the gather, with
    its own cache counts, peak memory, model FLOPs and matmul peak."""
    run = train.setup(load_config(_args(demo, tmp_path / "run", demo.teachers)))
    sent = []

    def gather(obj):
        if not isinstance(obj, tuple):  # set-up's memory check: this rank's alone
            return [obj]
        sent.append(obj)
        groups, types, tokens, _, memory, (flops, peak) = obj
        return [obj, (groups, types, tokens, (0, 10), memory + 5.0, (3 * flops, 2 * peak))]

    monkeypatch.setattr(train.distributed, "all_gather_objects", gather)
    metrics = train.train_step(run, step=1)
    run.log.close()
    (_, _, tokens, (hits, misses), memory, (flops, peak)), = sent
    assert tokens > 0 and misses > 0 and flops > 0
    assert peak == run.peak_tflops > 0
    assert metrics["tokens_per_s"] * metrics["step_time_s"] == pytest.approx(2 * tokens)
    assert metrics["mfu"] == pytest.approx(4 * flops / (metrics["step_time_s"] * 3 * peak * 1e12))
    assert metrics["teacher_judge_cache_hit_rate"] == pytest.approx(hits / (hits + misses + 10))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # this process's peak (KiB) in GiB
    assert 0 < memory <= rss and metrics["peak_memory_gib"] == round(memory + 5.0, 3)

    # The same step with zero-weight filler micro-batches (as a rank with fewer outputs gets): the same
    # tokens, the fillers' not counted.
    agreement, plan, made = train.rank_agreement, train.micro_batches, []
    monkeypatch.setattr(train, "rank_agreement", lambda *a: {**agreement(*a), "agree": lambda n: 12})
    monkeypatch.setattr(train, "micro_batches", lambda *a, **k: made.append(plan(*a, **k)) or made[-1])
    run = train.setup(load_config(_args(demo, tmp_path / "again", demo.teachers)))
    train.train_step(run, step=1)
    run.log.close()
    assert any((mb.weight == 0).any() for mb in made[-1])
    assert sent[1][2] == tokens and sent[1][5][0] == flops  # fillers are no work of the step


def test_loss_normalisers_count_every_rank(demo, tmp_path, monkeypatch):
    """Eq. 1 and Eq. 2 divide by the step's outputs over all ranks (Eq. 2 times L_max), never this rank's: a
    second rank with as many outputs is simulated by the sum, and what the two passes receive is recorded."""
    run = train.setup(load_config(_args(demo, tmp_path / "run", demo.teachers)))
    seen, policy_pass, disc_pass = {}, train.policy_pass, train.disc_pass
    monkeypatch.setattr(train.distributed, "all_reduce_sum", lambda t: 2 * t)
    monkeypatch.setattr(train, "policy_pass", lambda model, micro, adv, normalizer, *a, **k: seen.update(
        policy=float(normalizer), outputs=len(adv)) or policy_pass(model, micro, adv, normalizer, *a, **k))
    monkeypatch.setattr(train, "disc_pass", lambda model, micro, labels, n, *a, **k: seen.update(
        disc=float(n)) or disc_pass(model, micro, labels, n, *a, **k))
    train.train_step(run, step=1)
    run.log.close()
    assert seen["outputs"] == 2 * 2 * 2  # this rank's: 2 questions x (G = 2 student + 2 teacher outputs)
    assert seen["disc"] == 2 * seen["outputs"] and seen["policy"] == 2 * seen["outputs"] * 11  # L_max = 11


class _CountingTimer(PhaseTimer):
    """The trainer's phase timer, also counting each phase's FLOPs with torch's FlopCounterMode."""

    def __init__(self):
        super().__init__()
        self.flops, self.ops = {}, set()

    @contextlib.contextmanager
    def __call__(self, phase: str):
        from torch.utils.flop_counter import FlopCounterMode

        with super().__call__(phase), FlopCounterMode(display=False) as counter:
            yield
        self.flops[phase] = self.flops.get(phase, 0) + counter.get_total_flops()
        self.ops |= {str(op) for counts in counter.get_flop_counts().values() for op in counts}


@pytest.mark.parametrize("mu, beta, teachers", [(2, 0.1, True), (1, 0.0, False)])
def test_step_flops_are_what_the_step_computes(demo, tmp_path, monkeypatch, mu, beta, teachers):
    """MFU's numerator against torch's FlopCounterMode around each phase of a step (3 questions, G = 3):
    the discriminator's updates and scores, the frozen passes (π_old for μ > 1, π_ref for β > 0) and the
    policy updates equal ril_fast.flops' phases exactly; the rollout, its useful work plus what batched
    generation computes besides (prompts left-padded to the longest, every row decoded until the longest
    response ends). FlopCounterMode has no formula for the CPU's fused attention kernel, so attention is
    left out of both sides (tests/test_flops.py checks its terms against eager attention). The trainer
    takes each question's prompt from its outputs: the same FLOPs as the prompts the rollout rendered."""
    run = train.setup(load_config(_args(demo, tmp_path / "run", demo.teachers if teachers else [], mu=mu,
                                        beta=beta, group_size=3, **{"batch.questions_per_step": 3})))
    rendered, seen, inner, count = [], [], run.processor, ril_fast.metrics.model_flops

    class Recording:
        def __getattr__(self, name):
            return getattr(inner, name)

        def encode_prompt(self, question, images=None):
            rendered.append(inner.encode_prompt(question, images))
            return rendered[-1]

    run.processor = Recording()
    monkeypatch.setattr(ril_fast.metrics, "model_flops", lambda *a: seen.append(a) or count(*a))
    timer = _CountingTimer()
    train.train_step(run, step=1, timer=timer)
    run.log.close()
    (_, encoded, sources), = seen
    samples = [Sample.of(e) for e in encoded]
    students = [x for x, s in zip(samples, sources) if s == "student"]
    prompts = [Sample.of(e) for e in rendered]
    assert len(prompts) == 3 and all(p.grids for p in prompts)
    assert len(students) == 9 and len(samples) == (18 if teachers else 9)
    frozen = int(mu > 1) + int(beta > 0)
    assert count(run, encoded, sources) == sum(phase_flops(run.shapes, prompts, students, samples, group_size=3,
                                                           mu=mu, frozen_models=frozen, disc=teachers).values())

    assert timer.ops == {"aten.mm", "aten.addmm"}  # no attention op counted (nor a convolution: a matmul here)
    s = dataclasses.replace(run.shapes, query_width=0, vis_width=0)  # no attention terms
    phases = phase_flops(s, prompts, students, samples, group_size=3, mu=mu, frozen_models=frozen, disc=teachers)
    assert (phases["disc_score"] > 0) == teachers and (phases["old_ref_logprobs"] > 0) == (frozen > 0)
    for phase in ("disc_update", "disc_score", "old_ref_logprobs", "policy_update"):
        assert timer.flops.get(phase, 0) == phases[phase], phase
    longest_prompt, longest_response, head = max(p.prompt for p in prompts), max(x.response for x in students), \
        2 * s.hidden * s.vocab
    generated = sum(s.vision(p.grids) for p in prompts) + 9 * (2 * longest_prompt * s.decoder_params + head) \
        + 9 * (longest_response - 1) * (2 * s.decoder_params + head)
    assert phases["rollout"] <= timer.flops["rollout"] == generated


# Run in a fresh interpreter: only transformers opens the exported folder, and the script fails if
# anything imported ril_fast. transformers' Qwen2_5_VLProcessor cannot be built here (its video processor
# needs torchvision, which this machine cannot have: shared/ENVIRONMENT.md), so the script uses the
# folder's tokenizer (its chat template) and image processor, and writes what that processor would: one
# placeholder per image token and the token types (1 = image; without them transformers gives the image
# tokens text positions). It prints the greedy continuation's token ids and their log-probs.
_PLAIN_HF = """
import json, sys
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
folder, question, image, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(folder)
image_processor = AutoImageProcessor.from_pretrained(folder)
model = AutoModelForImageTextToText.from_pretrained(folder).eval()
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
pixels = image_processor(images=[Image.open(image).convert("RGB")], return_tensors="pt")
n_image = int(pixels["image_grid_thw"].prod()) // model.config.vision_config.spatial_merge_size ** 2
pad = model.config.image_token_id
ids = [t for i in tokenizer(text, add_special_tokens=False)["input_ids"]
       for t in ([pad] * n_image if i == pad else [i])]
ids = torch.tensor([ids])
with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"],
                         mm_token_type_ids=(ids == pad).int(), output_logits=True, return_dict_in_generate=True)
tokens = out.sequences[0, ids.shape[1]:]
logprobs = [step[0].double().log_softmax(-1)[t].item() for step, t in zip(out.logits, tokens)]
assert not any(name.split(".")[0] == "ril_fast" for name in sys.modules), "ril_fast was imported"
print(json.dumps({"tokens": tokens.tolist(), "logprobs": logprobs}))
"""


def test_prompts_are_kept_within_their_step_only(demo, tmp_path):
    """A step renders each of its questions' prompts once (its 2G outputs take them from the cache) and keeps
    none past the next step's start or an evaluation: nothing else asks for them until the next epoch."""
    run = train.setup(load_config(_args(demo, tmp_path / "run", demo.teachers, eval_max_examples=3)))
    cache = run.processor._cached_prompt
    for step in (1, 2):
        train.train_step(run, step=step)
        info = cache.cache_info()  # (its counts start again with the step)
        assert (info.currsize, info.misses, info.hits) == (2, 2, 2 * 4)  # 2 questions a step, 2 + 2 outputs each
    train.evaluate_now(run)
    assert cache.cache_info().currsize == 0
    run.log.close()


def test_final_folder_opens_in_plain_transformers_and_answers_as_the_trainer_does(demo, tmp_path):
    """``output_dir/final/`` is a plain HF folder: transformers alone (no ril_fast in the process) loads
    the model, its tokenizer (chat template) and its image processor; its greedy answer to a held-out
    question is, token for token, the one ril_fast's evaluation decodes from the same weights, with the
    same log-probs (to 1e-5)."""
    from ril_fast.data import load_examples, to_sample
    from ril_fast.models import load, response_logprobs
    from ril_fast.rollout import sample_responses

    out = main(_args(demo, tmp_path / "run", demo.teachers))
    question = load_examples(demo.test)[0]
    n = 8
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", _PLAIN_HF, str(out / "final"), question.question,
                           str(question.images[0]), str(n)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    plain = json.loads(done.stdout.strip().splitlines()[-1])
    model, processor = load(out / "final", device="cpu")
    ours = sample_responses(model.eval(), processor, [to_sample(question)], greedy=True, max_new_tokens=n)[0][0]
    end = [] if ours.truncated else [processor.end_token_id]
    assert plain["tokens"][:len(ours.token_ids) + len(end)] == ours.token_ids + end
    # Scoring HF's whole continuation as a response: ril_fast's packed log-probs are transformers' own.
    sample = dict(to_sample(question), response_ids=plain["tokens"], truncated=True)
    ours_lp = response_logprobs(model, processor, [sample])[0].double()
    assert torch.allclose(ours_lp, torch.tensor(plain["logprobs"], dtype=torch.float64), rtol=0, atol=1e-5)


# A short deterministic run pinned to its per-step metrics. After an intended change of the numbers
# (the algorithm, the demo's student or data, the sampling), regenerate the file with
#     RIL_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_train.py -k golden
# and say why in the commit. Timings, and what follows from them, are not pinned.
GOLDEN = Path(__file__).parent / "golden" / "train_metrics.json"
UNPINNED = ("tokens_per_s", "step_time_s", "mfu", "peak_memory_gib")


def _tied_copy(student: Path, folder: Path) -> Path:
    """A copy of the demo student in ``folder`` with its LM head tied to the input embeddings (Qwen2.5-VL-3B's)."""
    shutil.copytree(student, folder)
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(config))
    weights = next(folder.glob("*.safetensors"))
    state = load_file(str(weights))
    del state["lm_head.weight"]  # a tied checkpoint holds the embeddings only
    save_file(state, str(weights), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("tied", [False, True], ids=["separate_head", "tied_head"])
def test_final_folder_in_bf16_is_the_bf16_cast_of_the_master_weights(demo, tmp_path, tied):
    """``export_dtype``: auto is bf16 on GPUs (the dtype their forwards ran in) and fp32 on CPUs. A sharded student
    exported in bf16 holds the bf16 cast of every fp32 weight its fp32 export holds, and its config (the VLM's
    text and vision configs too) names bf16, so ``from_pretrained(dtype="auto")`` loads it as written. An LM head
    tied to the embeddings (Qwen2.5-VL-3B's) is written once, as ``save_pretrained`` writes it, and loads tied."""
    from transformers import AutoModelForImageTextToText

    from ril_fast.distributed import init, shard_model
    from ril_fast.export import ExportDtype, export_hf
    from ril_fast.models import load

    assert ExportDtype.AUTO.on(torch.device("cuda", 0)) == torch.bfloat16
    assert ExportDtype.AUTO.on(torch.device("cpu")) == ExportDtype.FLOAT32.on(torch.device("cpu")) == torch.float32
    assert ExportDtype.BFLOAT16.on(torch.device("cpu")) == torch.bfloat16
    student = _tied_copy(demo.student, tmp_path / "tied") if tied else demo.student
    init()
    model, processor = load(student, device="cpu")
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    with torch.no_grad():  # weights no bf16 holds exactly
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    sharded = shard_model(model, mixed_precision=False)
    full, half = (export_hf(sharded, processor, tmp_path / name, is_main=True, dtype=dtype)
                  for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)))
    weights = {name: load_file(str(next(folder.glob("*.safetensors")))) for name, folder in (("fp32", full),
                                                                                             ("bf16", half))}
    assert weights["fp32"].keys() == weights["bf16"].keys()
    assert {t.dtype for t in weights["fp32"].values()} == {torch.float32}
    assert all(torch.equal(weights["bf16"][k], weights["fp32"][k].to(torch.bfloat16)) for k in weights["fp32"])
    assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in weights["fp32"].values())
    config = json.loads((half / "config.json").read_text())
    assert config["dtype"] == config["text_config"]["dtype"] == config["vision_config"]["dtype"] == "bfloat16"
    assert ("lm_head.weight" in weights["bf16"]) == (not tied)
    loaded = AutoModelForImageTextToText.from_pretrained(half, dtype="auto")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert (loaded.lm_head.weight is loaded.get_input_embeddings().weight) == tied


def _pinned(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k not in UNPINNED} for r in records]


@pytest.mark.parametrize("recompute, keep_gathered, offload", [(False, True, False), (True, True, False),
                                                               (False, False, False), (False, True, True)],
                         ids=["stored", "recomputed", "resharded", "offloaded"])
def test_golden_metrics(demo, tmp_path, monkeypatch, recompute, keep_gathered, offload):
    """Two teachers, μ = 2, β > 0, evaluations before, during and after: every logged value equals the
    pinned one (floats to 1e-5 relative: the rewards, accuracies and counts are exact fractions, so a
    single changed sample or verdict shows). With activation checkpointing the same values: recomputing
    the layers in the backward changes the memory, not the numbers; so does gathering each layer's
    weights again for the backward (``batch.keep_gathered=false``; this one rank keeps them by default),
    and keeping the trained state in the CPU's memory (``batch.cpu_offload``: on a CPU the copies are no-ops,
    so this checks the wiring, FSDP's offload path and AdamW's fused CPU kernel, which the offloaded
    optimisers use)."""
    resharding, offloaded, optimizers = [], [], []
    shard_model, adamw = train.distributed.shard_model, torch.optim.AdamW

    def recorded(model, **kw):
        sharded = shard_model(model, **kw)
        resharding.append([_reshards_after_forward(u) for u in fsdp_modules(sharded)[1:]])  # all but the root
        offloaded.append({p.offload_to_cpu for u in fsdp_modules(sharded) for g in _param_groups(u)
                          for p in g.fsdp_params})
        return sharded

    monkeypatch.setattr(train.distributed, "shard_model", recorded)
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: optimizers.append(k.get("fused")) or adamw(*a, **k))
    out = main(_args(demo, tmp_path / "run", demo.teachers, steps=3, mu=2, beta=0.1, eval_every=2,
                     **{"batch.activation_checkpointing": recompute, "batch.keep_gathered": keep_gathered,
                        "batch.cpu_offload": offload}))
    models = 3 if offload else 2  # student, discriminator and, offloaded with them, the reference (β > 0)
    assert resharding == [[not keep_gathered] * 3] * models  # blocks and vision tower
    assert offloaded == [{offload}] * models and optimizers == [True if offload else None] * 2  # AdamW fused on the CPU
    got = _pinned(read_metrics(out / "metrics.jsonl"))
    if os.environ.get("RIL_UPDATE_GOLDEN") and not recompute and not offload:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert [sorted(r) for r in got] == [sorted(r) for r in want], "the logged keys changed"
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        for key in w:
            assert math.isclose(g[key], w[key], rel_tol=1e-5, abs_tol=1e-7), \
                f"record {step} ({w.get('step')}), {key}: {g[key]!r} != pinned {w[key]!r}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: on a CPU there is nowhere to offload to")
def test_cpu_offload_keeps_the_trained_state_off_the_gpu(demo, tmp_path):
    """``batch.cpu_offload`` on a GPU: after set-up the student's, the discriminator's and the reference's shards
    (and so the gradients and AdamW moments) sit in pinned CPU memory, the models keep on the GPU under 1% of the
    trained models' fp32 weights (buffers, the discriminator's 0-d bias) and the forwards run on the GPU; a run
    with μ = 2 and β > 0 then trains: finite metrics, a student that moved. (The golden test checks the same run's
    numbers on a CPU.)"""
    args = _args(demo, tmp_path / "run", demo.teachers, mu=2, beta=0.1, **{"batch.cpu_offload": True})
    run = train.setup(load_config(args + [f"output_dir={tmp_path / 'set-up'}"]))  # the last value of a key wins
    models = (run.student, run.disc, run.reference)
    for model in models:
        assert train.distributed.compute_device(model).type == "cuda"
        shards = [p.to_local() for p in model.parameters() if p.ndim > 0]
        assert all(t.device.type == "cpu" and t.is_pinned() for t in shards)
    # What the models keep on the GPU (not the process's allocations: cuBLAS workspaces and the matmul peak's
    # scraps would swamp a tiny student): buffers and the 0-d bias.
    tensors = [t for m in models for t in (*(p.to_local() if p.ndim else p for p in m.parameters()), *m.buffers())]
    on_gpu = sum(t.numel() * t.element_size() for t in tensors if t.is_cuda)
    weights = sum(p.numel() * 4 for m in (run.student, run.disc) for p in m.parameters())  # fp32
    assert on_gpu < weights / 100, (on_gpu, weights)
    run.log.close()
    del run
    out = main(args)
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for r in steps for v in r.values() if isinstance(v, float))
    before, after = _weights(demo.student), _weights(out / "final")
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before)


def test_max_image_pixels_reaches_the_run_and_its_exports(tmp_path):
    """A student whose image processor allows 16 tokens an image (12,544 pixels; a 300x200 image takes 12),
    trained with ``max_image_pixels=6272``: the checkpoint's and ``final/``'s image processors, which are the run's,
    resize it to at most 6,272 pixels (8 tokens), so inference sees images as training did."""
    from PIL import Image

    from ril_fast.processor import Processor

    student = make_tiny(tmp_path / "student", "qwen2_5_vl")
    Image.fromarray((torch.rand(200, 300, 3) * 255).byte().numpy()).save(tmp_path / "wide.png")
    rows = [{"id": f"q{i}", "question": f"What shape is {i}?", "answer": "circle", "images": ["wide.png"]}
            for i in range(4)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = main([f"student={student}", f"train_data={tmp_path / 'train.jsonl'}", "teachers=", "eval_data=",
                "steps=1", "group_size=2", "max_new_tokens=4", f"output_dir={tmp_path / 'run'}", "progress=false",
                "batch.questions_per_step=2", "max_image_pixels=6272", "checkpoint_every=1"])
    assert Processor.from_pretrained(student).image_tokens(300, 200) == 12  # under the folder's own limit
    for folder in (out / "final", out / "step-1" / "hf"):
        processor = Processor.from_pretrained(folder)
        assert processor.image_processor.size["longest_edge"] == 6272, folder
        assert processor.image_tokens(300, 200) <= 8, folder
