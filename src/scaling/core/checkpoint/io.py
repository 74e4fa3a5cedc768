"""Save and load checkpoints that do not depend on the layout they were written on.

Model weights and the optimizer's per-parameter state (fp32 master, both Adam moments) are stored
full-size, one safetensors file per layer each: tensor-parallel slices are gathered before writing, ZeRO
shards all-gathered, and loading slices them again for the new layout. So a run resumes with weights and
optimizer state on any (tp, pp, dp). A save becomes visible only when complete: every rank writes into
``.global_step{N}.incomplete``, then rank 0 renames it and replaces ``latest``, both atomically.
"""

from __future__ import annotations

import json
import os
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
    model_layer_file,
    optimizer_layer_file,
    rank_state_file,
    step_dir,
    step_of,
)
from scaling.core.logging import get_logger
from scaling.core.nn.param_meta import get_param_meta, shard
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.module import ParallelModule

__all__ = ["CheckpointInfo", "find_checkpoint", "load_checkpoint", "save_checkpoint"]

FORMAT_VERSION = 1

_logger = get_logger("scaling.checkpoint")


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
        os.fsync(handle.fileno())
    latest_tmp.replace(save_dir / LATEST)
    fsync_dir(save_dir)
    if keep_last is not None:
        done = sorted((p for p in save_dir.iterdir() if step_of(p) is not None), key=lambda p: step_of(p) or 0)
        for old in done[:-keep_last]:
            if old != final:
                shutil.rmtree(old)
    return final


def _published_step(save_dir: Path) -> int | None:
    latest = save_dir / LATEST
    if not latest.is_file():
        return None
    return step_of(Path(latest.read_text(encoding="utf-8").strip()))


def _is_unpublished(save_dir: Path, step: int) -> bool:
    """Whether ``global_step{step}`` was renamed into place by a save that crashed before ``latest`` moved.

    Such a directory is newer than the published checkpoint; the resumed run reaches the same step
    again and must be able to save it.
    """
    published = _published_step(save_dir)
    return published is None or step > published


def _set_aside(save_dir: Path, step: int) -> None:
    """Keep an unpublished checkpoint under a hidden name (nothing saved is deleted) so the step can be saved."""
    aside = save_dir / f".global_step{step}.unpublished"
    if aside.exists():
        shutil.rmtree(aside)
    step_dir(save_dir, step).rename(aside)
    fsync_dir(save_dir)
    _logger.warning(
        "%s was never published (a save crashed before '%s' moved); kept as %s",
        step_dir(save_dir, step),
        LATEST,
        aside.name,
    )


