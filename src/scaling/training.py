"""What a plain PyTorch loop over a sharded model needs besides the model: clipping, fp16 scaling, rank 0 only.

A user of ``scaling.llama`` writes ``loss = model(batch); loss.backward(); optimizer.step()`` with a stock
``torch.optim`` optimizer. The three usual additions to such a loop go wrong on a sharded model when taken
from ``torch`` itself, which is why they are here:

- **Clipping.** ``torch.nn.utils.clip_grad_norm_`` sees only this rank's shards, so every rank would clip by
  a different, too small norm. :func:`clip_grad_norm` sums the squares of exactly the gradients the model
  says count (each weight once over tensor- and data-parallel ranks) over the right group, and scales every
  rank's shards by the same factor, so the update is the one a single process would make.
- **fp16 loss scaling.** ``torch.amp.GradScaler`` checks only the local shards for overflow, so one rank
  could skip a step that the others take, and the replicas drift apart. :class:`Scaler` agrees on the
  overflow over the whole world before anyone steps.
- **Rank 0 only.** ``wandb.log``, prints and file writes must happen once, not once per process.
  :func:`master_node` is a decorator and a context manager that runs its body on global rank 0 only.

The model is duck-typed (anything with ``grads_for_norm()``, see
``scaling.transformer.plain.model.ShardedTransformer``); the optimizer is any ``torch.optim.Optimizer``
whose parameters may be DTensors (FSDP2 shards): only their local parts are touched.
"""

from __future__ import annotations

import dis
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

import torch
import torch.distributed as dist

from scaling.core.optimizer.clipping import clip_grads_, global_grad_norm
from scaling.core.zero.tensors import local_part

if TYPE_CHECKING:
    from _typeshed import TraceFunction  # what sys.gettrace() returns and frame.f_trace holds

__all__ = ["Scaler", "clip_grad_norm", "master_node"]


def _local_grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The local part of every gradient the optimizer will apply (shards of DTensors, plain tensors as is)."""
    return [local_part(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def _first_device(optimizer: torch.optim.Optimizer) -> torch.device:
    for group in optimizer.param_groups:
        for p in group["params"]:
            return local_part(p).device
    return torch.device("cpu")


# Clipping --------------------------------------------------------------------------------------------------


class _ShardedModel(Protocol):
    def grads_for_norm(self) -> tuple[list[torch.Tensor], dist.ProcessGroup | None]: ...


def clip_grad_norm(
    model: _ShardedModel, optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """Clip the gradients of ``optimizer``'s parameters by the model's true global L2 norm; returns that norm.

    The norm is the one ``torch.nn.utils.clip_grad_norm_`` would return on one process holding the whole
    model: every tensor-parallel slice and data-parallel shard contributes, each weight once (the model's
    ``grads_for_norm()`` says which local gradients count and over which group to sum). When it exceeds
    ``max_norm``, every local gradient is multiplied by ``max_norm / (norm + 1e-6)``, as torch does. The
    returned norm (before clipping, fp32, identical on every rank) stays on the device: nothing here waits
    for it, so logging it (``.item()``) is the only host synchronisation. Inf/nan propagate into the norm.

    With a :class:`Scaler`, call ``scaler.unscale_(optimizer)`` first, or the norm is the scaled one.
    """
    if norm_type != 2:
        raise ValueError(f"clip_grad_norm: norm_type={norm_type!r} is not supported; only the L2 norm (2.0) is")
    if not max_norm > 0:
        raise ValueError(f"clip_grad_norm: max_norm ({max_norm}) must be positive")
    if not callable(getattr(model, "grads_for_norm", None)):
        raise TypeError(
            f"clip_grad_norm: {type(model).__name__} has no grads_for_norm(), so the norm over its shards is "
            "unknown; pass a scaling model (scaling.llama, scaling.mistral), or use torch.nn.utils.clip_grad_norm_ "
            "for an unsharded module"
        )
    counted, group = model.grads_for_norm()
    norm = global_grad_norm(counted, group, device=_first_device(optimizer))
    clip_grads_(_local_grads(optimizer), max_norm, norm)
    return norm


# fp16 loss scaling -----------------------------------------------------------------------------------------


@dataclass
class _StepState:
    """One optimizer's progress through the current step, forgotten at :meth:`Scaler.update`."""

    found_inf: torch.Tensor | None = None  # this rank's flag, set by unscale_
    overflow: bool | None = None  # the world's agreed flag, set by step


