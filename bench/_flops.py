"""Analytic model FLOPs of each phase of an RIL step, from the shapes of the samples it processed.

Model FLOPs count the useful work of the model's matmuls: 2 FLOPs per multiply-add, nothing for norms,
activations, softmax or the optimiser, nothing for padding, nothing recomputed (the fused log-probs
backward recomputes the logits; activation checkpointing would recompute the forward). With d the
query width (heads × head_dim) and P_dec the decoder's matmul parameters per layer,

    decoder forward, one sample of L tokens   2·L·P_dec·layers + 2·layers·d·L²     (causal: half of 4·d·L²)
    LM head, per row it is applied to         2·H·V              (training: the R response rows only)
    vision tower, one image of n patches      2·n·(P_embed + depth·P_block) + 2·(n / m²)·P_merger·mergers
                                              + 4·d_v·n² per full-attention block
                                              + 4·d_v·Σ_w n_w² per windowed block (windows of n_w patches)
    decoding token t of a response            2·P_dec·layers + 4·layers·d·(P + t) + 2·H·V

and backward = 2 × forward (weights and activations each cost one forward). The vision tower counts once
per distinct image set: the samples of one prompt share theirs (``ril_fast.packing.image_inputs``), and
micro-batches keep them together wherever they fit. The phases:

    rollout            G prefills of each prompt (the vision tower once per prompt: its G copies share
                       the image features) + one decoding step per generated token after the first
    disc_update        μ × 3 × (vision + decoder) over every sample (the d→1 head is negligible)
    disc_score         1 × (vision + decoder) over every sample
    old_ref_logprobs   per frozen model (π_old when μ > 1, π_ref when β > 0): vision + decoder + LM head
    policy_update      μ × 3 × (vision + decoder + LM head on response rows)

P_dec = H·d + 2·H·d_kv + d·H + 3·H·I (q, k, v, o, gate, up, down); P_block = 4·d_v² + k·d_v·I_v (k = 3 MLP
matrices for Qwen2.5-VL, 2 for Qwen3-VL); P_embed = 3·t_p·p²·d_v (the patch convolution); P_merger =
(m²·d_v)² + m²·d_v·H; mergers = 1 + the DeepStack blocks.

The two vision towers: Qwen2.5-VL's has windowed blocks (all but ``fullatt_block_indexes``), a gated MLP
and one merger; Qwen3-VL's attends over each whole image in every block, has a plain two-matrix MLP, and
one more merger per DeepStack block (``deepstack_visual_indexes``; their outputs are added to the first
decoder layers' image rows). Qwen3's q/k RMSNorms, DeepStack's adds and Qwen3-VL's resampled position
embeddings (a weighted sum of 4 embedding rows per patch) cost no matmul. ``tests/bench/test_flops.py``
checks the forward formulas against torch's FlopCounterMode on small models of both families.

The optimiser is memory-bound: AdamW in fp32 with gradient clipping reads and writes about 32 bytes per
parameter (read p, g, m, v; write p, m, v; read g once more for the norm).
"""

from dataclasses import dataclass

ADAMW_BYTES_PER_PARAM = 32


