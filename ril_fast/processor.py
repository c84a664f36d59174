"""One (images, question, response) sample -> token ids, processed images and positions: ``Processor``.

A sample is a dict ``{"images": [PIL.Image | path, ...], "question": str, "response": str}`` (an
optional ``"truncated": True`` marks a response cut at the generation budget, see below; optional
``"response_ids"``, the token ids a student rollout sampled, are used instead of re-tokenising, and
``"end_id"``, the stop token that ended it). Each image is loaded as HF's image processors see it
(``ril_fast.images.load_image``: EXIF orientation applied, transparency composited onto white).

End of a turn: the chat template's own end-of-turn token (``Processor.end_token_id``: the special token it
writes directly after an assistant's content, e.g. Qwen's <|im_end|>, Gemma's <end_of_turn>, Llama 3's
<|eot_id|>; the tokenizer's eos where the template writes none or cannot be rendered). A response ends at the
first of ``Processor.stop_token_ids``: that token, the tokenizer's eos and the eos ids of the folder's
generation_config.json (a Qwen base tokenizer's eos is <|endoftext|> while its template ends turns with
<|im_end|>; Instruct models list several).

Rendering (``Processor.encode``): the user turn (the images, then the question) goes through the
model's chat template with the generation prompt; the response is tokenised on its own and followed
by the token that ended it: a student rollout's ``"end_id"`` (the stop token it sampled), else the
template's end-of-turn token (what the model must learn to emit); none for truncated responses.
Tokenising prompt and response separately keeps the response's token boundaries the ones the policy
sampled. Image placeholders are expanded here, in id space, because Qwen2.5-VL's HF processor cannot
be built without torchvision:
    Qwen-VL   <|image_pad|>  ->  (t·h·w / merge²) × <|image_pad|>        (t, h, w) = image_grid_thw
    InternVL  <IMG_CONTEXT>  ->  <img> + (image_seq_length · tiles) × <IMG_CONTEXT> + </img>

The packed micro-batches these samples become: ``ril_fast.packing``.
"""

import enum
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ril_fast.images import load_image


class ModelKind(str, enum.Enum):
    """How a model takes images: Qwen-VL (grid_thw + mrope), InternVL (tiles), or not at all."""

    QWEN_VL = "qwen_vl"
    INTERNVL = "internvl"
    TEXT = "text"

    @classmethod
    def of(cls, model_type: str) -> "ModelKind":
        """The kind of a transformers ``config.model_type``."""
        if model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"):
            return cls.QWEN_VL
        if model_type == "internvl":
            return cls.INTERNVL
        return cls.TEXT

    @classmethod
    def of_config(cls, config, path) -> "ModelKind":
        """The kind of the transformers config of the model folder ``path``; a vision-language model of any
        other family (one with a ``vision_config``: LLaVA, Gemma 3, SmolVLM, MoE Qwen-VLs, ...) is refused
        (``UnsupportedModel``, its message starting with ``path``) rather than loaded as a text-only model."""
        kind = cls.of(config.model_type)
        if kind is cls.TEXT and getattr(config, "vision_config", None) is not None:
            raise UnsupportedModel(f"{path}: model type {config.model_type!r} is a vision-language model ril_fast "
                                   f"does not support (students: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, InternVL in "
                                   f"its transformers form, or a text-only causal LM)")
        return kind


class UnsupportedModel(ValueError):
    """A model folder of an architecture ril_fast cannot train."""


class UnsupportedSetting(ValueError):
    """A setting the model's processor cannot take; the message starts with ``setting=value:``."""


_PROBE = "RILENDOFTURNPROBE"  # an assistant's reply no template rewrites (no spaces to trim, no think tags)