class Scaler:
    """Dynamic loss scaling for fp16 in a plain loop, with every rank agreeing on each overflow.

    The loop, as with ``torch.amp.GradScaler``::

        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)                      # only when clipping
        clip_grad_norm(model, optimizer, 1.0)
        scaler.step(optimizer)                          # skipped when any rank's gradients overflowed
        scaler.update()

    The loss is multiplied by the scale so that small gradients survive fp16; before the step they are
    divided by it again (``unscale_``, fused with the inf/nan check). ``step`` all-reduces the overflow
    flag over the whole world (one tiny collective and the step's only host synchronisation: whether to
    call ``optimizer.step()`` has to be known on the host), so all replicas skip together. ``update`` backs
    the scale off by ``backoff_factor`` after an overflow and grows it by ``growth_factor`` after
    ``growth_interval`` clean steps in a row.

    The engine's ``DynamicLossScaler`` is not reused: it has one factor for growth and back-off, plus a
    hysteresis and a floor, while a plain loop's users bring ``GradScaler``'s arguments and expect its
    behaviour. With ``enabled=False`` everything passes through (``scale(loss)`` is ``loss``, ``step``
    always steps), so one loop serves fp16, bf16 and fp32.

    ``scale`` is the method, as in ``GradScaler`` (the loop above is the one its users have); the number is
    :meth:`get_scale`, for logging. (A callable float serving both would leak into whatever the user saves
    it in: ``torch.load(weights_only=True)`` refuses unknown classes.)
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        enabled: bool = True,
    ) -> None:
        if not init_scale > 0:
            raise ValueError(f"Scaler: init_scale ({init_scale}) must be positive")
        if not growth_factor > 1:
            raise ValueError(f"Scaler: growth_factor ({growth_factor}) must be above 1")
        if not 0 < backoff_factor < 1:
            raise ValueError(f"Scaler: backoff_factor ({backoff_factor}) must lie strictly between 0 and 1")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
            raise ValueError(f"Scaler: growth_interval ({growth_interval!r}) must be an integer of at least 1")
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self.enabled = enabled
        self._scale = float(init_scale)
        self._growth_tracker = 0  # clean steps in a row since the last change of scale
        self._steps: dict[int, _StepState] = {}  # by id(optimizer), for the current step only

    def get_scale(self) -> float:
        """The current scale (1.0 when disabled), as ``GradScaler.get_scale``."""
        return self._scale if self.enabled else 1.0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the current scale (``loss`` itself when disabled); call ``backward()`` on it."""
        if not self.enabled:
            return loss
        # An fp16 loss times 2**16 would itself overflow (fp16 ends at 65504): scale in fp32. The gradient
        # flowing back into the fp16 graph is the scale, which fp16 holds.
        if loss.dtype in (torch.float16, torch.bfloat16):
            loss = loss.float()
        return loss * self._scale

    def _state(self, optimizer: torch.optim.Optimizer) -> _StepState:
        return self._steps.setdefault(id(optimizer), _StepState())

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide ``optimizer``'s gradients (their local parts) by the scale in place and note whether this
        rank's hold inf/nan. Idempotent within a step: a second call before :meth:`update` does nothing."""
        if not self.enabled:
            return
        state = self._state(optimizer)
        if state.found_inf is not None:
            return
        device = _first_device(optimizer)
        found = torch.zeros((), dtype=torch.float32, device=device)
        by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for grad in _local_grads(optimizer):
            by_device.setdefault((grad.device, grad.dtype), []).append(grad)
        for (grad_device, _), grads in by_device.items():
            flag = torch.zeros((), dtype=torch.float32, device=grad_device)
            inv_scale = torch.full((), 1.0 / self._scale, dtype=torch.float32, device=grad_device)
            # One fused kernel per device and dtype: multiply by 1/scale and set flag to 1 on any inf/nan.
            torch._amp_foreach_non_finite_check_and_unscale_(grads, flag, inv_scale)
            found = torch.maximum(found, flag.to(device))
        state.found_inf = found

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> bool:
        """``optimizer.step(*args, **kwargs)`` unless some rank's gradients hold inf/nan; returns whether it
        stepped (the same on every rank). Unscales first when :meth:`unscale_` was not called."""
        if not self.enabled:
            optimizer.step(*args, **kwargs)
            return True
        state = self._state(optimizer)
        if state.overflow is not None:
            raise RuntimeError("Scaler.step: this optimizer already stepped in this step; call update() first")
        self.unscale_(optimizer)
        assert state.found_inf is not None
        found = state.found_inf.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(found, op=dist.ReduceOp.MAX)  # one rank's overflow skips the step everywhere
        state.overflow = bool(found.item())
        if state.overflow:
            return False
        optimizer.step(*args, **kwargs)
        return True

    def update(self) -> None:
        """Adjust the scale after this step's :meth:`step` calls: back off after an overflow, grow after
        ``growth_interval`` clean steps in a row. Every rank computes the same scale."""
        if not self.enabled:
            return
        outcomes = [state.overflow for state in self._steps.values() if state.overflow is not None]
        if not outcomes:
            raise RuntimeError("Scaler.update: no step(optimizer) since the last update(), so no overflow check")
        if any(outcomes):
            self._scale *= self.backoff_factor
            self._growth_tracker = 0
        else:
            self._growth_tracker += 1
            if self._growth_tracker >= self.growth_interval:
                self._scale *= self.growth_factor
                self._growth_tracker = 0
        self._steps.clear()

    def state_dict(self) -> dict[str, float | int | bool]:
        """What resuming needs (save it next to the model's checkpoint)."""
        return {
            "scale": self._scale,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "growth_tracker": self._growth_tracker,
            "enabled": self.enabled,
        }

    def load_state_dict(self, state: dict[str, float | int | bool]) -> None:
        missing = [key for key in ("scale", "growth_tracker") if key not in state]
        if missing:
            raise ValueError(f"Scaler.load_state_dict: the state lacks {missing} (it has {sorted(state)})")
        self._scale = float(state["scale"])
        self._growth_tracker = int(state["growth_tracker"])
        self.growth_factor = float(state.get("growth_factor", self.growth_factor))
        self.backoff_factor = float(state.get("backoff_factor", self.backoff_factor))
        self.growth_interval = int(state.get("growth_interval", self.growth_interval))
        self._steps.clear()


