"""Events a step can raise (a non-finite loss or gradient norm, a loss or gradient-norm spike) and what the
training loop does about each: ``skip`` the update, ``rollback`` to the last checkpoint, or ``abort``.

A spike is a loss or a gradient norm above ``factor`` times its running median over the last ``window``
healthy steps: a median, unlike a mean, is not dragged up by the spikes it is meant to catch, and only
healthy steps enter the window, so a run of spikes cannot make itself look normal. Detection starts once
the window is full (a median of three early steps says little).

Every rank decides alike without a further collective: the loss (averaged over micro-batches and
data-parallel ranks) and the gradient norm (all-reduced over the model) are already identical on every
rank when the optimizer has read them, and the decision is a pure function of them and of the history,
which every rank also shares.

``skip`` must drop the update before it is applied, yet the norm is known only inside the optimizer step.
So a skipped spike reaches the optimizer as a non-finite loss (the optimizer then skips, as for any
non-finite step), decided on the device from the loss and, for gradient-norm spikes, a norm computed
once more before the step (only when that policy is ``skip``; one extra scalar all-reduce per step).
``rollback`` and ``abort`` act after the step (a rolled-back update is discarded with the reload).

Every event puts its batch in the ledger (:mod:`scaling.core.trainer.ledger`), so a replay steps over
it; ``max_events`` in ``event_window`` steps stop the run with a summary. The default policy is today's:
non-finite steps are skipped (and ``max_consecutive_skips`` in a row stop the run, see
:mod:`scaling.core.trainer.nonfinite`), and spikes are not looked for.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field

from scaling.core.checkpoint.discovery import find_checkpoint, holds_checkpoints
from scaling.core.config import BaseConfig, ConfigError
from scaling.core.data.loader import DistributedDataLoader
from scaling.core.logging import get_logger
from scaling.core.optimizer.clipping import global_grad_norm
from scaling.core.optimizer.config import TrainingGroupConfig
from scaling.core.optimizer.optimizer import Optimizer, OptimizerStepResult
from scaling.core.pipeline.module import ParallelModule
from scaling.core.trainer.ledger import LEDGER_NAME, BadBatch, BadBatchLedger, data_source, global_sample_indices
from scaling.core.trainer.nonfinite import TrainingDiverged

__all__ = ["EVENTS", "Policy", "SpikeConfig", "StepEvent", "StepGuard", "for_health"]

_logger = get_logger("scaling.trainer")

Policy = Literal["skip", "rollback", "abort"]
EVENTS = ("non_finite", "loss_spike", "grad_norm_spike")


class SpikeConfig(BaseConfig):
    """What counts as a bad step beyond a non-finite one, and what each kind of bad step does."""

    on_non_finite: Policy = Field(
        "skip",
        description="A non-finite loss or gradient norm: 'skip' (drop the update; trainer.max_consecutive_skips "
        "in a row stop the run), 'rollback' or 'abort'. With fp16 loss scaling overflows follow the scaler.",
    )
    on_loss_spike: Policy = Field("skip", description="A loss spike: 'skip', 'rollback' or 'abort'.")
    on_grad_norm_spike: Policy = Field("skip", description="A gradient-norm spike: 'skip', 'rollback' or 'abort'.")
    factor: float | None = Field(
        None,
        gt=1.0,
        description="A loss or gradient norm above this multiple of its running median is a spike; no spike "
        "detection when unset.",
    )
    window: int = Field(20, ge=3, description="Healthy steps in the running median (detection starts when full).")
    max_events: int | None = Field(
        None, ge=1, description="Stop the run after this many events within event_window steps; unbounded when unset."
    )
    event_window: int = Field(1000, ge=1, description="Steps (as executed, replays included) that max_events counts.")
    rollback_lr_factor: float = Field(
        0.5, gt=0.0, le=1.0, description="After a rollback, multiply the learning rate by this..."
    )
    rollback_lr_steps: int = Field(100, ge=0, description="...for this many steps from the checkpoint's step.")
    layer_norm_steps: int = Field(
        3,
        ge=0,
        description="Per-layer gradient norms of this many steps before an event go into its ledger entry, and "
        "the event's step and this many steps after it log them (layer_grad_norm/<layer>); 0: not measured "
        "(saves one small all-reduce per step).",
    )
    ledger: Path | None = Field(
        None,
        description="The bad-batch ledger (JSON lines), read at start and appended to at every event; "
        "default: .bad_batches.jsonl in trainer.save_dir (in memory only without a save_dir).",
    )

    @property
    def uses_rollback(self) -> bool:
        return "rollback" in (self.on_non_finite, self.on_loss_spike, self.on_grad_norm_spike)


@dataclass(frozen=True)
class StepEvent:
    """What happened at ``step`` (1-based), the values seen, the spike threshold crossed, what is done."""

    kind: str
    step: int
    loss: float
    grad_norm: float
    threshold: float | None
    action: Policy

    def describe(self) -> str:
        limit = "" if self.threshold is None else f" > {self.threshold:.4g}"
        value = self.grad_norm if self.kind == "grad_norm_spike" else self.loss
        other = f"grad norm {self.grad_norm:.4g}" if self.kind != "grad_norm_spike" else f"loss {self.loss:.4g}"
        what = {"non_finite": "non-finite step", "loss_spike": "loss spike", "grad_norm_spike": "grad-norm spike"}
        name = "loss" if self.kind != "grad_norm_spike" else "grad norm"
        return f"{what[self.kind]} at step {self.step} ({name} {value:.4g}{limit}, {other})"


class _RunningMedian:
    def __init__(self, window: int) -> None:
        self.values: deque[float] = deque(maxlen=window)

    def limit(self, factor: float) -> float | None:
        """``factor`` x the median, rounded to float32 (so the device's comparison and the host's agree)."""
        if len(self.values) < (self.values.maxlen or 0):
            return None
        return float(torch.tensor(factor * statistics.median(self.values), dtype=torch.float32))


class StepGuard:
    """The per-step check, the bookkeeping of events and the ledger; one per training run, alike on every rank.

    ``announce``: this rank writes the log lines and the ledger file (global rank 0).
    """

    def __init__(self, config: SpikeConfig, ledger: BadBatchLedger, *, loss_scaling: bool, announce: bool) -> None:
        if loss_scaling and config.factor is not None and "skip" in (config.on_loss_spike, config.on_grad_norm_spike):
            raise ConfigError(
                "trainer.spikes: skipping spikes ('skip' in on_loss_spike or on_grad_norm_spike) is not supported "
                "with fp16 loss scaling (the dropped update would lower the loss scale); use 'rollback' or 'abort'"
            )
        self.config = config
        self.ledger = ledger
        self.loss_scaling = loss_scaling  # fp16: non-finite steps are the scaler's business
        self.announce = announce
        self._loss = _RunningMedian(config.window)
        self._norm = _RunningMedian(config.window)
        self._executed = 0  # steps executed by this process, replays included: the clock of event_window
        self._recent: deque[tuple[int, StepEvent]] = deque()
        self.counts: Counter[str] = Counter()  # "skipped", "rolled_back", "spikes", "ledger_skipped", per kind
        self._flags: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        self._bad: set[int] | None = None  # data positions to step over (from the ledger, filled on first use)
        self._lr_until = 0  # steps below this train at rollback_lr_factor x the learning rate

    @classmethod
    def for_run(cls, config: SpikeConfig, save_dir: Path | None, *, loss_scaling: bool, announce: bool) -> StepGuard:
        """The guard of a run: its ledger at ``config.ledger``, else in ``save_dir``, else in memory."""
        path = config.ledger or (save_dir / LEDGER_NAME if save_dir is not None else None)
        return cls(config, BadBatchLedger(path, writer=announce), loss_scaling=loss_scaling, announce=announce)

    # Before the step -----------------------------------------------------------------------------------
    def step_over_bad_batches(self, loader: DistributedDataLoader) -> None:
        """Move ``loader`` past every global batch in the ledger that it would read next."""
        if self._bad is None:  # rank 0's ledger counts: the run directory need not be shared by every node
            bad = [sorted(self.ledger.positions(loader))]
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.broadcast_object_list(bad, src=0)
            self._bad = set(bad[0])
        position = loader.consumed
        while position in self._bad:
            position += loader.global_batch
        if position == loader.consumed:
            return
        passed = (position - loader.consumed) // loader.global_batch
        self.counts["ledger_skipped"] += passed
        if self.announce:
            _logger.info(
                "stepping over %d global batch(es) at sample position %d: in the bad-batch ledger %s",
                passed,
                loader.consumed,
                self.ledger.path,
            )
        loader.load_state_dict({"consumed": position, "seed": loader.seed})  # also restarts background readers

    def loss_for_update(self, loss: torch.Tensor, module: ParallelModule, optimizer: Optimizer) -> torch.Tensor:
        """The loss to hand the optimizer: ``loss`` itself, or NaN when a spike whose policy is ``skip`` must
        drop this update. Decided on the device (no host sync); :meth:`judge` reads the decision later."""
        self._flags = (None, None)
        factor = self.config.factor
        if factor is None:
            return loss
        loss_flag = norm_flag = None
        loss_limit = self._loss.limit(factor)
        if self.config.on_loss_spike == "skip" and loss_limit is not None:
            loss_flag = loss.detach().float() > loss_limit
        norm_limit = self._norm.limit(factor)
        if self.config.on_grad_norm_spike == "skip" and norm_limit is not None:
            norm_flag = _norm_before_step(module, optimizer) > norm_limit
        self._flags = (loss_flag, norm_flag)
        drop = [f.to(loss.device) for f in (loss_flag, norm_flag) if f is not None]
        if not drop:
            return loss
        spiked = torch.stack(drop).any()
        return torch.where(spiked, torch.full_like(loss, float("nan")), loss)

    @contextmanager
    def learning_rate(self, optimizer: Optimizer, step: int) -> Iterator[None]:
        """Within: ``optimizer`` uses ``rollback_lr_factor`` x its schedules when ``step`` (0-based) is within
        ``rollback_lr_steps`` of the last rollback's checkpoint; otherwise its own schedules."""
        factor = self.config.rollback_lr_factor
        if step >= self._lr_until or factor == 1.0:
            yield
            return
        original = optimizer.slots
        optimizer.slots = [replace(slot, group=_scaled(slot.group, factor)) for slot in original]
        try:
            yield
        finally:
            optimizer.slots = original

    # After the step ------------------------------------------------------------------------------------
    def judge(self, step: int, update: OptimizerStepResult, loss: torch.Tensor) -> StepEvent | None:
        """The event of the step that completed as ``step`` (None: a healthy step, which enters the medians).

        ``update`` is what the optimizer did, ``loss`` the step's own loss. A non-finite step under fp16
        loss scaling is no event (the scaler lowers the scale). Reads the loss to the host only when spikes
        are looked for or the step was skipped (the optimizer has synchronised on it already).
        """
        self._executed += 1
        loss_flag, norm_flag = (bool(f) if f is not None else False for f in self._flags)
        self._flags = (None, None)
        factor = self.config.factor
        if factor is None and not update.skipped:
            return None
        norm, value = update.grad_norm_value, float(loss)
        finite = math.isfinite(norm) and math.isfinite(value)
        event: StepEvent | None = None
        if not finite:
            if not self.loss_scaling:
                event = StepEvent("non_finite", step, value, norm, None, self.config.on_non_finite)
        elif factor is not None:
            loss_limit, norm_limit = self._loss.limit(factor), self._norm.limit(factor)
            # A skipping policy goes by the device's decision (it is what dropped the update, or did not).
            if self.config.on_loss_spike != "skip":
                loss_flag = loss_limit is not None and value > loss_limit
            if self.config.on_grad_norm_spike != "skip":
                norm_flag = norm_limit is not None and norm > norm_limit
            if loss_flag:
                event = StepEvent("loss_spike", step, value, norm, loss_limit, self.config.on_loss_spike)
            elif norm_flag:
                event = StepEvent("grad_norm_spike", step, value, norm, norm_limit, self.config.on_grad_norm_spike)
        if event is None:
            if finite and not update.skipped:
                self._loss.values.append(value)
                self._norm.values.append(norm)
            return None
        self.counts[event.kind] += 1
        if event.kind != "non_finite":
            self.counts["spikes"] += 1
        if event.action == "skip":
            self.counts["skipped"] += 1
            self.counts["spike_skipped"] += event.kind != "non_finite"
        self._recent.append((self._executed, event))
        return event

    def record(
        self,
        event: StepEvent,
        loader: DistributedDataLoader,
        layer_grad_norms: dict[str, dict[str, float]] | None = None,
    ) -> TrainingDiverged | None:
        """Write ``event``'s batch (read by ``loader`` just before) and the per-layer norms of the steps up to
        it to the ledger; returns the error that stops the run when the policy is ``abort`` or ``max_events``
        is reached (the caller logs the step, then raises it)."""
        position = loader.consumed - loader.global_batch
        entry = BadBatch(
            step=event.step,
            position=position,
            global_batch=loader.global_batch,
            seed=loader.seed,
            samples=global_sample_indices(loader, position),
            source=data_source(loader),
            event=event.kind,
            loss=event.loss,
            grad_norm=event.grad_norm,
            threshold=event.threshold,
            layer_grad_norms=layer_grad_norms or None,
        )
        self.ledger.add(entry)
        if self._bad is not None:
            self._bad.add(position)
        if self.announce and event.action != "abort" and (event.kind, event.action) != ("non_finite", "skip"):
            action = {"skip": "update skipped", "rollback": "rolling back to the last checkpoint"}[event.action]
            _logger.warning("%s: %s; batch added to %s", event.describe(), action, self.ledger.path or "the ledger")
        if event.action == "abort":
            return TrainingDiverged(
                f"training stopped: {event.describe()} (trainer.spikes policy 'abort'); the batch is in the "
                f"bad-batch ledger {self.ledger.path or '(in memory)'} and is stepped over when the run resumes"
            )
        summary = self.too_many()
        return None if summary is None else TrainingDiverged(summary)

    @property
    def spike_skips(self) -> int:
        """Spikes whose update was dropped (``StepHealth`` counts the non-finite skips)."""
        return self.counts["spike_skipped"]

    def rollback_source(self, save_dir: Path | None, loaded: Path | None, event: StepEvent) -> Path:
        """The checkpoint a rollback reloads: the newest in ``save_dir``, else the one the run started from."""
        if save_dir is not None and holds_checkpoints(save_dir):
            return find_checkpoint(save_dir)
        if loaded is not None:
            return loaded
        raise TrainingDiverged(
            f"training stopped: {event.describe()} calls for a rollback, but no checkpoint was saved yet "
            f"(trainer.save_dir {save_dir}); lower trainer.save_interval or choose 'skip' or 'abort'"
        )

    def rolled_back(self, step: int) -> None:
        """The run now stands at checkpoint ``step``: the next ``rollback_lr_steps`` steps train slower."""
        self.counts["rolled_back"] += 1
        self._lr_until = step + self.config.rollback_lr_steps

    def too_many(self) -> str | None:
        """The summary line that stops the run when ``max_events`` fell within ``event_window`` steps."""
        limit = self.config.max_events
        while self._recent and self._recent[0][0] <= self._executed - self.config.event_window:
            self._recent.popleft()
        if limit is None or len(self._recent) < limit:
            return None
        kinds = Counter(e.kind for _, e in self._recent)
        parts = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(kinds.items()))
        last = self._recent[-1][1]
        return (
            f"training stopped: {len(self._recent)} bad steps within {self.config.event_window} steps "
            f"(trainer.spikes.max_events = {limit}): {parts}; last: {last.describe()}; "
            f"{self.counts['skipped']} skipped, {self.counts['rolled_back']} rolled back"
        )

    def metrics(self) -> dict[str, float]:
        """Running totals of this process for the metrics sinks."""
        return {
            "events/skipped": float(self.counts["skipped"]),
            "events/rolled_back": float(self.counts["rolled_back"]),
            "events/spikes": float(self.counts["spikes"]),
            "events/non_finite": float(self.counts["non_finite"]),
            "events/ledger_skipped": float(self.counts["ledger_skipped"]),
        }


def for_health(update: OptimizerStepResult, event: StepEvent | None) -> OptimizerStepResult:
    """``update`` as the non-finite bookkeeping should see it: a spike's dropped update is no non-finite skip."""
    if event is not None and event.kind != "non_finite" and update.skipped:
        return replace(update, skipped=False)
    return update


def _scaled(group: TrainingGroupConfig, factor: float) -> TrainingGroupConfig:
    schedule = group.learning_rate_schedule
    scaled = schedule.model_copy(
        update={
            "learning_rate": schedule.learning_rate * factor,
            "learning_rate_minimum": schedule.learning_rate_minimum * factor,
        }
    )
    return group.model_copy(update={"learning_rate_schedule": scaled})


def _norm_before_step(module: ParallelModule, optimizer: Optimizer) -> torch.Tensor:
    """The global gradient norm the optimizer is about to compute (unscaled), from the module's final grads."""
    grads = [g.float() for g in (module.main_grad(n) for n in module.names_counted_in_norm()) if g is not None]
    group = dist.group.WORLD if optimizer.sharded else module.topology.model_group
    norm = global_grad_norm(grads, group, module.topology.device)
    return norm / optimizer.loss_scale
