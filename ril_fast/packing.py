"""Varlen packing: (images, question, response) samples -> one padding-free micro-batch.

A sample is a dict ``{"images": [PIL.Image | path, ...], "question": str, "response": str}`` (an
optional ``"truncated": True`` marks a response cut at the generation budget, see below; optional
``"response_ids"``, the token ids a student rollout sampled, are used instead of re-tokenising).

Rendering (``Processor.encode``): the user turn (the images, then the question) goes through the
model's chat template with the generation prompt; the response is tokenised on its own and followed
by the end-of-turn token the policy emitted to stop (the tokenizer's eos, e.g. <|im_end|>; left out
for truncated responses). Tokenising prompt and response separately keeps the response's token
boundaries the ones the policy sampled. Image placeholders are expanded here, in id space, because
Qwen2.5-VL's HF processor cannot be built without torchvision:
    Qwen-VL   <|image_pad|>  ->  (t·h·w / merge²) × <|image_pad|>        (t, h, w) = image_grid_thw
    InternVL  <IMG_CONTEXT>  ->  <img> + (image_seq_length · tiles) × <IMG_CONTEXT> + </img>

Layout of a packed batch of S samples, T = Σ L_s tokens, sample s at rows [o_s, o_s + L_s) with a
prompt of P_s and a response of R_s tokens:
    input_ids      (1, T)       the samples back to back, no padding
    position_ids   (1, T)       text models: 0..L_s-1 per sample (transformers finds the boundaries
                                from the restarts when use_cache=False and no attention mask is given)
                   (4, 1, T)    Qwen-VL: row 0 the restarting text positions (for the packed mask),
                                rows 1-3 each sample's own 3-D mrope positions (its get_rope_index)
    cu_seqlens     (S+1,) int32 sample boundaries, as flash-attention's varlen kernels take them
    targets        (T,) int64   the next token of each row; -100 on each sample's last row
    response_rows  (R,) int64   rows whose target is a response token: [o_s+P_s-1, o_s+P_s+R_s-1) for
                                each s in turn (R = Σ R_s; listed here, so no device code searches)
    resp_starts/ends (S,) int64 rows holding the response tokens: [o_s+P_s, o_s+P_s+R_s), the range
                                the discriminator pools ("last" = the end-of-turn token's row)
    pixel_values, image_grid_thw, vision_grid_thw, vision_index
                                the images (``image_inputs``): samples rendered from one cached
                                prompt (a question's 2G responses) share their images' pixels, and
                                the vision tower runs once per distinct image

Planning: ``first_fit_decreasing`` bins samples under a token budget, ``balance_ranks`` spreads them
over data-parallel ranks, ``plan`` does both and gives every rank the same number of micro-batches
where it can (FSDP ranks must run the same number of forwards); ``report`` summarises a plan.
"""

import enum
import functools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

IGNORE_INDEX = -100


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


