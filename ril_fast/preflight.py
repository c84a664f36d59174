"""What a run checks before any model loads, each failure one line that names the setting or FILE:LINE.

* ``load_data``: the training and held-out examples, the teacher bank and the batches, read against the
  student's tokenizer and image processor; every prompt is counted, images included, from the image files'
  headers, so one that leaves no room for a full-length response stops the run here (``long_prompts``);
* ``check_surroundings``: what the settings point at outside the config (a judge's folder, server or verdict
  cache, the device Triton kernels need, the number of ranks), on every rank;
* ``check_memory``: the student as ``ril_fast.models.load`` would refuse it (attention ril_fast's cannot stand for,
  layers that carry state along the sequence), then the models' memory on every rank (``ril_fast.memory``), both
  from the student built on the meta device, before any model loads.

``python -m ril_fast.preflight --gpus 8 --gpu-gib 78 --config FILE`` runs the data and memory checks for a planned
run on any machine (no weight is read) and prints the lengths and the plan they rest on, with estimates of what a
rollout's KV cache and an update micro-batch's activations take beside the plan (:func:`main`).
"""

from collections.abc import Callable

import torch
from transformers import AutoConfig

from ril_fast import activations, distributed, memory, recurrence
from ril_fast.config import Config, ConfigError
from ril_fast.data import Batches, DataError, Example, fitting, load_examples, load_teachers, refuse_images
from ril_fast.files import model_folder_problem
from ril_fast.judge import JudgeKind, judge_store
from ril_fast.judges_hf import judge_model_problem
from ril_fast.judges_http import OpenAIClient
from ril_fast.kernels._triton import interpreting
from ril_fast.models import Kernels
from ril_fast.processor import ModelKind, Processor, UnsupportedModel, UnsupportedSetting


class DoesNotFit(ConfigError):
    """The models cannot fit in the memory some rank has free: raised by :func:`check_memory`, before any model loads
    (the message names the student, the GiB needed and free, and what to change)."""


def built_demo():
    """The built-in demo's paths (``ril_fast.demo.build_demo``: built first if needed); a folder it cannot be built
    in is a ConfigError naming ``RIL_FAST_DEMO`` (a 36-line traceback otherwise)."""
    from ril_fast.demo import build_demo, default_root

    try:
        return build_demo()
    except OSError as e:
        raise ConfigError(f"the built-in demo cannot be built in {default_root()}: {e}; set RIL_FAST_DEMO to a "
                          f"writable folder of your own (or give student=, train_data= and teachers=)") from e


def load_data(cfg: Config, dist: distributed.Dist, *, counted: dict | None = None):
    """The training examples, the teacher bank (None: RL only), the evaluation examples and this rank's
    batches, checked against the student's tokenizer and image processor (every prompt leaves room for a
    full-length response: ``long_prompts``); prints which ablation runs. Rank 0 alone reads the files (every
    image is opened) and sends what it read to the other ranks; its errors are raised on every rank. ``counted``
    (one process: :func:`main`): a dict that gets the token counters the checks used, under "prompts" and
    "responses", each remembering what it counted (:func:`_remembered`), and under "image_tokens" the processor's
    count of an image's tokens from its (width, height)."""
    examples, bank, eval_examples = distributed.on_rank0(lambda: _read_data(cfg, counted))
    try:
        batches = Batches(examples, cfg.batch.questions_per_step, seed=cfg.seed, rank=dist.rank,
                          world_size=dist.world_size)
    except ValueError as e:
        raise ConfigError(f"batch.questions_per_step={cfg.batch.questions_per_step}: {e}") from None
    if dist.is_main:
        if bank is None:
            print("mode: RL only (Dr.GRPO on the judge's reward; no teachers given)", flush=True)
        else:
            print(f"mode: RIL with {len(bank.teachers)} teacher(s): "
                  + ", ".join(f"{name} ({n} responses)" for name, n in bank.counts().items()), flush=True)
            if bank.truncated:
                print(f"left out {len(bank.truncated)} teacher responses marked truncated (the first: "
                      f"{bank.truncated[0]})", flush=True)
            if bank.repeated:
                print(f"{len(bank.repeated)} teacher lines repeat an earlier line's teacher, id, index and response "
                      f"word for word (the first: {bank.repeated[0]}): a collection copied in twice? each is trained "
                      f"on as often as it is written", flush=True)
    return examples, bank, eval_examples, batches


