"""Hugging Face Llama/Mistral folder -> scaling checkpoint.

The checkpoint is written by the engine itself: the weights are loaded into a one-process
``ParallelModule`` of the mapped architecture and saved with ``save_checkpoint`` at step 0, so the
result is exactly what training writes and loads on any layout. Everything is checked (config fields,
tensor names and shapes) before the model is built, so a bad folder fails in seconds with one message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn

from scaling.core.checkpoint import save_checkpoint
from scaling.core.nn.precision import Precision, PrecisionConfig
from scaling.core.pipeline.module import ParallelModule
from scaling.core.topology import Topology, TopologyConfig
from scaling.transformer.convert.errors import ConversionError
from scaling.transformer.convert.hf_config import architecture_from_hf, dtype_name, resolve_dtype
from scaling.transformer.convert.hf_files import HFWeightReader
from scaling.transformer.convert.hf_weights import hf_tensor_shapes, scaling_layer_from_hf
from scaling.transformer.convert.output import SIDE_FILES, staged_directory
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.model.layers import LanguageModelLoss, transformer_layer_specs

__all__ = ["FINETUNE_CONFIG", "from_huggingface"]

_logger = logging.getLogger(__name__)

FINETUNE_CONFIG = "finetune.yml"
_CHECKPOINT_STEP = 0


def _read_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing: {hf_dir} is not a Hugging Face model folder") from None
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} must hold a JSON object")
    return data


@contextmanager
def _one_process_world() -> Iterator[Topology]:
    """A CPU topology of one rank: reuses a world of one if the caller has one, else makes (and ends) it."""
    created = False
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError(
                f"conversion runs in a single process, but this one is rank {dist.get_rank()} of a "
                f"{dist.get_world_size()}-process world; run it outside the distributed job"
            )
    else:
        store = dist.HashStore()  # type: ignore[attr-defined]
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        created = True
    try:
        yield Topology(TopologyConfig(device="cpu"), device="cpu")
    finally:
        if created:
            dist.destroy_process_group()


def _freeze(layer: nn.Module, index: int) -> nn.Module:
    """No gradients: the engine then allocates no gradient buffers (a full model's worth of memory)."""
    return layer.requires_grad_(False)


def _write_checkpoint(
    reader: HFWeightReader,
    arch: TransformerArchitectureConfig,
    dtype: torch.dtype,
    save_dir: Path,
    files: dict[str, Path],
) -> None:
    precision = PrecisionConfig(precision=Precision(dtype_name(dtype)))
    with _one_process_world() as topology:
        module = ParallelModule(
            transformer_layer_specs(arch, topology),
            topology,
            LanguageModelLoss(topology),
            precision=precision,
            adapt=_freeze,
        )
        by_layer: dict[int, dict[str, nn.Parameter]] = {}
        for name, param in module.named_parameters_canonical():
            _, layer, key = name.split(".", 2)  # "layers.{index}.{key}"
            by_layer.setdefault(int(layer), {})[key] = param
        for index, params in sorted(by_layer.items()):
            tensors = scaling_layer_from_hf(arch, index, reader.read)
            if set(tensors) != set(params):  # the mapping and the model disagree: a bug here, not bad input
                raise AssertionError(f"layer {index}: mapped {sorted(tensors)}, model has {sorted(params)}")
            for key, param in params.items():
                # Replace the storage instead of copying into it: the random initial values are freed now.
                param.data = tensors[key].to(dtype=param.dtype).contiguous()
        config = {"architecture": arch.to_dict(), "precision": precision.to_dict(), "finetuning": None}
        save_checkpoint(save_dir, _CHECKPOINT_STEP, module, config=config, files=files)


def _finetune_config(arch: TransformerArchitectureConfig, dtype: torch.dtype, out_dir: Path, tokenizer: bool) -> str:
    """A ``scaling train`` config that finetunes the converted weights; data paths are placeholders."""
    checkpoint = out_dir / f"global_step{_CHECKPOINT_STEP}"
    sequence_length = min(arch.sequence_length, 4096)
    data: dict[str, Any] = (
        {"finetuning_jsonl": "EDIT_ME/train.jsonl", "tokenizer": str(checkpoint / "tokenizer.json")}
        if tokenizer
        else {"prefixes": ["EDIT_ME/data_prefix"]}
    )
    config = {
        "topology": {"micro_batch_size": 1, "gradient_accumulation_steps": 8},
        "precision": {"precision": dtype_name(dtype)},
        "trainer": {
            "train_iterations": 1000,
            "load_dir": str(out_dir),
            "load": "weights",
            "assert_checkpoint_loaded": True,
            "save_dir": str(out_dir.with_name(f"{out_dir.name}-finetuned")),
            "save_interval": 200,
        },
        "architecture": {**arch.to_dict(), "sequence_length": sequence_length},
        "data": data,
    }
    header = (
        f"# Finetunes the weights converted into {out_dir}.\n"
        f"# Edit the data paths, then run `scaling train {FINETUNE_CONFIG}`. sequence_length is {sequence_length}\n"
        f"# (the model allows {arch.context_length}: max_position_embeddings, kept on export); keep the rest of\n"
        "# the architecture, or the weights will not load. Every option: `scaling config template`.\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)


def from_huggingface(hf_dir: str | Path, out_dir: str | Path, *, dtype: str | torch.dtype | None = None) -> Path:
    """Convert a Hugging Face Llama or Mistral folder into a scaling checkpoint; returns the step directory.

    Args:
        hf_dir: holds ``config.json`` and safetensors weights (``model.safetensors``, or shards with
            ``model.safetensors.index.json``); tokenizer and generation files are copied along.
        out_dir: becomes a checkpoint save directory (``latest`` -> ``global_step0``) plus
            ``finetune.yml``, a training config to edit; must be absent or empty.
        dtype: float32, bfloat16 or float16; default: the dtype the weights are stored in.

    Raises:
        ConversionError: unsupported model, or a missing, unexpected or mis-shaped tensor (named with
            its file); nothing is written then.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    source = hf_dir / "config.json"
    arch = architecture_from_hf(_read_config(hf_dir), source=str(source))
    reader = HFWeightReader(hf_dir)
    ignored = [n for n in reader.names if n.endswith("rotary_emb.inv_freq")]  # a buffer some old exports kept
    if arch.weight_tying:
        ignored.append("lm_head.weight")  # a copy of the embedding when present: Hugging Face ignores it too
    reader.check(hf_tensor_shapes(arch), ignored)
    target = resolve_dtype(dtype) or reader.dtype("model.embed_tokens.weight")
    dtype_name(target)  # fails early on a stored dtype the engine cannot train in (e.g. float64)
    files = {name: hf_dir / name for name in SIDE_FILES if (hf_dir / name).is_file()}
    if "tokenizer.json" not in files:
        _logger.warning("%s has no tokenizer.json: the checkpoint will not carry a tokenizer", hf_dir)
    with staged_directory(out_dir) as staging:
        _write_checkpoint(reader, arch, target, staging, files)
        text = _finetune_config(arch, target, out_dir.resolve(), "tokenizer.json" in files)
        (staging / FINETUNE_CONFIG).write_text(text, encoding="utf-8")
    return out_dir / f"global_step{_CHECKPOINT_STEP}"