def _special_ids(tokenizer) -> set[int]:
    """The tokenizer's special tokens: its named ones and every added token marked special (Llama 3's <|eot_id|>
    is only the latter)."""
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def turn_end_id(tokenizer, kind: ModelKind) -> int | None:
    """The chat template's end-of-turn token: the special token it writes directly after an assistant's content,
    in a conversation of one question and one reply rendered as ``Processor.prompt_text`` renders a question (the
    reply as a string, else, for a template that takes none, as a list of parts). None where the template writes
    no special token there (text, a space, nothing) or cannot render the conversation."""
    question = "?" if kind is ModelKind.TEXT else [{"type": "text", "text": "?"}]
    special = _special_ids(tokenizer)
    for reply in (_PROBE, [{"type": "text", "text": _PROBE}]):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # noqa: BLE001 - a template's raise_exception, no template, a content it cannot take
            continue
        if not isinstance(text, str) or _PROBE not in text:
            continue
        after = tokenizer(text[text.rindex(_PROBE) + len(_PROBE):], add_special_tokens=False)["input_ids"]
        return after[0] if after and after[0] in special else None
    return None


# ----------------------------------------------------------------------------------------------------
# One sample -> token ids, images and positions
# ----------------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """One rendered sample.

    input_ids (L,) int64; prompt_len P and response_len R with P + R = L; pixel_values: Qwen-VL
    (patches, C·t·p·p), InternVL (tiles, C, S, S), or None; image_grid_thw (images, 3) int64 (Qwen-VL)
    or None; mrope (3, L) int64 (Qwen-VL) or None.
    """

    input_ids: torch.Tensor
    prompt_len: int
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    mrope: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Tokens of the whole sample, prompt and response."""
        return self.input_ids.numel()

    @property
    def response_len(self) -> int:
        """Tokens of the response."""
        return self.length - self.prompt_len