def _read_data(cfg: Config, counted: dict | None = None):
    """:func:`load_data`'s examples, teacher bank and evaluation examples, read and checked (on rank 0); ``counted``:
    see :func:`load_data`."""
    if problem := model_folder_problem(cfg.student):
        raise ConfigError(f"student={cfg.student}: cannot open the model folder: {problem}")
    try:
        tokens = Processor.from_pretrained(cfg.student, max_image_pixels=cfg.max_image_pixels)
    except UnsupportedModel as e:  # "DIR: model type ..."
        raise ConfigError(f"student={e}") from None
    except UnsupportedSetting as e:  # "max_image_pixels=N: ..."
        raise ConfigError(str(e)) from None
    except (OSError, ValueError) as e:  # transformers' words for a missing folder or config.json
        raise ConfigError(f"student={cfg.student}: cannot open the model folder: {e}") from None
    limit = length_limit(AutoConfig.from_pretrained(cfg.student))
    prompt_lengths, response_lengths = tokens.prompt_lengths, tokens.response_lengths
    if counted is not None:  # main prints the lengths counted here, not counted twice
        prompt_lengths = counted["prompts"] = _remembered(tokens.prompt_lengths, key=prompt_key)
        response_lengths = counted["responses"] = _remembered(tokens.response_lengths)
        counted["image_tokens"] = tokens.image_tokens
    every = load_examples(cfg.train_data, control_tokens=tokens.control_tokens)
    if tokens.kind is ModelKind.TEXT:
        refuse_images(every, f"the student ({cfg.student})")
    examples = _fitting(cfg, every, prompt_lengths, *token_budget(cfg, limit), what="training")
    bank = None
    if not cfg.rl_only:  # every example's id is known to the teacher files, left out or not
        bank = load_teachers(cfg.teachers, every, max_tokens=cfg.max_new_tokens,
                             count_tokens=response_lengths, control_tokens=tokens.control_tokens)
        if missing := bank.missing(examples):
            cut = bank.cut.get(missing[0].id)
            cut = (f"; its {len(cut)} responses were all marked truncated and left out (the first: {cut[0]}): a "
                   f"response cut off at the teacher's token budget is not its answer, so collect others (python -m "
                   f"ril_fast.teacher ... --redo-truncated) or drop the example" if cut else "")
            others = ", ".join(repr(e.id) for e in missing[1:4]) + (", ..." if len(missing) > 4 else "")
            raise DataError(f"{missing[0].where}: example {missing[0].id!r} has no response in any teacher "
                            f"collection ({len(missing)} such examples{': also ' + others if others else ''}){cut}; "
                            f"RIL needs G teacher outputs per question: collect them (python -m ril_fast.teacher "
                            f"appends what a file lacks) or drop the examples")
    eval_examples = load_examples(cfg.eval_data, control_tokens=tokens.control_tokens) if cfg.eval_data else []
    if cfg.eval_max_examples and len(eval_examples) > cfg.eval_max_examples:
        print(f"held-out: the first {cfg.eval_max_examples} of the {len(eval_examples)} examples of {cfg.eval_data} "
              f"(eval_max_examples; 0: all)", flush=True)
        eval_examples = eval_examples[:cfg.eval_max_examples]
    if tokens.kind is ModelKind.TEXT:
        refuse_images(eval_examples, f"the student ({cfg.student})")
    if eval_examples:  # greedy answers are generated, not packed: only the model bounds them
        eval_examples = _fitting(cfg, eval_examples, prompt_lengths, limit[0] or float("inf"), limit[1],
                                 what="held-out")
    return examples, bank, eval_examples


