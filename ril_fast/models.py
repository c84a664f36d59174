"""Student and reference models from HF folders, and log-probs of packed responses without logits.

Supported: Qwen2.5-VL, Qwen2-VL, Qwen3-VL (dense), Qwen3.5 (dense: hybrid linear and full attention),
InternVL3 and 3.5 in their transformers ("-hf") form, and text-only causal LMs (Qwen2, Llama, ...). The
forward always runs with ``use_cache=False``: with a cache transformers silently skips packed-sequence
detection and lets the samples of a packed row attend to each other.

Log-probs never build the (T, V) logits: the decoder runs to its last hidden states, the rows that
predict response tokens are gathered, and ``ril_fast.kernels.token_logprobs`` applies the LM head
to those rows only (``Kernels.EAGER`` swaps in the full-logits reference, as a baseline for
benchmarks). A head that scales its logits by a config value (Granite, Cohere) has the scale folded into the
temperature; one that does more (a bias, a soft-cap, layers before the output embedding) is refused at load.
The discriminator lives in ``ril_fast.discriminator``.
"""

import contextlib
import enum
import functools
import inspect
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ril_fast import attention, recurrence
from ril_fast.distributed import compute_device
from ril_fast.kernels import TokenLogprobs, token_logprobs
from ril_fast.kernels.logprobs import token_logprobs_reference
from ril_fast.packing import PackedBatch, PaddedBatch, pack
from ril_fast.processor import ModelKind, Processor, UnsupportedModel


class Attn(str, enum.Enum):
    """Attention path. AUTO = VARLEN: ``ril_fast.attention`` (flash-attention varlen over the packed row on
    CUDA; on CPU one SDPA call over the samples laid out as a padded batch). SDPA: transformers builds
    a (T, T) block-diagonal mask from the restarting position ids (quadratic in the packed row's length:
    9x slower in the demo's forward + backward on CPU). EAGER is the plain-matmul reference."""

    AUTO = "auto"
    VARLEN = "varlen"
    SDPA = "sdpa"
    EAGER = "eager"

    def resolve(self) -> str:
        """The transformers ``attn_implementation`` name (registering ``ril_varlen`` when needed)."""
        return attention.register() if self in (Attn.AUTO, Attn.VARLEN) else self.value


class Kernels(str, enum.Enum):
    """Which code computes the response log-probs and the Dr.GRPO loss. AUTO: the fused kernels, Triton on
    CUDA and their vocabulary-chunked torch path elsewhere; TRITON / TORCH force one of those; EAGER: the
    eager references (the full (N, V) logits through log_softmax, the loss written as TRL writes it), the
    baseline the kernels are measured against."""

    AUTO = "auto"
    TRITON = "triton"
    TORCH = "torch"
    EAGER = "eager"

    @property
    def impl(self) -> str:
        """The ``impl=`` argument of the kernel functions (EAGER: "torch", which for the loss is the
        eager reference; the log-probs' reference is a separate function, see :func:`packed_logprobs`)."""
        return "torch" if self is Kernels.EAGER else self.value


def _apply_liger(model, model_type: str) -> None:
    """Liger's RMSNorm / SwiGLU / RoPE kernels where Liger supports the architecture. Its (fused linear)
    cross-entropy stays off: logits never go through the model here.

    Liger is an optional speed-up: a version that does not fit the installed transformers gives a
    warning, not an error. Liger also patches transformers' classes, so later models of the same type in
    the process get its modules too.
    """
    try:
        import liger_kernel.transformers as liger

        _bridge_liger_output_classes()
        patch = getattr(liger, f"apply_liger_kernel_to_{model_type}", None)
        if patch is None:
            return
        params = inspect.signature(patch).parameters
        # Liger's RoPE does not cover Qwen3.5's partial rotary (its patch refuses rope=True).
        flags = dict(rope=model_type != "qwen3_5", rms_norm=True, swiglu=True, cross_entropy=False,
                     fused_linear_cross_entropy=False)
        kwargs = {k: v for k, v in flags.items() if k in params}
        try:
            patch(model=model, **kwargs)
        except TypeError:  # some patches take the whole VLM or its text model, not the base VLM (a discriminator's)
            patch(model=model.language_model, **kwargs)
    except Exception as e:  # noqa: BLE001 - any Liger failure leaves the plain (correct) modules
        warnings.warn(f"Liger kernels not applied to {model_type}: {type(e).__name__}: {e}", stacklevel=2)


