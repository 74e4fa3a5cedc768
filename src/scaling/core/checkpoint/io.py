"""Save and load checkpoints that do not depend on the layout they were written on.

Model weights are stored full-size, one safetensors file per layer (tensor-parallel shards are gathered
before writing and sliced again on loading), so weights load onto any (tp, pp, dp). Optimizer shards are
stored per rank with their flat ranges, so they reload onto any data-parallel size with the same tp and
pp. A save becomes visible only when complete: every rank writes into ``.global_step{N}.incomplete``,
then rank 0 renames it and replaces ``latest``, both atomically.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from scaling.core.checkpoint.files import (
    CheckpointError,
    fsync_dir,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)
from scaling.core.checkpoint.layout import (
    LATEST,
    MANIFEST,
    incomplete_dir,
    layer_file,
    optimizer_file,
    rank_state_file,
    step_dir,
    step_of,
)
from scaling.core.nn.param_meta import get_param_meta, shard
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.module import ParallelModule

__all__ = ["CheckpointInfo", "find_checkpoint", "load_checkpoint", "save_checkpoint"]

FORMAT_VERSION = 1


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    manifest: dict[str, Any]
    rank_state: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer_loaded: bool = False


def _layer_and_key(name: str) -> tuple[int, str]:
    _, index, key = name.split(".", 2)  # "layers.{index}.{key}"
    return int(index), key


def _topology_record(module: ParallelModule) -> dict[str, int]:
    t = module.topology
    return {"tp": t.tp_size, "pp": t.pp_size, "dp": t.dp_size, "virtual_pipe_stages": module.n_chunks}


def _commit(save_dir: Path, step: int, keep_last: int | None) -> Path:
    """Rank 0 only: publish the finished save and apply retention."""
    final = step_dir(save_dir, step)
    incomplete_dir(save_dir, step).rename(final)
    fsync_dir(save_dir)
    latest_tmp = save_dir / f".{LATEST}.tmp"
    latest_tmp.write_text(final.name, encoding="utf-8")
    with open(latest_tmp, "rb") as handle:
        import os

        os.fsync(handle.fileno())
    latest_tmp.replace(save_dir / LATEST)
    fsync_dir(save_dir)
    if keep_last is not None:
        done = sorted((p for p in save_dir.iterdir() if step_of(p) is not None), key=lambda p: step_of(p) or 0)
        for old in done[:-keep_last]:
            if old != final:
                shutil.rmtree(old)
    return final


def save_checkpoint(
    save_dir: str | Path,
    step: int,
    module: ParallelModule,
    optimizer: Optimizer | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    rank_state: Mapping[str, torch.Tensor] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write ``global_step{step}`` under ``save_dir``; collective (every rank calls it).

    Refuses to overwrite an existing ``global_step{step}``: nothing already saved is touched.
    """
    save_dir = Path(save_dir)
    topo = module.topology
    final, work = step_dir(save_dir, step), incomplete_dir(save_dir, step)
    if final.exists():
        raise CheckpointError(f"{final} already exists; refusing to overwrite a saved checkpoint")
    if topo.global_rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if work.exists():  # left by a save that crashed: never published, safe to discard
            shutil.rmtree(work)
        work.mkdir()
    dist.barrier()

    _save_model(work, module)
    if optimizer is not None and (optimizer.sharded or topo.dp_rank == 0):
        state = optimizer.state_dict()
        tensors = {
            f"slot{i}.{k}": s[k] for i, s in enumerate(state["slots"]) for k in ("master", "exp_avg", "exp_avg_sq")
        }
        slots = [{k: v for k, v in s.items() if not isinstance(v, torch.Tensor)} for s in state["slots"]]
        metadata = {"slots": json.dumps(slots), "loss_scaler": json.dumps(state["loss_scaler"])}
        write_tensors(optimizer_file(work, topo.pp_rank, topo.tp_rank, topo.dp_rank), tensors, metadata)
    if rank_state:
        write_tensors(rank_state_file(work, topo.global_rank), dict(rank_state))
    dist.barrier()
    if topo.global_rank == 0:
        manifest = {
            "version": FORMAT_VERSION,
            "step": step,
            "topology": _topology_record(module),
            "optimizer": None if optimizer is None else {"zero": optimizer.sharded},
            "config": dict(config) if config is not None else None,
        }
        write_json(work / MANIFEST, manifest)
        _commit(save_dir, step, keep_last)
    dist.barrier()
    return final


