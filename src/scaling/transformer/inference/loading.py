"""Load a checkpoint written on any training layout into one process, or into tensor-parallel inference ranks.

Checkpoints store full-size tensors per layer (see :mod:`scaling.core.checkpoint`), so inference builds
the model for *its* layout (one process, or ``tp`` ranks with no pipeline) and the ordinary loader slices
the weights. The architecture comes from the checkpoint's manifest; an adapter checkpoint (LoRA, BitFit,
bottleneck adapters, soft prompts, saved with ``weights="trainable"``) loads on top of its base, and LoRA
is merged into the base weights so generation pays nothing for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from scaling.core.checkpoint import CheckpointError, load_checkpoint, verify_file
from scaling.core.checkpoint.layout import model_layer_file
from scaling.core.nn.precision import PrecisionConfig
from scaling.core.pipeline.module import ParallelModule
from scaling.core.topology import Topology, TopologyConfig, init_distributed
from scaling.transformer.data.tokenizer import Tokenizer
from scaling.transformer.finetuning.apply import finetuning_adapter
from scaling.transformer.finetuning.config import FinetuningConfig
from scaling.transformer.finetuning.lora import merge_lora
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.model.layers import LanguageModelLoss, transformer_layer_specs
from scaling.transformer.saved_run import SavedRun

__all__ = ["LoadedModel", "inference_topology", "load_model"]

TOKENIZER_FILE = "tokenizer.json"
_PRECISION_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class LoadedModel:
    """This rank's layers of a trained model, ready for inference (eval mode, no gradients)."""

    module: ParallelModule
    architecture: TransformerArchitectureConfig
    finetuning: FinetuningConfig | None
    tokenizer: Tokenizer | None
    checkpoint: Path


def inference_topology(tensor_parallel: int | None = None, device: str = "auto") -> Topology:
    """A topology of ``tensor_parallel`` ranks (default: every rank of the world) and no pipeline.

    Without a launched world (no ``RANK``/``WORLD_SIZE`` from a launcher) this process becomes a world of one.
    """
    # Before initialisation a launched rank knows the world size from the launcher's environment.
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    tp = tensor_parallel or world
    if world != tp:
        raise ValueError(f"inference runs on tensor-parallel ranks only: {world} processes for tp={tp}")
    config = TopologyConfig.from_dict(
        {"model_parallel_size": tp, "world_size": tp, "micro_batch_size": 1, "global_batch_size": 1,
         "device": device}
    )  # fmt: skip
    if not dist.is_initialized():
        return init_distributed(config)
    return Topology(config, device="cpu" if device == "cpu" else None)  # None: the world's own device choice


def _load_tokenizer(run: SavedRun) -> Tokenizer | None:
    candidates = [run.path / TOKENIZER_FILE]
    data = run.config.get("data")
    if isinstance(data, dict) and data.get("tokenizer"):
        candidates.append(Path(data["tokenizer"]))
    for path in candidates:
        if path.is_file():
            return Tokenizer.from_file(verify_file(path, run.path, run.checksums) if path == candidates[0] else path)
    return None


def load_model(
    checkpoint: str | Path,
    *,
    adapters: str | Path | None = None,
    topology: Topology | None = None,
    dtype: torch.dtype = torch.float32,
    merge: bool = True,
) -> LoadedModel:
    """Build the checkpoint's model for ``topology`` (default: :func:`inference_topology`) and load it.

    ``adapters``: a checkpoint holding only finetuned weights (LoRA, BitFit, adapters, soft prompt),
    loaded on top of ``checkpoint``; its manifest says which finetuning built it. ``merge`` folds LoRA
    into the base weights. Collective over the tensor-parallel ranks.
    """
    if dtype not in _PRECISION_NAMES:
        raise ValueError(f"inference dtype must be one of {sorted(map(str, _PRECISION_NAMES))}, got {dtype}")
    base = SavedRun.read(checkpoint)
    architecture = base.architecture
    overlay = SavedRun.read(adapters) if adapters is not None else None
    finetuning = (overlay or base).finetuning
    if overlay is not None and finetuning is None:
        raise CheckpointError(f"{overlay.path} records no finetuning config: it is not an adapter checkpoint")
    topology = topology or inference_topology()
    if topology.pp_size != 1 or topology.dp_size != 1:
        raise ValueError(
            f"inference needs a tensor-parallel-only topology, got pp={topology.pp_size}, dp={topology.dp_size}"
        )
    module = ParallelModule(
        transformer_layer_specs(architecture, topology),
        topology,
        LanguageModelLoss(topology),
        adapt=finetuning_adapter(finetuning, topology) if finetuning is not None else None,
        # Each layer is cast as it is built, so a bf16 model never exists in fp32 all at once.
        precision=PrecisionConfig.from_dict({"precision": _PRECISION_NAMES[dtype]}),
    )
    # A full checkpoint of a finetuned model holds its adapter weights; a base checkpoint under an adapter
    # checkpoint does not, and the adapter checkpoint then fills them in (and must hold every one).
    load_checkpoint(base.path, module, missing="keep_initialised" if overlay is not None else "error")
    if overlay is not None:
        _load_adapters(overlay.path, module)
    if merge:
        merge_lora(module)
    module.eval()
    module.requires_grad_(False)
    tokenizer = _load_tokenizer(base)
    if tokenizer is None and overlay is not None:
        tokenizer = _load_tokenizer(overlay)
    return LoadedModel(module, architecture, finetuning, tokenizer, base.path)


def _load_adapters(adapter_dir: Path, module: ParallelModule) -> None:
    """Load the adapter checkpoint's tensors, insisting that every trainable parameter is among them."""
    load_checkpoint(adapter_dir, module, missing="keep_initialised")
    stored: set[str] = set()
    for layer in sorted({int(name.split(".")[1]) for name, _ in module.named_parameters_canonical()}):
        path = model_layer_file(adapter_dir, layer)
        if path.is_file():
            with safe_open(str(path), framework="pt") as handle:
                stored |= {f"layers.{layer}.{key}" for key in handle.keys()}  # noqa: SIM118 (not a dict)
    missing = [name for name, p in module.named_parameters_canonical() if p.requires_grad and name not in stored]
    if missing:
        raise CheckpointError(
            f"adapter checkpoint {adapter_dir} lacks trained parameters {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}: was it saved by the same finetuning config?"
        )
