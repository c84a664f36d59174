"""Packed rows through the recurrent layers of hybrid models (Qwen3.5's Gated DeltaNet).

A packed row holds S samples back to back. Attention keeps them apart by their boundaries
(``ril_fast.attention``); a linear-attention layer (a causal convolution, then a recurrence over the
sequence) would carry each sample's state into the next. transformers takes sample boundaries there only
from kernels that may not be installed (flash-linear-attention, causal-conv1d); its PyTorch fallback runs
the packed row as one sequence.

``per_sample(model, path)`` makes every Gated DeltaNet layer of ``model`` run a packed row's samples as
rows of their own: samples of similar lengths right-padded into one batch (``similar_lengths``: padding
at most doubles a batch), one call of the layer per batch, the real rows kept. Right padding cannot reach
a real position (every operation in the layer is causal). Each decoder layer hands its text position ids
(each sample restarts at 0) to its linear-attention layer in the keyword arguments of that call, so
activation checkpointing, which runs a layer's ``forward`` again with the same arguments in the backward,
hands them again. Anything else (generation with its cache, a padded batch with a mask) runs as it is.

A model with other layers that carry state along the sequence (Mamba, short convolutions, RWKV, ...)
would mix a packed row's samples: ``per_sample`` refuses it, found by class name or by its config's
``layer_types`` (more stateful layers declared there than Gated DeltaNet layers handled).
"""

import functools
import re
import types

import torch

from ril_fast import attention
from ril_fast.processor import UnsupportedModel

# Class names of sequence mixers that carry state along the sequence (transformers' names for them).
_STATEFUL = re.compile(r"Mixer|ShortConv|Rwkv|Recurrent|Rglru|DeltaNet|DeltaAttention|Lightning|LSTM|Lstm|Ssm")
# Layer types of such mixers in a config's ``layer_types`` (transformers' names, and older ones).
_STATEFUL_TYPES = {"linear_attention", "conv", "hybrid", "hybrid_sliding", "mamba", "mamba2", "recurrent", "rwkv"}


def per_sample(model, path) -> None:
    """Make the Gated DeltaNet layers of ``model`` (loaded from the folder ``path``) run each sample of a packed
    row on its own (see the module docstring); refuse a model with other stateful sequence mixers."""
    handled, mixers = set(), 0
    for layer in model.modules():
        mixer = getattr(layer, "linear_attn", None)
        if type(mixer).__name__.endswith("GatedDeltaNet"):
            layer.register_forward_pre_hook(_hand_positions, with_kwargs=True)
            mixer.forward = types.MethodType(_per_sample_forward, mixer)  # bound: a deep copy rebinds it
            handled |= set(mixer.modules())
            mixers += 1
    stateful = sorted({type(m).__name__ for m in model.modules()
                       if m not in handled and _STATEFUL.search(type(m).__name__)})
    text = model.config.get_text_config()
    layer_types = getattr(text, "layer_types", None) or getattr(text, "layers_block_type", None) or []
    declared = [t for t in layer_types if t in _STATEFUL_TYPES]
    if not stateful and len(declared) > mixers:  # a mixer under a class name not in _STATEFUL
        stateful = [f"{len(declared) - mixers} {'/'.join(sorted(set(declared)))}"]
    if stateful:
        raise UnsupportedModel(f"{path}: its {', '.join(stateful)} layers carry state along the sequence, which "
                               f"would flow from one packed sample into the next; ril_fast cannot train it")


def _hand_positions(layer, args, kwargs):
    return args, {**kwargs, "packed_positions": kwargs.get("position_ids")}


def _per_sample_forward(module, hidden_states, *args, packed_positions=None, **kwargs):
    """The layer's own forward, per group of similar-length samples for a packed (1, T, H) row."""
    forward = functools.partial(type(module).forward, module)
    cache = kwargs.get("cache", kwargs.get("cache_params"))  # transformers 5.24 renamed cache_params to cache
    if (packed_positions is None or hidden_states.shape[0] != 1 or cache is not None
            or kwargs.get("attention_mask") is not None):
        return forward(hidden_states, *args, **kwargs)
    layout = _layout(packed_positions)
    outputs = []
    for tokens, rows, shape in layout.groups:  # the group's tokens of the row, their rows in (n·L,), (n, L)
        padded = hidden_states.new_zeros(shape[0] * shape[1], hidden_states.shape[-1])
        padded = padded.index_copy(0, rows, hidden_states[0].index_select(0, tokens)).view(*shape, -1)
        outputs.append(forward(padded, *args, **kwargs).flatten(0, 1).index_select(0, rows))
    return torch.cat(outputs).index_select(0, layout.order)[None]


class _Layout:
    """Where a packed row's tokens go: ``groups`` of (token indices, rows in the padded batch, (n, L)), and
    ``order``, the permutation that puts the groups' concatenated outputs back in row order."""

    def __init__(self, cu: torch.Tensor):
        starts = cu.tolist()
        if starts[0] != 0:
            raise ValueError(f"a packed row's text positions must restart at 0 for each sample; the first "
                             f"{starts[0]} tokens belong to none")
        lengths = [b - a for a, b in zip(starts[:-1], starts[1:])]
        self.groups, taken = [], []
        for group in similar_lengths(lengths):
            width = max(lengths[s] for s in group)
            tokens = torch.cat([torch.arange(starts[s], starts[s + 1]) for s in group])
            rows = torch.cat([torch.arange(lengths[s]) + k * width for k, s in enumerate(group)])
            self.groups.append((tokens.to(cu.device), rows.to(cu.device), (len(group), width)))
            taken.append(tokens)
        self.order = torch.argsort(torch.cat(taken)).to(cu.device)


_layout_cache: tuple[torch.Tensor, int, _Layout] | None = None  # the last position-ids tensor's layout


def _layout(positions: torch.Tensor) -> _Layout:
    """The layout of a packed row's samples (one per forward: every layer gets the same position tensor)."""
    global _layout_cache
    cache = _layout_cache
    if cache is None or cache[0] is not positions or cache[1] != positions._version:
        cu, _ = attention._boundaries_from_positions(positions)
        cache = _layout_cache = (positions, positions._version, _Layout(cu))
    return cache[2]


def similar_lengths(lengths: list[int]) -> list[list[int]]:
    """Sample indices grouped so that right-padding each group to its longest sample at most doubles its
    tokens: longest first, a sample joins the current group while (size + 1) · longest ≤ 2 · (tokens with
    it); groups in that order, each longest first. Every index appears once."""
    groups, tokens = [], 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= 2 * (tokens + lengths[i]):
            groups[-1].append(i)
            tokens += lengths[i]
        else:
            groups.append([i])
            tokens = lengths[i]
    return groups
