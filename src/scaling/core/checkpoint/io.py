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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist

from scaling.core.checkpoint.discovery import find_checkpoint, verify_checkpoint
from scaling.core.checkpoint.files import (
    CheckpointError,
    file_digest,
    fsync_dir,
    read_tensors,
    write_json,
)
from scaling.core.checkpoint.layout import (
    LATEST,
    MANIFEST,
    incomplete_dir,
    leftover_of,
    model_layer_file,
    optimizer_layer_file,
    rank_state_file,
    step_dir,
    step_of,
)
from scaling.core.checkpoint.writes import SaveWrites, first_error
from scaling.core.logging import get_logger
from scaling.core.nn.param_meta import shard
from scaling.core.optimizer.loss_scaler import DynamicLossScaler
from scaling.core.pipeline.module import ParallelModule
from scaling.core.zero.tensors import assign_full, gathered

__all__ = ["CheckpointInfo", "find_checkpoint", "load_checkpoint", "save_checkpoint"]

FORMAT_VERSION = 1

_logger = get_logger("scaling.checkpoint")


class _Slot(Protocol):
    @property
    def key(self) -> str: ...

    @property
    def names(self) -> Sequence[str]: ...


class CheckpointOptimizer(Protocol):
    """What a checkpoint needs of an optimizer: its state per parameter name, full over data-parallel ranks.
    The engine's ``Optimizer`` is one; a plain loop adapts its ``torch.optim.AdamW`` to it."""

    @property
    def slots(self) -> Sequence[_Slot]: ...

    @property
    def sharded(self) -> bool: ...

    @property
    def zero_stage(self) -> int: ...

    @property
    def scaler(self) -> DynamicLossScaler | None: ...

    def steps_taken(self) -> dict[str, int]: ...

    def set_steps_taken(self, steps: dict[str, int]) -> None: ...

    def parameter_state(self, name: str) -> dict[str, torch.Tensor]: ...

    def load_parameter_state(self, name: str, state: dict[str, torch.Tensor]) -> None: ...

    def reload_masters_from_params(self) -> None: ...


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    manifest: dict[str, Any]
    rank_state: dict[str, torch.Tensor] = field(default_factory=dict)  # see :func:`saved_rank_for`
    optimizer_loaded: bool = False

    @property
    def run_state(self) -> dict[str, Any]:
        """What the run saved once for all ranks (the data position); empty for older checkpoints."""
        return dict(self.manifest.get("run_state") or {})


def _layer_and_key(name: str) -> tuple[int, str]:
    _, index, key = name.split(".", 2)  # "layers.{index}.{key}"
    return int(index), key


def _topology_record(module: ParallelModule) -> dict[str, int]:
    t = module.topology
    return {"tp": t.tp_size, "pp": t.pp_size, "dp": t.dp_size, "virtual_pipe_stages": module.n_chunks}


def _remove_leftovers(save_dir: Path, published: int) -> None:
    """Delete what crashed saves left at or before the ``published`` step; anything newer stays."""
    for entry in save_dir.iterdir():
        leftover = leftover_of(entry)
        if leftover is None:
            continue
        step, kind = leftover
        if step < published or (kind == "unpublished" and step == published):
            shutil.rmtree(entry, ignore_errors=True)
            _logger.info("removed %s, left by a crashed save (step %d is published)", entry, published)


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
    _remove_leftovers(save_dir, step)
    if keep_last is not None:  # never a checkpoint newer than the one just published
        steps = {p: s for p in save_dir.iterdir() if (s := step_of(p)) is not None and s <= step}
        for old in sorted(steps, key=steps.__getitem__)[:-keep_last]:
            shutil.rmtree(old)
    return final


def _published_step(save_dir: Path) -> int | None:
    """The step a resumed run would start from (``latest``, or the fallback when it is broken)."""
    try:
        return step_of(find_checkpoint(save_dir))
    except CheckpointError:
        return None


def _is_unpublished(save_dir: Path, step: int) -> bool:
    """Whether ``global_step{step}`` was renamed into place by a save that crashed before ``latest`` moved.

    Such a directory is newer than the published checkpoint; the resumed run reaches the same step
    again and must be able to save it.
    """
    published = _published_step(save_dir)
    return published is None or step > published