def _bridge_liger_output_classes() -> None:
    """Let liger 0.8.5 patch Qwen-VL under transformers 5.23.

    Its Qwen-VL patch functions import the module of its fused-cross-entropy forward, which needs an
    output class Liger defines only when transformers has ``Qwen2_5_VLCausalLMOutputWithPast`` /
    ``Qwen2VLCausalLMOutputWithPast`` / ``Qwen3VLCausalLMOutputWithPast`` (5.23 has none), so the whole
    patch failed, RMSNorm, SwiGLU and RoPE included. That forward is never installed here
    (``fused_linear_cross_entropy=False``), so the missing names get Liger's generic output class.
    """
    from liger_kernel.transformers.model import output_classes

    for arch in ("Qwen2_5_VL", "Qwen2VL", "Qwen3VL"):
        name = f"Liger{arch}CausalLMOutputWithPast"
        if not hasattr(output_classes, name):
            setattr(output_classes, name, output_classes.LigerCausalLMOutputWithPast)


def _vision_varlen(model) -> None:
    """Give a Qwen-VL vision tower loaded with ``ril_varlen`` its "flash" alias, under which it passes its
    windows' boundaries in one call per layer instead of calling once per window (``ril_fast.attention``)."""
    visual = getattr(model.base_model, "visual", None)
    if visual is not None and visual.config._attn_implementation == attention.NAME:
        visual.config._attn_implementation = attention.VISION_NAME


def _patches_as_matmul(model) -> None:
    """Run a Qwen-VL vision tower's patch embedding, a Conv3d whose stride is its kernel (each patch is
    one window), as the matmul it is: ``patches (N, C·T·P·P) @ weightᵀ``. The same parameter (its shape
    and name unchanged, so checkpoints and exports are too) and the same values up to summation order;
    on the CPU 2.6x faster forward + backward (weight gradient) at the demo's 8,192 patches a pass, and
    no 3-D convolution kernel on the GPU."""
    proj = getattr(getattr(getattr(model.base_model, "visual", None), "patch_embed", None), "proj", None)
    if not (isinstance(proj, torch.nn.Conv3d) and proj.stride == proj.kernel_size and proj.groups == 1
            and proj.padding == (0, 0, 0) and proj.dilation == (1, 1, 1)):
        return
    proj.forward = types.MethodType(_patch_matmul, proj)  # bound: a deep copy rebinds it to its own weight


def _patch_matmul(proj: torch.nn.Conv3d, patches: torch.Tensor) -> torch.Tensor:
    """(N, C, T, P, P) patches -> (N, embed): the patch Conv3d's one window per patch, as a matmul."""
    return F.linear(patches.flatten(1), proj.weight.flatten(1), proj.bias)