def prompt_key(prompt: tuple) -> tuple:
    """What a prompt's token count depends on, hashable: ``Processor.prompt_lengths``' item ``(question, image
    sizes)`` with the sizes as a tuple (the same question about images of other sizes is another prompt)."""
    question, sizes = prompt
    return question, tuple(sizes)


def _remembered(count: Callable[[list], list[int]], key: Callable = lambda item: item) -> Callable[[list], list[int]]:
    """``count`` (items -> their token counts) counting each distinct item once, by ``key`` (hashable), and
    remembering it: what is asked again costs nothing."""
    seen: dict = {}

    def counted(items: list) -> list[int]:
        new = {key(item): item for item in items if key(item) not in seen}
        if new:
            seen.update(zip(new, count(list(new.values()))))
        return [seen[key(item)] for item in items]

    return counted


def length_limit(config) -> tuple[int | None, str]:
    """The most tokens one sample (prompt and response) may take in the model of ``config``, and its name: the
    model's context, or a shorter length within which packing is exact, the smallest of

    * a sliding window that some of its layers attend within ("the model's sliding window"): ril_fast's attention
      has none, so it is exact only for samples that fit in the window (and refuses longer ones in the forward,
      ``ril_fast.attention``);
    * LongRoPE's original context (Phi-3/3.5 128k, Phi-4-mini: "the model's original context"): transformers
      switches every position's rotary factors when the longest position of a forward passes it, so one sample
      longer than that in a packed row would change the log-probs of the short samples beside it.

    (A dynamic NTK RoPE rescales only past the context itself.) None where the config says none of them."""
    text = config.get_text_config()
    limits = [(getattr(text, "max_position_embeddings", None), "the model's context")]
    window, layers = getattr(text, "sliding_window", None), getattr(text, "layer_types", None)
    if window is not None and (layers is None or "sliding_attention" in layers):  # Qwen2: use_sliding_window
        limits.append((window, "the model's sliding window"))
    rope = getattr(text, "rope_parameters", None) or {}
    for params in (rope.values() if all(isinstance(v, dict) for v in rope.values()) and rope else [rope]):
        if params.get("rope_type") == "longrope" and params.get("original_max_position_embeddings"):
            limits.append((params["original_max_position_embeddings"], "the model's original context (LongRoPE)"))
    known = [limit for limit in limits if limit[0] is not None]
    return min(known, key=lambda limit: limit[0]) if known else (None, "the model's context")


def token_budget(cfg: Config, limit: tuple[int | None, str]) -> tuple[int, str]:
    """The tokens one training sample may take, prompt and response, and the setting that bounds them: the model's
    ``limit`` (:func:`length_limit`) or ``batch.max_tokens``, the smaller."""
    tokens, words = limit
    if tokens is not None and tokens < cfg.batch.max_tokens:
        return tokens, words
    return cfg.batch.max_tokens, "batch.max_tokens"


def _fitting(cfg: Config, examples: list[Example], prompt_lengths: Callable[[list], list[int]], budget: float,
             setting: str, *, what: str) -> list[Example]:
    """The ``examples`` whose prompts leave room for ``max_new_tokens`` within ``budget`` tokens (``setting`` names
    it), counted by ``prompt_lengths`` (``Processor.prompt_lengths``) from the question and the image sizes before any
    model loads. The others stop the run (``long_prompts=refuse``, naming the first one's line) or are left out and
    counted (``skip``)."""
    kept, left_out = fitting(examples, prompt_lengths, budget=budget, max_new_tokens=cfg.max_new_tokens,
                             setting=setting, long_prompts=cfg.long_prompts,
                             hint="long_prompts=skip leaves such examples out")
    if not kept:
        raise DataError(f"{left_out[0]}: no {what} example leaves room for a response (long_prompts=skip left "
                        f"out all {len(examples)})")
    if left_out:
        print(f"left out {len(left_out)} of {len(examples)} {what} examples (long_prompts=skip); the first: "
              f"{left_out[0]}", flush=True)
    return kept


