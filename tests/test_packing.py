"""Packing: layout of a packed batch (positions, targets, response rows) and the token-budget bins."""

import random

import pytest
import torch

from ril_fast.microbatch import micro_batches
from ril_fast.packing import IGNORE_INDEX, first_fit_decreasing, image_groups, pack, pad
from ril_fast.processor import Encoded
from models_fixtures import one_thread, processors, random_image, random_samples  # noqa: F401


# ----------------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------------
def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5"])
def test_mrope_positions_hand_made(arch, processors):
    """Sample A text only, sample B one image of 4 x 6 patches (w x h; 56x84 pixels, Qwen3-VL's 16-pixel
    patches 64x96): grid (1, 6, 4) -> 3 x 2 merged tokens."""
    proc = processors[arch]
    tok = proc.tokenizer
    patch = 16 if arch in ("qwen3_vl", "qwen3_5") else 14
    a = dict(images=[], question="What is x?", response="x = 4.")
    b = dict(images=[random_image(4 * patch, 6 * patch)], question="Which shape?", response="A circle.")
    batch = pack([proc.encode(a), proc.encode(b)])

    head = _ids(tok, "<|im_start|>user\n<|vision_start|>")
    tail = _ids(tok, "<|vision_end|>Which shape?<|im_end|>\n<|im_start|>assistant\n")
    resp = _ids(tok, "A circle.") + [tok.convert_tokens_to_ids("<|im_end|>")]
    p0, n_img = len(head), 6
    len_b = p0 + n_img + len(tail) + len(resp)
    len_a = len(_ids(tok, "<|im_start|>user\nWhat is x?<|im_end|>\n<|im_start|>assistant\nx = 4.<|im_end|>"))
    assert batch.lengths == [len_a, len_b]
    assert batch.input_ids[0, len_a:].tolist() == head + [proc.image_token_id] * n_img + tail + resp

    after = torch.arange(len_b - p0 - n_img) + p0 + 3  # text resumes after max(h, w) = 3
    expect_b = torch.stack([
        torch.cat([torch.arange(p0), torch.full((n_img,), p0), after]),                        # t
        torch.cat([torch.arange(p0), p0 + torch.tensor([0, 0, 1, 1, 2, 2]), after]),           # h
        torch.cat([torch.arange(p0), p0 + torch.tensor([0, 1, 0, 1, 0, 1]), after]),           # w
    ])
    expect = torch.cat([torch.arange(len_a).expand(3, -1), expect_b], 1)
    text = torch.cat([torch.arange(len_a), torch.arange(len_b)])
    assert batch.position_ids.shape == (4, 1, len_a + len_b)
    assert torch.equal(batch.position_ids[0, 0], text)
    assert torch.equal(batch.position_ids[1:, 0], expect)
    assert batch.cu_seqlens.tolist() == [0, len_a, len_a + len_b] and batch.cu_seqlens.dtype == torch.int32
    assert batch.max_seqlen == max(len_a, len_b)
    assert batch.image_grid_thw.tolist() == [[1, 6, 4]]
    assert batch.pixel_values.shape == (24, 3 * 2 * patch * patch)

    padded = pad([proc.encode(a), proc.encode(b)])
    assert torch.equal(padded.position_ids[:, 1, :len_b], expect_b)
    assert torch.equal(padded.position_ids[:, 0, :len_a], torch.arange(len_a).expand(3, -1))


def test_internvl_image_tokens_hand_made(processors):
    """InternVL: each <IMG_CONTEXT> placeholder becomes <img> + 4 tokens per tile + </img>; 1-D positions."""
    proc = processors["internvl"]
    tok = proc.tokenizer
    images = [random_image(150, 60), random_image(40, 40)]
    tiles = proc.image_processor(images=images, crop_to_patches=True)["num_patches"]
    enc = proc.encode(dict(images=images, question="Which?", response="A."))

    def span(n):
        return [tok.convert_tokens_to_ids("<img>")] + [proc.image_token_id] * (4 * int(n)) + [
            tok.convert_tokens_to_ids("</img>")]

    want = (_ids(tok, "<|im_start|>user\n") + span(tiles[0]) + _ids(tok, "\n") + span(tiles[1])
            + _ids(tok, "\nWhich?<|im_end|>\n<|im_start|>assistant\n") + _ids(tok, "A.<|im_end|>"))
    assert enc.input_ids.tolist() == want
    assert enc.pixel_values.shape == (sum(tiles), 3, 56, 56) and int(tiles[0]) > 1
    batch = pack([enc, proc.encode(dict(images=[], question="q", response="r"))])
    assert batch.position_ids.shape == (1, sum(batch.lengths)) and batch.image_grid_thw is None