@dataclass(frozen=True)
class Shapes:
    """The dimensions FLOPs depend on, read from a Qwen2.5-VL or Qwen3-VL config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vis_hidden: int
    vis_intermediate: int
    vis_depth: int
    vis_full_blocks: int
    vis_window: int  # patches per side of a window (0: no windowed blocks)
    vis_patch_in: int  # channels × temporal patch × patch² (one patch's input values)
    merge: int
    vis_mlp_matrices: int = 3  # gated (Qwen2.5-VL) or not (Qwen3-VL)
    vis_mergers: int = 1  # the final merger + one per DeepStack block (Qwen3-VL)

    @classmethod
    def of(cls, config) -> "Shapes":
        """Shapes of a transformers Qwen2.5-VL or Qwen3-VL config (``AutoConfig.from_pretrained(student)``)."""
        t, v = config.text_config, config.vision_config
        heads = t.num_attention_heads
        qwen3 = config.model_type == "qwen3_vl"  # no windows, a two-matrix MLP, DeepStack mergers
        return cls(hidden=t.hidden_size, intermediate=t.intermediate_size, layers=t.num_hidden_layers, heads=heads,
                   kv_heads=t.num_key_value_heads, head_dim=getattr(t, "head_dim", None) or t.hidden_size // heads,
                   vocab=t.vocab_size, vis_hidden=v.hidden_size, vis_intermediate=v.intermediate_size,
                   vis_depth=v.depth, vis_full_blocks=v.depth if qwen3 else len(v.fullatt_block_indexes),
                   vis_window=0 if qwen3 else v.window_size // v.patch_size,
                   vis_patch_in=v.in_channels * v.temporal_patch_size * v.patch_size**2, merge=v.spatial_merge_size,
                   vis_mlp_matrices=2 if qwen3 else 3,
                   vis_mergers=1 + (len(v.deepstack_visual_indexes) if qwen3 else 0))

    # -- pieces ------------------------------------------------------------------------------------
    @property
    def decoder_params(self) -> int:
        """Matmul parameters of all decoder layers."""
        h, d, dkv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.layers * (h * d + 2 * h * dkv + d * h + 3 * h * self.intermediate)

    def decoder(self, length: int) -> float:
        """Forward FLOPs of the decoder over one sample of ``length`` tokens (causal attention)."""
        return 2 * length * self.decoder_params + 2 * self.layers * self.heads * self.head_dim * length**2

    def lm_head(self, rows: int) -> float:
        """Forward FLOPs of the LM head over ``rows`` rows."""
        return 2 * rows * self.hidden * self.vocab

    def vision(self, grids) -> float:
        """Forward FLOPs of the vision tower over images of patch grids ``[(t, h, w), ...]``."""
        d, m2 = self.vis_hidden, self.merge**2
        block = 4 * d * d + self.vis_mlp_matrices * d * self.vis_intermediate
        merger = (m2 * d) ** 2 + m2 * d * self.hidden
        windowed = self.vis_depth - self.vis_full_blocks
        total = 0.0
        for t, h, w in grids:
            n = t * h * w
            total += 2 * n * (self.vis_patch_in * d + self.vis_depth * block)
            total += 2 * (n // m2) * merger * self.vis_mergers
            total += 4 * d * n * n * self.vis_full_blocks
            if windowed:
                total += 4 * d * t * t * _square_sum(h, self.vis_window) * _square_sum(w, self.vis_window) * windowed
        return total

    def decode(self, prompt: int, generated: int) -> float:
        """FLOPs of the decoding steps that follow a prefill of ``prompt`` tokens and produce tokens
        2..``generated`` (the prefill's logits give the first)."""
        steps = max(generated - 1, 0)
        contexts = steps * prompt + steps * (steps + 1) // 2
        return (2 * self.decoder_params + 2 * self.hidden * self.vocab) * steps \
            + 4 * self.layers * self.heads * self.head_dim * contexts


def _square_sum(n: int, window: int) -> int:
    """Σ of the squared sizes of the chunks of ``window`` that cover ``n`` patches."""
    full, rest = divmod(n, window)
    return full * window**2 + rest**2


@dataclass
class Sample:
    """One processed sample's shape: total and prompt tokens, response rows, image patch grids."""

    length: int
    prompt: int
    response: int
    grids: list
    image_set: int | None = None  # samples with the same value share their images' vision features

    @classmethod
    def of(cls, encoded) -> "Sample":
        """From a ``ril_fast.packing.Encoded`` (its pixel tensor names its image set)."""
        grids = [] if encoded.image_grid_thw is None else [tuple(g) for g in encoded.image_grid_thw.tolist()]
        image_set = None if encoded.pixel_values is None else id(encoded.pixel_values)
        return cls(encoded.length, encoded.prompt_len, encoded.response_len, grids, image_set)


def forward_flops(s: Shapes, samples: list[Sample], *, head: bool) -> float:
    """Forward FLOPs over ``samples``: the decoder over each, the LM head on their response rows when
    ``head``, the vision tower once per distinct image set."""
    images = {x.image_set if x.image_set is not None else id(x): x.grids for x in samples if x.grids}
    return sum(s.vision(g) for g in images.values()) + sum(
        s.decoder(x.length) + (s.lm_head(x.response) if head else 0) for x in samples)


def rollout_flops(s: Shapes, prompts: list[Sample], students: list[Sample], group_size: int) -> float:
    """Model FLOPs of sampling ``group_size`` responses to each of ``prompts`` (rendered prompts; their
    ``prompt`` tokens are prefilled ``group_size`` times with the LM head on the last row, their images
    encoded once) that came out as ``students`` (``response`` = tokens generated, in prompt order)."""
    prefill = sum(s.decoder(p.prompt) + s.lm_head(1) for p in prompts)
    return sum(s.vision(p.grids) for p in prompts) + group_size * prefill \
        + sum(s.decode(x.prompt, x.response) for x in students)


def phase_flops(s: Shapes, prompts: list[Sample], students: list[Sample], samples: list[Sample], *,
                group_size: int, mu: int, frozen_models: int, disc: bool) -> dict[str, float]:
    """Model FLOPs per phase of one step (see the module docstring).

    ``prompts``: each question's rendered prompt (once; generate runs it ``group_size`` times);
    ``students``: the sampled student responses (their ``response`` = tokens generated); ``samples``:
    every output the updates run on; ``frozen_models``: 0, 1 or 2 frozen log-prob passes; ``disc``:
    whether the step has a discriminator.
    """
    backbone = forward_flops(s, samples, head=False)
    with_head = forward_flops(s, samples, head=True)
    return {
        "rollout": rollout_flops(s, prompts, students, group_size),
        "disc_update": 3 * mu * backbone if disc else 0.0,
        "judge": 0.0,
        "disc_score": backbone if disc else 0.0,
        "old_ref_logprobs": frozen_models * with_head,
        "policy_update": 3 * mu * with_head,
        "optimizer": 0.0,
    }