def check_surroundings(cfg: Config, dist: distributed.Dist):
    """The settings that depend on things outside the config, checked before any model loads -> the teacher
    verdicts' persistent cache (``judge_cache``), if configured. Every rank checks its own (another node may not
    reach a judge server or folder rank 0 reaches) and all stop together, with the first rank's refusal, naming
    that rank: so rank 0 says it and no rank waits for the others in a collective."""
    try:
        store, problem = _surroundings(cfg, dist), None
    except ConfigError as e:
        store, problem = None, str(e)
    if found := _first_problem(problem):
        rank, problem = found
        raise ConfigError(problem + (f" (on rank {rank})" if rank else ""))
    return store


def _first_problem(problem: str | None) -> tuple[int, str] | None:
    """Every rank's ``problem`` (None: none) gathered: the first rank's that has one, and that rank, the same on
    every rank; None where none has."""
    return next(((rank, p) for rank, p in enumerate(distributed.all_gather_objects(problem)) if p), None)


def _surroundings(cfg: Config, dist: distributed.Dist):
    """This rank's checks for :func:`check_surroundings`: the verdict cache (opened, and returned), an hf judge's
    model folder, an http judge's server (it answers and serves ``judge_model``), Triton kernels' device, the
    number of ranks the shards are spread over."""
    try:
        store = judge_store(cfg.judge_cache)
    except ValueError as e:
        raise ConfigError(f"judge_cache={cfg.judge_cache}: {e}") from None
    try:
        distributed.shard_size(cfg.batch.shard_ranks)
    except ValueError as e:  # "shard_ranks=N: must divide ..."
        raise ConfigError(f"batch.{e}") from None
    if cfg.judge is JudgeKind.HF and (problem := judge_model_problem(cfg.judge_model)):
        raise ConfigError(f"judge_model={cfg.judge_model}: {problem}")
    if cfg.judge is JudgeKind.HTTP and (problem := OpenAIClient(
            cfg.judge_url, timeout_s=cfg.judge_timeout_s, retries=cfg.judge_retries).serving(cfg.judge_model)):
        raise ConfigError(f"judge_url={cfg.judge_url}: the judge server cannot be used: {problem}")
    if cfg.loss.kernels is Kernels.TRITON and dist.device.type != "cuda" and not interpreting():
        raise ConfigError("loss.kernels=triton: Triton kernels need a GPU, or on the CPU the interpreter "
                          "(TRITON_INTERPRET=1); auto picks the chunked torch code here")
    return store


def check_memory(cfg: Config, dist: distributed.Dist, *, disc: bool, examples: list[Example] = ()) -> None:
    """Refuse, before any model loads, a student ``ril_fast.models.load`` would refuse (:func:`meta_student`), and
    one whose models cannot fit on some rank's device (or, offloaded, in its share of the CPU's memory) even before
    activations (``ril_fast.memory``): every rank checks its own and all stop together. The main rank then prints
    the plan and the estimate of an update micro-batch's activations (:func:`_activations`, over the images of the
    prompt of ``examples`` with the most image tokens), with what to change where the device's free memory less the
    plan is smaller: a warning, never a refusal."""
    shard = distributed.shard_size(cfg.batch.shard_ranks)
    config = AutoConfig.from_pretrained(cfg.student)
    student = meta_student(cfg.student, config)
    plan = memory.plan(config, disc=disc, reference=cfg.beta > 0, gpu=dist.device.type == "cuda", shard=shard,
                       copies=dist.world_size // shard, offload=cfg.batch.cpu_offload, pinned=cfg.batch.offload_pinned,
                       model=student)
    host = memory.available_bytes(torch.device("cpu")) if plan.offload else None
    available = memory.available_bytes(dist.device)
    if found := _first_problem(memory.shortfall(plan, available, host)):
        raise DoesNotFit(f"student={cfg.student}: {found[1]}")
    if dist.is_main:
        print(f"memory: {plan.describe()}", flush=True)
        count = Processor.from_pretrained(cfg.student, max_image_pixels=cfg.max_image_pixels).image_tokens \
            if any(e.image_sizes for e in examples) else None
        left = None if available is None else (available - plan.per_rank) / 2**30
        print(_activations_line(cfg, config, student, examples, count, disc=disc, gpu=dist.device.type == "cuda",
                                left=left), flush=True)


