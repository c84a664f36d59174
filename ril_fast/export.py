"""Export models as plain Hugging Face folders that need no ril_fast code.

    python -m ril_fast.export runs/ril/step-40 OUT_DIR                 # the student of a checkpoint
    python -m ril_fast.export runs/ril/step-40 OUT_DIR --disc DISC_DIR # and its discriminator

The trainer writes the final student to ``output_dir/final/`` with :func:`export_hf`: safetensors
weights, ``config.json``, the tokenizer (with its chat template) and the image-processor config, so
``AutoModelForImageTextToText.from_pretrained(final)`` (or ``AutoModelForCausalLM``) loads it and
generates. Its weights are by default in the dtype the trainer's forwards ran in (``export_dtype=auto``):
bf16 on GPUs, where the rollouts and evaluations sampled the bf16 cast of the fp32 master weights, so
``final/`` is that model at half the size; fp32 on CPUs. The command line does the same from a checkpoint
(``ril_fast.checkpoint``), on one CPU process, with the same code (fp32 master weights unless ``--dtype
bfloat16``); ``--disc`` also writes the discriminator in its own folder format (``ril_fast.discriminator``:
a HF base model + ``disc_head.safetensors``).
"""

import argparse
import enum
import json
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ril_fast.checkpoint import SafeLoadPlanner, saved_param_groups, single_process
from ril_fast.distributed import barrier, fsdp_modules, unwrap
from ril_fast.models import compute_dtype

_PREFIX = "module."  # parameter names of a model under the trainer's Sharded root


class ExportDtype(str, enum.Enum):
    """The dtype of an exported student's weights. AUTO: the one its forwards ran in (bf16 on a GPU, under
    FSDP's mixed precision; fp32 on a CPU); FLOAT32: the optimiser's master weights; BFLOAT16: their bf16 cast."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"

    def on(self, device: torch.device) -> torch.dtype:
        """The torch dtype for a run on ``device``."""
        if self is ExportDtype.AUTO:
            return compute_dtype(device)
        return getattr(torch, self.value)


def save_processor(processor, out: str | Path) -> None:
    """Write the tokenizer (with its chat template) and, for a VLM, the image-processor config; a
    ``generation_config.json`` already in ``out`` (the model's) is made to stop where the trainer's rollouts stop,
    at every one of ``processor.stop_token_ids`` (the chat template's end of turn among them: a Qwen base folder
    lists only <|endoftext|>, so final/ under transformers or vLLM ran past the <|im_end|> it was trained to end
    with). Only that key is rewritten, as JSON: transformers' ``save_pretrained`` of a changed GenerationConfig
    validates it strictly, and refuses what many models ship (``do_sample`` false with a ``temperature``)."""
    processor.tokenizer.save_pretrained(out)
    if processor.image_processor is not None:
        processor.image_processor.save_pretrained(out)
    stops = list(getattr(processor, "stop_token_ids", ()))
    path = Path(out) / "generation_config.json"
    if stops and path.is_file():
        config = json.loads(path.read_text())
        config["eos_token_id"] = stops if len(stops) > 1 else stops[0]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_hf_files(model: torch.nn.Module, processor, out: str | Path) -> None:
    """Everything of a HF folder but the weights: the model's config, its generation settings (stop tokens,
    sampling defaults) and the processor files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf = unwrap(model)
    hf.config.save_pretrained(out)
    if getattr(hf, "generation_config", None) is not None:
        hf.generation_config.save_pretrained(out)
    save_processor(processor, out)


def export_hf(model: torch.nn.Module, processor, out: str | Path, *, is_main: bool,
              dtype: torch.dtype | None = None) -> Path:
    """Gather the full state dict (every rank must call this) and write it, with the processor's files,
    to ``out`` on the main rank, its floating-point tensors in ``dtype`` (default: as they are). Returns ``out``."""
    out = Path(out)
    hf = unwrap(model)
    if fsdp_modules(model):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        state = {k.removeprefix(_PREFIX): v for k, v in state.items()}
    else:
        state = {k: v.detach().cpu() for k, v in hf.state_dict().items()}
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if dtype is not None:
            for k, v in state.items():  # in place: one fp32 tensor at a time is freed for its cast
                if v.is_floating_point():
                    state[k] = v.to(dtype)
        _share_tied(hf, state)
        hf.save_pretrained(out, state_dict=state, safe_serialization=True)
        if dtype is not None:
            _declare_dtype(out / "config.json", dtype)
        save_processor(processor, out)
    barrier()
    return out


def _share_tied(hf: torch.nn.Module, state: dict) -> None:
    """Make the keys of one tied parameter (an LM head tied to the input embeddings) hold one tensor, as they do in
    ``hf``: gathered or cast, each key got its own copy, and ``save_pretrained`` drops a tied key only where the
    tensors share memory (else ``final/`` would hold the head twice: 0.6 GB more for a 3B Qwen2.5-VL)."""
    first = {}
    for name, param in hf.named_parameters(remove_duplicate=False):
        if name in state:
            state[name] = state[first.setdefault(id(param), name)]


