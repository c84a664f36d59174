"""The hf judge: a local causal LM (an HF folder) reads the judge prompt and its next-token
probabilities of "yes" and "no" decide. No generation: one forward pass per batch of prompts.

Each item becomes ``ril_fast.judge.judge_messages(item)`` rendered by the model's chat template with
the generation prompt (the assistant turn is open; its first token is the answer). Prompts are sorted
by length and cut into batches of ``batch_size``, right-padded (a causal model's real tokens never see the padding
after them, whatever its positions or recurrences: a batch gives what one prompt at a time gives, up to float
rounding; left padding moved Bart's learned positions and ran RecurrentGemma's convolution over the pads). The
model's own forward computes the logits of the batch's last-token positions only (``logits_to_keep`` as a tensor
of positions, where the forward takes it), and each prompt's are read at its last token: the logits are the
model's, with what its forward does after the LM head (Gemma-2's final-logit soft-capping, Granite's logits
scaling, Cohere's logit scale), which changes the probabilities and can flip a verdict. p_yes is the softmax
probability summed over the "yes" tokens (every single-token spelling of yes / Yes / YES with and without a leading
space that the tokenizer has), p_no likewise, and the verdict is ``ril_fast.judge.decide``:
p_yes / (p_yes + p_no) > 0.5.

A small model is a weak judge: SmolLM2-135M-Instruct (``python -m ril_fast.tiny DIR --arch smollm2``)
runs the mechanics on a CPU; its agreement with the rule judge is measured in ``bench/judges.py``.
"""

import inspect
from pathlib import Path

import torch

from ril_fast.files import model_folder_problem
from ril_fast.judge import PROMPT_VERSION, JudgeItem, decide, judge_messages

_SPELLINGS = ("yes", "Yes", "YES", "no", "No", "NO")

# Part of the judge's name, so the persistent cache (judges_cache) never hands back the verdicts of older code: raise
# it with any change here that can move p_yes or p_no, even by rounding (padding, positions, which logits are read),
# which can flip a verdict near 0.5. v1 (no version in the name): left-padded, positions from each prompt's start;
# v2: a model whose forward takes no position ids right-padded (96432e4); v3: every model right-padded, the logits
# kept for the batch's last-token positions (9d0553c).
CODE_VERSION = 3


def answer_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The token ids that spell "yes" and "no" as one token each, with and without a leading space."""
    ids = {"yes": set(), "no": set()}
    for word in _SPELLINGS:
        for text in (word, " " + word):
            encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1:
                ids[word.lower()].add(encoded[0])
    if not ids["yes"] or not ids["no"]:
        raise ValueError("the judge model's tokenizer has no single token for 'yes' or for 'no'")
    return sorted(ids["yes"]), sorted(ids["no"])


def judge_model_problem(folder: str | Path) -> str | None:
    """What makes ``folder`` unusable as the hf judge, read from its config and tokenizer before any weights load
    (no model folder, a model type ``AutoModelForCausalLM`` cannot load, no single-token "yes" or "no", no chat
    template), or None."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if problem := model_folder_problem(folder):
        return problem
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        return f"its config.json cannot be read ({str(e).splitlines()[0][:200]})"
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return (f"model type {config.model_type!r} is no causal LM that AutoModelForCausalLM loads (the judge is a "
                f"text model: a VLM student's folder is not one)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        answer_token_ids(tokenizer)
    except (OSError, ValueError) as e:
        return str(e).splitlines()[0][:300]
    if not tokenizer.chat_template:
        return "its tokenizer has no chat template (the judge's question is a chat turn): an instruct model has one"
    return None


class HFJudge:
    """The hf judge on the causal LM in folder ``model`` (module docstring).

    ``batch_size``: prompts per forward pass. ``device``: default the current CUDA device when there is
    one, else the CPU. ``dtype``: default bf16 on CUDA, fp32 on the CPU. The name (its cache identity) is
    ``hf-v{CODE_VERSION}:{absolute folder}:{PROMPT_VERSION}:{dtype}`` ("hf-v3:...:bfloat16"): the dtype changes
    verdicts (bf16 and fp32 SmolLM2-135M disagree on 20 of 300 mixed cases), so a cache shared by a CUDA and a CPU
    run keeps both; ``CODE_VERSION`` is this module's, raised with any change to how it computes p_yes and p_no.
    """

    def __init__(self, model: str | Path, *, batch_size: int = 32, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not model:
            raise ValueError("the hf judge needs a model folder (judge_model=DIR)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        folder = Path(model).expanduser()
        if problem := model_folder_problem(folder):
            raise FileNotFoundError(f"the hf judge's model folder {folder}: {problem}")
        self.device = torch.device(device if device is not None else
                                   torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
        from ril_fast.models import compute_dtype

        dtype = dtype or compute_dtype(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(self.device).eval()
        self.yes_ids, self.no_ids = answer_token_ids(self.tokenizer)
        self.batch_size = batch_size
        self.name = f"hf-v{CODE_VERSION}:{folder.resolve()}:{PROMPT_VERSION}:{str(dtype).removeprefix('torch.')}"
        # The forward computes only the logits of the positions asked for where it can: nearly all of transformers'
        # causal LMs (not Whisper's, Musicgen's, xLSTM's, ... in 5.23), which then compute the whole (B, T, V).
        self._keeps = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def prompt_ids(self, item: JudgeItem) -> list[int]:
        """The token ids of ``item``'s rendered judge prompt, ending where the answer's first token goes."""
        text = self.tokenizer.apply_chat_template(judge_messages(item), tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def probabilities(self, items: list[JudgeItem]) -> torch.Tensor:
        """(n, 2) float32 on the CPU: p_yes and p_no of each item (not renormalised)."""
        prompts = [self.prompt_ids(item) for item in items]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = torch.zeros(len(prompts), 2)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, i in enumerate(rows):  # right padding
                ids[b, :len(prompts[i])] = torch.tensor(prompts[i])
                mask[b, :len(prompts[i])] = 1
            ends = mask.sum(-1) - 1  # each prompt's last token
            keep = torch.unique(ends)  # sorted: few distinct ones, the batch being of similar lengths
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False,
                                **({"logits_to_keep": keep.to(self.device)} if self._keeps else {})).logits
            column = torch.searchsorted(keep, ends) if self._keeps else ends
            last = logits[torch.arange(len(rows), device=logits.device), column.to(logits.device)]
            probs = last.float().softmax(-1)  # (B, V): the first answer token's distribution
            both = torch.stack([probs[:, self.yes_ids].sum(-1), probs[:, self.no_ids].sum(-1)], dim=-1)
            out[rows] = both.cpu()
        return out

    def __call__(self, items: list[JudgeItem]) -> list[bool]:
        """One verdict per item: p_yes / (p_yes + p_no) > 0.5."""
        if not items:
            return []
        return [decide(p_yes, p_no) for p_yes, p_no in self.probabilities(items).tolist()]