def _set_aside(save_dir: Path, step: int) -> None:
    """Keep an unpublished checkpoint under a hidden name so the step can be saved; the save's commit removes it."""
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
    optimizer: CheckpointOptimizer | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    rank_state: Mapping[str, torch.Tensor] | None = None,
    run_state: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
    weights: Literal["all", "trainable"] = "all",
    files: Mapping[str, str | Path] | None = None,
) -> Path:
    """Write ``global_step{step}`` under ``save_dir``; collective (every rank calls it).

    ``weights="trainable"`` stores only parameters that require grad: a finetuning run (LoRA, BitFit,
    adapters) saves just its adapter weights, to be loaded on top of the base checkpoint. Refuses to
    overwrite an existing ``global_step{step}``: nothing already saved is touched. ``files``: name in
    the checkpoint -> file to copy there (a tokenizer, so the checkpoint generates on its own); each is
    checksummed like the tensors. ``run_state``: JSON facts of the whole run (the data position),
    stored once in the manifest, unlike ``rank_state`` which each rank writes for itself.

    A failure on any rank (a write error such as a full disk, or a non-finite weight or optimizer
    state) raises ``CheckpointError`` naming the file or parameter on every rank, and removes the
    ``.incomplete`` directory: earlier checkpoints are untouched and nothing is published.
    """
    writes = begin_save(save_dir, step, module, files)
    write_state(writes, module, optimizer, weights=weights, rank_state=rank_state)
    manifest = manifest_of(step, module, optimizer, weights=weights, config=config, run_state=run_state)
    return publish(writes, Path(save_dir), manifest, files=files, keep_last=keep_last, rank=module.topology.global_rank)


class TensorSink(Protocol):
    """Where a save sends each file's tensors: written at once (``SaveWrites``), or kept as host copies to be
    written later by a background writer (:mod:`scaling.core.checkpoint.async_save`)."""

    @property
    def work(self) -> Path: ...

    def tensors(
        self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], label: Callable[[str], str]
    ) -> None: ...


def begin_save(
    save_dir: str | Path, step: int, module: ParallelModule, files: Mapping[str, str | Path] | None
) -> SaveWrites:
    """The checks before a save and rank 0's empty ``.incomplete`` directory; collective (the outcome is
    agreed over the default group). Raises ``CheckpointError`` on every rank when the save cannot start."""
    save_dir = Path(save_dir)
    for name in files or {}:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"checkpoint file name {name!r} must be a plain relative name")
    final, work = step_dir(save_dir, step), incomplete_dir(save_dir, step)
    unpublished = final.exists() and _is_unpublished(save_dir, step)
    if final.exists() and not unpublished:
        raise CheckpointError(f"{final} already exists; refusing to overwrite a saved checkpoint")
    writes = SaveWrites(work, step)
    if module.topology.global_rank == 0:
        writes.guard(work, _prepare, save_dir, step, unpublished)
    if (error := first_error(writes.error)) is not None:
        raise CheckpointError(error)
    return writes


