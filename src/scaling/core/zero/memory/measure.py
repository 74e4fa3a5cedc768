"""Peak bytes of live tensors while a callable runs, measured with torch's own memory tracker.

The estimate in :mod:`scaling.core.zero.memory.estimate` is only worth printing if it matches what a run
holds, so the tests and ``benchmarks/zero.py`` measure the same thing the formula predicts: bytes of
tensor storage alive at the worst moment of a training step. ``torch.cuda.max_memory_allocated`` answers
that on a GPU only; on CPU (where every test runs) we use
:class:`torch.distributed._tools.mem_tracker.MemTracker`, a ``TorchDispatchMode`` that sees every
storage an operator creates (FSDP2's all-gather and reduce-scatter buffers, the optimizer's states,
storages FSDP2 grows and frees with ``resize_``) and notices when the storage dies. It counts storage
bytes, not allocator blocks, so the figure is exact and the same on every machine.

Two details make it measure a whole training step:

* Tensors that exist before the call (weights, bucket buffers, optimizer state built in an earlier step)
  were created outside the tracker. Every tensor the garbage collector can reach at the start is
  registered as the baseline, and the ``track`` objects (modules, optimizers) after it so their
  tensors are labelled as parameters and optimizer state.
* The tracker refuses a second forward of a top-level module (it keeps per-module statistics for one
  iteration). Gradient accumulation and a second step need exactly that, so its per-module statistics
  are dropped when it happens; the per-category totals, which are what we read, are kept.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import nn, optim
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed._tools.mem_tracker import MemTracker

__all__ = ["MemoryMeasurement", "live_tensor_bytes", "measure_peak"]

T = TypeVar("T")

_TOTAL = "Total"


@dataclass
class MemoryMeasurement(Generic[T]):
    """Peak bytes of live tensor storage during the call (on the device with the highest peak), and how
    those bytes split by the tracker's categories at that moment (``param``, ``grad``, ``opt``, ``act``,
    ``temp``, ``oth``: what existed before the call and was not a tracked parameter or optimizer state)."""

    peak_bytes: int
    at_peak: dict[str, int] = field(default_factory=dict)
    result: T | None = None

    def bytes_per_parameter(self, n_params: int) -> float:
        return self.peak_bytes / max(n_params, 1)


class _StepTracker(MemTracker):  # type: ignore[no-untyped-call]  # TorchDispatchMode's hook
    """``MemTracker`` that allows repeated forwards of the same top-level module (micro-batches, steps)."""

    def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
        try:
            super()._pre_fw_hook(module, inputs)
        except NotImplementedError:  # "multiple iterative calls": start a new iteration's module statistics
            self.reset_mod_stats()
            super()._pre_fw_hook(module, inputs)


def _live_tensors() -> list[torch.Tensor]:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() touches deprecated module attributes that warn
        warnings.simplefilter("ignore")
        return [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every tensor the garbage collector can reach now.

    Subtracted from a later peak it gives what one model's training added, even where an earlier model
    in the same process is kept alive (autograd hooks that close over their module form reference cycles
    through C++ that ``gc`` cannot collect).
    """
    storages = {st for t in _live_tensors() for st in get_untyped_storages(t)}
    return sum(st.nbytes() for st in storages)


def measure_peak(
    fn: Callable[[], T],
    *track: nn.Module | optim.Optimizer | torch.Tensor,
    device: torch.device | str | None = None,
) -> MemoryMeasurement[T]:
    """Run ``fn()`` and return the peak bytes of live tensors during it, counting those alive before.

    ``track``: modules and optimizers whose tensors should be labelled (parameters, optimizer state);
    everything else alive at the start is counted too, labelled ``oth``. ``device``: report this device
    (default: the one with the highest peak).
    """
    tracker = _StepTracker()
    baseline = _live_tensors()
    tracker.track_external(*baseline)
    del baseline
    tracker.track_external(*track)
    with tracker:
        result = fn()
    snapshot = tracker.get_tracker_snapshot("peak")
    if not snapshot:
        return MemoryMeasurement(0, {}, result)
    if device is not None:
        chosen = torch.device(device)
        per_device = snapshot.get(chosen, {})
    else:
        per_device = max(snapshot.values(), key=lambda s: s.get(_TOTAL, 0))
    at_peak = {_label(k): v for k, v in per_device.items() if k != _TOTAL and v}
    return MemoryMeasurement(int(per_device.get(_TOTAL, 0)), at_peak, result)


def _label(key: Any) -> str:
    """The tracker's category enum as a short lower-case word (``_MemRefType.PARAM`` -> ``param``)."""
    return str(getattr(key, "name", key)).lower()
