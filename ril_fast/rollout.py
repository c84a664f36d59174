"""Rollouts: G sampled responses per question from the student (or one greedy response, for evaluation).

Prompts are rendered by the ``ril_fast.processor.Processor`` (chat template, image-token expansion), left-padded
into one batch (G copies of each prompt, whose images go through the vision tower once) and run
through HF ``generate`` with the KV cache. Sampling is exactly softmax(logits / τ), optionally top-k
and top-p truncated (on a CPU each token is drawn by :func:`draw_one`, torch's multinomial being 3-30x
slower there): the generation settings are given in full and the model's own ``generation_config``
(Qwen2.5-VL ships top_k=1, repetition_penalty=1.05, ...) is set aside for the call, so the log-probs
the trainer computes at the same τ are those of the distribution the tokens came from (before any
top-k or top-p cut: the log-probs are not renormalised over the kept tokens, as in other RL
trainers; nor over the image placeholder tokens, which are never sampled: on the demo's student they
hold ~1e-5 of the probability). Generation stops at the first stop token (``processor.stop_token_ids``: the chat
template's end-of-turn token, the tokenizer's eos and the eos ids of the folder's generation_config, which the
neutral config would otherwise set aside) or after ``max_new_tokens``.

A sharded model (the ``Sharded`` root from ``ril_fast.distributed.shard_model``) runs inside
``ril_fast.distributed.gathered``: its parameters are all-gathered once for the whole call, and the
forwards of generation run no collectives, so ranks may hold different numbers of prompts and finish
at different steps; its decoder blocks run without FSDP's forward hooks (``bare_blocks``).
"""

import contextlib
import inspect
from dataclasses import dataclass

import torch

from ril_fast.distributed import bare_blocks, compute_device, gathered, unwrap
from ril_fast.models import vision_once
from ril_fast.packing import image_inputs
from ril_fast.processor import Encoded, Processor


@dataclass
class Rollout:
    """One generated response. ``token_ids``: the sampled tokens, the stop token excluded;
    ``text``: their decoding (special tokens kept, so it re-tokenises to the same ids where BPE allows);
    ``truncated``: generation hit ``max_new_tokens`` before any stop token; ``end_id``: the stop token that
    ended it (one of ``Processor.stop_token_ids``; None when truncated)."""

    text: str
    token_ids: list[int]
    truncated: bool
    end_id: int | None = None

    def sample(self, example: dict) -> dict:
        """The packing sample ``{"images", "question", "response", "response_ids", "truncated", "end_id"}`` of this
        response to ``example`` (its images and question); the packer uses the sampled ids as they are, followed
        by the stop token sampled."""
        return {"images": example.get("images") or [], "question": example["question"], "response": self.text,
                "response_ids": self.token_ids, "truncated": self.truncated, "end_id": self.end_id}


def _batch(prompts: list[Encoded], processor: Processor, model, pad_id: int, device) -> dict:
    """Left-padded ``generate`` inputs: input_ids / attention_mask (B, P_max) int64, and for images
    ``packing.image_inputs`` (a prompt repeated G times has its pixels once) and, where the model's rope
    index reads them (transformers >= 5.3), mm_token_type_ids (B, P_max) int32 (1 on image tokens)."""
    P = max(p.input_ids.numel() for p in prompts)
    input_ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        n = p.input_ids.numel()
        input_ids[b, P - n:] = p.input_ids
        attention_mask[b, P - n:] = 1
    kw = dict(input_ids=input_ids, attention_mask=attention_mask)
    kw.update((k, v) for k, v in image_inputs(prompts).items() if v is not None)
    if "image_grid_thw" in kw and _rope_takes_types(model):
        kw["mm_token_type_ids"] = (input_ids == processor.image_token_id).int()
    return {k: v.to(device) for k, v in kw.items()}


def _rope_takes_types(model) -> bool:
    """Whether this transformers version's Qwen-VL rope index finds image tokens from mm_token_type_ids
    (without them, generate would silently give image tokens 1-D text positions)."""
    return "mm_token_type_ids" in inspect.signature(model.base_model.get_rope_index).parameters


def _generation_config(processor: Processor, *, max_new_tokens: int, greedy: bool, temperature: float,
                       top_p: float, top_k: int, pad_id: int):
    """Every setting that shapes the next-token distribution, and every stop token, given explicitly."""
    from transformers import GenerationConfig

    sampling = {} if greedy else dict(temperature=temperature, top_p=top_p, top_k=top_k)
    # A response may not contain image placeholders: the model's forward swaps image features in at
    # every one, so a sampled placeholder would break the training forward of that response.
    placeholders = [t for t in (processor.image_token_id, processor.image_start_id, processor.image_end_id)
                    if t is not None]
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, num_beams=1,
                            repetition_penalty=1.0, eos_token_id=list(processor.stop_token_ids), pad_token_id=pad_id,
                            use_cache=True, suppress_tokens=placeholders or None, **sampling)