def write_state(
    sink: TensorSink,
    module: ParallelModule,
    optimizer: CheckpointOptimizer | None,
    *,
    weights: Literal["all", "trainable"],
    rank_state: Mapping[str, torch.Tensor] | None,
) -> None:
    """Send this rank's files (per-layer weights and optimizer state, its rank state) to ``sink``.

    Collective: tensor-parallel slices and ZeRO shards are gathered here, so an asynchronous save runs this
    in the training step and leaves only local work (files, checksums) to its writer.
    """

    def weights_of(name: str, p: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if weights != "all" and not p.requires_grad:
            return None
        # Sharded stages hold fp32 masters as parameters; the model file stores the compute dtype on
        # every stage, so a checkpoint's weights do not depend on the ZeRO stage that saved them.
        return {"": gathered(p.detach()).to(module.dtype)}

    _save_per_layer(sink, module, weights_of, model_layer_file)
    if optimizer is not None:
        steps = optimizer.steps_taken()
        slot_of = {name: slot.key for slot in optimizer.slots for name in slot.names}
        steps_of = {name: str(steps[key]) for name, key in slot_of.items()}

        def optimizer_state_of(name: str, p: torch.Tensor) -> dict[str, torch.Tensor] | None:
            if name not in slot_of:
                return None
            return {f".{k}": v for k, v in optimizer.parameter_state(name).items()}  # gathered over dp

        _save_per_layer(sink, module, optimizer_state_of, optimizer_layer_file, extra=steps_of)
    if rank_state:
        state_file = rank_state_file(sink.work, module.topology.global_rank)
        sink.tensors(state_file, dict(rank_state), {}, lambda key: f"rank state {key!r}")


def manifest_of(
    step: int,
    module: ParallelModule,
    optimizer: CheckpointOptimizer | None,
    *,
    weights: Literal["all", "trainable"],
    config: Mapping[str, Any] | None,
    run_state: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The manifest of a save, without its checksums; taken when the tensors are (the loss scaler moves on)."""
    return {
        "version": FORMAT_VERSION,
        "step": step,
        "topology": _topology_record(module),
        "weights": weights,
        "optimizer": None
        if optimizer is None
        else {
            "zero": optimizer.sharded,
            "zero_stage": optimizer.zero_stage,
            "loss_scaler": optimizer.scaler.state_dict() if optimizer.scaler else None,
        },
        "config": dict(config) if config is not None else None,
        "run_state": dict(run_state) if run_state is not None else None,
    }


def publish(
    writes: SaveWrites,
    save_dir: Path,
    manifest: dict[str, Any],
    *,
    files: Mapping[str, str | Path | bytes] | None,
    keep_last: int | None,
    rank: int,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """After this rank's files are written: agree that every rank finished, then rank 0 writes the manifest
    and publishes (rename, ``latest``, retention). Collective over ``group`` (the default one unless a
    background writer brings its own), which must hold every rank; ``rank`` is the global rank. ``files``:
    name -> file to copy, or its bytes (read when a background save started: the caller may delete it).
    """
    step = writes.step
    work = writes.work
    every_rank: list[tuple[dict[str, str], str | None] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every_rank, (writes.digests, writes.error), group=group)  # also the barrier
    error = next((part[1] for part in every_rank if part is not None and part[1] is not None), None)
    if error is None and rank == 0:
        checksums = {name: digest for part in every_rank if part is not None for name, digest in part[0].items()}
        for name, source in (files or {}).items():
            writes.guard(work / name, _place, source, work / name)
            if writes.error is None:
                checksums[name] = file_digest(work / name)
        full = {**manifest, "checksums": checksums}
        writes.guard(work / MANIFEST, write_json, work / MANIFEST, full)
        if writes.error is None:
            writes.guard(save_dir / LATEST, _commit, save_dir, step, keep_last)
        error = writes.error
    if rank == 0 and error is not None:
        shutil.rmtree(work, ignore_errors=True)  # never published: nothing saved before is touched
    if (error := first_error(error, group)) is not None:
        raise CheckpointError(error)
    return step_dir(save_dir, step)


def _place(source: str | Path | bytes, target: Path) -> None:
    if isinstance(source, bytes):
        target.write_bytes(source)
    else:
        shutil.copyfile(source, target)


def _prepare(save_dir: Path, step: int, unpublished: bool) -> None:
    """Rank 0: an empty ``.incomplete`` directory for the save, with what a crashed save left cleared."""
    save_dir.mkdir(parents=True, exist_ok=True)
    work = incomplete_dir(save_dir, step)
    if work.exists():  # left by a save that crashed: never published, safe to discard
        shutil.rmtree(work)
    if unpublished and step_dir(save_dir, step).exists():
        _set_aside(save_dir, step)
    work.mkdir()


def _save_per_layer(
    writes: TensorSink,
    module: ParallelModule,
    tensors_for: Any,
    file_of: Any,
    extra: dict[str, str] | None = None,
) -> None:
    """Write, per layer, the full-size tensors ``tensors_for(name, param)`` (suffix -> this rank's slice,
    full over data-parallel ranks; None to skip the parameter).

    ``tensors_for`` runs on every rank, parameter by parameter in the same order (gathering a sharded
    parameter is collective over dp), and each layer is written before the next one is gathered: no rank
    holds more than one layer beyond its shards. Tensor-parallel slices are all-gathered over the first
    data-parallel replica's tp group; its tp rank 0 writes. Tied copies are written once, by their first
    stage. ``extra``: per canonical parameter name, a string stored in the file's metadata (the optimizer's
    step count). ``writes`` records the SHA-256 of each file this rank wrote, by its path inside the
    checkpoint.
    """
    topo = module.topology
    by_layer: dict[int, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, p in module.named_parameters_canonical():
        if not module.is_tied_copy(name):
            by_layer.setdefault(_layer_and_key(name)[0], []).append((name, p))
    for layer, named in sorted(by_layer.items()):
        gathered_layer: dict[str, torch.Tensor] = {}
        meta: dict[str, str] = {}
        for name, p in named:
            pieces = tensors_for(name, p)
            if pieces is None or topo.dp_rank != 0:
                continue
            _, key = _layer_and_key(name)
            split = module.param_table[name].tp_split_dim
            for suffix, local in pieces.items():
                full = local
                if split is not None and topo.tp_size > 1:
                    parts = [torch.empty_like(local) for _ in range(topo.tp_size)]
                    dist.all_gather(parts, local.contiguous(), group=topo.tp_group)
                    full = torch.cat(parts, dim=split)
                gathered_layer[key + suffix] = full
            entry = {"tp_split_dim": split}
            if extra is not None and name in extra:
                entry["step"] = int(extra[name])
            meta[key] = json.dumps(entry)
        if gathered_layer and topo.dp_rank == 0 and topo.tp_rank == 0:
            writes.tensors(file_of(writes.work, layer), gathered_layer, meta, partial(_describe, layer))


def _describe(layer: int, key: str) -> str:
    """What the stored tensor ``key`` of ``layer`` is, for errors: a weight or a parameter's optimizer state."""
    for stat in (".master", ".exp_avg_sq", ".exp_avg"):
        if key.endswith(stat):
            return f"optimizer state {stat[1:]} of parameter 'layers.{layer}.{key[: -len(stat)]}'"
    return f"parameter 'layers.{layer}.{key}'"


def load_checkpoint(
    path: str | Path,
    module: ParallelModule,
    optimizer: CheckpointOptimizer | None = None,
    *,
    load_optimizer: bool = True,
    missing: Literal["error", "keep_initialised"] = "error",
) -> CheckpointInfo:
    """Load weights and, if asked, the optimizer state onto any (tp, pp, dp) layout.

    ``missing``: what to do with a parameter of the model that the checkpoint lacks (e.g. an adapter
    added for finetuning): fail, or keep its initial value. Collective.
    """
    checkpoint = find_checkpoint(path)
    manifest = verify_checkpoint(checkpoint)  # every file it lists is present, before anything loads
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
            optimizer.reload_masters_from_params()
    topo = module.topology
    source = saved_rank_for(manifest.get("topology") or {}, topo.pp_rank, topo.tp_rank, _topology_record(module))
    if source is None and (manifest.get("topology") or {}) == _topology_record(module):
        source = topo.global_rank
    state = rank_state_file(checkpoint, source) if source is not None else None
    if state is not None and state.is_file():
        info.rank_state = read_tensors(state, checksums.get(state.relative_to(checkpoint).as_posix()))[0]
    dist.barrier()
    return info


def saved_rank_for(saved: Mapping[str, int], pp: int, tp: int, current: Mapping[str, int]) -> int | None:
    """The rank of the saved run whose rank state (RNG streams) this rank at (``pp``, ``tp``) continues.

    On the same layout: the rank itself (returned by the caller). When only the number of data-parallel
    ranks changed, the saved rank at the same (pp, tp) of data-parallel replica 0: data-parallel replicas
    share their random streams, so every replica, old or new, continues exactly. When tp, pp or the
    virtual stages changed no saved stream belongs to this rank: None, and the rank keeps the streams it
    was initialised with (a pure function of the config seed and its coordinates), so the run is still
    deterministic. Rank order: tp fastest, then dp, then pp.
    """
    keys = ("tp", "pp", "virtual_pipe_stages")
    if not saved or dict(saved) == dict(current) or any(saved.get(k) != current.get(k) for k in keys):
        return None
    return tp + int(saved["tp"]) * int(saved["dp"]) * pp  # data-parallel index 0


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
        cache.clear()  # parameters come layer by layer: keep only the current layer's file in memory
        digest = checksums.get(path.relative_to(checkpoint).as_posix())
        if not path.is_file() and digest is not None:
            raise CheckpointError(f"checkpoint file {path} is missing (the manifest lists it)")
        cache[path] = read_tensors(path, digest) if path.is_file() else ({}, {})
    tensors, metadata = cache[path]
    full = tensors.get(key + suffix)
    if full is None:
        return None, {}
    split = module.param_table[name].tp_split_dim
    expected = list(p.shape)  # this rank's tensor-parallel slice (a DTensor's shape is full over dp)
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
        assign_full(p, local)


def _load_optimizer(
    checkpoint: Path,
    manifest: dict[str, Any],
    module: ParallelModule,
    optimizer: CheckpointOptimizer,
    checksums: dict[str, str],
) -> None:
    if manifest.get("optimizer") is None:
        raise CheckpointError(f"{checkpoint} has no optimizer state; load with load_optimizer=False")
    cache: dict[Path, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}
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
        optimizer.load_parameter_state(name, entry)  # one parameter at a time
    optimizer.set_steps_taken(steps)
    scaler_state = manifest["optimizer"].get("loss_scaler")
    if optimizer.scaler is not None and scaler_state is not None:
        optimizer.scaler.load_state_dict(scaler_state)
