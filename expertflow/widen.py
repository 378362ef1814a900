"""Widen a checkpoint's experts with zeros: the same model, with the cost structure of a bigger one.

Zero gate/up rows and zero down columns contribute exactly nothing (act(0) * 0 = 0), so outputs and
routing are unchanged while each expert's bytes (and so its transfer cost) grow with the new
intermediate size. Used to bench offloading where loading an expert costs far more than computing it.

Shape legend: H hidden, I old intermediate size, J new intermediate size.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
from tqdm import tqdm

from expertflow.adapters import adapter_for
from expertflow.checkpoint import INDEX_FILE, Checkpoint
from expertflow.config import EngineConfig
from expertflow.errors import ExpertflowError
from expertflow.lineage import write_record
from expertflow.loading import read_config
from expertflow.outputs import check_output_dir, write_dir

_COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model", "vocab.json", "merges.txt", "README.md")


def widen_checkpoint(src: Path, dst: Path, intermediate_size: int, overwrite: bool = False) -> Path:
    """Write a copy of `src` whose experts have `intermediate_size` (>= the current one), hub layout, one
    shard per MoE layer. A new directory appears whole or not at all; with `overwrite`, an existing one
    gets the copy's files (each replaced atomically) and keeps its others."""
    check_output_dir(dst, overwrite)
    config = EngineConfig(model=src)
    hf_config = read_config(config)
    adapter = adapter_for(hf_config)
    if adapter.hub_expert_names is None or tuple(p.name for p in adapter.layout.parts) != ("gate_up", "down"):
        raise ExpertflowError(f"widen supports SwiGLU experts (gate/up/down); {hf_config.architectures[0]} has another layout")
    if intermediate_size < adapter.intermediate_size:
        raise ExpertflowError(f"--intermediate-size {intermediate_size} is below the model's {adapter.intermediate_size}; "
                              "widening only adds zeros")
    checkpoint = Checkpoint(config.model)
    available = set(checkpoint.keys())
    layers = sorted({int(k.split(".")[2]) for k in available if adapter.is_expert_tensor(k)})

    def fill(staging: Path) -> None:
        config_dict = json.loads((config.model / "config.json").read_text())
        config_dict[adapter.intermediate_attr] = intermediate_size
        (staging / "config.json").write_text(json.dumps(config_dict, indent=2))
        shapes = _parameter_shapes(staging)
        weight_map = _write_shards(staging, checkpoint, adapter, layers, available, intermediate_size, shapes)
        with open(staging / INDEX_FILE, "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
        for name in _COPIED_FILES:
            if (config.model / name).is_file():
                shutil.copy(config.model / name, staging / name)
        write_record(staging, config.model, intermediate_size, adapter.intermediate_size)

    return write_dir(dst, fill)


def _write_shards(out: Path, checkpoint: Checkpoint, adapter, layers: list[int], available: set[str],
                  width: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    weight_map: dict[str, str] = {}
    resident = {k: checkpoint.read(k) for k in available if not adapter.is_expert_tensor(k)}
    _save(out / "model-resident.safetensors", _fit_resident(resident, adapter, shapes), weight_map)
    for layer in tqdm(layers, desc="widening experts", unit="layer", disable=None):
        tensors = {}
        for expert in range(adapter.num_experts):
            refs = adapter.expert_refs(layer, expert, available)
            flat = torch.empty(adapter.layout.numel, dtype=checkpoint.extent(refs[0]).dtype)
            checkpoint.read_expert_into(refs, flat)
            views = adapter.layout.views(flat)
            gate, up = views["gate_up"].chunk(2, dim=0)  # (I, H) each
            path = refs[0].name.rsplit(".experts.", 1)[0]
            names = [f"{path}.experts.{expert}.{n}.weight" for n in adapter.hub_expert_names]
            tensors[names[0]] = _pad_rows(gate, width)
            tensors[names[1]] = _pad_rows(up, width)
            tensors[names[2]] = _pad_rows(views["down"].t(), width).t().contiguous()  # (H, J)
        _save(out / f"model-experts-{layer:03d}.safetensors", tensors, weight_map)
    return weight_map


def _parameter_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the widened config (meta skeleton: nothing allocated)."""
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return {name: tuple(p.shape) for name, p in skeleton.named_parameters()}


def _fit_resident(resident: dict[str, torch.Tensor], adapter, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Shared experts sized from the routed experts' width (DeepSeek) are zero-padded the same way."""
    fitted = {}
    for key, tensor in resident.items():
        want = shapes.get(adapter.module_key(key))
        if want is None or tuple(tensor.shape) == want:
            fitted[key] = tensor
        elif key.endswith(("gate_proj.weight", "up_proj.weight")):
            fitted[key] = _pad_rows(tensor, want[0])
        elif key.endswith("down_proj.weight"):
            fitted[key] = _pad_rows(tensor.t(), want[1]).t().contiguous()
        else:
            raise ExpertflowError(f"widening changes the shape of {key} in a way zero padding cannot keep exact")
    return fitted


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    padded = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype)
    padded[: t.shape[0]] = t
    return padded


def _save(path: Path, tensors: dict[str, torch.Tensor], weight_map: dict[str, str]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    weight_map.update({k: path.name for k in tensors})