def meta_student(student, config) -> torch.nn.Module:
    """The student ``ril_fast.models.load`` builds from ``config`` (the folder ``student``'s), on the meta device (no
    memory, no weight read), refused as ``load`` refuses it: attention ril_fast's cannot stand for (its own, as
    Bloom's, or soft-capped, as Gemma 2's: ``models._check_attention``), layers that carry state along the sequence
    (``recurrence.per_sample``). A ConfigError naming ``student=``, the same on every rank."""
    from ril_fast.models import _check_attention, meta_model

    model = meta_model(config)
    try:
        _check_attention(model, student)
        recurrence.per_sample(model, student)  # (it hooks the meta model's Gated DeltaNet layers: nothing runs them)
    except UnsupportedModel as e:  # "DIR: model type ..."
        raise ConfigError(f"student={e}") from None
    return model


# ----------------------------------------------------------------------------------------------------
# python -m ril_fast.preflight: the checks alone, for GPUs this machine need not have
# ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``python -m ril_fast.preflight [--gpus N] [--gpu-gib G] [--config FILE] [key=value ...]``: what the trainer
    would check before loading for that run on N GPUs with G GiB free each, run here (a laptop will do: the
    student folder's config, tokenizer and image-processor files and the images are read, no weight), with the
    numbers to choose settings by: prompt and teacher-response lengths, the memory plan, the KV cache of the larger
    of a rollout's and an evaluation's generate call, the activations of one update micro-batch
    (:func:`_activations`), each of the last two with what to change when it exceeds what the plan leaves. Returns
    the exit status: 0 when the trainer would start the run, 1 when it would refuse it (the reason printed as
    ``error: ...``: the data, a student ``models.load`` would refuse, the memory before activations: the KV cache
    and the activations are estimates, printed, never a refusal). With ``batch.cpu_offload`` the host's memory is
    checked when ``--host-gib`` is given."""
    import argparse
    import sys
    from types import SimpleNamespace

    from ril_fast.config import load_config
    from ril_fast.demo import needs_demo, with_demo

    parser = argparse.ArgumentParser(
        prog="python -m ril_fast.preflight", epilog="every other argument is the trainer's: --config FILE, key=value",
        description="What the trainer checks before loading, for a run on GPUs this machine need not have: the data "
                    "(prompt and teacher-response lengths), the memory plan and generate's KV cache. No weight is "
                    "read.")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs of the run, all nodes together (default 1)")
    parser.add_argument("--gpu-gib", type=float, default=78.0, help="memory one GPU has free for the run, in GiB "
                        "(default 78: an H100 80GB, ~79.2 GiB in all, once CUDA has started)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs that share a node's memory (default: --gpus, at "
                        "most 8)")
    parser.add_argument("--host-gib", type=float, help="memory a node has available, in GiB: checked against the "
                        "offloaded state (batch.cpu_offload); not given, not checked")
    args, rest = parser.parse_known_args(argv)
    per_node = args.gpus_per_node or min(args.gpus, 8)
    if args.gpus < 1 or args.gpu_gib <= 0 or per_node < 1 or (args.host_gib is not None and args.host_gib <= 0):
        parser.error("--gpus and --gpus-per-node must be >= 1, --gpu-gib and --host-gib > 0")
    counted: dict = {}  # the token counters load_data used, remembering what they counted
    try:
        cfg = load_config(rest)
        if needs_demo(cfg):
            cfg = with_demo(cfg, built_demo())
        shard = cfg.batch.shard_ranks or args.gpus
        if args.gpus % shard:
            raise ConfigError(f"batch.shard_ranks={shard}: must divide the number of GPUs ({args.gpus})")
        print(f"preflight of {cfg.student} for {args.gpus} GPU(s) with {args.gpu_gib:g} GiB free (read: configs, "
              f"tokenizer, the images; no weights)", flush=True)
        examples, bank, eval_examples, _ = load_data(cfg, SimpleNamespace(rank=0, world_size=args.gpus, is_main=True),
                                                     counted=counted)
        config = AutoConfig.from_pretrained(cfg.student)
        student = meta_student(cfg.student, config)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    budget, setting = token_budget(cfg, length_limit(config))
    prompt_lengths = counted["prompts"]  # load_data's: what it counted is not counted again
    lengths = prompt_lengths([(e.question, e.image_sizes) for e in examples])
    eval_lengths = prompt_lengths([(e.question, e.image_sizes) for e in eval_examples])
    print(f"training examples that fit: {len(examples)}; held-out: {len(eval_examples)}")
    print(f"prompt tokens, images included: {_spread(lengths)}; {setting} {budget} leaves "
          f"{budget - cfg.max_new_tokens} beside max_new_tokens={cfg.max_new_tokens}")
    if bank is not None:
        texts = [r for per_teacher in bank.by_id.values() for rs in per_teacher.values() for r in rs]
        print(f"teacher responses' tokens (end of turn included): {_spread(counted['responses'](texts))}; "
              f"max_new_tokens={cfg.max_new_tokens}")
    plan = memory.plan(config, disc=bank is not None, reference=cfg.beta > 0, gpu=True, shard=shard,
                       copies=args.gpus // shard, offload=cfg.batch.cpu_offload, pinned=cfg.batch.offload_pinned,
                       model=student)
    host = None if args.host_gib is None else int(args.host_gib * 2**30) // per_node  # the trainer's share a rank
    if problem := memory.shortfall(plan, int(args.gpu_gib * 2**30), host):
        print(f"error: student={cfg.student}: {problem} (here: --gpus, --gpu-gib, --host-gib)", file=sys.stderr)
        return 1
    left = args.gpu_gib - plan.per_rank / 2**30
    print(f"memory: {plan.describe()}; {left:.3g} GiB of each GPU left for activations (bounded by batch.max_tokens"
          f"={cfg.batch.max_tokens}{', recomputed' if cfg.batch.activation_checkpointing else ''})")
    kv, words = _kv_cache(cfg, config, args.gpus, lengths, eval_lengths)
    print(words + ("" if kv <= left else f": more than the {left:.3g} GiB left: lower rollout.batch_size"))
    print(_activations_line(cfg, config, student, examples, counted["image_tokens"], disc=bank is not None, gpu=True,
                            left=left))
    unchecked = ["the judge's server or folder", "the weights themselves"]
    if plan.offload and host is None:
        unchecked.append(f"the host's memory ({plan.host_per_rank / 2**30:.3g} GiB a rank: --host-gib)")
    print(f"not checked here: {', '.join(unchecked)}")
    return 0


def _kv_cache(cfg: Config, config, gpus: int, lengths: list[int], eval_lengths: list[int]) -> tuple[float, str]:
    """The larger KV cache one generate call builds on a rank of ``gpus``, in GiB, and it in words: a rollout's
    (``group_size`` responses to each of the rank's questions) or an evaluation's (the rank's share of the held-out
    prompts), at most ``rollout.batch_size`` sequences a call, each left-padded to the longest prompt (``lengths``,
    ``eval_lengths``: the training and held-out prompts' tokens) and run to ``max_new_tokens``: every row at full
    length."""
    def gib(rows: int, longest: int) -> float:
        return memory.kv_cache_bytes(config, rows * (longest + cfg.max_new_tokens), gpu=True) / 2**30

    rows = min(cfg.rollout.batch_size, cfg.group_size * -(-cfg.batch.questions_per_step // gpus))
    kv = gib(rows, max(lengths))
    if eval_lengths:
        held_out = min(cfg.rollout.batch_size, -(-len(eval_lengths) // gpus))
        if (eval_kv := gib(held_out, max(eval_lengths))) > kv:
            return eval_kv, (f"evaluation's KV cache: up to {eval_kv:.3g} GiB a rank ({held_out} held-out prompts of "
                             f"at most {max(eval_lengths)} + {cfg.max_new_tokens} tokens, bf16; a rollout's: up to "
                             f"{kv:.3g} GiB)")
    return kv, (f"rollout KV cache: up to {kv:.3g} GiB a rank ({rows} sequences of at most {max(lengths)} + "
                f"{cfg.max_new_tokens} tokens, bf16)")


def _activations(cfg: Config, config, student, image_tokens: int, *, disc: bool, gpu: bool = True
                 ) -> tuple[float, str]:
    """What one update micro-batch of ``batch.max_tokens`` tokens keeps for its backward on a GPU (``gpu``; else a
    CPU), in GiB (``ril_fast.activations``: bf16 on a GPU, fp32 on a CPU; the policy's update or, with a
    discriminator (``disc``), the larger of its and the discriminator's; ``batch.activation_checkpointing`` as set),
    and it in words; the vision tower over the images of one prompt, the one with the most image tokens
    (``image_tokens``): a micro-batch that holds several prompts' images keeps theirs too. An estimate, printed,
    never a reason to refuse the run."""
    tokens, recomputed = cfg.batch.max_tokens, cfg.batch.activation_checkpointing
    gib = activations.activation_bytes(config, tokens, checkpointing=recomputed, gpu=gpu, disc=disc,
                                       image_tokens=image_tokens, model=student) / 2**30
    # A Gated DeltaNet's recurrence (Qwen3.5) is not counted: then the figure is a floor.
    about = "~" if activations.Widths.of_model(student).linear_layers == 0 else "more than "
    update = "the larger of the policy's and the discriminator's update" if disc else "the policy update"
    layers = "layers recomputed" if recomputed else "every layer's activations kept"
    images = f"; the vision tower over one prompt's images, {image_tokens} image tokens" if image_tokens else ""
    return gib, (f"activations of one update micro-batch of batch.max_tokens={tokens}: {about}{gib:.3g} GiB a rank "
                 f"({'bf16' if gpu else 'fp32'}, {update}, {layers}{images})")


def _activations_line(cfg: Config, config, student, examples: list[Example], image_tokens, *, disc: bool, gpu: bool,
                      left: float | None) -> str:
    """:func:`_activations`' words over the prompt of ``examples`` with the most image tokens (``image_tokens(width,
    height)``: the processor's count; None where no example has an image) and, where the estimate exceeds ``left``
    GiB (None: unknown), what to change: checkpointing while it is off, the token budget."""
    images = max((sum(image_tokens(w, h) for w, h in e.image_sizes) for e in examples), default=0) \
        if image_tokens is not None else 0
    gib, words = _activations(cfg, config, student, images, disc=disc, gpu=gpu)
    if left is None or gib <= left:
        return words
    fixes = ("set batch.activation_checkpointing=true or " if not cfg.batch.activation_checkpointing else "") + \
        "lower batch.max_tokens"
    return f"{words}: more than the {left:.3g} GiB left: {fixes}"


def _spread(values: list[int]) -> str:
    """min, median, 99th percentile and max of ``values``, in words."""
    v = sorted(values)
    return f"min {v[0]}, median {v[len(v) // 2]}, 99th percentile {v[min(len(v) - 1, len(v) * 99 // 100)]}, max {v[-1]}"


if __name__ == "__main__":
    raise SystemExit(main())
