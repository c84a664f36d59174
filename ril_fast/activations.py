"""The activations one update micro-batch keeps for its backward: the memory ``batch.max_tokens`` bounds.

``ril_fast.memory`` plans the bytes a run's models take before any activation; this counts what the autograd
graph of one update micro-batch of T packed tokens holds on top, at its peak (the end of the forward): the
student's policy update (the decoder to its last hidden states, then the fused ``token_logprobs`` on the R
response rows: no (T, V) logits) or the discriminator's (the same backbone and a d→1 head), whichever is larger:
they run at different times. Counted from the student's modules (:meth:`Widths.of_model`, on the meta device), a
token of each decoder layer keeps, with e the bytes of an activation (2: bf16 on a GPU, the trainer's mixed
precision; 4: fp32 on a CPU) and widths H (hidden), I (MLP), q and kv (heads × head_dim of the queries and of the
keys and values), h (query heads):

    RMSNorm over n        4·n + e·n + 4    its input in fp32 (a copy where e = 2), the normalised value, 1/rms
                          e·n + 4          Liger's kernel: its input and 1/rms
    LayerNorm over n      e·n + 8          its input, mean and 1/std (a CPU keeps those two in the input's dtype)
    norm outputs          e·n              the linear layers' input (q, k and v share one; gate and up one)
    attention             e·(2q + 2kv) + 4·h    flash-attention's q, k, v, output (o_proj's input), log-sum-exp
    q/k norms (Qwen3)     an RMSNorm over each head of q and of k
    SwiGLU MLP            4·e·I            gate, silu(gate), up, their product (Liger's kernel: 3·e·I)

and once a forward the rotary cos and sin (2·e·head_dim a token, shared by the layers), the final norm and the
head: the policy's R gathered rows (e·H + 16: targets, log-sum-exp, log-prob; and the loss's advantages and mask,
8) or, on a GPU, the discriminator's Triton head's T rows (e·H); a VLM's image-token mask (1 a token). The vision
tower runs once per distinct image of the micro-batch (its image tokens are part of T) over n = m²·(image tokens)
patches (Qwen-VL) or tiles of patches and a class token (InternVL): the same layer terms at its widths, its MLP's
(GELU: 2·e·I; QuickGELU: 3·e·I), InternViT's layer scales (2·e·d), the fp32 rotary tables (Qwen-VL), the patch
embedding's input (the pixels cast to bf16; in fp32 they are the batch's own tensor), the window order (Qwen2.5-VL),
the merger, Qwen3-VL's DeepStack mergers and interpolated position taps.

With activation checkpointing (``models.enable_activation_checkpointing``, ``models.recomputing``) each decoder
layer and vision block keeps its input (e·H a token) and, while the largest is recomputed in the backward, its
whole set once more (less its input where it saves that very tensor: in fp32, in LayerNorm, in Liger's norm).

The GPU's code (``gpu``) is flash-attention, the Triton log-probs, loss and discriminator head and, wherever
``ril_fast.models`` applies them (``liger``), Liger's kernels (the decoder's RMSNorms and SwiGLU MLPs, Qwen2.5-VL's
vision blocks' RMSNorms). The CPU's, which ``tests/test_activations.py`` measures term by term against what
autograd saves in the trainer's updates of tiny students (fp32 and bf16, checkpointed or not), pads each attention
call's samples to the longest (``ril_fast.attention._padded``: the padded q, k, v, output and log-sum-exp, the
causal mask in the activations' dtype, 8 bytes a row of indices, the output copied out), runs the eager loss (21
bytes a response row) and pools the discriminator's rows (4·H a sample). Liger's terms are measured there too,
its kernels' launchers stood in for by torch (what a kernel saves is its Python's choice); flash-attention's and
the Triton heads' are read from their code, not measured here (no GPU).

Not counted: the weights and gradients (``ril_fast.memory``), the batch's own ids, positions and pixels, other
values per sample (the discriminator's pooled ranges, labels and BCE: 24 bytes), π_old's and π_ref's log-probs (4
bytes a response row each, when μ > 1 or β > 0), the indices copying the features of images that samples share (8
bytes an image token), the vision tower's int32 sequence and window boundaries, the backward's transients (the
gradient flowing back: a few T×H and T×I tensors at a time; the log-probs' recomputed logit chunk),
flash-attention's workspace, the allocator's rounding and fragmentation. A Gated DeltaNet layer (Qwen3.5) counts its
norms, MLP and input projections only: its recurrence's own intermediates (half the bytes of the tiny Qwen3.5's
update on a CPU) are not, so the figure is a floor there; other decoder families count as Llama's layer (two
RMSNorms, attention, a SwiGLU MLP).
"""