def load_image(image):
    """A PIL image, or a path to one, as the RGB image HF image processors would see: EXIF orientation
    applied, transparency composited onto white (transformers' ``convert_to_rgb``; a plain
    ``convert("RGB")`` would turn a transparent background black)."""
    from PIL import Image, ImageOps
    from transformers.image_transforms import convert_to_rgb

    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return load_image(im)
    return Image.fromarray(convert_to_rgb(ImageOps.exif_transpose(image), return_numpy=True))


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
    mrope position function; ``ril_fast.models.load`` sets it for Qwen-VL models.
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
        processor saved with the processor's files says so)."""
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        config = AutoConfig.from_pretrained(path)
        kind = ModelKind.of_config(config, path)
        tok = AutoTokenizer.from_pretrained(path)
        proc = cls(tokenizer=tok, kind=kind, end_token_id=tok.eos_token_id)
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

    @functools.cached_property
    def control_tokens(self) -> tuple[str, ...]:
        """The special tokens that give a sample its structure: those the chat template renders around a
        question with an image, the end-of-turn and padding tokens, and the image tokens. Text holding one
        would be tokenised as that token (ending a turn early, or standing for an image)."""
        tok = self.tokenizer
        ids = set(tok(self.prompt_text("?", 0 if self.kind is ModelKind.TEXT else 1),
                      add_special_tokens=False)["input_ids"])
        ids |= {self.end_token_id, tok.pad_token_id, self.image_token_id, self.image_start_id, self.image_end_id}
        special = set(tok.all_special_ids)
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
        if not sample.get("truncated", False):
            response = response + [self.end_token_id]
        if not response:
            raise ValueError("a sample has an empty response")
        input_ids = torch.cat([prompt.input_ids, torch.tensor(response, dtype=torch.long)])
        mrope = None
        if prompt.mrope is not None:  # the response is text: it continues the prompt's last position on all 3 axes
            mrope = torch.cat([prompt.mrope, prompt.mrope[:, -1:] + torch.arange(1, len(response) + 1)], 1)
        return Encoded(input_ids, prompt.prompt_len, prompt.pixel_values, prompt.image_grid_thw, mrope)

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


# ----------------------------------------------------------------------------------------------------
# Encoded samples -> one packed micro-batch (or a padded one, for comparison)
# ----------------------------------------------------------------------------------------------------
def image_inputs(encoded: list) -> dict:
    """The image inputs of samples (``Encoded``, or anything with ``pixel_values`` / ``image_grid_thw``)
    in sample order, each distinct image set's pixels once: a dict of

        pixel_values     the patches (Qwen-VL) or tiles (InternVL) of every distinct image set, once
        image_grid_thw   (images, 3) every sample's images in sample order (Qwen-VL; else None): what
                         the language side reads (placeholder counts, mrope)
        vision_grid_thw  (distinct images, 3) what the vision tower computes (Qwen-VL; else None), and
        vision_index     Qwen-VL: (images,) int64, the row of vision_grid_thw each row of image_grid_thw
                         is; InternVL: (tiles,) int64, the row of pixel_values each sample's tile is;
                         None when no image repeats

    Samples share an image set when they hold the same ``pixel_values`` tensor, as every sample
    rendered from one cached prompt does (the 2G student and teacher responses to a question): their
    vision features are computed once and handed to each (``ril_fast.models.vision_once``).
    """
    out = dict.fromkeys(("pixel_values", "image_grid_thw", "vision_grid_thw", "vision_index"))
    held = [e for e in encoded if e.pixel_values is not None]
    if not held:
        return out
    qwen = all(e.image_grid_thw is not None for e in held)  # else InternVL: tiles, no grids
    groups = image_groups(held)
    distinct = [held[g[0]] for g in groups]
    out["pixel_values"] = torch.cat([e.pixel_values for e in distinct])
    if qwen:
        out["image_grid_thw"] = torch.cat([e.image_grid_thw for e in held])
    if len(distinct) < len(held):
        units = [len(e.image_grid_thw) if qwen else len(e.pixel_values) for e in distinct]  # images or tiles
        first = torch.tensor([0] + units).cumsum(0).tolist()
        rows = {i: range(first[d], first[d + 1]) for d, g in enumerate(groups) for i in g}
        out["vision_index"] = torch.tensor([r for i in range(len(held)) for r in rows[i]], dtype=torch.long)
        if qwen:
            out["vision_grid_thw"] = torch.cat([e.image_grid_thw for e in distinct])
    return out


