"""The pieces of ``ril_fast.export`` that write a folder's files besides the weights, on stand-ins (no model, no
checkpoint): tests/test_train.py and tests/test_checkpoint.py export real students. Each test kills a change found
by mutation testing."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ril_fast.export import _declare_dtype, save_hf_files, save_processor


class _Saves:
    """A stand-in for what ``save_pretrained``s itself: records the folders it was saved to, writes ``name``."""

    def __init__(self, name: str):
        self.name, self.folders = name, []

    def save_pretrained(self, out):
        self.folders.append(str(out))
        (Path(out) / self.name).write_text("{}")


def test_declared_dtype_reaches_every_sub_config(tmp_path):
    """A VLM's config names the dtype at its top and in its text and vision configs: all are rewritten; a
    sub-config without a dtype key is left as it is."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"dtype": "float32", "text_config": {"dtype": "float32", "hidden_size": 8},
                                "vision_config": {"dtype": "float32"}, "rope_scaling": {"type": "mrope"}}))
    _declare_dtype(path, torch.bfloat16)
    config = json.loads(path.read_text())
    assert config["dtype"] == config["text_config"]["dtype"] == config["vision_config"]["dtype"] == "bfloat16"
    assert config["rope_scaling"] == {"type": "mrope"} and config["text_config"]["hidden_size"] == 8


def test_save_processor_writes_the_image_processor_and_every_stop_token(tmp_path):
    """The tokenizer and a VLM's image processor are saved to the folder; a generation_config.json there lists
    every stop token, its other keys kept."""
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "temperature": 0.7}))
    processor = SimpleNamespace(tokenizer=_Saves("tokenizer_config.json"),
                                image_processor=_Saves("preprocessor_config.json"), stop_token_ids=[5, 1])
    save_processor(processor, tmp_path)
    assert processor.tokenizer.folders == processor.image_processor.folders == [str(tmp_path)]
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"eos_token_id": [5, 1],
                                                                             "temperature": 0.7}


def test_save_hf_files_writes_config_generation_config_and_processor(tmp_path):
    """Everything but the weights: the model's config, its generation config and the processor's files."""
    model = SimpleNamespace(config=_Saves("config.json"), generation_config=_Saves("generation_config.json"))
    processor = SimpleNamespace(tokenizer=_Saves("tokenizer_config.json"), image_processor=None, stop_token_ids=[3])
    out = tmp_path / "hf"
    save_hf_files(model, processor, out)
    assert model.config.folders == model.generation_config.folders == processor.tokenizer.folders == [str(out)]
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": 3}


def test_a_folder_with_dcp_but_no_hf_config_is_no_checkpoint(tmp_path):
    """export_checkpoint needs both of a checkpoint's parts: dcp/ alone (hf/ lost, or a folder of another tool)
    is refused before anything loads, naming what it expected."""
    from ril_fast.export import export_checkpoint

    step = tmp_path / "step-3"
    (step / "dcp").mkdir(parents=True)
    (step / "hf").mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a ril_fast checkpoint \(expected dcp/ and hf/config.json"):
        export_checkpoint(step, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_export_casts_floating_point_tensors_only(tmp_path):
    """``export_hf(dtype=bf16)`` casts the weights; an integer buffer the model saves (a persistent index table)
    keeps its dtype and values."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from ril_fast.export import export_hf

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=32, n_positions=16))
    model.register_buffer("index_table", torch.arange(5, dtype=torch.int64) * 1000 + 7)  # 4007 is no bf16 number
    processor = SimpleNamespace(tokenizer=_Saves("tokenizer.json"), stop_token_ids=[0], image_processor=None)
    export_hf(model, processor, tmp_path / "out", is_main=True, dtype=torch.bfloat16)
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert saved["index_table"].dtype == torch.int64 and saved["index_table"].tolist() == [7, 1007, 2007, 3007, 4007]
    assert saved["transformer.wte.weight"].dtype == torch.bfloat16
