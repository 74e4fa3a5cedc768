"""The process world of a plain PyTorch loop: initialised on first use, shared by the model and its loader.

A user of ``scaling.llama`` writes no ``init_process_group`` and passes no topology: the first preset model
built in the process initialises ``torch.distributed`` from the launcher's environment (``torchrun``,
``scaling run``), or a world of one when the script was not launched, and records the layout it chose
(tensor parallel ``tp``, data parallel the rest; no pipeline: ``pp > 1`` belongs to ``scaling train``).
The loader reads the same record, so ranks of one tensor-parallel group get the same rows and each
data-parallel replica its own share of every global batch, without either object knowing the other.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from scaling.core.topology import Topology, TopologyConfig, init_distributed

__all__ = ["current_topology", "data_parallel_coordinates", "plain_topology", "reset_plain_world"]

_current: Topology | None = None


def _launched_world_size() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1


def plain_topology(tp: int = 1, *, activation_checkpointing: bool = False, device: str = "auto") -> Topology:
    """The topology of this process for a plain loop with ``tp`` tensor-parallel ranks (data parallel: the
    rest of the world), initialising ``torch.distributed`` if nobody has. A second model in the same
    process with the same layout reuses it (process groups are created once)."""
    global _current
    world = _launched_world_size()
    if tp < 1 or world % tp != 0:
        raise ValueError(f"tp={tp} does not divide the {world} launched processes")
    checkpointing = "every_layer" if activation_checkpointing else "disabled"
    if _current is not None and dist.is_initialized():
        config = _current.config
        if config.model_parallel_size == tp and config.activation_checkpointing_type.value == checkpointing:
            return _current
    config = TopologyConfig(
        model_parallel_size=tp,
        pipe_parallel_size=1,
        data_parallel_size=world // tp,
        activation_checkpointing_type=checkpointing,
        device=device,
    )
    if dist.is_initialized():
        from scaling.core.topology.device import choose_device_for_this_process

        _current = Topology(config, device=choose_device_for_this_process(config.device).device)
    else:
        _current = init_distributed(config)
    return _current


def current_topology() -> Topology | None:
    """The topology the last preset model of this process was built on (None before the first)."""
    return _current


def data_parallel_coordinates() -> tuple[int, int]:
    """(rank, size) of this process among data-parallel replicas: from the preset model's topology when one
    was built, else from the launched world with no tensor parallelism, else (0, 1)."""
    if _current is not None:
        return _current.dp_rank, _current.dp_size
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def reset_plain_world() -> None:
    """Forget the recorded topology (tests that build worlds of different layouts in one process)."""
    global _current
    _current = None
