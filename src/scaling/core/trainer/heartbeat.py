"""What this rank is doing right now: step, phase, micro-batch, pipeline instruction and collective.

When a run hangs, the question is never "is it stuck" but "which rank did not arrive, and where was it".
The answer has to be recorded *before* the hang, by the thread that then blocks, and cheaply, because it is
recorded on every instruction and every collective. :class:`Heartbeat` is that record: a few attribute
assignments per event plus two short rings of recent pipeline instructions and collectives. The hang
watchdog (:mod:`scaling.core.trainer.hang`) reads it from its own thread, publishes it to the other ranks
and writes it to the run directory when the run stops progressing.

Collectives are recorded by :func:`record_collectives`, which wraps the ``torch.distributed`` functions
(``all_reduce``, ``broadcast``, ``send``/``recv``...) for as long as a heartbeat is active. Wrapping the
module attributes reaches every caller that looks them up as ``dist.all_reduce`` at call time (our engine,
FSDP2's all-gathers and reduce-scatters); collectives issued from C++ (DDP's reducer) are not seen, and the
heartbeat then shows the last Python-level one.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["COLLECTIVES", "CollectiveCall", "Heartbeat", "record_collectives"]

# The torch.distributed functions recorded (those this torch lacks are skipped).
COLLECTIVES = (
    "all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
    "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all", "all_to_all_single",
    "gather", "scatter", "barrier", "monitored_barrier", "all_gather_object", "broadcast_object_list",
    "send", "recv", "isend", "irecv", "batch_isend_irecv",
)  # fmt: skip
_PEER_ARGUMENT = {"send": "dst", "isend": "dst", "recv": "src", "irecv": "src"}  # position 1 as well
_ASYNCHRONOUS = frozenset({"isend", "irecv", "batch_isend_irecv"})  # others with async_op=True
_RING = 16  # recent instructions and collectives kept: enough to see the pattern that led to the hang


class CollectiveCall:
    """One collective this rank entered: which, over which group (or with which peer), on what shape."""

    __slots__ = ("asynchronous", "entered", "group", "left", "name", "peer", "shape", "step")

    def __init__(
        self, name: str, group: Any, peer: int | None, shape: tuple[int, ...] | None, step: int, asynchronous: bool
    ) -> None:
        self.name, self.group, self.peer, self.shape, self.step = name, group, peer, shape, step
        self.asynchronous = asynchronous  # returns at once; the rank waits on its Work later, unseen
        self.entered = time.monotonic()
        self.left: float | None = None  # None: still inside

    def describe(self) -> str:
        """E.g. ``all_reduce(shape [2, 16], group ranks [0, 1])`` or ``recv(from rank 1, shape [4])``."""
        parts = []
        if self.peer is not None:
            parts.append(f"{'to' if self.name in ('send', 'isend') else 'from'} rank {self.peer}")
        if self.shape is not None:
            parts.append(f"shape {list(self.shape)}")
        parts.append(_group_text(self.group))
        return f"{self.name}({', '.join(parts)})"


@functools.lru_cache(maxsize=64)
def _ranks_of(group: Any) -> tuple[int, ...] | None:
    try:
        return tuple(dist.get_process_group_ranks(group))
    except Exception:  # a destroyed or foreign group: say less rather than fail while reporting
        return None


def _group_text(group: Any) -> str:
    if group is None:
        return "the whole world"
    ranks = _ranks_of(group)
    return "a process group" if ranks is None else f"group ranks {list(ranks)}"


def _shape_of(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return tuple(value[0].shape)
    return None


class Heartbeat:
    """This rank's progress, written by the training thread and read by the watchdog thread.

    ``progress`` grows with every event (phase, instruction, collective entered or left): a rank whose
    ``progress`` stays the same made no progress. Reads from another thread see consistent single values
    (attribute assignment is atomic under the GIL); a snapshot may mix two neighbouring events, which is
    fine for a report.
    """

    def __init__(self, where: str) -> None:
        self.where = where  # e.g. "rank 1 (pp 0, dp 1, tp 0)"
        self.progress = 0
        self.step = 0
        self.phase = "start"
        self.micro: int | None = None
        self.instruction: object | None = None  # the pipeline instruction being executed
        self.collective: CollectiveCall | None = None  # the last one entered
        self._open: list[CollectiveCall] = []  # entered and not yet left, outermost first
        self.collectives = 0  # entered so far: a rank behind the others in this count waits in an older one
        self.instructions: deque[tuple[float, int, object]] = deque(maxlen=_RING)
        self.recent: deque[CollectiveCall] = deque(maxlen=_RING)
        self.slow = False  # in a phase that may legitimately take long without any event (a save)
        self.executing = False  # the instruction is running now (not a phase beaten after it)
        self.pending = False  # the last event was starting an asynchronous collective
        self.owner: int | None = None  # the thread whose collectives are recorded (see record_collectives)

    def beat(self, phase: str, step: int, *, slow: bool = False) -> None:
        """The loop enters ``phase`` of ``step``; ``slow`` marks a phase allowed to last long (writing files)."""
        self.phase, self.step, self.slow = phase, step, slow
        self.pending = False
        self.executing = False  # the last instruction (if any) is kept: a hang after it still names it
        self.progress += 1

    def on_instruction(self, step: int, instruction: Any) -> None:
        """The pipeline executor starts ``instruction`` (it has ``micro``) of ``step``."""
        self.step, self.micro, self.instruction = step, getattr(instruction, "micro", None), instruction
        self.executing = True
        self.pending = False
        self.instructions.append((time.monotonic(), step, instruction))
        self.progress += 1

    def enter(
        self, name: str, group: Any, peer: int | None, shape: tuple[int, ...] | None, asynchronous: bool = False
    ) -> CollectiveCall:
        call = CollectiveCall(name, group, peer, shape, self.step, asynchronous)
        self.collective = call
        self._open.append(call)
        self.recent.append(call)
        self.collectives += 1
        self.progress += 1
        return call

    def leave(self, call: CollectiveCall) -> None:
        call.left = time.monotonic()
        if call in self._open:
            self._open.remove(call)
        if self._open:  # a collective built on others (all_gather_object): the outer one is still waited in
            self.collective = self._open[-1]
        self.pending = call.asynchronous  # the last thing done: the rank probably waits for it next
        self.progress += 1

    @property
    def in_collective(self) -> bool:
        """Inside a collective, or its last event was starting an asynchronous one (then it most likely
        waits on that one's ``Work``: a wait the wrappers cannot see)."""
        return bool(self._open) or self.pending

    def doing(self) -> str:
        """One phrase: step, phase, micro-batch, instruction and the collective it waits in or entered last."""
        text = f"step {self.step}, {self.phase}"
        if self.instruction is not None and self.executing:
            text += f", micro-batch {self.micro}, instruction {self.instruction}"
        elif self.instruction is not None:
            text += f", after instruction {self.instruction}"
        call = self.collective
        if call is not None:
            if self._open:
                text += f", waiting in {call.describe()} for {time.monotonic() - call.entered:.0f} s"
            elif self.pending:
                text += f", probably waiting for the asynchronous {call.describe()} it started last"
            else:
                text += f", last collective {call.describe()}"
        return text

    def snapshot(self) -> dict[str, Any]:
        """What other ranks need to name this one: small and JSON-serialisable."""
        return {
            "where": self.where,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "progress": self.progress,
            "collectives": self.collectives,
            "in_collective": self.in_collective,
            "slow": self.slow,
            "doing": self.doing(),
        }

    def history(self) -> str:
        """The recent instructions and collectives, oldest first, with how long ago each began."""
        now = time.monotonic()
        lines = ["recent pipeline instructions (oldest first):"]
        lines += [f"  {now - t:8.1f} s ago  step {step}  {instr}" for t, step, instr in list(self.instructions)]
        if not self.instructions:
            lines.append("  (none)")
        lines.append("recent collectives (oldest first):")
        for call in list(self.recent):
            state = "still inside" if call.left is None else f"left after {call.left - call.entered:.3f} s"
            state = f"asynchronous, started; {state}" if call.asynchronous else state
            lines.append(f"  {now - call.entered:8.1f} s ago  step {call.step}  {call.describe()}  ({state})")
        if not self.recent:
            lines.append("  (none recorded)")
        return "\n".join(lines)


def _training_thread(heartbeat: Heartbeat) -> bool:
    """Whether the calling thread's collectives describe the training: the thread that started recording,
    or a thread Python did not start (autograd's device threads, where FSDP2 reduce-scatters gradients).
    Python helper threads (a background checkpoint writer) have collectives of their own, which would
    otherwise hide the one the training thread waits in."""
    thread = threading.current_thread()
    return thread.ident == heartbeat.owner or isinstance(thread, threading._DummyThread)


_lock = threading.Lock()
_active: Heartbeat | None = None
_originals: dict[str, Callable[..., Any]] = {}


def _wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    peer_name = _PEER_ARGUMENT.get(name)

    @functools.wraps(original)
    def recorded(*args: Any, **kwargs: Any) -> Any:
        heartbeat = _active
        if heartbeat is None or not _training_thread(heartbeat):
            return original(*args, **kwargs)
        peer = None
        if peer_name is not None:
            peer = kwargs.get(peer_name, args[1] if len(args) > 1 else None)
        shape = _shape_of(args[0]) if args else None
        asynchronous = name in _ASYNCHRONOUS or bool(kwargs.get("async_op"))
        call = heartbeat.enter(name, kwargs.get("group"), peer if isinstance(peer, int) else None, shape, asynchronous)
        try:
            return original(*args, **kwargs)
        finally:
            heartbeat.leave(call)

    recorded.__scaling_recorded__ = True  # type: ignore[attr-defined]
    return recorded


@contextmanager
def record_collectives(heartbeat: Heartbeat) -> Iterator[Heartbeat]:
    """Record every ``torch.distributed`` collective this process enters in ``heartbeat`` while inside.

    Recorded are the calling thread's collectives and those of threads Python did not start (see
    ``_training_thread``). One heartbeat at a time per process (a second raises); on exit the original
    functions are put back unless someone wrapped them again meanwhile (then ours stay and pass calls
    straight through).
    """
    global _active
    with _lock:
        if _active is not None:
            raise RuntimeError(f"collectives are already recorded for {_active.where}")
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None and not getattr(original, "__scaling_recorded__", False):
                _originals[name] = original
                setattr(dist, name, _wrap(name, original))
        heartbeat.owner = threading.get_ident()
        _active = heartbeat
    try:
        yield heartbeat
    finally:
        with _lock:
            _active = None
            for name, original in list(_originals.items()):
                if getattr(getattr(dist, name, None), "__scaling_recorded__", False):
                    setattr(dist, name, original)
                    del _originals[name]