def _to(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else x


class _Batch:
    """What the packed and the padded batch share: the image inputs and moving to a device."""

    def _image_inputs(self) -> dict:
        names = ("pixel_values", "image_grid_thw")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def to(self, device):
        """A copy with every tensor on ``device``."""
        return replace(self, **{k: _to(v, device) for k, v in self.__dict__.items()})


@dataclass
class PackedBatch(_Batch):
    """S samples packed into one row of T tokens, no padding. Shapes in the module docstring."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    targets: torch.Tensor
    response_rows: torch.Tensor
    resp_starts: torch.Tensor
    resp_ends: torch.Tensor
    lengths: list[int]
    response_lengths: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    vision_grid_thw: torch.Tensor | None = None
    vision_index: torch.Tensor | None = None

    def model_inputs(self) -> dict:
        """Keyword arguments of the HF forward. No attention mask: the restarting positions carry the
        boundaries; use_cache=False, else transformers skips packed detection and attends across samples."""
        return dict(input_ids=self.input_ids, position_ids=self.position_ids, use_cache=False,
                    **self._image_inputs())


def _rows_before(starts: list[int], ends: list[int]) -> torch.Tensor:
    """The rows ``[start - 1, end - 1)`` of each range in turn, as one int64 tensor: the rows that predict
    the tokens of rows ``[start, end)``."""
    return torch.cat([torch.arange(s - 1, e - 1) for s, e in zip(starts, ends)]) if starts else \
        torch.zeros(0, dtype=torch.long)


def pack(encoded: list[Encoded]) -> PackedBatch:
    """Pack encoded samples into one padding-free micro-batch (see the module docstring)."""
    if not encoded:
        raise ValueError("nothing to pack")
    lengths = [e.length for e in encoded]
    offsets = [0] + list(torch.tensor(lengths).cumsum(0).tolist())
    T = offsets[-1]
    input_ids = torch.cat([e.input_ids for e in encoded])
    text_pos = torch.cat([torch.arange(n) for n in lengths])
    if all(e.mrope is not None for e in encoded):
        position_ids = torch.cat([text_pos[None], torch.cat([e.mrope for e in encoded], 1)])[:, None]
    elif any(e.mrope is not None for e in encoded):
        raise ValueError("some samples have mrope positions and some do not")
    else:
        position_ids = text_pos[None]
    targets = torch.full((T,), IGNORE_INDEX, dtype=torch.long)
    starts, ends = [], []
    for e, o in zip(encoded, offsets):
        targets[o:o + e.length - 1] = e.input_ids[1:]
        starts.append(o + e.prompt_len)
        ends.append(o + e.length)
    return PackedBatch(
        input_ids=input_ids[None],
        position_ids=position_ids,
        cu_seqlens=torch.tensor(offsets, dtype=torch.int32),
        max_seqlen=max(lengths),
        targets=targets,
        response_rows=_rows_before(starts, ends),
        resp_starts=torch.tensor(starts, dtype=torch.long),
        resp_ends=torch.tensor(ends, dtype=torch.long),
        lengths=lengths,
        response_lengths=[e.response_len for e in encoded],
        **image_inputs(encoded),
    )


@dataclass
class PaddedBatch(_Batch):
    """The same samples right-padded to (B, L), for comparisons and benchmarks.

    input_ids, attention_mask (B, L); position_ids (B, L) or (3, B, L) (Qwen-VL mrope). targets,
    response_rows and resp_starts/ends index the flattened (B·L) rows, so code that reads a
    PackedBatch's row fields reads these unchanged.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    response_rows: torch.Tensor
    resp_starts: torch.Tensor
    resp_ends: torch.Tensor
    lengths: list[int]
    response_lengths: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    vision_grid_thw: torch.Tensor | None = None
    vision_index: torch.Tensor | None = None

    def model_inputs(self) -> dict:
        """Keyword arguments of the HF forward (use_cache=False)."""
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask,
                    position_ids=self.position_ids, use_cache=False, **self._image_inputs())


