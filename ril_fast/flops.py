"""Analytic model FLOPs of each phase of an RIL step, from the shapes of the samples it processed; the
matmul peak they are divided by (MFU).

Model FLOPs count the useful work of the model's matmuls: 2 FLOPs per multiply-add, nothing for norms,
activations, softmax or the optimiser, nothing for padding, nothing recomputed (the fused log-probs
backward recomputes the logits; activation checkpointing would recompute the forward). With P_dec the
weights of the decoder's linear (and convolution) layers, A its layers with softmax attention and d their
query width (heads × head_dim),

    decoder forward, one sample of L tokens   2·L·P_dec + 2·A·d·L²                  (causal: half of 4·d·L²)
    LM head, per row it is applied to         2·H·V              (training: the R response rows only)
    vision tower, one image of n patches      2·n·(P_embed + P_blocks) + 2·(n / m²)·P_merge
                                              + 4·d_v·n² per full-attention block
                                              + 4·d_v·Σ_w n_w² per windowed block (windows of n_w patches)
    decoding token t of a response            2·P_dec + 4·A·d·(P + t) + 2·H·V

and backward = 2 × forward (weights and activations each cost one forward), but for the patch embedding,
whose input (the pixels) needs no gradient: 1 × its forward. The parameter counts are read
from the model's modules (:meth:`Shapes.of_model`), so any decoder transformers builds is counted: MLPs
gated or not, q/k norms, Qwen3.5's gated attention and its Gated DeltaNet layers' projections and
convolution. Left out: the Gated DeltaNet's recurrence (linear in L, not a weight matmul; A counts only
the softmax-attention layers), and a sliding window's saving (such layers count as full attention).
A mixture of experts would be over-counted (every expert's weights); ril_fast takes none.

The vision towers: Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 embed n patches (P_embed: the patch
convolution), run the blocks on them and merge m² = 4 patches into a token (P_merge: the merger, plus
Qwen3-VL's DeepStack mergers); Qwen2.5-VL's blocks attend within windows but for ``fullatt_block_indexes``,
the others over the whole image. InternVL's tower (InternViT) takes each 448-pixel tile as one image of
n patches plus a class token that its blocks also run on, and its projector maps each 2×2 patches after the
pixel shuffle (m = 1 / ``downsample_ratio``). ``tests/test_flops.py`` checks the forward formulas against
torch's FlopCounterMode on small models of every family. The vision tower counts once per distinct image
set: the samples of one prompt share theirs (``ril_fast.packing.image_inputs``). The phases:

    rollout            G prefills of each prompt (the vision tower once per prompt: its G copies share
                       the image features) + one decoding step per generated token after the first
    disc_update        μ × (3 × (vision + decoder) - patch embedding) over every sample (the d→1 head
                       is negligible)
    disc_score         1 × (vision + decoder) over every sample
    old_ref_logprobs   per frozen model (π_old when μ > 1, π_ref when β > 0): vision + decoder + LM head
    policy_update      μ × (3 × (vision + decoder + LM head on response rows) - patch embedding)

The optimiser is memory-bound: AdamW in fp32 with gradient clipping reads and writes about 32 bytes per
parameter (read p, g, m, v; write p, m, v; read g once more for the norm).
"""

import functools
import time
from dataclasses import dataclass

import torch

from ril_fast.processor import ModelKind

ADAMW_BYTES_PER_PARAM = 32
_WEIGHTED = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _weights(*modules) -> int:
    """Weights of the linear and convolution layers in ``modules`` (None: none): each is one multiply-add
    per row (a patch convolution's stride equals its kernel; Qwen3.5's causal convolution is depthwise)."""
    return sum(m.weight.numel() for module in modules if module is not None
               for m in module.modules() if isinstance(m, _WEIGHTED))


def softmax_attention(text_config) -> tuple[int, int]:
    """(layers with softmax attention over the context, head_dim) of a transformers text config: a hybrid model's
    linear-attention layers (Qwen3.5's Gated DeltaNet) are not counted."""
    kinds = getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return sum(kind != "linear_attention" for kind in kinds), head_dim