@contextlib.contextmanager
def _neutral_generation_config(model):
    """Set the model's own generation_config aside: ``generate`` fills every setting left unset from it."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


_TORCH_MULTINOMIAL = torch.multinomial


def draw_one(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` (B, V) (non-negative, not necessarily normalised) -> (B, 1) int64,
    drawn by inverting the row's CDF with one uniform number: the distribution ``torch.multinomial``
    samples, 3-30x faster on a CPU (64 x 16,384 on 2 threads, torch 2.13: 0.5-5.7 ms from one process to
    another, against 17-22 ms). Zero-probability
    entries are never drawn. A row with a NaN, an infinity or a negative entry, or all zeros (a student whose
    logits went NaN), is a RuntimeError, as it is to ``torch.multinomial``."""
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1]  # NaN or infinite when an entry is
    if not (torch.isfinite(total).all() and (total > 0).all() and probs.min() >= 0):
        raise RuntimeError("a row of next-token probabilities holds NaN, infinity or a negative entry, or is all "
                           "zeros: the model's logits are no longer finite")
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max_(probs.shape[1] - 1)


def _multinomial(input, num_samples, replacement=False, *, generator=None, out=None):
    """``torch.multinomial`` with its one-sample-per-row CPU calls (what ``generate`` makes every token)
    served by :func:`draw_one`; every other call goes to torch's own."""
    if num_samples == 1 and input.dim() == 2 and not input.is_cuda and out is None:
        return draw_one(input, generator)
    return _TORCH_MULTINOMIAL(input, num_samples, replacement, generator=generator, out=out)


@contextlib.contextmanager
def _fast_cpu_sampling():
    """Route ``generate``'s per-token ``torch.multinomial`` through :func:`draw_one` inside the block
    (transformers has no hook for the sampler; it looks ``torch.multinomial`` up at each call)."""
    torch.multinomial = _multinomial
    try:
        yield
    finally:
        torch.multinomial = _TORCH_MULTINOMIAL


def _split(new_tokens: torch.Tensor, stop_ids, tokenizer) -> list[Rollout]:
    """(B, N) generated ids (pad after a stop token) -> B rollouts, each cut at its first token of ``stop_ids``.
    A row without any ran for all ``max_new_tokens``: truncated."""
    stop_ids, out = set(stop_ids), []
    for row in new_tokens.tolist():
        end = next((k for k, t in enumerate(row) if t in stop_ids), None)
        ids = row if end is None else row[:end]
        out.append(Rollout(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
                           ids, end is None, None if end is None else row[end]))
    return out


def sample_responses(model, processor: Processor, examples: list[dict], *, group_size: int = 1,
                     max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                     seed: int = 0, greedy: bool = False, max_batch: int | None = None) -> list[list[Rollout]]:
    """Generate ``group_size`` responses to each example -> ``rollouts[example][g]``.

    ``examples``: dicts with ``"question"`` and optional ``"images"`` (PIL images or paths), e.g. the
    training examples or packing samples (a ``"response"`` is ignored). ``model``: the HF model (with
    LM head) that ``processor`` belongs to (from ``ril_fast.models.load``), or the ``Sharded`` root of
    it from ``ril_fast.distributed.shard_model``.
    Sampling: softmax(logits / ``temperature``), cut to the ``top_k`` most probable tokens when
    ``top_k`` > 0, then top-p truncated when ``top_p`` < 1 (transformers' order), reproducible from
    ``seed`` for the same examples and ``max_batch`` (the global RNG is left as it was). Use a different
    seed per rank. ``greedy``: argmax decoding, ``group_size`` must be 1 (evaluation); it gives what one
    prompt at a time would give: left padding does not change the output. ``max_batch``: most sequences
    per ``generate`` call (default: all ``len(examples) * group_size`` at once).
    """
    if greedy and group_size != 1:
        raise ValueError("greedy decoding gives one response per question: group_size must be 1")
    if group_size < 1 or max_new_tokens < 1:
        raise ValueError(f"need group_size >= 1 and max_new_tokens >= 1, got {group_size}, {max_new_tokens}")
    if not examples:
        return []
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else processor.end_token_id
    config = _generation_config(processor, max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature,
                                top_p=top_p, top_k=top_k, pad_id=pad_id)
    hf = unwrap(model)
    device = compute_device(model)
    prompts = [processor.encode_prompt(ex["question"], ex.get("images")) for ex in examples]
    prompts = [p for p in prompts for _ in range(group_size)]
    step = max_batch or len(prompts)
    flat: list[Rollout] = []
    rng_devices = [device] if device.type == "cuda" else []
    with gathered(model), torch.no_grad(), bare_blocks(hf), _neutral_generation_config(hf), _fast_cpu_sampling(), \
            torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), step):
            inputs = _batch(prompts[start:start + step], processor, hf, pad_id, device)
            shared = (inputs.pop("vision_grid_thw", None), inputs.pop("vision_index", None))
            # synced_gpus=False: inside gathered() the forwards run no collectives, so a rank that
            # finishes early need not keep stepping (transformers turns syncing on for FSDP models).
            with vision_once(hf, *shared):
                out = hf.generate(**inputs, generation_config=config, synced_gpus=False)
            flat.extend(_split(out[:, inputs["input_ids"].shape[1]:].cpu(), processor.stop_token_ids, tok))
    return [flat[i:i + group_size] for i in range(0, len(flat), group_size)]


def sampling_settings(cfg) -> dict:
    """The keyword arguments of :func:`sample_responses` that the trainer's rollout phase takes from ``cfg`` (a
    ``ril_fast.config.Config``): ``group_size``, ``max_new_tokens``, ``rollout.temperature``, ``top_p``, ``top_k``
    and ``batch_size`` (as ``max_batch``); the seed, one per step and rank, is the caller's. bench/throughput.py
    samples with these too, so the two cannot drift apart."""
    return dict(group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.rollout.temperature,
                top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, max_batch=cfg.rollout.batch_size)