import inspect
from dataclasses import dataclass

import torch

from ril_fast.flops import softmax_attention
from ril_fast.processor import ModelKind

LSE_BYTES = 4  # fp32 log-sum-exp per query head and row
ROW_BYTES = 8  # an int64 index per row


@dataclass(frozen=True)
class Vision:
    """A vision tower's widths: ``depth`` blocks of ``width`` (``heads`` heads; an MLP of ``intermediate``), of
    which ``full_blocks`` attend over whole images and the others within windows of ``window`` merged tokens a side
    (Qwen2.5-VL); m = ``merge``; ``patch_inputs`` pixel values a patch; the merger's (projector's) norm over
    ``merger_norm`` values a merged token and its GELU over ``merger_hidden``."""

    kind: str  # "qwen": the patches of every image in one packed row; "internvl": tiles as a batch
    width: int
    intermediate: int
    heads: int
    depth: int
    full_blocks: int
    window: int
    merge: int
    patch_inputs: int
    norm: str  # "rms" | "layer"
    mlp: str  # "gated" (SwiGLU) | "gelu" | "quick_gelu"
    merger_norm: int
    merger_hidden: int
    merger_norm_kind: str = "layer"  # "rms" | "layer"
    rotary: int = 0  # fp32 cos and sin values a patch (Qwen-VL)
    layer_scale: bool = False  # InternViT: λ₁·attention, λ₂·MLP
    tile_patches: int = 0  # InternVL: patches a tile (and one class token)
    deepstack: int = 0  # Qwen3-VL: mergers of earlier blocks' outputs (their input is the next block's)
    position_taps: int = 0  # Qwen3-VL: learned position embeddings interpolated from 4 taps a patch


@dataclass(frozen=True)
class Widths:
    """The widths a micro-batch's activations scale with (see the module docstring), read by :meth:`of_model`."""

    hidden: int  # H
    intermediate: int  # I
    layers: int  # decoder layers with softmax attention
    linear_layers: int  # Gated DeltaNet layers (Qwen3.5)
    q_width: int  # q: query heads × head_dim
    kv_width: int  # kv
    heads: int  # h: query heads
    rotary: int  # cos and sin values a token
    qk_norm: bool = False  # Qwen3, Qwen3-VL, Qwen3.5: an RMSNorm over each head of q and k
    gated_attention: bool = False  # Qwen3.5: q_proj also gives a sigmoid gate on the attention's output
    zero_centred: bool = False  # Qwen3.5's RMSNorm: x̂·(1 + w) in fp32, which keeps x̂ in fp32 (4·n, not e·n)
    linear_width: int = 0  # a Gated DeltaNet layer's input projections, per token
    vision: Vision | None = None

    @classmethod
    def of_model(cls, model: torch.nn.Module) -> "Widths":
        """Widths of a transformers causal LM or VLM (a student ``ril_fast.models.meta_model`` builds)."""
        text = model.config.get_text_config()
        layers, head_dim = softmax_attention(text)
        heads = text.num_attention_heads
        decoder = list(model.get_decoder().modules())
        attention = next((m for m in decoder if hasattr(m, "q_proj") and hasattr(m, "o_proj")), None)
        q_norm = getattr(attention, "q_norm", None)
        rope = getattr(text, "rope_parameters", None) or {}
        partial = rope.get("partial_rotary_factor", 1.0) if isinstance(rope, dict) else 1.0
        linear = next((m for m in decoder if hasattr(m, "in_proj_qkvz") or hasattr(m, "in_proj_qkv")), None)
        norm = next((m for m in decoder if "RMSNorm" in type(m).__name__), None)
        return cls(hidden=text.hidden_size, intermediate=text.intermediate_size, layers=layers,
                   linear_layers=text.num_hidden_layers - layers, q_width=heads * head_dim,
                   kv_width=(getattr(text, "num_key_value_heads", None) or heads) * head_dim, heads=heads,
                   rotary=2 * int(head_dim * partial),
                   qk_norm=q_norm is not None and not isinstance(q_norm, torch.nn.Identity),
                   gated_attention=attention is not None and attention.q_proj.out_features == 2 * heads * head_dim,
                   zero_centred=norm is not None and "1.0 + self.weight" in inspect.getsource(type(norm).forward),
                   linear_width=sum(m.out_features for m in linear.children() if isinstance(m, torch.nn.Linear)
                                    and m.in_features == text.hidden_size) if linear is not None else 0,
                   vision=_vision(model))