def _rope_index(model, image_token_id: int):
    """The model's own mrope position function as ``(input_ids (1, L), image_grid_thw (n, 3)) -> (3, 1, L)``.

    Recent transformers (5.23 here) find the image tokens from ``mm_token_type_ids``; older ones from the ids.
    """
    fn = model.base_model.get_rope_index
    takes_types = "mm_token_type_ids" in inspect.signature(fn).parameters

    def rope_index(input_ids: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        kw = {"mm_token_type_ids": (input_ids == image_token_id).int()} if takes_types else {}
        return fn(input_ids, image_grid_thw=image_grid_thw, **kw)[0]

    return rope_index


def model_class(config, *, lm_head: bool = True):
    """The transformers Auto class :func:`load` builds a model of ``config`` with: the base model without the
    LM head (``lm_head=False``), else a causal LM for a text-only model, an image-text-to-text model for a VLM."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    if not lm_head:
        return AutoModel
    return AutoModelForCausalLM if ModelKind.of(config.model_type) is ModelKind.TEXT else AutoModelForImageTextToText


def meta_model(config) -> torch.nn.Module:
    """The student :func:`load` would build from ``config``, on the meta device: its modules and parameter
    shapes without memory or weights (for counting parameters and FLOPs)."""
    with torch.device("meta"):
        return model_class(config).from_config(config)


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Silence transformers' warnings inside the block."""
    from transformers.utils import logging

    before = logging.get_verbosity()
    if enabled:
        logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(before)


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype forwards run in on ``device``: bf16 on CUDA (the trainer's mixed precision, and what flash attention
    takes), fp32 on the CPU. The trainer's frozen reference and its matmul peak, final/'s ``export_dtype=auto``, and
    the models that are only run (the eval tool's, the local teacher, the hf judge) load or measure in it."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load(path: str | Path, *, dtype: torch.dtype = torch.float32, attn: Attn | str = Attn.AUTO,
         device: str | torch.device | None = None, lm_head: bool = True, weights_on_cpu: bool = False,
         empty: bool = False, max_image_pixels: int = 0, logprobs: bool = True):
    """Load a model folder (or a cached hub id) -> ``(model, processor)``.

    ``model``: the HF model on ``device`` (default: CUDA when available) in ``dtype``, in eval mode,
    with the attention path ``attn`` (see :class:`Attn`) and, on CUDA, Liger's kernels. ``lm_head=False``
    loads the base model without the LM head (the discriminator's backbone). ``weights_on_cpu``: the model is set
    up for ``device`` but its weights stay in the CPU's memory, for ``ril_fast.distributed.shard_model(device=)``
    to move one unit at a time (a GPU never holds the whole unsharded model). ``empty``: the model without its
    weights, on the meta device (nothing read but the folder's configs), for a rank that receives them from rank 0
    (``shard_model(from_rank0=True)``). ``processor``: a
    :class:`ril_fast.processor.Processor` (tokenizer, image processor, chat template, image-token
    expansion and, for Qwen-VL, the model's mrope position function; ``max_image_pixels``: see
    ``Processor.from_pretrained``). A model ril_fast cannot pack or take the log-probs of (another VLM family, stateful
    sequence mixers other than Qwen3.5's: ``ril_fast.recurrence``, attention outside transformers' interface,
    soft-capped, with sinks or with another value head dim, an LM head other than a linear map of the last hidden
    state: :func:`_check_attention`) raises ``ril_fast.processor.UnsupportedModel``; ``logprobs=False`` (a model
    that only generates, through its own logits: a local teacher, ``python -m ril_fast.eval``) leaves its head
    unchecked.
    """
    from transformers import AutoConfig

    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    config = AutoConfig.from_pretrained(path)
    ModelKind.of_config(config, path)  # refuses a VLM family this module cannot pack
    auto, attn_implementation = model_class(config, lm_head=lm_head), Attn(attn).resolve()
    try:
        if empty:  # the modules only, on the meta device: from_pretrained would read every weight even for meta
            with torch.device("meta"):
                model = auto.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
            if model.can_generate() and (Path(path) / "generation_config.json").is_file():
                from transformers import GenerationConfig

                model.generation_config = GenerationConfig.from_pretrained(path)
        else:
            with _quiet(not lm_head):  # loading the base model reports the checkpoint's LM head as unexpected
                model = auto.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
            model.to("cpu" if weights_on_cpu else device)
    except KeyError as e:  # Falcon, GPT-J before transformers 5.24: their own table of attention classes, no ril_varlen
        if e.args != (attn_implementation,):
            raise
        raise _own_attention(path, config) from None
    _check_attention(model, path, head=logprobs)
    model.eval()
    _vision_varlen(model)
    _patches_as_matmul(model)
    recurrence.per_sample(model, path)
    if device.type == "cuda":
        _apply_liger(model, config.model_type)
    processor = Processor.from_pretrained(path, max_image_pixels=max_image_pixels)
    if processor.kind is ModelKind.QWEN_VL:
        processor.rope_index = _rope_index(model, config.image_token_id)
    return model, processor


def _own_attention(path, config) -> UnsupportedModel:
    return UnsupportedModel(f"{path}: model type {config.model_type!r} computes its attention itself, not through "
                            f"transformers' attention interface, so the samples of a packed row cannot be kept apart: "
                            f"ril_fast cannot train it")


def _check_attention(model, path, *, head: bool = True) -> None:
    """Refuse a model whose attention or LM head ril_fast's cannot stand for: one that never calls transformers'
    attention interface (Bloom, CodeGen, XGLM: they build their own causal mask, across a packed row's samples; Falcon
    and, before transformers 5.24, GPT-J fail to build with ril_varlen, refused alike), soft-caps its attention logits
    (Gemma 2), builds its own attention mask (Doge's dynamic mask), adds attention sinks to the softmax (GPT-OSS,
    Granite-SWA) or has values of another head dim than its queries and keys (multi-head latent attention:
    DeepSeek-V2/V3, MiniCPM3); and, with ``head``, an LM head
    :func:`packed_logprobs` cannot stand for (:func:`_check_head`). It reads classes, config values and parameter
    names and shapes only, so a model on the meta device (``ril_fast.preflight``) is refused as the loaded one is."""
    # transformers' own test of whether the model's module calls the attention interface (private in 5.23; its public
    # flag, _supports_attention_backend, is False for some that do, such as BioGPT)
    calls_interface = getattr(type(model), "_can_set_attn_implementation", None)
    if not (calls_interface() if calls_interface is not None else model._supports_attention_backend):
        raise _own_attention(path, model.config)
    text = model.config.get_text_config()
    what = f"{path}: model type {model.config.model_type!r}"
    if getattr(text, "attn_logit_softcapping", None) is not None:
        raise UnsupportedModel(f"{what} soft-caps its attention logits "
                               f"(attn_logit_softcapping={text.attn_logit_softcapping}): ril_fast's attention does not")
    if own := sorted({type(m).__name__ for m in model.modules()
                      if callable(getattr(m, "prepare_dynamic_mask", None))}):
        raise UnsupportedModel(f"{what} builds its own attention mask in its {', '.join(own)} layers (across the "
                               f"sequence, not the 2-D padding mask ril_fast's attention keeps samples apart by): "
                               f"ril_fast cannot train it")
    if sinks := sorted({type(m).__name__ for m in model.modules()
                        if isinstance(getattr(m, "sinks", None), torch.nn.Parameter)}):
        raise UnsupportedModel(f"{what} adds attention sinks to the softmax of its {', '.join(sinks)} layers: "
                               f"ril_fast's attention has none, so it cannot train it")
    # (head_dim read only beside a v_head_dim: some configs, Gemma 4's, refuse to give one for every layer)
    v_dim = getattr(text, "v_head_dim", None)
    qk_dim = v_dim and (getattr(text, "qk_head_dim", None) or getattr(text, "head_dim", None))
    if qk_dim and v_dim != qk_dim:
        raise UnsupportedModel(f"{what} has values of {v_dim} dims per head and queries and keys of {qk_dim} "
                               f"(multi-head latent attention): ril_fast's attention takes one head dim for all three")
    if head:
        _check_head(model, what)


# Heads that scale their logits by a config value, by the model type whose causal LM applies it:
# (attribute, True where the logits are divided by it). packed_logprobs folds it into the temperature. (Families
# refused before their head is looked at are left out: Granite-SWA's sinks, MiniCPM3's latent attention; an unknown
# logits_scaling would be refused too.)
_LOGIT_SCALES = {
    **dict.fromkeys(("granite", "granitemoe", "granitemoeshared", "granitemoehybrid"), ("logits_scaling", True)),
    "hyperclovax": ("logits_scaling", False),
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), ("logit_scale", False)),
}