def pad(encoded: list[Encoded], pad_token_id: int = 0) -> PaddedBatch:
    """Right-pad encoded samples to the longest one (see :class:`PaddedBatch`)."""
    if not encoded:
        raise ValueError("nothing to pad")
    B, L = len(encoded), max(e.length for e in encoded)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    mrope = encoded[0].mrope is not None
    position_ids = torch.zeros((3, B, L) if mrope else (B, L), dtype=torch.long)
    targets = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(encoded):
        n = e.length
        input_ids[b, :n] = e.input_ids
        attention_mask[b, :n] = 1
        if mrope:
            position_ids[:, b, :n] = e.mrope
        else:
            position_ids[b, :n] = torch.arange(n)
        targets[b, :n - 1] = e.input_ids[1:]
    starts = [b * L + e.prompt_len for b, e in enumerate(encoded)]
    ends = [b * L + e.length for b, e in enumerate(encoded)]
    return PaddedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        targets=targets.flatten(),
        response_rows=_rows_before(starts, ends),
        resp_starts=torch.tensor(starts, dtype=torch.long),
        resp_ends=torch.tensor(ends, dtype=torch.long),
        lengths=[e.length for e in encoded],
        response_lengths=[e.response_len for e in encoded],
        **image_inputs(encoded),
    )


# ----------------------------------------------------------------------------------------------------
# Planning: token budget per micro-batch, balance across data-parallel ranks
# ----------------------------------------------------------------------------------------------------
def _check_budget(lengths: list[int], max_tokens: int) -> None:
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(f"sample {i} has {n} tokens, more than max_tokens={max_tokens}: raise the "
                             f"budget or drop the sample")


def first_fit_decreasing(lengths: list[int], max_tokens: int,
                         groups: list[list[int]] | None = None) -> list[list[int]]:
    """Bin sample indices into micro-batches of at most ``max_tokens`` tokens each.

    Longest first, each into the first micro-batch with room (FFD: at most 11/9·OPT + 1 bins).
    ``groups``: lists of indices (each index in one) whose samples share images (see ``image_groups``):
    the vision tower encodes a group's images once in each micro-batch that holds any of it. A group is
    cut into the chunks FFD packs it into on its own (one chunk, the group, when it fits), and each chunk
    is binned as one item, its indices together in group order. Any two chunks of a group exceed
    ``max_tokens`` together (the later one did not fit beside the earlier), so no two share a
    micro-batch: a group of T tokens lies in exactly k micro-batches, k ≤ 11/9·OPT + 1 (OPT: the fewest
    that could hold it alone) and k < 2·T / max_tokens + 1.
    Returns a list of micro-batches, each a list of indices into ``lengths``; every index appears once.
    """
    _check_budget(lengths, max_tokens)
    items = [[i] for i in range(len(lengths))] if groups is None else [
        [g[j] for j in sorted(chunk)] for g in groups
        for chunk in first_fit_decreasing([lengths[i] for i in g], max_tokens)]
    sizes = [sum(lengths[i] for i in item) for item in items]
    bins, room = [], []
    for k in sorted(range(len(items)), key=lambda k: -sizes[k]):
        j = next((j for j, r in enumerate(room) if r >= sizes[k]), None)
        if j is None:
            bins.append([])
            room.append(max_tokens)
            j = len(bins) - 1
        bins[j].extend(items[k])
        room[j] -= sizes[k]
    return bins


def image_groups(encoded: list) -> list[list[int]]:
    """Indices of ``encoded`` grouped by shared images (the same ``pixel_values`` tensor: samples
    rendered from one cached prompt), in order of first appearance; a sample without images is a
    group of its own. Binned together, a group's images go through the vision tower once."""
    groups: dict[object, list[int]] = {}
    for i, e in enumerate(encoded):
        groups.setdefault(("images", id(e.pixel_values)) if e.pixel_values is not None else i, []).append(i)
    return list(groups.values())