def _vision(model) -> Vision | None:
    """The vision tower's widths (a Qwen-VL or InternVL one), None without one; a vision-language model of another
    family is refused (``UnsupportedModel``), not counted without its tower."""
    config, inner = model.config, model.base_model
    kind = ModelKind.of_config(config, config.name_or_path or "the model")
    if kind is ModelKind.QWEN_VL:
        v, visual = config.vision_config, inner.visual
        block, merger = visual.blocks[0], visual.merger
        width = block.norm1.weight.shape[0]
        windowed = getattr(v, "fullatt_block_indexes", None) is not None  # Qwen2.5-VL
        act = getattr(block.mlp, "act", None) or getattr(block.mlp, "act_fn", None)
        merger_norm = next(m for m in merger.modules() if "Norm" in type(m).__name__)
        return Vision(kind="qwen", width=width, heads=v.num_heads, depth=len(visual.blocks),
                      intermediate=next(m for m in block.mlp.children() if isinstance(m, torch.nn.Linear))
                      .out_features,
                      full_blocks=len(v.fullatt_block_indexes) if windowed else len(visual.blocks),
                      window=v.window_size // v.patch_size // v.spatial_merge_size if windowed else 0,
                      merge=v.spatial_merge_size, patch_inputs=visual.patch_embed.proj.weight[0].numel(),
                      norm="rms" if "RMS" in type(block.norm1).__name__ else "layer",
                      mlp="gated" if hasattr(block.mlp, "gate_proj") else
                      "quick_gelu" if "QuickGELU" in type(act).__name__ else "gelu",
                      merger_norm=merger_norm.weight.shape[0],
                      merger_hidden=next(m for m in merger.modules() if isinstance(m, torch.nn.Linear)).out_features,
                      merger_norm_kind="rms" if "RMS" in type(merger_norm).__name__ else "layer",
                      rotary=2 * (width // v.num_heads),
                      deepstack=len(getattr(visual, "deepstack_merger_list", None) or ()),
                      position_taps=4 if getattr(visual, "pos_embed", None) is not None else 0)
    if kind is ModelKind.INTERNVL:
        v, tower, merge = config.vision_config, inner.vision_tower, round(1 / config.downsample_ratio)
        size, patch = (_pair(v.image_size), _pair(v.patch_size))
        return Vision(kind="internvl", width=v.hidden_size, intermediate=v.intermediate_size,
                      heads=v.num_attention_heads, depth=v.num_hidden_layers, full_blocks=v.num_hidden_layers,
                      window=0, merge=merge, patch_inputs=v.num_channels * patch[0] * patch[1], norm="layer",
                      mlp="gelu", merger_norm=merge**2 * v.hidden_size,
                      merger_hidden=inner.multi_modal_projector.linear_1.out_features,
                      layer_scale=hasattr(tower.encoder.layer[0], "lambda_1"),
                      tile_patches=(size[0] // patch[0]) * (size[1] // patch[1]))
    return None


def _pair(x) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


# ----------------------------------------------------------------------------------------------------
# The bytes, term by term (see the module docstring)
# ----------------------------------------------------------------------------------------------------
def _rms(n: int, e: int, *, liger: bool = False, zero_centred: bool = False) -> int:
    """Bytes an RMSNorm over ``n`` values saves a row: its input in fp32 (in fp32 the input itself, in bf16 a
    copy), 1/rms and the normalised value (in fp32 for a zero-centred norm, whose weight multiplies in fp32);
    Liger's kernel saves its input and 1/rms."""
    if liger:
        return e * n + 4
    return 4 * n + (4 if zero_centred else e) * n + 4


def _layer_norm(n: int, e: int, gpu: bool) -> int:
    """Bytes a LayerNorm over ``n`` values saves a row: its input, its mean and 1/std (fp32 on a GPU; on a CPU in
    the input's dtype)."""
    return e * n + (8 if gpu else 2 * e)


def _attention(lengths: list[int], e: int, q: int, kv: int, heads: int, *, causal: bool, gpu: bool) -> int:
    """Bytes one attention call saves over samples of ``lengths`` rows (queries ``q`` wide, keys and values ``kv``,
    ``heads`` query heads): flash-attention's (``gpu``) q, k, v, output (the next linear layer's input) and fp32
    log-sum-exp; or the CPU's (``attention._padded``): the samples right-padded to the longest, their causal mask
    in the activations' dtype, the padded rows' indices and, apart, the output the next linear layer reads (one call
    per sample where padding would more than quadruple the work: ``attention._reference``)."""
    rows = sum(lengths)
    per_row = e * (2 * q + 2 * kv) + LSE_BYTES * heads
    if gpu:
        return rows * per_row
    samples, longest = len(lengths), max(lengths)
    squares = sum(n * n for n in lengths)
    if samples * longest * longest > 4 * squares + 4096:  # one SDPA call per sample, over views of q, k, v
        return rows * (per_row + e * q) + (squares * e if causal else 0)
    padded = samples * longest
    return padded * (per_row + 2 * ROW_BYTES) + padded * (longest if causal else 1) * e + rows * (ROW_BYTES + e * q)


def _mlp(kind: str, intermediate: int, e: int, *, liger: bool = False) -> int:
    """Bytes an MLP saves a row past its input: SwiGLU's gate, silu(gate), up and their product (Liger's kernel
    recomputes silu(gate)); GELU's input and output; QuickGELU's input, sigmoid and output."""
    return e * intermediate * ({"gated": 3 if liger else 4, "gelu": 2, "quick_gelu": 3}[kind])


@dataclass(frozen=True)
class Parts:
    """An update's saved bytes in the parts checkpointing treats apart: what is saved ``outside`` any checkpointed
    layer (the image mask, rotary tables, the vision tower's patch embedding and merger, the final norm, the head),
    each checkpointed layer's whole set (``layers``), its input (``inputs``: what it keeps when checkpointed) and
    the part of its set that is that input tensor itself (``shared``)."""

    outside: int
    layers: tuple[int, ...]
    inputs: tuple[int, ...]
    shared: tuple[int, ...]

    def peak(self, checkpointing: bool) -> int:
        """Bytes held at the end of the forward; with ``checkpointing``, every layer's input and, while the
        largest layer is recomputed, its set beside them."""
        if not checkpointing:
            return self.outside + sum(self.layers)
        recomputed = max((s - i for s, i in zip(self.layers, self.shared)), default=0)
        return self.outside + sum(self.inputs) + recomputed


def parts(w: Widths, tokens: int, *, dtype_bytes: int, gpu: bool, liger: bool = False, head: str = "policy",
          responses: int | None = None, lengths: list[int] | None = None, grids=(), tiles: int = 0) -> Parts:
    """:class:`Parts` of one update micro-batch of ``tokens`` packed tokens (``lengths``: its samples' lengths,
    default one sample), with ``head`` "policy" (``responses`` rows through the LM head, default all) or "disc"
    (every row pooled), activations of ``dtype_bytes``, the GPU's code (``gpu``: flash-attention, the Triton
    heads and loss; else the CPU's padded attention and eager loss) and Liger's RMSNorm and SwiGLU (``liger``);
    the vision tower over Qwen-VL images of patch ``grids`` ``[(t, h, w), ...]`` (the distinct images the
    micro-batch encodes) or ``tiles`` InternVL tiles."""
    e, H, T = dtype_bytes, w.hidden, tokens
    lengths = lengths or [T]
    responses = T if responses is None else responses
    norm = _rms(H, e, liger=liger, zero_centred=w.zero_centred)
    layer = T * (2 * (norm + e * H) + _mlp("gated", w.intermediate, e, liger=liger))
    attn = layer + _attention(lengths, e, w.q_width, w.kv_width, w.heads, causal=True, gpu=gpu)
    if w.qk_norm:  # an RMSNorm over each head of q and of k
        head_dim = w.q_width // w.heads
        attn += T * _rms(head_dim, e, liger=liger, zero_centred=w.zero_centred) * (w.q_width + w.kv_width) // head_dim
    if w.gated_attention:  # the sigmoid of the gate and the gated output (o_proj's input)
        attn += T * 2 * e * w.q_width
    shared = T * e * H if (e == 4 or liger) else 0  # the input layer norm saves the layer's input itself
    layers = [attn] * w.layers + [layer + T * e * w.linear_width] * w.linear_layers  # (a lower bound: see above)
    inputs = [T * e * H] * len(layers)
    shares = [shared] * len(layers)
    outside = T * w.rotary * e + T * norm
    if head == "policy":  # the gathered rows, targets, log-sum-exp and log-probs; the loss's advantages and mask
        # (the CPU's eager loss: a mask, the ratio, the advantages and mask and two products, 21 bytes)
        outside += responses * (e * H + ROW_BYTES + 2 * 4 + (2 * 4 if gpu else 21))
    else:  # the discriminator's Triton head keeps every row's final hidden state; the CPU's the pooled rows, in fp32
        outside += T * e * H if gpu else len(lengths) * 4 * H
    if (v := w.vision) is not None and (grids or tiles):
        outside += T  # the image tokens' mask (bool)
        vision = _vision_parts(v, e, gpu=gpu, liger=liger, grids=grids, tiles=tiles)
        outside += vision.outside
        layers += vision.layers
        inputs += vision.inputs
        shares += vision.shared
    return Parts(outside, tuple(layers), tuple(inputs), tuple(shares))


def _vision_parts(v: Vision, e: int, *, gpu: bool, liger: bool, grids, tiles: int) -> Parts:
    """:class:`Parts` of the vision tower over ``grids`` (Qwen-VL) or ``tiles`` (InternVL)."""
    d, m2 = v.width, v.merge**2
    norm = _rms(d, e, liger=liger) if v.norm == "rms" else _layer_norm(d, e, gpu)
    if v.kind == "internvl":  # each tile one sequence: its patches and a class token
        patches, full = v.tile_patches * tiles, [v.tile_patches + 1] * tiles
        windowed = full
    else:  # each frame of each image one sequence; Qwen2.5-VL's windows of v.window merged tokens a side
        full = [h * w for t, h, w in grids for _ in range(t)]
        patches = sum(full)
        windowed = [m2 * a * b for t, h, w in grids for _ in range(t)
                    for a in _chunks(h // v.merge, v.window) for b in _chunks(w // v.merge, v.window)] \
            if v.window else full
    rows = sum(full)
    block = rows * (2 * (norm + e * d) + _mlp(v.mlp, v.intermediate, e) + (2 * e * d if v.layer_scale else 0))

    def attention(lengths):
        if v.kind == "internvl":  # plain SDPA over the tiles as a batch: q, k, v and the output, no copies
            return sum(lengths) * (4 * e * d + LSE_BYTES * v.heads)
        return _attention(lengths, e, d, d, v.heads, causal=False, gpu=gpu)

    blocks = [block + attention(full)] * v.full_blocks + [block + attention(windowed)] * (v.depth - v.full_blocks)
    shared = rows * e * d if (e == 4 or v.norm == "layer" or liger) else 0
    merged = patches // m2
    outside = patches * v.patch_inputs * e if e != 4 else 0  # the pixels cast to the tower's dtype
    outside += patches * v.rotary * 4 + (2 * merged * ROW_BYTES if v.window else 0)  # fp32 cos, sin; window order
    merger_rows = patches if v.merger_norm == d else merged
    # (Liger patches the student's vision blocks, not its merger)
    merger_norm = _rms(v.merger_norm, e) if v.merger_norm_kind == "rms" else _layer_norm(v.merger_norm, e, gpu)
    outside += merger_rows * merger_norm + merged * e * (m2 * d + 2 * v.merger_hidden)
    # Qwen3-VL: each DeepStack merger's norm statistics, linear and GELU inputs; the interpolation's taps (an int64
    # index and an fp32 weight each)
    stats = 8 if gpu else 2 * e
    outside += v.deepstack * merged * (stats + e * (m2 * d + 2 * v.merger_hidden)) + patches * v.position_taps * (
        ROW_BYTES + 4)
    return Parts(outside, tuple(blocks), (rows * e * d,) * v.depth, (shared,) * v.depth)


def _chunks(n: int, size: int) -> list[int]:
    """The sizes of the chunks of ``size`` that cover ``n``."""
    return [min(size, n - k) for k in range(0, n, size)]


# ----------------------------------------------------------------------------------------------------
# What preflight prints
# ----------------------------------------------------------------------------------------------------
def activation_bytes(config, tokens: int, *, checkpointing: bool, gpu: bool, disc: bool = True, image_tokens: int = 0,
                     model: torch.nn.Module | None = None) -> int:
    """Peak bytes the autograd graph of one update micro-batch of ``tokens`` packed tokens holds for its backward
    (see the module docstring), for a student of transformers ``config``: the policy update's (every row a response
    row: the most it can be) or, with ``disc``, the discriminator's where that is larger; with activation
    ``checkpointing`` or not; on a GPU (``gpu``: bf16, flash-attention, the Triton heads and loss, Liger's kernels
    where ``ril_fast.models`` applies them) or a CPU (fp32; the attention as over one sample of ``tokens``).
    ``image_tokens``: the image tokens among ``tokens`` whose images the vision tower encodes in the micro-batch
    (m² patches each: Qwen-VL; a tile per ``tile_patches / m²``: InternVL). ``model``: the student already built
    on the meta device (``ril_fast.models.meta_model(config)``), else built here."""
    from ril_fast.models import meta_model

    w = Widths.of_model(meta_model(config) if model is None else model)
    grids, tiles = [], 0
    if image_tokens and (v := w.vision) is not None:  # only the patch count matters to flash-attention
        if v.kind == "internvl":
            tiles = -(-image_tokens // (v.tile_patches // v.merge**2))
        else:
            grids = [(1, v.merge, v.merge * image_tokens)]
    # bf16 on a GPU, fp32 on a CPU (ril_fast.models.compute_dtype)
    kw = dict(dtype_bytes=2 if gpu else 4, gpu=gpu, liger=gpu and liger_applies(config.model_type), grids=grids,
              tiles=tiles)
    heads = ("policy", "disc") if disc else ("policy",)
    return max(parts(w, tokens, head=head, **kw).peak(checkpointing) for head in heads)


def liger_applies(model_type: str) -> bool:
    """Whether ``ril_fast.models`` gives a student of ``model_type`` Liger's kernels on a GPU (Liger patches it)."""
    try:
        import liger_kernel.transformers as liger
    except ImportError:
        return False
    return getattr(liger, f"apply_liger_kernel_to_{model_type}", None) is not None