@dataclass(frozen=True)
class Shapes:
    """The dimensions FLOPs depend on (see the module docstring), from :meth:`of_model` or :meth:`of`."""

    hidden: int
    vocab: int
    decoder_params: int  # P_dec: linear and convolution weights of all decoder layers
    attention_layers: int  # A: layers with softmax attention over the context
    query_width: int  # d: heads × head_dim of those layers
    vis_width: int = 0  # d_v (0: no vision tower)
    vis_embed_params: int = 0  # P_embed: per patch
    vis_block_params: int = 0  # P_blocks: per token the tower's blocks run on (patches + class tokens)
    vis_merge_params: int = 0  # P_merge: per merged token (m² patches)
    vis_depth: int = 0
    vis_full_blocks: int = 0  # blocks attending over the whole image (the others: within windows)
    vis_window: int = 0  # patches per side of a window (0: no windowed blocks)
    vis_class_tokens: int = 0  # InternViT: 1
    tile_patches: int = 0  # InternVL: patches per tile
    merge: int = 1  # m

    @classmethod
    def of(cls, config) -> "Shapes":
        """Shapes of a transformers config (``AutoConfig.from_pretrained(student)``), read from the model it
        builds on the meta device (no memory, no weights)."""
        from ril_fast.models import meta_model

        return cls.of_model(meta_model(config))

    @classmethod
    def of_model(cls, model: torch.nn.Module) -> "Shapes":
        """Shapes of a transformers causal LM or vision-language model (a Qwen-VL or InternVL one), unsharded. A
        vision-language model of another family is refused (``UnsupportedModel``), not counted without its tower."""
        config = model.config
        text = config.get_text_config()
        heads = text.num_attention_heads
        attention_layers, head_dim = softmax_attention(text)
        head = model.get_output_embeddings().weight
        shapes = dict(hidden=head.shape[1], vocab=head.shape[0], decoder_params=_weights(model.get_decoder()),
                      attention_layers=attention_layers,
                      query_width=heads * head_dim)
        kind, inner = ModelKind.of_config(config, config.name_or_path or "the model"), model.base_model
        if kind is ModelKind.QWEN_VL:
            v, visual = config.vision_config, inner.visual
            windowed = getattr(v, "fullatt_block_indexes", None) is not None  # Qwen2.5-VL
            shapes.update(vis_width=getattr(v, "embed_dim", v.hidden_size),  # Qwen2-VL: hidden_size is the output's
                          vis_embed_params=_weights(visual.patch_embed), vis_block_params=_weights(visual.blocks),
                          vis_merge_params=_weights(visual.merger, getattr(visual, "deepstack_merger_list", None)),
                          vis_depth=v.depth, vis_full_blocks=len(v.fullatt_block_indexes) if windowed else v.depth,
                          vis_window=v.window_size // v.patch_size if windowed else 0, merge=v.spatial_merge_size)
        elif kind is ModelKind.INTERNVL:
            v, tower = config.vision_config, inner.vision_tower
            size, patch = _pair(v.image_size), _pair(v.patch_size)
            shapes.update(vis_width=v.hidden_size, vis_embed_params=_weights(tower.embeddings),
                          vis_block_params=_weights(tower.encoder),
                          vis_merge_params=_weights(inner.multi_modal_projector),
                          vis_depth=v.num_hidden_layers, vis_full_blocks=v.num_hidden_layers, vis_class_tokens=1,
                          tile_patches=(size[0] // patch[0]) * (size[1] // patch[1]),
                          merge=round(1 / config.downsample_ratio))
        return cls(**shapes)

    def decoder(self, length: int) -> float:
        """Forward FLOPs of the decoder over one sample of ``length`` tokens (causal attention)."""
        return 2 * length * self.decoder_params + 2 * self.attention_layers * self.query_width * length**2

    def lm_head(self, rows: int) -> float:
        """Forward FLOPs of the LM head over ``rows`` rows."""
        return 2 * rows * self.hidden * self.vocab

    def vision(self, grids, tiles: int = 0) -> float:
        """Forward FLOPs of the vision tower over Qwen-VL images of patch grids ``[(t, h, w), ...]`` and
        ``tiles`` InternVL tiles."""
        images = self._images(grids, tiles)
        d, windowed = self.vis_width, self.vis_depth - self.vis_full_blocks
        total = 0.0
        for n, t, h, w in images:
            tokens = n + self.vis_class_tokens
            total += 2 * n * self.vis_embed_params + 2 * tokens * self.vis_block_params
            total += 2 * (n // self.merge**2) * self.vis_merge_params
            total += 4 * d * tokens * tokens * self.vis_full_blocks
            if windowed:
                total += 4 * d * t * t * _square_sum(h, self.vis_window) * _square_sum(w, self.vis_window) * windowed
        return total

    def patch_embedding(self, grids, tiles: int = 0) -> float:
        """The part of :meth:`vision` that is the patch embedding (its backward skips the pixels' gradient)."""
        return sum(2 * n * self.vis_embed_params for n, *_ in self._images(grids, tiles))

    def _images(self, grids, tiles: int) -> list[tuple[int, int, int, int]]:
        """(patches, t, h, w) of each image; an InternVL tile is one image of ``tile_patches`` patches."""
        return [(t * h * w, t, h, w) for t, h, w in grids] + [(self.tile_patches, 1, 0, 0)] * tiles

    def decode(self, prompt: int, generated: int) -> float:
        """FLOPs of the decoding steps that follow a prefill of ``prompt`` tokens and produce tokens
        2..``generated`` (the prefill's logits give the first)."""
        steps = max(generated - 1, 0)
        contexts = steps * prompt + steps * (steps + 1) // 2
        return (2 * self.decoder_params + 2 * self.hidden * self.vocab) * steps \
            + 4 * self.attention_layers * self.query_width * contexts


def _pair(x) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


def _square_sum(n: int, window: int) -> int:
    """Σ of the squared sizes of the chunks of ``window`` that cover ``n`` patches."""
    full, rest = divmod(n, window)
    return full * window**2 + rest**2


@dataclass
class Sample:
    """One processed sample's shape: total and prompt tokens, response rows, its images' patch grids
    (Qwen-VL) or tile count (InternVL)."""

    length: int
    prompt: int
    response: int
    grids: list
    image_set: int | None = None  # samples with the same value share their images' vision features
    tiles: int = 0

    @classmethod
    def of(cls, encoded) -> "Sample":
        """From a ``ril_fast.processor.Encoded`` (its pixel tensor names its image set)."""
        grids = [] if encoded.image_grid_thw is None else [tuple(g) for g in encoded.image_grid_thw.tolist()]
        pixels = encoded.pixel_values
        tiles = len(pixels) if pixels is not None and encoded.image_grid_thw is None else 0
        return cls(encoded.length, encoded.prompt_len, encoded.response_len, grids,
                   None if pixels is None else id(pixels), tiles)

    def prompt_only(self) -> "Sample":
        """The rendered prompt this sample answers (its first ``prompt`` tokens, its images)."""
        return Sample(self.prompt, self.prompt, 0, self.grids, self.image_set, self.tiles)


def _image_sets(samples: list[Sample]) -> list[tuple[list, int]]:
    """(grids, tiles) of each distinct image set of ``samples``."""
    return list({x.image_set if x.image_set is not None else id(x): (x.grids, x.tiles)
                 for x in samples if x.grids or x.tiles}.values())


def forward_flops(s: Shapes, samples: list[Sample], *, head: bool) -> float:
    """Forward FLOPs over ``samples``: the decoder over each, the LM head on their response rows when
    ``head``, the vision tower once per distinct image set."""
    return sum(s.vision(*g) for g in _image_sets(samples)) + sum(
        s.decoder(x.length) + (s.lm_head(x.response) if head else 0) for x in samples)


def training_flops(s: Shapes, samples: list[Sample], *, head: bool) -> float:
    """Forward + backward FLOPs over ``samples`` (as :func:`forward_flops`): 3 × the forward, less the
    patch embedding's input gradient (the pixels need none)."""
    return 3 * forward_flops(s, samples, head=head) - sum(s.patch_embedding(*g) for g in _image_sets(samples))


def rollout_flops(s: Shapes, prompts: list[Sample], students: list[Sample], group_size: int) -> float:
    """Model FLOPs of sampling ``group_size`` responses to each of ``prompts`` (rendered prompts; their
    ``prompt`` tokens are prefilled ``group_size`` times with the LM head on the last row, their images
    encoded once) that came out as ``students`` (``response`` = tokens generated, in prompt order)."""
    prefill = sum(s.decoder(p.prompt) + s.lm_head(1) for p in prompts)
    return sum(s.vision(p.grids, p.tiles) for p in prompts) + group_size * prefill \
        + sum(s.decode(x.prompt, x.response) for x in students)


def phase_flops(s: Shapes, prompts: list[Sample], students: list[Sample], samples: list[Sample], *,
                group_size: int, mu: int, frozen_models: int, disc: bool) -> dict[str, float]:
    """Model FLOPs per phase of one step (see the module docstring).

    ``prompts``: each question's rendered prompt (once; generate runs it ``group_size`` times);
    ``students``: the sampled student responses (their ``response`` = tokens generated); ``samples``:
    every output the updates run on; ``frozen_models``: 0, 1 or 2 frozen log-prob passes; ``disc``:
    whether the step has a discriminator.
    """
    return {
        "rollout": rollout_flops(s, prompts, students, group_size),
        "disc_update": mu * training_flops(s, samples, head=False) if disc else 0.0,
        "judge": 0.0,
        "disc_score": forward_flops(s, samples, head=False) if disc else 0.0,
        "old_ref_logprobs": frozen_models * forward_flops(s, samples, head=True),
        "policy_update": mu * training_flops(s, samples, head=True),
        "optimizer": 0.0,
    }


@functools.cache
def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense square matmul TFLOP/s of ``device`` in ``dtype``, measured (once per process): 8192² on a GPU
    (the fastest of ``triton.testing.do_bench``'s calls), 1024² on a CPU (the fastest of 3 after a
    warm-up). The denominator of MFU: a datasheet figure would hide clock throttling, a busy machine and a
    wrong dtype."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn_like(a)
    if cuda:
        import triton.testing

        with torch.cuda.device(device):
            ms = triton.testing.do_bench(lambda: a @ b, warmup=5, rep=50, return_mode="min")
    else:
        a @ b  # warm-up
        ms = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            a @ b
            ms = min(ms, 1e3 * (time.perf_counter() - t0))
    return 2 * n**3 / (ms * 1e-3) / 1e12
