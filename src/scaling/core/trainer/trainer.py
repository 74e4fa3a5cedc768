"""The training loop: data -> train_step -> optimizer -> metrics, with evaluation, checkpoints and signals.

Every ``log_interval`` steps (and the first and last) the loop logs loss, learning rate per group, gradient
norm (before and after clipping), loss scale, skipped steps, step time, samples/s and tokens/s from the
rank that holds the metrics (last pipeline stage, dp 0, tp 0); global rank 0 prints one progress line to
the console and, when stderr is a terminal, draws a progress bar (see :mod:`scaling.core.trainer.console`).
Steps with a non-finite loss or gradient norm are skipped and counted, and stop the run when they do not
end (:mod:`scaling.core.trainer.nonfinite`); spikes, the policy per kind of bad step (skip, rollback,
abort) and the bad-batch ledger are :mod:`scaling.core.trainer.spikes`; the per-layer gradient norms of the
steps around such an event, :mod:`scaling.core.trainer.layer_norms`. Every record carries the goodput and
the time lost to restarts, rollbacks and checkpoint stalls (:mod:`scaling.core.runner.goodput`). On SIGTERM
or SIGINT the loop finishes the current step, saves a checkpoint and returns; all ranks agree on stopping
through one tiny all-reduce per step.

On the steps logged at the interval (and the first and last) the record also holds the honest-metrics set
(:mod:`scaling.core.profiler`, docs/metrics.md): model and hardware TFLOP/s per device, MFU and HFU
against ``trainer.mfu_device`` (when the model's FLOPs per token are given), the time split of the step
(data, forward, backward, optimizer, pipeline wait, exposed gradient sync), the peak memory over ranks,
and the straggler report: one small all-gather of every rank's step and busy time, with a warning on
rank 0 when the slowest rank lags the median by more than ``trainer.straggler_threshold``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from scaling.core.checkpoint import check_save_dir, load_checkpoint, save_checkpoint
from scaling.core.checkpoint.async_save import AsyncCheckpointer
from scaling.core.checkpoint.discovery import verify_checkpoint
from scaling.core.checkpoint.preflight import expected_checkpoint_bytes
from scaling.core.checkpoint.resume import continues_to, resume_source
from scaling.core.config import ConfigError
from scaling.core.data.loader import DistributedDataLoader
from scaling.core.logging import MetricsLogger, get_logger
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.module import ParallelModule
from scaling.core.profiler import (
    COMMUNICATION_PHASES,
    IntervalTimes,
    RankSample,
    StepTimer,
    TokenFlops,
    gather_rank_samples,
    peak_flops_for,
    peak_memory_bytes,
    reset_peak_memory,
    throughput_metrics,
)
from scaling.core.runner.goodput import GoodputClock
from scaling.core.runner.restarts import resume_after_restart
from scaling.core.topology.rng import RngTracker
from scaling.core.trainer.config import TrainerConfig
from scaling.core.trainer.console import parameter_counts, progress_line, startup_block
from scaling.core.trainer.context import TrainingContext
from scaling.core.trainer.hang import hang_watchdog
from scaling.core.trainer.layer_norms import LayerNormRing
from scaling.core.trainer.nonfinite import StepHealth
from scaling.core.trainer.spikes import StepGuard, for_health
from scaling.core.trainer.watchdog import StallWatchdog
from scaling.core.zero.memory import estimate_memory, format_memory_line, param_sizes
from scaling.core.zero.policy import Offload

__all__ = ["Trainer"]

_logger = get_logger("scaling.trainer")


def _tokens_in(batches: list[Any]) -> int:
    """Input tokens in this rank's micro-batches (batches that are dicts with a "tokens" tensor)."""
    return sum(int(b["tokens"].numel()) for b in batches if isinstance(b, Mapping) and "tokens" in b)