def test_text_positions_restart(processors):
    proc = processors["qwen2"]
    samples = random_samples([0, 0, 0])
    enc = [proc.encode(s) for s in samples]
    batch = pack(enc)
    assert batch.position_ids.shape == (1, sum(batch.lengths))
    assert torch.equal(batch.position_ids[0], torch.cat([torch.arange(e.length) for e in enc]))
    assert torch.equal(batch.input_ids[0], torch.cat([e.input_ids for e in enc]))
    with pytest.raises(ValueError, match="no images"):
        proc.encode(dict(images=[random_image(30, 30)], question="q", response="r"))


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2"])
def test_targets_and_response_rows(arch, processors):
    proc = processors[arch]
    tok = proc.tokenizer
    samples = random_samples([0, 2, 1] if arch != "qwen2" else [0, 0, 0])
    samples[2]["truncated"] = True
    batch = pack([proc.encode(s) for s in samples])
    T = sum(batch.lengths)
    assert batch.targets.shape == (T,) and batch.response_rows.shape == (sum(batch.response_lengths),)
    ends = batch.cu_seqlens[1:].long() - 1
    assert (batch.targets[ends] == IGNORE_INDEX).all()
    keep = torch.ones(T, dtype=torch.bool)
    keep[ends] = False
    assert torch.equal(batch.targets[keep], batch.input_ids[0, 1:][keep[:-1]])
    eos = "<|im_end|>"
    for s, lo, hi, n, sample in zip(range(3), batch.resp_starts, batch.resp_ends, batch.response_lengths, samples):
        want = sample["response"] + ("" if sample.get("truncated") else eos)
        assert tok.decode(batch.input_ids[0, lo:hi]) == want
        assert hi - lo == n
        # the rows predicting the response are the ones just before its tokens
        rows = batch.response_rows[(batch.response_rows >= batch.cu_seqlens[s]) & (batch.response_rows < hi)]
        assert torch.equal(rows + 1, torch.arange(lo, hi))
    assert tok.decode(batch.targets[batch.response_rows]) == "".join(
        s["response"] + ("" if s.get("truncated") else eos) for s in samples)

    padded = pad([proc.encode(s) for s in samples])
    flat = padded.input_ids.flatten()
    assert torch.equal(padded.targets[padded.response_rows], batch.targets[batch.response_rows])
    for lo, hi, plo, phi in zip(batch.resp_starts, batch.resp_ends, padded.resp_starts, padded.resp_ends):
        assert torch.equal(batch.input_ids[0, lo:hi], flat[plo:phi])
    assert padded.attention_mask.sum(1).tolist() == batch.lengths


# ----------------------------------------------------------------------------------------------------
# Planner
# ----------------------------------------------------------------------------------------------------
def _random_lengths(n, hi):
    rng = random.Random(int(torch.randint(1 << 30, ())))
    return [rng.randint(1, hi) for _ in range(n)]