# Rank 0 only -----------------------------------------------------------------------------------------------

P = ParamSpec("P")
R = TypeVar("R")

# The instruction a frame sits on while a `with` statement calls __enter__ (3.10: SETUP_WITH; 3.11-3.13:
# BEFORE_WITH). From 3.14 on, `with` calls __enter__ with an ordinary CALL, so the check is skipped there.
_WITH_OPCODES = frozenset({"SETUP_WITH", "BEFORE_WITH"})


def _global_rank() -> int:
    """This process's global rank: from torch.distributed when initialised, else the launcher's RANK, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    raw = os.environ.get("RANK")
    if raw is None:
        return 0
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"master_node: the environment variable RANK={raw!r} is not an integer") from None


def _check_with_statement(frame: FrameType) -> None:
    """Refuse an ``__enter__`` that no ``with`` statement made: skipping would raise in the caller's code."""
    if sys.version_info >= (3, 14):
        return
    code = frame.f_code.co_code
    opname = dis.opname[code[frame.f_lasti]] if 0 <= frame.f_lasti < len(code) else None
    if opname not in _WITH_OPCODES:
        raise RuntimeError(
            "master_node() must be used as `with master_node():` or `@master_node()`; entered any other way "
            "(ExitStack.enter_context, a direct __enter__ call) it cannot skip its block on other ranks"
        )


