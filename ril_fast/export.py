"""Export a (possibly FSDP-sharded) model as a plain Hugging Face folder that needs no ril_fast code.

The trainer writes the final student to ``output_dir/final/`` with :func:`export_hf`: safetensors
weights, ``config.json``, the tokenizer (with its chat template) and the image-processor config, so
``AutoModelForImageTextToText.from_pretrained(final)`` (or ``AutoModelForCausalLM``) loads it and
generates.
"""

from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ril_fast.distributed import barrier, fsdp_modules, unwrap


def export_hf(model: torch.nn.Module, processor, out: str | Path, *, is_main: bool) -> Path:
    """Gather the full state dict (every rank must call this) and write it, with the processor's files,
    to ``out`` on the main rank. Returns ``out``."""
    out = Path(out)
    hf = unwrap(model)
    if fsdp_modules(model):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        state = {k.removeprefix("module."): v for k, v in state.items()}
    else:
        state = {k: v.detach().cpu() for k, v in hf.state_dict().items()}
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(out, state_dict=state, safe_serialization=True)
        processor.tokenizer.save_pretrained(out)
        if processor.image_processor is not None:
            processor.image_processor.save_pretrained(out)
    barrier()
    return out