def _declare_dtype(config_json: Path, dtype: torch.dtype) -> None:
    """Make a saved ``config.json`` (and its sub-configs: a VLM's text and vision configs) name ``dtype``, the
    dtype its weights were written in (``save_pretrained`` writes the model's own), so that loaders that follow
    the config (``from_pretrained(dtype="auto")``, vLLM) load them as they are."""
    config = json.loads(config_json.read_text())
    name = str(dtype).removeprefix("torch.")
    for part in [config, *(v for v in config.values() if isinstance(v, dict) and "dtype" in v)]:
        part["dtype"] = name
    config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------------
# From a checkpoint
# ----------------------------------------------------------------------------------------------------
def _empty(hf_dir: Path, *, lm_head: bool) -> torch.nn.Module:
    """The model class of ``hf_dir/config.json`` with uninitialised CPU weights (built on the meta
    device, so a large model costs one allocation, not an initialisation)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    from ril_fast.processor import ModelKind

    config = AutoConfig.from_pretrained(hf_dir)
    text_only = ModelKind.of(config.model_type) is ModelKind.TEXT
    auto = AutoModel if not lm_head else AutoModelForCausalLM if text_only else AutoModelForImageTextToText
    with torch.device("meta"):
        model = auto.from_config(config)
    return model.to_empty(device="cpu")


def _load_weights(model: torch.nn.Module, checkpoint: Path, entry: str) -> None:
    """Fill ``model``'s parameters and persistent buffers from DCP entry ``entry`` of ``checkpoint``."""
    state = {_PREFIX + k: v for k, v in model.state_dict().items()}
    with single_process(True):
        dcp.load({entry: {"model": state}}, checkpoint_id=checkpoint / "dcp", no_dist=True, planner=SafeLoadPlanner())


class DestinationError(OSError):
    """An export folder that cannot be made: a file of its name is there, a parent is a file, no permission."""


def _make_folder(folder: Path, what: str) -> None:
    """Make ``folder`` (and its parents) to export the ``what`` to, or raise ``DestinationError`` naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = "a file of that name is there" if folder.exists() and not folder.is_dir() else e.strerror or e
        raise DestinationError(f"{folder}: cannot make the folder to export the {what} to: {reason}") from None


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, disc_out: str | Path | None = None,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write the student of ``checkpoint`` (a ``step-N`` folder) as a HF folder ``out``, its weights in ``dtype``
    (default: the fp32 master weights); with ``disc_out``, the discriminator too (fp32). Runs in one process
    without a process group. Returns ``out``."""
    from ril_fast.discriminator import Discriminator
    from ril_fast.processor import Processor

    checkpoint = Path(checkpoint)
    hf_dir = checkpoint / "hf"
    if not (checkpoint / "dcp").is_dir() or not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint}: not a ril_fast checkpoint (expected dcp/ and hf/config.json; "
                                f"checkpoints are the step-N folders of a run's output_dir)")
    out = Path(out)
    _make_folder(out, "student")  # before any model loads: a destination that cannot be made fails now
    if disc_out is not None:
        _make_folder(Path(disc_out), "discriminator")
        if not saved_param_groups(checkpoint, "disc"):
            raise FileNotFoundError(f"{checkpoint}: holds no discriminator (a checkpoint of an RL-only run): leave "
                                    f"out --disc")
    processor = Processor.from_pretrained(hf_dir)
    student = _empty(hf_dir, lm_head=True)
    if (hf_dir / "generation_config.json").is_file():  # else transformers derives one from config.json: stop tokens
        from transformers import GenerationConfig  # and sampling defaults of generation_config.json would be lost

        student.generation_config = GenerationConfig.from_pretrained(hf_dir)
    _load_weights(student, checkpoint, "student")
    if student.config.tie_word_embeddings:  # loaded into the input embeddings; the head shares them
        student.tie_weights()
    student.to(dtype).save_pretrained(out, safe_serialization=True)
    _declare_dtype(out / "config.json", dtype)
    save_processor(processor, out)
    if disc_out is not None:
        pool = yaml.safe_load((checkpoint / "config.yaml").read_text())["disc"]["pool"]
        disc = Discriminator(_empty(hf_dir, lm_head=False), pool=pool)
        _load_weights(disc, checkpoint, "disc")
        disc.save(disc_out, processor)
    return out


def main(argv: list[str] | None = None) -> Path:
    """``python -m ril_fast.export CHECKPOINT OUT_DIR [--disc DISC_DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m ril_fast.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint folder: output_dir/step-N")
    parser.add_argument("out", help="folder to write the student to (HF format, safetensors)")
    parser.add_argument("--disc", metavar="DISC_DIR", help="also write the discriminator to this folder")
    parser.add_argument("--dtype", choices=[ExportDtype.FLOAT32.value, ExportDtype.BFLOAT16.value],
                        default=ExportDtype.FLOAT32.value,
                        help="the student's weights: float32 (the master weights, default) or bfloat16 (what a GPU "
                             "run's forwards ran in, and its final/: half the size)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, disc_out=args.disc, dtype=getattr(torch, args.dtype))
    except (FileNotFoundError, DestinationError) as e:  # the message names the checkpoint or the destination
        raise SystemExit(f"error: {e}") from None
    print(f"student: {out}" + (f"\ndiscriminator: {args.disc}" if args.disc else ""))
    return out


if __name__ == "__main__":
    main()