def save_checkpoint(
    save_dir: str | Path,
    step: int,
    module: ParallelModule,
    optimizer: Optimizer | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    rank_state: Mapping[str, torch.Tensor] | None = None,
    keep_last: int | None = None,
    weights: Literal["all", "trainable"] = "all",
    files: Mapping[str, str | Path] | None = None,
) -> Path:
    """Write ``global_step{step}`` under ``save_dir``; collective (every rank calls it).

    ``weights="trainable"`` stores only parameters that require grad: a finetuning run (LoRA, BitFit,
    adapters) saves just its adapter weights, to be loaded on top of the base checkpoint. Refuses to
    overwrite an existing ``global_step{step}``: nothing already saved is touched. ``files``: name in
    the checkpoint -> file to copy there (a tokenizer, so the checkpoint generates on its own).
    """
    save_dir = Path(save_dir)
    topo = module.topology
    final, work = step_dir(save_dir, step), incomplete_dir(save_dir, step)
    unpublished = final.exists() and _is_unpublished(save_dir, step)
    if final.exists() and not unpublished:
        raise CheckpointError(f"{final} already exists; refusing to overwrite a saved checkpoint")
    if topo.global_rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if work.exists():  # left by a save that crashed: never published, safe to discard
            shutil.rmtree(work)
        if unpublished and final.exists():
            _set_aside(save_dir, step)
        work.mkdir()
    dist.barrier()

    digests: dict[str, str] = {}
    saved = [p for p in module.parameters() if weights == "all" or p.requires_grad]
    digests |= _save_per_layer(work, module, {id(p): {"": p.detach()} for p in saved}, model_layer_file)
    if optimizer is not None:
        states = optimizer.parameter_states()  # collective over dp when sharded
        steps = optimizer.steps_taken()
        slot_of = {name: slot.key for slot in optimizer.slots for name in slot.names}
        optimizer_tensors = {pid: {f".{k}": v for k, v in state.items()} for pid, state in states.items()}
        steps_of = {name: str(steps[key]) for name, key in slot_of.items()}
        digests |= _save_per_layer(work, module, optimizer_tensors, optimizer_layer_file, extra=steps_of)
    if rank_state:
        state_file = rank_state_file(work, topo.global_rank)
        digests[state_file.relative_to(work).as_posix()] = write_tensors(state_file, dict(rank_state))
    every_rank: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, digests)  # also the barrier: every rank has written its files
    if topo.global_rank == 0:
        manifest = {
            "version": FORMAT_VERSION,
            "step": step,
            "topology": _topology_record(module),
            "weights": weights,
            "optimizer": None
            if optimizer is None
            else {
                "zero": optimizer.sharded,
                "loss_scaler": optimizer.scaler.state_dict() if optimizer.scaler else None,
            },
            "config": dict(config) if config is not None else None,
            "checksums": {name: digest for part in every_rank for name, digest in (part or {}).items()},
        }
        write_json(work / MANIFEST, manifest)
        for name, source in (files or {}).items():
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise CheckpointError(f"checkpoint file name {name!r} must be a plain relative name")
            shutil.copyfile(source, work / name)
        _commit(save_dir, step, keep_last)
    dist.barrier()
    return final