def _check_head(model, what: str) -> None:
    """Refuse a causal LM whose logits are not ``hidden @ Wᵀ`` of its last hidden state and output embedding W (times
    a config scale of ``_LOGIT_SCALES``), the product :func:`packed_logprobs` computes: a head with a bias (Phi-1/2,
    GPT-J from transformers 5.24), a final soft-cap of the logits (Gemma 3's option, Gemma 2), modules between the
    last hidden state and the output embedding (BERT-, RoBERTa-, ModernBERT-style causal LMs' dense + LayerNorm), or
    an unknown logit setting in its config. A model without a head (a discriminator's backbone) passes."""
    head = model.get_output_embeddings()
    if head is None or model is model.base_model:
        return
    if getattr(head, "bias", None) is not None:
        raise UnsupportedModel(f"{what} adds a bias to its logits (its LM head has one): ril_fast's log-probs use the "
                               f"head's weight alone, so it cannot train it")
    text = model.config.get_text_config()
    for cap in ("final_logit_softcapping", "logits_soft_cap"):
        if getattr(text, cap, None) is not None:
            raise UnsupportedModel(f"{what} soft-caps its logits ({cap}={getattr(text, cap)}): ril_fast's log-probs "
                                   f"do not, so it cannot train it")
    if not isinstance(head, torch.nn.Linear):
        raise UnsupportedModel(f"{what} computes its logits with a {type(head).__name__}, not a linear output "
                               f"embedding: ril_fast's log-probs take hidden @ weightᵀ, so it cannot train it")
    ours = {id(p) for p in [*model.base_model.parameters(), *head.parameters()]}
    if extra := [n for n, p in model.named_parameters() if id(p) not in ours]:
        raise UnsupportedModel(f"{what} computes its logits with more than its output embedding of the last hidden "
                               f"state ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}): ril_fast's "
                               f"log-probs apply that embedding alone, so it cannot train it")
    known = {_LOGIT_SCALES.get(model.config.model_type, (None,))[0], "attn_logit_softcapping"}
    for key, value in text.to_dict().items():  # a logit setting of a family ril_fast does not know (None, 1: unset)
        if (("logit" in key or "lm_head" in key) and key not in known and "router" not in key and "to_keep" not in key
                and type(value) in (int, float) and value != 1):
            raise UnsupportedModel(f"{what} sets {key}={value}, a setting of its logits ril_fast does not know how to "
                                   f"apply, so it cannot train it")