def test_ffd_hand_example():
    assert first_fit_decreasing([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]


def test_ffd_random():
    lengths, budget = _random_lengths(300, 500), 1000
    bins = first_fit_decreasing(lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(300))
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert max(loads) <= budget
    assert sum(load <= budget / 2 for load in loads) <= 1  # first-fit leaves at most one bin half empty
    assert len(bins) <= -(-sum(lengths) // budget) * 11 / 9 + 1


def test_ffd_groups_hand_example():
    # groups of 5, 5 and 4 tokens: kept whole; the group of 12 > 8 is cut into its own FFD chunks
    assert first_fit_decreasing([3, 3, 2, 2, 4], 8, groups=[[0, 2], [1, 3], [4]]) == [[0, 2], [1, 3], [4]]
    assert first_fit_decreasing([3, 3, 2, 2, 4], 8) == [[4, 0], [1, 2, 3]]
    assert first_fit_decreasing([5, 4, 3], 8, groups=[[0, 1, 2]]) == [[0, 2], [1]]
    # a group of 4 × 3 tokens > 8 beside one of 5: cut into two chunks of 6 (3 image encodes in 3 bins);
    # cut into single samples it was scattered over all three bins ([[1, 0], [2, 3], [4]]: 4 encodes)
    assert first_fit_decreasing([3, 5, 3, 3, 3], 8, groups=[[0, 2, 3, 4], [1]]) == [[0, 2], [3, 4], [1]]


def _random_groups(n, groups):
    """``n`` indices shuffled and cut into ``groups`` non-empty groups."""
    rng = random.Random(int(torch.randint(1 << 30, ())))
    order = rng.sample(range(n), n)
    cuts = sorted(rng.sample(range(1, n), groups - 1))
    return [order[a:b] for a, b in zip([0] + cuts, cuts + [n])]


@pytest.mark.parametrize("hi", [200, 600])  # longest sample: 1/5 and 3/5 of the budget
def test_ffd_groups_random(hi):
    """Every index once, every bin within budget, a group's indices together and in group order in each
    bin; a group that fits lies in one bin, a larger one in exactly as many bins as FFD packs it into
    alone, any two of which hold more than the budget of its tokens (so fewer than 2·T / budget + 1)."""
    lengths, budget = _random_lengths(300, hi), 1000
    groups = _random_groups(300, 20)
    bins = first_fit_decreasing(lengths, budget, groups=groups)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert max(sum(lengths[i] for i in b) for b in bins) <= budget
    split = 0
    for g in groups:
        parts = []
        for b in bins:
            at = [k for k, i in enumerate(b) if i in g]
            if at:
                assert at == list(range(at[0], at[-1] + 1))  # together: halving a bin keeps groups whole
                parts.append([b[k] for k in at])
        assert all(p == [i for i in g if i in p] for p in parts)
        tokens = sum(lengths[i] for i in g)
        if tokens <= budget:
            assert parts == [g]
            continue
        split += 1
        held = sorted(sum(lengths[i] for i in p) for p in parts)
        assert len(parts) == len(first_fit_decreasing([lengths[i] for i in g], budget))
        assert held[0] + held[1] > budget and len(parts) < 2 * tokens / budget + 1
    assert split  # 20 groups of 15 samples on average: some exceed the budget


def test_micro_batches_encode_a_group_once_per_chunk():
    """Through ``micro_batches`` and ``pack``: the images the vision tower encodes, summed over the
    micro-batches, are the chunks the image groups are cut into (one per group where it fits). Cut into
    single samples, as before, a group's images were encoded in most of the micro-batches."""
    lengths, budget = [n + 1 for n in _random_lengths(48, 60)], 128
    groups = _random_groups(48, 6)
    grid = torch.tensor([[1, 2, 2]])
    pixels = [torch.zeros(4, 3) for _ in groups]
    image = {i: pixels[k] for k, g in enumerate(groups) for i in g}
    encoded = [Encoded(torch.zeros(n, dtype=torch.long), 1, image[i], grid) for i, n in enumerate(lengths)]
    micro = micro_batches(encoded, budget)
    assert sorted(i for mb in micro for i in mb.index) == list(range(48))
    assert max(sum(mb.batch.lengths) for mb in micro) <= budget
    encodes = sum(len(mb.batch.image_grid_thw if mb.batch.vision_grid_thw is None else mb.batch.vision_grid_thw)
                  for mb in micro)
    assert encodes == sum(len(first_fit_decreasing([lengths[i] for i in g], budget)) for g in groups)


def test_image_groups_follow_shared_pixels():
    a, b = torch.zeros(4, 3), torch.zeros(4, 3)  # equal values, distinct tensors: not shared
    grid = torch.tensor([[1, 2, 2]])
    encoded = [Encoded(torch.zeros(3, dtype=torch.long), 1, pix, None if pix is None else grid)
               for pix in (a, None, b, a, None, b, a)]
    assert image_groups(encoded) == [[0, 3, 6], [1], [2, 5], [4]]
    batch = pack(encoded)
    assert batch.pixel_values.shape == (8, 3) and batch.image_grid_thw.tolist() == [[1, 2, 2]] * 5
    assert batch.vision_grid_thw.tolist() == [[1, 2, 2]] * 2 and batch.vision_index.tolist() == [0, 1, 0, 1, 0]
    alone = pack([encoded[0], encoded[2]])  # no image repeats: plain HF inputs
    assert alone.vision_grid_thw is None and alone.vision_index is None and alone.pixel_values.shape == (8, 3)


def test_too_long_sample_is_a_clear_error():
    with pytest.raises(ValueError, match="sample 2 has 9 tokens, more than max_tokens=8"):
        first_fit_decreasing([1, 2, 9], 8)
    # the budget itself fits: alone, and filling a bin exactly
    assert first_fit_decreasing([5], 5) == [[0]]
    assert first_fit_decreasing([8, 3, 5], 8) == [[0], [2, 1]]


def test_micro_batches_split_the_heaviest_then_copy_the_shortest():
    """To reach the agreed count, ``micro_batches`` halves the micro-batch with the most tokens (evening out the
    passes' work), then, with nothing left to split, adds zero-weight copies of the shortest response (the least
    wasted work). Hand example: bins [0, 3] (12 + 4 = 16 tokens) and [2, 1] (6 + 2 = 8) at a budget of 16."""
    lengths = [12, 2, 6, 4]
    encoded = [Encoded(torch.arange(n), 1) for n in lengths]
    assert [mb.index for mb in micro_batches(encoded, 16)] == [[0, 3], [2, 1]]
    split = micro_batches(encoded, 16, agree=lambda n: n + 1)
    assert [mb.index for mb in split] == [[2, 1], [0], [3]]  # the 16-token bin halved, not the 8-token one
    assert [sum(mb.batch.lengths) for mb in split] == [8, 12, 4]
    filled = micro_batches(encoded, 16, agree=lambda n: 6)  # 4 single responses, then 2 fillers
    assert sorted(i for mb in filled[:4] for i in mb.index) == [0, 1, 2, 3]
    assert all(mb.weight.tolist() == [1.0] for mb in filled[:4])
    for filler in filled[4:]:
        assert filler.index == [1] and filler.batch.lengths == [2] and filler.weight.tolist() == [0.0]
