"""Varlen packing: rendered samples (``ril_fast.processor.Encoded``) -> one padding-free micro-batch.

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

Planning: ``first_fit_decreasing`` bins samples under a token budget, keeping the samples that share images
together (``image_groups``); ``ril_fast.microbatch`` gives every rank the same number of micro-batches.
"""

from dataclasses import dataclass, replace

import torch

from ril_fast.processor import Encoded

IGNORE_INDEX = -100


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
# Planning: token budget per micro-batch
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