def _save_per_layer(
    work: Path,
    module: ParallelModule,
    tensors_of: dict[int, dict[str, torch.Tensor]],
    file_of: Any,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Write, per layer, the full-size tensors ``tensors_of[id(param)]`` (suffix -> this rank's slice).

    Tensor-parallel slices are all-gathered over the first data-parallel replica's tp group; its tp rank
    0 writes. Tied copies are written once, by their first stage. ``extra``: per canonical parameter name,
    a string stored in the file's metadata (the optimizer's step count). Returns the SHA-256 of each
    file this rank wrote, by its path inside the checkpoint.
    """
    topo = module.topology
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    meta: dict[int, dict[str, str]] = {}
    for name, p in module.named_parameters_canonical():
        if module.is_tied_copy(p) or id(p) not in tensors_of or topo.dp_rank != 0:
            continue
        layer, key = _layer_and_key(name)
        split = get_param_meta(p).tp_split_dim
        for suffix, local in tensors_of[id(p)].items():
            full = local
            if split is not None and topo.tp_size > 1:
                parts = [torch.empty_like(local) for _ in range(topo.tp_size)]
                dist.all_gather(parts, local.contiguous(), group=topo.tp_group)
                full = torch.cat(parts, dim=split)
            by_layer.setdefault(layer, {})[key + suffix] = full
        entry = {"tp_split_dim": split}
        if extra is not None and name in extra:
            entry["step"] = int(extra[name])
        meta.setdefault(layer, {})[key] = json.dumps(entry)
    if topo.dp_rank != 0 or topo.tp_rank != 0:
        return {}
    digests = {}
    for layer, tensors in by_layer.items():
        path = file_of(work, layer)
        digests[path.relative_to(work).as_posix()] = write_tensors(path, tensors, meta[layer])
    return digests


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
    """Load weights and, if asked, the optimizer state onto any (tp, pp, dp) layout.

    ``missing``: what to do with a parameter of the model that the checkpoint lacks (e.g. an adapter
    added for finetuning): fail, or keep its initial value. Collective.
    """
    checkpoint = find_checkpoint(path)
    manifest = read_json(checkpoint / MANIFEST)
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{checkpoint / MANIFEST}: format version {manifest.get('version')} is not supported")
    checksums: dict[str, str] = manifest.get("checksums") or {}  # absent in checkpoints of older versions
    _load_model(checkpoint, module, missing, checksums)
    info = CheckpointInfo(checkpoint, int(manifest["step"]), manifest)
    if optimizer is not None:
        if load_optimizer:
            _load_optimizer(checkpoint, manifest, module, optimizer, checksums)
            info.optimizer_loaded = True
        else:
            for shard_ in optimizer.shards:
                shard_.load_from_params()
    state = rank_state_file(checkpoint, module.topology.global_rank)
    if state.is_file():
        info.rank_state = read_tensors(state, checksums.get(state.relative_to(checkpoint).as_posix()))[0]
    dist.barrier()
    return info


def _read_full(
    checkpoint: Path,
    module: ParallelModule,
    name: str,
    p: torch.Tensor,
    suffix: str,
    file_of: Any,
    cache: dict[Path, tuple[dict[str, torch.Tensor], dict[str, str]]],
    checksums: dict[str, str],
) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """This rank's slice of the stored full tensor ``name + suffix``, and the parameter's metadata."""
    topo = module.topology
    layer, key = _layer_and_key(name)
    path = file_of(checkpoint, layer)
    if path not in cache:
        digest = checksums.get(path.relative_to(checkpoint).as_posix())
        if not path.is_file() and digest is not None:
            raise CheckpointError(f"checkpoint file {path} is missing (the manifest lists it)")
        cache[path] = read_tensors(path, digest) if path.is_file() else ({}, {})
    tensors, metadata = cache[path]
    full = tensors.get(key + suffix)
    if full is None:
        return None, {}
    split = get_param_meta(p).tp_split_dim
    expected = list(p.shape)
    if split is not None:
        expected[split] *= topo.tp_size
    if list(full.shape) != expected:
        raise CheckpointError(
            f"parameter {name!r}: the checkpoint holds shape {list(full.shape)} ({path}), the model expects {expected}"
        )
    local = full if split is None or topo.tp_size == 1 else shard(full, split, topo.tp_rank, topo.tp_size)
    return local, json.loads(metadata.get(key, "{}"))


def _load_model(checkpoint: Path, module: ParallelModule, missing: str, checksums: dict[str, str]) -> None:
    cache: dict[Path, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}
    for name, p in module.named_parameters_canonical():
        local, _ = _read_full(checkpoint, module, name, p, "", model_layer_file, cache, checksums)
        if local is None:
            if missing == "keep_initialised":
                continue
            where = model_layer_file(checkpoint, _layer_and_key(name)[0])
            raise CheckpointError(
                f"parameter {name!r} is not in the checkpoint ({where}); "
                "pass missing='keep_initialised' to keep its initial value"
            )
        with torch.no_grad():
            p.copy_(local.to(dtype=p.dtype, device=p.device))


def _load_optimizer(
    checkpoint: Path, manifest: dict[str, Any], module: ParallelModule, optimizer: Optimizer, checksums: dict[str, str]
) -> None:
    if manifest.get("optimizer") is None:
        raise CheckpointError(f"{checkpoint} has no optimizer state; load with load_optimizer=False")
    cache: dict[Path, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}
    states: dict[int, dict[str, torch.Tensor]] = {}
    steps: dict[str, int] = {}
    slot_of = {name: slot.key for slot in optimizer.slots for name in slot.names}
    for name, p in module.named_parameters_canonical():
        if name not in slot_of:
            continue  # frozen
        entry: dict[str, torch.Tensor] = {}
        for stat in ("master", "exp_avg", "exp_avg_sq"):
            local, meta = _read_full(checkpoint, module, name, p, f".{stat}", optimizer_layer_file, cache, checksums)
            if local is None:
                raise CheckpointError(
                    f"optimizer state of {name!r} ({stat}) is not in {checkpoint}; resume with load_optimizer=False"
                )
            entry[stat] = local
            steps[slot_of[name]] = int(meta.get("step", 0))
        states[id(p)] = entry
    optimizer.load_parameter_states(states, steps)
    scaler_state = manifest["optimizer"].get("loss_scaler")
    if optimizer.scaler is not None and scaler_state is not None:
        optimizer.scaler.load_state_dict(scaler_state)