def balance_ranks(lengths: list[int], world_size: int) -> list[list[int]]:
    """Split sample indices over ``world_size`` ranks, balancing tokens.

    Longest first, each onto the rank with the fewest tokens so far (LPT: within 4/3 of the best
    possible maximum). Returns one list of indices per rank, each ascending. Needs at least one sample
    per rank.
    """
    if len(lengths) < world_size:
        raise ValueError(f"{len(lengths)} samples cannot feed {world_size} ranks")
    ranks, load = [[] for _ in range(world_size)], [0] * world_size
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = min(range(world_size), key=lambda r: (load[r], len(ranks[r])))
        ranks[r].append(i)
        load[r] += lengths[i]
    return [sorted(r) for r in ranks]


def _split_largest(bins: list[list[int]], lengths: list[int]) -> bool:
    """Split the heaviest micro-batch with ≥ 2 samples into two of similar tokens; False if none can."""
    splittable = [b for b in bins if len(b) >= 2]
    if not splittable:
        return False
    big = max(splittable, key=lambda b: sum(lengths[i] for i in b))
    bins.remove(big)
    halves, load = ([], []), [0, 0]
    for i in sorted(big, key=lambda i: -lengths[i]):
        h = 0 if load[0] <= load[1] else 1
        halves[h].append(i)
        load[h] += lengths[i]
    bins.extend(halves)
    return True


def plan(lengths: list[int], max_tokens: int, world_size: int = 1) -> list[list[list[int]]]:
    """Plan a step: ``plan[rank][micro_batch]`` is a list of sample indices.

    Samples are balanced over ranks (``balance_ranks``), then binned per rank under ``max_tokens``
    (``first_fit_decreasing``). Ranks with fewer micro-batches split their heaviest ones until all
    ranks have the same count, since FSDP ranks must run the same number of forward/backward passes;
    a rank of single-sample micro-batches cannot split further and keeps fewer (``report`` shows it).
    """
    _check_budget(lengths, max_tokens)
    per_rank = []
    for idx in balance_ranks(lengths, world_size):
        bins = first_fit_decreasing([lengths[i] for i in idx], max_tokens)
        per_rank.append([sorted(idx[j] for j in b) for b in bins])
    target = max(len(bins) for bins in per_rank)
    for bins in per_rank:
        while len(bins) < target and _split_largest(bins, lengths):
            pass
    return per_rank


@dataclass
class PackReport:
    """Summary of a plan. ``rows``: one dict per micro-batch (rank, index, tokens, sequences,
    padding_fraction); ``rank_tokens``: tokens per rank; ``imbalance``: max / mean rank tokens − 1."""

    rows: list[dict]
    rank_tokens: list[int]
    imbalance: float

    def __str__(self) -> str:
        lines = ["rank  mb  tokens  seqs  padding"]
        lines += [f"{r['rank']:>4} {r['index']:>3} {r['tokens']:>7} {r['sequences']:>5} "
                  f"{r['padding_fraction']:>8.3f}" for r in self.rows]
        lines.append(f"rank tokens {self.rank_tokens}, imbalance {self.imbalance:.3f}")
        return "\n".join(lines)


def report(step_plan: list[list[list[int]]], lengths: list[int], *, padded: bool = False) -> PackReport:
    """Tokens, sequences and padding fraction per micro-batch of ``step_plan`` (from :func:`plan`), and
    the token imbalance across ranks. ``padded=True`` measures the same micro-batches laid out as
    right-padded (B, L_max) batches instead of packed ones (whose padding fraction is 0)."""
    rows, rank_tokens = [], []
    for rank, bins in enumerate(step_plan):
        for index, b in enumerate(bins):
            tokens = sum(lengths[i] for i in b)
            slots = len(b) * max(lengths[i] for i in b) if padded else tokens
            rows.append(dict(rank=rank, index=index, tokens=tokens, sequences=len(b),
                             padding_fraction=1 - tokens / slots))
        rank_tokens.append(sum(lengths[i] for b in bins for i in b))
    mean = sum(rank_tokens) / len(rank_tokens)
    imbalance = max(rank_tokens) / mean - 1 if mean else 0.0
    return PackReport(rows=rows, rank_tokens=rank_tokens, imbalance=imbalance)