def logits_temperature(model, temperature: float) -> float:
    """The temperature the log-prob kernels divide ``hidden @ Wᵀ`` by for sampling temperature τ = ``temperature``:
    τ, or for a head that scales its logits by a config value s (``_LOGIT_SCALES``) τ·s where it divides them by s
    (Granite) and τ/s where it multiplies them (Cohere), so that the kernels give log_softmax(model logits / τ)."""
    if (found := _LOGIT_SCALES.get(model.config.model_type)) is None:
        return temperature
    name, divides = found
    scale = getattr(model.config, name)
    return temperature * scale if divides else temperature / scale


@contextlib.contextmanager
def vision_once(model, vision_grid_thw: torch.Tensor | None, vision_index: torch.Tensor | None):
    """Inside the block, the forward of ``model`` (a Qwen-VL or InternVL VLM, with or without LM head)
    runs its vision tower once per distinct image, for inputs from ``ril_fast.packing.image_inputs``: the
    distinct images' pixels with, for Qwen-VL, every sample's ``image_grid_thw``.

    Qwen-VL: the tower computes ``vision_grid_thw`` (the distinct images), and its merged features (and
    Qwen3-VL's DeepStack features) are copied to every image that repeats one (row ``vision_index[i]`` for
    image i). InternVL: the projected features of the distinct tiles are copied to every sample's tiles
    (row ``vision_index[j]`` for tile j).
    Either way the language side gets exactly what per-sample pixels would give it, and the backward sums
    the copies' gradients into the one computation. A no-op when ``vision_index`` is None (no image repeats).
    """
    if vision_index is None:
        yield
        return
    if vision_grid_thw is None:
        hooks = [model.base_model.multi_modal_projector.register_forward_hook(
            lambda module, args, output: output.index_select(0, vision_index))]  # (tiles, tokens, H)
    else:
        hooks = _qwen_vision_hooks(model.base_model.visual, vision_grid_thw, vision_index)
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _qwen_vision_hooks(visual, vision_grid_thw: torch.Tensor, vision_index: torch.Tensor) -> list:
    """Hooks on a Qwen-VL vision tower: compute ``vision_grid_thw`` only, then copy each distinct image's
    merged features to the images that repeat it (see :func:`vision_once`)."""
    sizes = vision_grid_thw.prod(-1) // visual.spatial_merge_size ** 2  # merged tokens per distinct image
    counts = sizes[vision_index]
    # feature row of every image token of the batch, image after image: its distinct image's rows in order
    shift = (sizes.cumsum(0) - sizes)[vision_index] - (counts.cumsum(0) - counts)
    rows = torch.repeat_interleave(shift, counts) + torch.arange(int(counts.sum()), device=counts.device)

    def distinct_only(module, args, kwargs):
        if "grid_thw" in kwargs:
            return args, {**kwargs, "grid_thw": vision_grid_thw}
        return (args[0], vision_grid_thw, *args[2:]), kwargs

    def copy_out(module, args, kwargs, output):
        output.pooler_output = output.pooler_output.index_select(0, rows)
        if getattr(output, "deepstack_features", None):  # Qwen3-VL: merged features of earlier blocks too
            output.deepstack_features = [f.index_select(0, rows) for f in output.deepstack_features]
        return output

    return [visual.register_forward_pre_hook(distinct_only, with_kwargs=True),
            visual.register_forward_hook(copy_out, with_kwargs=True)]