@dataclass
class Processor:
    """Tokenizer + image processor + chat template + image-token expansion for one model folder.

    Our own small object rather than the HF processor: Qwen2.5-VL's cannot be built without
    torchvision, and packing needs the pieces (ids, grids, mrope) separately anyway.
    ``rope_index(input_ids (1, L), image_grid_thw (n, 3) | None) -> (3, 1, L)`` is the model's own
    mrope position function; ``ril_fast.models.load`` sets it for Qwen-VL models. ``end_token_id``: the chat
    template's end-of-turn token (see the module docstring); ``other_stop_ids``: the other tokens that end a
    response (the tokenizer's eos, the generation_config's eos ids), all of them together ``stop_token_ids``.
    """

    tokenizer: object = field(repr=False)
    kind: ModelKind = ModelKind.TEXT
    image_processor: object | None = field(default=None, repr=False)
    image_token_id: int | None = None
    merge_size: int = 1
    image_seq_length: int = 0  # InternVL: tokens per tile
    image_start_id: int | None = None  # InternVL: <img>
    image_end_id: int | None = None  # InternVL: </img>
    end_token_id: int | None = None
    other_stop_ids: tuple[int, ...] = ()
    rope_index: Callable | None = field(default=None, repr=False)
    prompt_cache_size: int = 256

    def __post_init__(self):
        # A step encodes each question 1 + 2G times (its rollout prompt, then every output): the rendered
        # prompt (ids, processed images, mrope) is kept for the most recent questions whose images are paths.
        self._cached_prompt = functools.lru_cache(maxsize=self.prompt_cache_size)(self._encode_prompt)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, max_image_pixels: int = 0) -> "Processor":
        """The processor of a local HF folder (or a cached hub id); ``rope_index`` left unset. ``max_image_pixels``
        (Qwen-VL; 0: the folder's own): images are resized to at most this many pixels (and the image
        processor saved with the processor's files says so). The end-of-turn token is the chat template's
        (:func:`turn_end_id`, else the tokenizer's eos); the other stop tokens are the tokenizer's eos and the eos
        ids of the folder's generation_config.json, where it has one."""
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, GenerationConfig

        config = AutoConfig.from_pretrained(path)
        kind = ModelKind.of_config(config, path)
        tok = AutoTokenizer.from_pretrained(path)
        end = turn_end_id(tok, kind)
        stops = [tok.eos_token_id]
        try:
            eos = GenerationConfig.from_pretrained(path).eos_token_id
        except OSError:  # no generation_config.json: the template's and the tokenizer's stop tokens only
            eos = None
        stops += eos if isinstance(eos, (list, tuple)) else [eos]
        end = end if end is not None else tok.eos_token_id
        proc = cls(tokenizer=tok, kind=kind, end_token_id=end,
                   other_stop_ids=tuple(dict.fromkeys(i for i in stops if i is not None and i != end)))
        if max_image_pixels and kind is not ModelKind.QWEN_VL:
            raise UnsupportedSetting(f"max_image_pixels={max_image_pixels}: only Qwen-VL students resize images to a "
                                     f"pixel budget; {path} is a {config.model_type} model")
        if kind is ModelKind.TEXT:
            return proc
        proc.image_processor = AutoImageProcessor.from_pretrained(
            path, **({"max_pixels": max_image_pixels} if max_image_pixels else {}))
        if max_image_pixels and max_image_pixels < proc.image_processor.size["shortest_edge"]:
            raise UnsupportedSetting(f"max_image_pixels={max_image_pixels}: {path}'s image processor enlarges every "
                                     f"image to at least {proc.image_processor.size['shortest_edge']} pixels")
        proc.image_token_id = config.image_token_id
        if kind is ModelKind.QWEN_VL:
            proc.merge_size = config.vision_config.spatial_merge_size
        else:
            proc.image_seq_length = config.image_seq_length
            proc.image_start_id = tok.convert_tokens_to_ids(getattr(tok, "start_image_token", "<img>"))
            proc.image_end_id = tok.convert_tokens_to_ids(getattr(tok, "end_image_token", "</img>"))
        return proc

    def prompt_text(self, question: str, n_images: int) -> str:
        """The user turn rendered by the chat template, generation prompt included."""
        if self.kind is ModelKind.TEXT:
            content = question
        else:
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Every token that ends a response, the end-of-turn token first (then ``other_stop_ids``)."""
        return tuple(dict.fromkeys(i for i in (self.end_token_id, *self.other_stop_ids) if i is not None))

    @functools.cached_property
    def control_tokens(self) -> tuple[str, ...]:
        """The special tokens that give a sample its structure: those the chat template renders around a
        question with an image, the end-of-turn and other stop tokens, the padding token, and the image tokens. Text
        holding one would be tokenised as that token (ending a turn early, or standing for an image)."""
        tok = self.tokenizer
        ids = set(tok(self.prompt_text("?", 0 if self.kind is ModelKind.TEXT else 1),
                      add_special_tokens=False)["input_ids"])
        ids |= {*self.stop_token_ids, tok.pad_token_id, self.image_token_id, self.image_start_id, self.image_end_id}
        special = _special_ids(tok)
        return tuple(sorted(tok.convert_ids_to_tokens(i) for i in ids if i in special))

    def response_lengths(self, texts: list[str]) -> list[int]:
        """Tokens each text takes as a finished response in :meth:`encode` (end-of-turn token included)."""
        return [len(ids) + 1 for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def prompt_lengths(self, prompts: list[tuple[str, list[tuple[int, int]]]]) -> list[int]:
        """Tokens each prompt takes in :meth:`encode_prompt`, images expanded, from its question and its images'
        (width, height) alone: no pixel is decoded, so a whole data set is counted before training. Raises
        ValueError for an image size the image processor refuses (e.g. an extreme aspect ratio)."""
        texts = [self.prompt_text(question, len(sizes)) for question, sizes in prompts]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        # Each image's one placeholder token becomes its span (_expand_images).
        return [len(t) + sum(self.image_tokens(w, h) - 1 for w, h in sizes) for t, (_, sizes) in zip(ids, prompts)]

    def image_tokens(self, width: int, height: int) -> int:
        """Tokens that an image of ``width`` x ``height`` pixels takes in a prompt (its span in
        :meth:`_expand_images`), by the image processor's own count of its patches (Qwen-VL) or tiles (InternVL)."""
        if self.kind is ModelKind.QWEN_VL:
            return self.image_processor.get_number_of_image_patches(height, width, {}) // self.merge_size**2
        tiles = self.image_processor.get_number_of_image_patches(height, width, {"crop_to_patches": True})
        return self.image_seq_length * tiles + 2  # <img> ... </img>

    def encode(self, sample: dict) -> Encoded:
        """Render, tokenise and (for VLMs) process the images of one sample. See the module docstring."""
        prompt = self.encode_prompt(sample["question"], sample.get("images"))
        tok = self.tokenizer
        # A student rollout brings the ids it sampled: re-tokenising its text need not give them back
        # (BPE is not canonical, and a young model emits broken UTF-8), and Eq. 2 needs their log-probs.
        response = list(sample["response_ids"]) if sample.get("response_ids") is not None else \
            tok(sample["response"], add_special_tokens=False)["input_ids"]
        if not sample.get("truncated", False):  # the stop token a rollout sampled, else the template's turn end
            response = response + [sample["end_id"] if sample.get("end_id") is not None else self.end_token_id]
        if not response:
            raise ValueError("a sample has an empty response")
        input_ids = torch.cat([prompt.input_ids, torch.tensor(response, dtype=torch.long)])
        mrope = None
        if prompt.mrope is not None:  # the response is text: it continues the prompt's last position on all 3 axes
            mrope = torch.cat([prompt.mrope, prompt.mrope[:, -1:] + torch.arange(1, len(response) + 1)], 1)
        return Encoded(input_ids, prompt.prompt_len, prompt.pixel_values, prompt.image_grid_thw, mrope)

    def forget_prompts(self) -> None:
        """Drop the kept prompts. The trainer calls it as each step starts and after each evaluation: a step's
        questions come back only in the next epoch, long evicted by then, so what a step keeps past its end is
        only memory (up to ``prompt_cache_size`` questions' processed pixels, 18 MiB each for a 1024x768 photo
        at Qwen2.5-VL's own pixel cap: 4.6 GiB a rank)."""
        self._cached_prompt.cache_clear()

    def encode_prompt(self, question: str, images=None) -> Encoded:
        """The prompt alone (no response) of a question and its images (paths or PIL images): ids,
        processed images and (Qwen-VL) mrope positions. Kept for the most recent questions whose images
        are paths (``prompt_cache_size``)."""
        images = tuple(images or ())
        if all(isinstance(im, (str, Path)) for im in images):
            return self._cached_prompt(question, images)
        return self._encode_prompt(question, images)

    def _encode_prompt(self, question: str, images: tuple) -> Encoded:
        """The prompt alone (no response): ids, processed images and (Qwen-VL) mrope positions."""
        images = [load_image(im) for im in images]
        if images and self.kind is ModelKind.TEXT:
            raise ValueError("this model takes no images, but a sample has some")
        prompt = self.tokenizer(self.prompt_text(question, len(images)), add_special_tokens=False)["input_ids"]
        pixel_values = grid = None
        if images:
            prompt, pixel_values, grid = self._expand_images(prompt, images)
        input_ids = torch.tensor(prompt, dtype=torch.long)
        mrope = self._mrope(input_ids, grid) if self.kind is ModelKind.QWEN_VL else None
        return Encoded(input_ids, len(prompt), pixel_values, grid, mrope)

    def _expand_images(self, prompt: list[int], images: list):
        """Replace each image placeholder of ``prompt`` by the image's tokens.

        Returns (expanded prompt, pixel_values, image_grid_thw (Qwen-VL) or None).
        """
        if prompt.count(self.image_token_id) != len(images):
            raise ValueError(f"the chat template rendered {prompt.count(self.image_token_id)} image "
                             f"placeholders for {len(images)} images")
        if self.kind is ModelKind.QWEN_VL:
            out = self.image_processor(images=images, return_tensors="pt")
            grid = out["image_grid_thw"].long()
            spans = [[self.image_token_id] * n for n in (grid.prod(-1) // self.merge_size**2).tolist()]
        else:
            out = self.image_processor(images=images, crop_to_patches=True, return_tensors="pt")
            grid = None
            spans = [[self.image_start_id] + [self.image_token_id] * (self.image_seq_length * int(n))
                     + [self.image_end_id] for n in out["num_patches"]]
        expanded, spans = [], iter(spans)
        for t in prompt:
            expanded.extend(next(spans) if t == self.image_token_id else [t])
        return expanded, out["pixel_values"], grid

    def _mrope(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None) -> torch.Tensor:
        """(3, L) mrope positions of one sample from the model's own ``get_rope_index``."""
        if image_grid_thw is None:
            return torch.arange(input_ids.numel()).expand(3, -1).clone()
        if self.rope_index is None:
            raise RuntimeError("Qwen-VL packing needs the model's rope index: get the processor from "
                               "ril_fast.models.load")
        return self.rope_index(input_ids[None], image_grid_thw)[:, 0]