def _save_model(work: Path, module: ParallelModule) -> None:
    topo = module.topology
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    splits: dict[int, dict[str, str]] = {}
    for name, p in module.named_parameters_canonical():
        if module.is_tied_copy(p):
            continue
        layer, key = _layer_and_key(name)
        split = get_param_meta(p).tp_split_dim
        full = p.detach()
        if split is not None and topo.tp_size > 1:
            if topo.dp_rank != 0:
                continue  # only the first replica writes; its tp group gathers
            parts = [torch.empty_like(full) for _ in range(topo.tp_size)]
            dist.all_gather(parts, full.contiguous(), group=topo.tp_group)
            full = torch.cat(parts, dim=split)
        by_layer.setdefault(layer, {})[key] = full
        splits.setdefault(layer, {})[key] = "none" if split is None else str(split)
    if topo.dp_rank != 0 or topo.tp_rank != 0:
        return
    for layer, tensors in by_layer.items():
        write_tensors(layer_file(work, layer), tensors, {"tp_split_dim": json.dumps(splits[layer])})


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a finished checkpoint, else the one its ``latest`` file names."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    latest = path / LATEST
    if not latest.is_file():
        raise CheckpointError(f"no checkpoint at {path}: neither {MANIFEST} nor a '{LATEST}' file")
    target = path / latest.read_text(encoding="utf-8").strip()
    if not (target / MANIFEST).is_file():
        raise CheckpointError(f"{latest} names {target.name}, which has no {MANIFEST}")
    return target


def load_checkpoint(
    path: str | Path,
    module: ParallelModule,
    optimizer: Optimizer | None = None,
    *,
    load_optimizer: bool = True,
    missing: Literal["error", "keep_initialised"] = "error",
) -> CheckpointInfo:
    """Load weights (onto any layout) and, if asked, the optimizer (same tp and pp, any dp).

    ``missing``: what to do with a parameter of the model that the checkpoint lacks (e.g. an adapter
    added for finetuning): fail, or keep its initial value. Collective.
    """
    checkpoint = find_checkpoint(path)
    manifest = read_json(checkpoint / MANIFEST)
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{checkpoint / MANIFEST}: format version {manifest.get('version')} is not supported")
    _load_model(checkpoint, module, missing)
    info = CheckpointInfo(checkpoint, int(manifest["step"]), manifest)
    if optimizer is not None:
        if load_optimizer:
            _load_optimizer(checkpoint, manifest, module, optimizer)
            info.optimizer_loaded = True
        else:
            for shard_ in optimizer.shards:
                shard_.load_from_params()
    state = rank_state_file(checkpoint, module.topology.global_rank)
    if state.is_file():
        info.rank_state = read_tensors(state)[0]
    dist.barrier()
    return info


def _load_model(checkpoint: Path, module: ParallelModule, missing: str) -> None:
    topo = module.topology
    cache: dict[int, dict[str, torch.Tensor]] = {}
    for name, p in module.named_parameters_canonical():
        layer, key = _layer_and_key(name)
        path = layer_file(checkpoint, layer)
        if layer not in cache:
            cache[layer] = read_tensors(path)[0] if path.is_file() else {}
        full = cache[layer].get(key)
        if full is None:
            if missing == "keep_initialised":
                continue
            raise CheckpointError(
                f"parameter {name!r} is not in the checkpoint ({path}); pass missing='keep_initialised'"
            )
        split = get_param_meta(p).tp_split_dim
        expected = list(p.shape)
        if split is not None:
            expected[split] *= topo.tp_size
        if list(full.shape) != expected:
            raise CheckpointError(
                f"parameter {name!r}: the checkpoint holds shape {list(full.shape)} ({path}), "
                f"the model expects {expected}"
            )
        local = full if split is None or topo.tp_size == 1 else shard(full, split, topo.tp_rank, topo.tp_size)
        with torch.no_grad():
            p.copy_(local.to(dtype=p.dtype, device=p.device))


def _load_optimizer(checkpoint: Path, manifest: dict[str, Any], module: ParallelModule, optimizer: Optimizer) -> None:
    saved = manifest["topology"]
    mine = _topology_record(module)
    if manifest.get("optimizer") is None:
        raise CheckpointError(f"{checkpoint} has no optimizer state; load with load_optimizer=False")
    for axis in ("tp", "pp", "virtual_pipe_stages"):
        if saved[axis] != mine[axis]:
            raise CheckpointError(
                f"optimizer state in {checkpoint} was saved with {axis}={saved[axis]}, this run has "
                f"{axis}={mine[axis]}: optimizer state reshards over data-parallel sizes only; resume with "
                "load_optimizer=False to load the weights onto this layout"
            )
    topo = module.topology
    ranks = range(saved["dp"]) if manifest["optimizer"]["zero"] else range(1)
    shards = []
    for dp in ranks:
        path = optimizer_file(checkpoint, topo.pp_rank, topo.tp_rank, dp)
        tensors, metadata = read_tensors(path)
        try:
            slots = json.loads(metadata["slots"])
            scaler = json.loads(metadata["loss_scaler"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint file {path} has no valid optimizer metadata: {exc}") from None
        for i, slot in enumerate(slots):
            for key in ("master", "exp_avg", "exp_avg_sq"):
                slot[key] = tensors[f"slot{i}.{key}"]
        shards.append({"slots": slots, "loss_scaler": scaler})
    try:
        optimizer.load_state_dict(shards)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"optimizer state in {checkpoint} does not fit this model: {exc}") from None