class _SkipBlock(BaseException):
    """Raised at the first instruction of a skipped ``with master_node():`` block and swallowed by its
    ``__exit__`` (a BaseException, so no ``except Exception`` could catch it in between)."""


@dataclass
class _Skipping:
    """What entering a block on a non-zero rank changed, to put back in ``__exit__``."""

    frame: FrameType
    token: _SkipBlock
    global_trace: TraceFunction | None
    local_trace: Callable[[FrameType, str, Any], Any] | None  # types.FrameType.f_trace
    trace_opcodes: bool


def _no_trace(frame: FrameType, event: str, arg: Any) -> None:
    """The thread's trace function while a block is skipped: tracing must be on for a frame's own trace
    function to get events, but no other frame needs tracing."""
    return None


class _RankZeroOnly:
    """The object ``master_node()`` returns: a decorator and a context manager (see :func:`master_node`)."""

    def __init__(self) -> None:
        self._entered: list[_Skipping | None] = []  # a stack, so one instance may be nested in itself

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R | None]:
        if not callable(fn):
            raise TypeError(f"@master_node() decorates a function, got {type(fn).__name__}")

        @functools.wraps(fn)
        def on_rank_zero(*args: P.args, **kwargs: P.kwargs) -> R | None:
            return fn(*args, **kwargs) if _global_rank() == 0 else None  # the rank is read at call time

        return on_rank_zero

    def __enter__(self) -> None:
        frame = sys._getframe(1)
        _check_with_statement(frame)
        if _global_rank() == 0:
            self._entered.append(None)
            return
        token = _SkipBlock("a `with master_node():` block skipped on a non-zero rank")
        self._entered.append(_Skipping(frame, token, sys.gettrace(), frame.f_trace, frame.f_trace_opcodes))

        def raise_in_block(traced: FrameType, event: str, arg: Any) -> None:
            raise token

        # A frame's own trace function gets events only while the thread traces; ours is installed even
        # when a debugger or coverage already traces, since a C-level tracer would never call it. Opcode
        # events make it fire at the block's first instruction, also for `with master_node(): f()` on one
        # line, where no line event would come before the body.
        sys.settrace(_no_trace)
        frame.f_trace_opcodes = True
        frame.f_trace = raise_in_block

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        skipping = self._entered.pop()
        if skipping is None:
            return False  # rank 0: the block ran, and its exceptions propagate
        # Raising from a trace function already switched the thread's tracing off; put back whatever
        # traced before (a debugger, coverage), and the frame's own settings.
        skipping.frame.f_trace = skipping.local_trace
        skipping.frame.f_trace_opcodes = skipping.trace_opcodes
        sys.settrace(skipping.global_trace)
        return exc is skipping.token


def master_node() -> _RankZeroOnly:
    """Run a block or a function on global rank 0 only: ``with master_node(): wandb.log(...)`` or
    ``@master_node()`` on a function (which then returns None on the other ranks).

    The rank comes from torch.distributed when it is initialised, else from the launcher's ``RANK``, else 0,
    and is read each time the block or function runs (so a function decorated at import time, before the
    process group exists, still asks the right question).

    How a ``with`` block is skipped: a context manager cannot skip its block by itself, so on other ranks
    ``__enter__`` installs a trace function on the calling frame (``sys.settrace`` to switch tracing on for
    the thread, ``frame.f_trace`` with opcode events) that raises a private exception at the block's first
    instruction; ``__exit__`` swallows exactly that exception and restores the previous trace functions, so
    debuggers and coverage keep working. Execution continues after the block. Nesting works (an inner block
    on another rank is never reached). Only a ``with`` statement can be skipped; entering it any other way
    (``ExitStack.enter_context``) is refused on every rank.
    """
    return _RankZeroOnly()