def enable_activation_checkpointing(model) -> None:
    """Let every layer of ``model`` (a HF model: decoder layers and vision blocks) keep only its input for
    the backward and recompute the rest there: transformers' activation checkpointing, non-reentrant, so
    FSDP2's hooks stay outside the recomputation. It acts inside :func:`recomputing` only."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


@contextlib.contextmanager
def recomputing(model):
    """Inside the block, the layers of ``model`` with activation checkpointing enabled
    (:func:`enable_activation_checkpointing`) recompute their activations in the backward: activation
    memory of one layer instead of all, for one more forward of compute. transformers checkpoints a layer
    only in training mode, so those layers alone enter it for the block (their attention and dropout
    modules stay in eval mode: no dropout). Outside it nothing changes: no-grad passes, and generation,
    whose KV cache transformers turns off in checkpointed layers. A no-op when none is enabled."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    modes = [m.training for m in layers]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m, mode in zip(layers, modes):
            m.training = mode


def last_hidden_states(model, batch: PackedBatch | PaddedBatch) -> torch.Tensor:
    """Final hidden states (after the last norm), without the LM head: (1, T, H) packed, (B, L, H) padded.

    ``model`` is a model with an LM head or a base model (the discriminator's backbone); the batch must
    be on the model's device. Images that samples share are encoded once (:func:`vision_once`).
    """
    packed = attention.packed_forward() if isinstance(batch, PackedBatch) else contextlib.nullcontext()
    with vision_once(model, batch.vision_grid_thw, batch.vision_index), packed:
        return model.base_model(**batch.model_inputs()).last_hidden_state


def lm_head_weight(model) -> torch.Tensor:
    """The LM head weight (V, H) (tied to the input embeddings on some models)."""
    return model.get_output_embeddings().weight


def packed_logprobs(model, batch: PackedBatch | PaddedBatch, *, temperature: float = 1.0,
                    ref_logprobs: torch.Tensor | None = None, return_entropy: bool = False,
                    kernels: Kernels | str = Kernels.AUTO) -> TokenLogprobs:
    """Log-probs of every response token of ``batch`` under softmax(the model's logits / ``temperature``), flat in batch
    order: ``(R,)`` fp32 (fp64 for an fp64 model) with R = Σ response_lengths (split with ``batch.response_lengths``).
    ``ref_logprobs (R,)`` adds the k3 KL; ``return_entropy`` the entropy. Only the R response rows go through the LM
    head, by the fused ``token_logprobs`` or, with ``kernels="eager"``, its full-logits reference (see
    :class:`Kernels`); a head that scales its logits has the scale folded into the temperature
    (:func:`logits_temperature`). Every log-prob the trainer takes (policy loss, π_old, π_ref) goes through here."""
    hidden = last_hidden_states(model, batch).flatten(0, 1)
    rows = batch.response_rows
    kernels = Kernels(kernels)
    fn = token_logprobs_reference if kernels is Kernels.EAGER else functools.partial(token_logprobs, impl=kernels.impl)
    out = fn(hidden.index_select(0, rows), lm_head_weight(model), batch.targets[rows],
             temperature=logits_temperature(model, temperature), ref_logprobs=ref_logprobs,
             return_entropy=return_entropy)
    if kernels is Kernels.EAGER:  # the reference returns views, which FSDP warns about as a root's output
        out = TokenLogprobs(*(t.clone() if t is not None else None for t in out))
    return out


def response_logprobs(model, processor: Processor, samples: list[dict], *, packed: bool = True,
                      temperature: float = 1.0) -> list[torch.Tensor]:
    """Log-probs of each sample's response tokens (end-of-turn token included), one ``(R_s,)`` fp32 (fp64) tensor
    per sample. ``packed=True``: all samples in one packed forward; ``False``: one forward per sample.
    Samples are dicts ``{"images": [...], "question": str, "response": str}`` (see ril_fast.packing)."""
    device = compute_device(model)
    encoded = [processor.encode(s) for s in samples]
    groups = [encoded] if packed else [[e] for e in encoded]
    out = []
    for group in groups:
        batch = pack(group).to(device)
        lp = packed_logprobs(model, batch, temperature=temperature).logprobs
        out.extend(lp.split(batch.response_lengths))
    return out