class Trainer:
    def __init__(
        self,
        config: TrainerConfig,
        context: TrainingContext,
        module: ParallelModule,
        optimizer: Optimizer,
        train_data: DistributedDataLoader,
        eval_data: DistributedDataLoader | None = None,
        metrics: MetricsLogger | None = None,
        rng_tracker: RngTracker | None = None,
        checkpoint_files: Mapping[str, str | Path] | None = None,
        flops: TokenFlops | None = None,
    ) -> None:
        self.config = resume_after_restart(config)  # a restarted attempt (--max-restarts) continues from save_dir
        self.context = context
        self.module = module
        self.optimizer = optimizer
        self.train_data = train_data
        self.eval_data = eval_data
        self.rng_tracker = rng_tracker
        self.checkpoint_files = dict(checkpoint_files or {})  # copied into every checkpoint (a tokenizer)
        topo = context.topology
        self.is_logging_rank = topo.is_last_pipe_stage and topo.dp_rank == 0 and topo.tp_rank == 0
        self.metrics = metrics
        self._stop_requested = False
        self.stop_signal: int | None = None  # the signal that asked this rank to stop, if one did
        self.history: list[dict[str, float]] = []  # what was logged, for callers and tests
        self._saver: AsyncCheckpointer | None = None  # trainer.async_save: created by run() on every rank
        self.flops = flops  # model and hardware FLOPs per token, for TFLOP/s, MFU and HFU; none when unknown
        self.peak_flops: float | None = None  # one device's peak for the compute dtype (trainer.mfu_device)

    # Checkpoints -----------------------------------------------------------------------------------
    def _rank_state(self) -> dict[str, torch.Tensor]:
        """What only this rank knows: its random streams. The data position is global (``_run_state``)."""
        state = {"torch_rng": torch.get_rng_state()}
        if self.rng_tracker is not None:
            state.update({f"tracker_{k}": v for k, v in self.rng_tracker.state_dict().items()})
        return state

    def _run_state(self) -> dict[str, Any]:
        """Facts of the whole run, stored once in the manifest: samples consumed and the data seed."""
        return {"data": self.train_data.state_dict()}

    def save(self, background: bool = False) -> None:
        """Save the current step; ``background`` (with ``async_save``) returns once host copies are taken."""
        if self.config.save_dir is None:
            return
        saver = partial(self._saver.save, background=background) if self._saver is not None else save_checkpoint
        saver(
            self.config.save_dir,
            self.context.step,
            self.module,
            self.optimizer,
            config=self.context.config.to_dict(),
            rank_state=self._rank_state(),
            run_state=self._run_state(),
            keep_last=self.config.keep_last_n_checkpoints,
            files=self.checkpoint_files,
        )
        _logger.info("saved checkpoint of step %d to %s", self.context.step, self.config.save_dir)

    def _prepare_checkpoints(self) -> bool:
        """Checks before the first step, then the load; False when the run is already complete.

        Refuses (before anything trains or is written) a run that would start fresh beside existing
        checkpoints, a checkpoint beyond ``train_iterations``, and a ``save_dir`` that cannot take one
        more checkpoint.
        """
        source = self._resume_source()
        if source is not None and self.config.load == "everything":
            step = int(verify_checkpoint(source)["step"])
            if not continues_to(step, self.config.train_iterations, source):
                if self.context.topology.global_rank == 0:
                    _logger.warning(
                        "%s is at step %d = trainer.train_iterations: the run is complete, nothing to do",
                        source,
                        step,
                    )
                self.context.step = step  # where the run stands: complete, not stopped early
                return False
        if self.config.save_dir is not None:
            check_save_dir(self.config.save_dir, self._checkpoint_bytes())
        self.load()
        return True

    def _checkpoint_bytes(self) -> int:
        """The size of one checkpoint of this model and optimizer (collective: sums over model-parallel ranks)."""
        weights = optimizer_state = 0
        if self.context.topology.dp_rank == 0:
            weight_bytes = torch.empty((), dtype=self.module.dtype).element_size()
            for record in self.module.param_table.values():
                if not self.module.is_tied_copy(record.name):
                    weights += record.local_numel * weight_bytes
                    optimizer_state += record.local_numel if record.trainable else 0
        total = torch.tensor([weights, optimizer_state], dtype=torch.float64, device=self.context.topology.device)
        dist.all_reduce(total)
        return int(total[0]) + expected_checkpoint_bytes(int(total[1]), 0, with_optimizer=True)

    def _resume_source(self) -> Path | None:
        """The checkpoint to load, None to start fresh; resolved once (a broken 'latest' is reported once)."""
        if not hasattr(self, "_source"):
            c = self.config
            self._source = resume_source(
                c.load_dir,
                c.save_dir,
                allow_fresh_start=c.allow_fresh_start_beside_checkpoints,
                require_checkpoint=c.assert_checkpoint_loaded,
            )
        return self._source

    def load(self, source: Path | None = None, mode: str | None = None) -> bool:
        """Restore as configured; returns whether a checkpoint was loaded.

        Only a ``load_dir`` that does not exist or holds nothing a checkpoint leaves means "start fresh"
        (and only when ``save_dir`` holds no checkpoints, see :func:`resume_source`); any other problem
        raises ``CheckpointError`` naming the file. With ``load: everything`` the data position comes
        from the manifest (one global value, so any number of data-parallel ranks resumes at the same
        sample; older checkpoints: from the rank state). Random streams: see
        :func:`~scaling.core.checkpoint.io.saved_rank_for`; a rank with no saved stream keeps the ones it
        was initialised with from the seed and its coordinates. ``source`` and ``mode`` (a rollback): instead
        of the resume source and ``trainer.load``.
        """
        if self._saver is not None:
            self._saver.wait()  # a reload (rollback) sees the save in flight published
        source = self._resume_source() if source is None else source
        if source is None:
            if self.config.load_dir is not None:
                _logger.info("no checkpoint in %s yet: starting from scratch", self.config.load_dir)
            return False
        mode = self.config.load if mode is None else mode
        info = load_checkpoint(
            source,
            self.module,
            self.optimizer,
            load_optimizer=mode != "weights",
            missing=self.config.load_missing_weights,
        )
        if mode == "everything":
            self.context.step = info.step
            state = info.rank_state
            data = info.run_state.get("data")
            if data is None and "data_consumed" in state:  # written before the position was global
                data = {"consumed": int(state["data_consumed"]), "seed": self.train_data.seed}
            if data is not None:
                try:
                    self.train_data.load_state_dict({"consumed": int(data["consumed"]), "seed": int(data["seed"])})
                except ValueError as exc:
                    raise ConfigError(f"resuming from {info.path}: {exc}") from None
            if "torch_rng" in state:
                torch.set_rng_state(state["torch_rng"])
            if self.rng_tracker is not None and "tracker_default" in state:
                self.rng_tracker.load_state_dict(
                    {"default": state["tracker_default"], "tensor_parallel": state["tracker_tensor_parallel"]}
                )
            self.context.consumed_samples = self.train_data.consumed
        _logger.info("loaded %s from %s (step %d)", mode, info.path, info.step)
        return True

    # Signals ---------------------------------------------------------------------------------------
    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        # Debug only: every rank gets the signal, and rank 0 says once, at the end, where the run stopped.
        _logger.debug("received signal %d: saving a checkpoint after this step and stopping", signum)
        self._stop_requested = True
        self.stop_signal = signum

    def _all_agree_to_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self.context.topology.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    # Watchdog --------------------------------------------------------------------------------------
    def _start_watchdog(self) -> StallWatchdog:
        topo = self.context.topology
        where = f"rank {topo.global_rank} (pp {topo.pp_rank}, dp {topo.dp_rank}, tp {topo.tp_rank})"
        return StallWatchdog(
            self.config.stall_warning_s,
            where,
            collective_timeout_s=topo.config.collective_timeout_s,
            watch_parent="RANK" in os.environ,
            hang=hang_watchdog(self.config.hang_timeout_s, where, self.module, self._run_dir(), topo),
        ).start()

    def _run_dir(self) -> Path:
        """Where a run's own reports go (hang dumps): ``save_dir``, else the log directory, else the cwd."""
        log_dir = getattr(getattr(self.context.config, "logger", None), "log_dir", None)
        return Path(self.config.save_dir or log_dir or ".")

    # The loop --------------------------------------------------------------------------------------
    def evaluate(self) -> float:
        """Mean loss over ``eval_iterations`` global batches of the eval data (the same on every rank)."""
        assert self.eval_data is not None
        losses = [self.module.eval_step(self.eval_data.next_batches(), step=self.context.step).loss]
        for _ in range(self.config.eval_iterations - 1):
            losses.append(self.module.eval_step(self.eval_data.next_batches(), step=self.context.step).loss)
        return float(torch.stack(losses).mean())

    def _announce_start(self) -> None:
        """The start-up block on rank 0: model size (summed over model-parallel ranks: every rank takes part),
        layout, and where logs and checkpoints go."""
        topo = self.context.topology
        total, trainable = parameter_counts(self.module)
        if topo.global_rank != 0:
            return
        run_config = self.context.config
        precision = getattr(getattr(run_config, "precision", None), "precision", "float32")
        precision = getattr(precision, "value", precision)  # the enum's name in the config
        log_dir = getattr(getattr(run_config, "logger", None), "log_dir", None)
        layout = {
            "tp": topo.tp_size,
            "pp": topo.pp_size,
            "dp": topo.dp_size,
            "micro batch": topo.config.micro_batch,
            "gradient accumulation": topo.config.micro_batches,
            "global batch": topo.config.global_batch,
            "precision": precision,
            "ZeRO": "off" if self.optimizer.config.zero_stage == 0 else f"stage {self.optimizer.config.zero_stage}",
        }
        block = startup_block(
            total=total,
            trainable=trainable,
            layout=layout,
            log_dir=log_dir,
            save_dir=self.config.save_dir,
            save_interval=self.config.save_interval,
            start_step=self.context.step,
            train_iterations=self.config.train_iterations,
            memory=self._memory_line(),
        )
        _logger.info("%s", block)

    def _memory_line(self) -> str:
        """This rank's expected bytes for parameters, gradients, optimizer state and the peak, from the
        parameter table, the ZeRO stage, the precision and the layout (a pure function; nothing measured)."""
        module, config = self.module, self.optimizer.config
        reduce_fp32 = getattr(getattr(self.context.config, "precision", None), "reduce_grads_in_fp32", True)
        estimate = estimate_memory(
            param_sizes(module.param_table.values()),
            zero_stage=config.zero_stage,
            dp=self.context.topology.dp_size,
            compute_dtype=module.dtype,
            reduce_dtype=torch.float32 if reduce_fp32 else None,
            gradient_accumulation_steps=self.context.topology.config.micro_batches,
            offload=config.offload != Offload.NONE,
            reshard_after_forward=module.sharding.reshard if config.zero_stage else None,
        )
        return format_memory_line(estimate)

    def run(self) -> TrainingContext:
        """Train to ``train_iterations``; returns the context. Raises :class:`TrainingDiverged` (on every rank
        alike) when steps stay non-finite; see :mod:`scaling.core.trainer.nonfinite`.

        The console line (:func:`~scaling.core.trainer.console.progress_line`) is written by global rank 0,
        where every one of its fields is known without communication; the metrics sinks are written by the
        metrics rank (last pipeline stage, dp 0, tp 0), which also has the loss function's own metrics.
        """
        if not self._prepare_checkpoints():  # resume and save_dir checks, then the load
            return self.context  # the checkpoint already reached train_iterations
        if self.config.async_save and self.config.save_dir is not None and self._saver is None:
            self._saver = AsyncCheckpointer()  # collective: its own gloo group for the writer's agreement
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, self._request_stop)
        topo = self.context.topology
        watchdog = self._start_watchdog()
        is_console_rank = topo.global_rank == 0
        health = StepHealth(self.config.max_consecutive_skips, announce=is_console_rank)
        loss_scaling = self.optimizer.scaler is not None
        guard = StepGuard.for_run(self.config.spikes, self.config.save_dir, loss_scaling=loss_scaling,
                                  announce=is_console_rank)  # fmt: skip
        norms = LayerNormRing(self.module, self.optimizer, self.config.spikes.layer_norm_steps)
        self._announce_start()
        timer = StepTimer(topo.device)  # the time split of the logged steps (scaling.core.profiler)
        timing = contextlib.ExitStack()
        rank_times = IntervalTimes()  # this rank's step and busy times since the last straggler report
        if self.flops is not None:
            peak = peak_flops_for(self.config.mfu_device, topo.device, self.module.dtype)
            self.peak_flops = peak[0] if peak is not None else None
            if peak is not None and is_console_rank:
                _logger.info("MFU against %s: %.4g TFLOP/s (%s)", peak[1], peak[0] / 1e12, self.module.dtype)
        progress = None
        redirect = contextlib.ExitStack()
        if is_console_rank and sys.stderr.isatty():  # the bar for terminals; log lines are written above it
            progress = tqdm(total=self.config.train_iterations, initial=self.context.step, desc="training")
            redirect.enter_context(logging_redirect_tqdm([get_logger()]))
        window_start, window_steps, window_tokens = time.perf_counter(), 0, 0  # since the last console line
        goodput = GoodputClock.for_attempt(self.metrics.config.log_dir if self.metrics else None, self.context.step)
        try:
            timing.enter_context(timer.attach(self.module))  # after the watchdog: its heartbeat hook is chained
            while self.context.step < self.config.train_iterations:
                step = self.context.step
                report = self._at_report(step + 1)  # a log step every rank knows of in advance: timed, gathered
                timer.start_step(report)  # on CUDA the timed steps synchronize at each phase boundary
                start = time.perf_counter()
                watchdog.beat("data", step)
                guard.step_over_bad_batches(self.train_data)  # batches in the bad-batch ledger are not replayed
                batches = self.train_data.next_batches()
                timer.enter("loss_sync")  # until the first instruction: the schedule, the loss weighting
                watchdog.beat("forward/backward", step)
                result = self.module.train_step(batches, step=step, loss_scale=self.optimizer.loss_scale)
                timer.enter("optimizer")
                watchdog.beat("optimizer", step)
                with guard.learning_rate(self.optimizer, step):  # lowered for a while after a rollback
                    update = self.optimizer.step(step, guard.loss_for_update(result.loss, self.module, self.optimizer))
                timer.enter("other")
                norms.measure(step + 1, update)  # per-layer gradient norms, kept for the steps around an event
                self.context.step += 1
                self.context.consumed_samples = self.train_data.consumed
                event = guard.judge(self.context.step, update, result.loss)  # spikes and non-finite steps
                diverged = health.record(self.context.step, for_health(update, event), result.loss,
                                         loss_scaling=loss_scaling)  # fmt: skip
                if event is not None:
                    layer_norms = norms.event() if norms.enabled else None  # the ring goes into the ledger entry
                    diverged = guard.record(event, self.train_data, layer_norms) or diverged  # abort, max_events
                split = timer.stop_step()  # seconds per phase, None on an untimed step
                seconds = time.perf_counter() - start
                rank_times.add(seconds, seconds - sum(split[p] for p in COMMUNICATION_PHASES) if split else None)
                tokens = _tokens_in(batches) * topo.dp_size
                window_steps, window_tokens = window_steps + 1, window_tokens + tokens
                last = self.context.step == self.config.train_iterations
                at_log = self.context.step % self.config.log_interval == 0 or self.context.step == 1 or last
                at_log = at_log or diverged is not None  # the step that stops the run is logged, then raised
                at_log = at_log or event is not None or norms.logging  # an event and the steps after it
                record: dict[str, float] = {}
                if at_log:
                    record = {
                        "loss": float(result.loss),
                        "grad_norm": update.grad_norm_value,
                        "grad_norm_clipped": float(update.grad_norm_clipped),
                        "loss_scale": update.loss_scale,
                        "skipped": float(update.skipped),
                        "skipped_steps": float(health.skipped_steps + guard.spike_skips),
                        **guard.metrics(),  # skipped, rolled-back and spike events (scaling.core.trainer.spikes)
                        "step_time_s": seconds,
                        "samples_per_s": topo.config.global_batch / seconds,
                        "tokens_per_s": tokens / seconds,
                        **goodput.metrics(),  # time lost to restarts, rollbacks, saves (scaling.core.runner.goodput)
                        **norms.for_record(event is not None),  # per-layer norms at and after an event
                        **{f"lr/{name}": lr for name, lr in update.learning_rates.items()},
                        **{k: float(v) for k, v in result.metrics.items()},
                    }
                    if self.flops is not None:
                        per_s = tokens / seconds
                        record.update(throughput_metrics(self.flops, per_s, topo.world_size, self.peak_flops))
                    if split is not None:
                        record.update({f"time/{phase}_s": value for phase, value in split.items()})
                    if report:
                        record.update(self._straggler_report(rank_times))
                    self._log(record)
                    if progress is not None:
                        progress.set_postfix(loss=f"{record['loss']:.4f}")
                if progress is not None:
                    progress.update(1)
                interval = self.config.eval_interval
                eval_loss = None
                if self.eval_data is not None and interval is not None and self.context.step % interval == 0:
                    watchdog.beat("evaluation", step)
                    eval_loss = self.evaluate()
                    self._log({"eval/loss": eval_loss, **goodput.metrics()})
                if is_console_rank and (at_log or eval_loss is not None):
                    elapsed = time.perf_counter() - window_start
                    per_step = elapsed / window_steps
                    _logger.info(
                        "%s",
                        progress_line(
                            step=self.context.step,
                            total=self.config.train_iterations,
                            loss=record["loss"] if record else float(result.loss),
                            learning_rate=next(iter(update.learning_rates.values()), 0.0),
                            grad_norm=update.grad_norm_value,
                            seconds_per_step=per_step,
                            tokens_per_s=window_tokens / elapsed if window_tokens else None,
                            samples_per_s=window_steps * topo.config.global_batch / elapsed,
                            skipped_steps=health.skipped_steps + guard.spike_skips,
                            eval_loss=eval_loss,
                        ),
                    )
                    window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
                if diverged is not None:
                    raise diverged
                if event is not None and event.action == "rollback":
                    watchdog.beat("rollback", step)
                    self.load(guard.rollback_source(self.config.save_dir, self._resume_source(), event), "everything")
                    guard.rolled_back(self.context.step)
                    goodput.rolled_back(self.context.step)  # the discarded steps and the reload are lost
                    continue
                watchdog.beat("end-of-step all-reduce", step)
                stop = self._all_agree_to_stop()
                at_interval = (
                    self.config.save_interval is not None and self.context.step % self.config.save_interval == 0
                )
                if at_interval or stop or last:
                    watchdog.beat("save", step)
                    with goodput.saving():  # the loop's time blocked in the save is lost to checkpoints
                        self.save(background=at_interval and not (stop or last))  # final/signal saves: synchronous
                    goodput.checkpointed(self.context.step)
                goodput.reached(self.context.step)
                if stop:
                    break
        finally:
            timing.close()  # the module's instruction hook and grad sync as they were
            if self._saver is not None:
                self._saver.close()  # the save in flight finishes (or fails, logged) before the run returns
            watchdog.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
            redirect.close()
            if progress is not None:
                progress.close()
        return self.context

    def _at_report(self, step: int) -> bool:
        """Whether finishing ``step`` logs at the interval, first or last: the same answer on every rank
        before the step runs (steps logged because of an event are known only after it)."""
        return step % self.config.log_interval == 0 or step == 1 or step == self.config.train_iterations

    def _straggler_report(self, interval: IntervalTimes) -> dict[str, float]:
        """Gather every rank's mean step and busy time and peak memory (collective: every rank, report
        steps only); rank 0 warns about a straggler. Starts the next interval and memory peak."""
        device = self.context.topology.device
        sample = RankSample(interval.mean_step_s(), interval.mean_busy_s(), peak_memory_bytes(device))
        report = gather_rank_samples(sample, device)
        interval.reset()
        reset_peak_memory(device)
        line = report.warning(self.config.straggler_threshold)
        if line is not None and self.context.topology.global_rank == 0:
            _logger.warning("%s", line)
        return report.metrics()

    def _log(self, record: dict[str, float]) -> None:
        entry = {"step": float(self.context.step), **record}
        self.history.append(entry)
        if self.is_logging_rank and self.metrics is not None:
            self.metrics.log(self.context.step, record)
