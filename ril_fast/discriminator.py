"""The RIL discriminator D_φ: the student's architecture and initial weights, LM head replaced by d -> 1.

    logit_s = pool(hidden[resp_starts[s]:resp_ends[s]]) · weight + bias,   D = sigmoid(logit)

D is the probability that a response was written by the student (label 1 student, 0 teacher). The
rows pooled are the response's own tokens (end-of-turn token included), so "last" pooling reads the
end-of-turn token's state, which has attended to the question, the images and the whole response. A
student response cut at ``max_new_tokens`` has no end-of-turn token (its last sampled token is read),
while teacher responses always end with one: truncation alone is a cue D can learn.
The head's weights are fp32 whatever the backbone's dtype (sharded under FSDP mixed precision, its d-vector is
all-gathered in bf16 like every other sharded weight, so the forward sees it rounded; the 0-d bias, which FSDP
leaves alone, stays fp32; the kernel accumulates in fp32 either way), and start at zero (D = 1/2 for every
input) unless ``init_std`` asks for a random start.

A saved discriminator is its own folder: the backbone as a HF model (config.json + safetensors,
loadable with AutoModel), the tokenizer / image-processor files, and the head in
``disc_head.safetensors`` (weight (H,), bias ()) with the pool mode in ``disc_head.json``.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ril_fast.kernels import disc_head
from ril_fast.kernels.disc_head import Pool
from ril_fast.models import Attn, last_hidden_states, load
from ril_fast.packing import PackedBatch, PaddedBatch

HEAD_WEIGHTS = "disc_head.safetensors"
HEAD_CONFIG = "disc_head.json"


class Discriminator(nn.Module):
    """Backbone (a HF base model, no LM head) + a d -> 1 head scored by ``ril_fast.kernels.disc_head``."""

    def __init__(self, backbone: nn.Module, *, pool: Pool | str = Pool.LAST, init_std: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.pool = Pool(pool)
        hidden = backbone.config.get_text_config().hidden_size
        device = next(backbone.parameters()).device
        self.weight = nn.Parameter(torch.randn(hidden, device=device) * init_std)
        self.bias = nn.Parameter(torch.zeros((), device=device))

    @classmethod
    def from_student(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, attn: Attn | str = Attn.AUTO,
                     device=None, pool: Pool | str = Pool.LAST, init_std: float = 0.0, weights_on_cpu: bool = False,
                     empty: bool = False):
        """A fresh discriminator from the student folder ``path`` -> ``(discriminator, processor)``
        (``weights_on_cpu``, ``empty``: see :func:`ril_fast.models.load`)."""
        backbone, processor = load(path, dtype=dtype, attn=attn, device=device, lm_head=False,
                                   weights_on_cpu=weights_on_cpu, empty=empty)
        return cls(backbone, pool=pool, init_std=init_std), processor

    def forward(self, batch: PackedBatch | PaddedBatch) -> torch.Tensor:
        """Logits (S,) fp32, one per sample of ``batch`` (on the discriminator's device)."""
        hidden = last_hidden_states(self.backbone, batch).flatten(0, 1)
        return disc_head(hidden, self.weight, self.bias, batch.resp_starts, batch.resp_ends, pool=self.pool)

    def save(self, path: str | Path, processor=None) -> Path:
        """Write the discriminator folder (and the processor's tokenizer / image-processor files if given)."""
        path = Path(path)
        self.backbone.save_pretrained(path)
        if processor is not None:
            processor.tokenizer.save_pretrained(path)
            if processor.image_processor is not None:
                processor.image_processor.save_pretrained(path)
        save_file({"weight": self.weight.detach().cpu().contiguous(), "bias": self.bias.detach().cpu()},
                  str(path / HEAD_WEIGHTS))
        (path / HEAD_CONFIG).write_text(json.dumps({"pool": self.pool.value}) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, attn: Attn | str = Attn.AUTO,
             device=None):
        """Load a folder written by :meth:`save` -> ``(discriminator, processor)``."""
        path = Path(path)
        backbone, processor = load(path, dtype=dtype, attn=attn, device=device, lm_head=False)
        pool = json.loads((path / HEAD_CONFIG).read_text())["pool"]
        disc = cls(backbone, pool=pool)
        head = load_file(str(path / HEAD_WEIGHTS))
        with torch.no_grad():
            disc.weight.copy_(head["weight"])
            disc.bias.copy_(head["bias"])
        return disc, processor
