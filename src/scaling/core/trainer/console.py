"""What a person watching a run reads: one progress line per log interval and a start-up block.

Both come from global rank 0 only, through the ``scaling`` logger (so they go wherever the text log goes,
terminal or not, and a redirected log file reads the same as the terminal). Rank 0 can write the
progress line without asking any other rank: every field is known there — the step loss is broadcast to
every pipeline stage and averaged over data-parallel ranks by ``train_step``, the gradient norm is
global, learning rates are computed locally, and rank 0, a first pipeline stage, reads the input tokens.
The parameter counts of the start-up block are the one exception: each rank holds part of the model,
so they are summed over the model-parallel ranks once, before the first step (a collective every rank
takes part in).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist

from scaling.core.pipeline.module import ParallelModule

__all__ = ["format_count", "format_duration", "parameter_counts", "progress_line", "startup_block"]


def format_count(value: float) -> str:
    """``12345 -> "12.3k"``, ``1.5e9 -> "1.5G"``, ``812 -> "812"``: short, and enough to compare runs."""
    for limit, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.1f}{suffix}"
    return f"{value:.1f}" if abs(value) < 10 and not float(value).is_integer() else f"{value:.0f}"


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (``"?"`` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def progress_line(
    *,
    step: int,
    total: int,
    loss: float,
    learning_rate: float,
    grad_norm: float,
    seconds_per_step: float,
    tokens_per_s: float | None,
    samples_per_s: float,
    skipped_steps: int = 0,
    eval_loss: float | None = None,
) -> str:
    """``step 12/100 | loss 3.4521 | lr 1.0e-04 | grad norm 0.812 | 12.3k tokens/s | 0.41 s/step | ETA 0:00:36``.

    Samples/s stands in for tokens/s when the batches carry no ``tokens``; ``skipped N`` appears once a
    step was skipped, ``eval loss`` when this step evaluated.
    """
    if tokens_per_s:
        throughput = f"{format_count(tokens_per_s)} tokens/s"
    else:
        throughput = f"{format_count(samples_per_s)} samples/s"
    parts = [
        f"step {step}/{total}",
        f"loss {loss:.4f}",
        f"lr {learning_rate:.1e}",
        f"grad norm {grad_norm:.3g}",
        throughput,
        f"{seconds_per_step:.2f} s/step",
        f"ETA {format_duration((total - step) * seconds_per_step)}",
    ]
    if skipped_steps:
        parts.append(f"skipped {skipped_steps}")
    if eval_loss is not None:
        parts.append(f"eval loss {eval_loss:.2f}")
    return " | ".join(parts)


def parameter_counts(module: ParallelModule) -> tuple[int, int]:
    """(all, trainable) parameters of the whole model, the same on every rank; collective over the model group.

    Each weight counts once: a tensor-parallel slice on every tp rank (each holds a different part), a
    replicated parameter on tp rank 0 only, a tied weight only where it is first held (not its copies on
    later stages). Data-parallel replicas hold the same weights and are not added.
    """
    topology = module.topology
    total = trainable = 0
    for record in module.param_table.values():
        if module.is_tied_copy(record.name) or (record.is_replicated and topology.tp_rank != 0):
            continue
        total += record.local_numel
        trainable += record.local_numel if record.trainable else 0
    counts = torch.tensor([total, trainable], dtype=torch.int64, device=topology.device)
    if topology.tp_size * topology.pp_size > 1:
        dist.all_reduce(counts, group=topology.model_group)
    return int(counts[0]), int(counts[1])


def startup_block(
    *,
    total: int,
    trainable: int,
    layout: Mapping[str, object],
    log_dir: Path | str | None,
    save_dir: Path | str | None,
    save_interval: int | None,
    start_step: int,
    train_iterations: int,
    memory: str | None = None,
) -> str:
    """The lines a run starts with: model size, layout, the expected memory per rank, where logs and
    checkpoints go, and how far to train."""
    if trainable == total:
        size = f"model: {format_count(total)} parameters ({total:,}), all trainable"
    else:
        share = 100.0 * trainable / total if total else 0.0
        size = (
            f"model: {format_count(total)} parameters ({total:,}), {format_count(trainable)} trainable "
            f"({trainable:,}, {share:.2f}%)"
        )
    shape = ", ".join(f"{key} {value}" for key, value in layout.items())
    saving = "not saved (trainer.save_dir is unset)"
    if save_dir is not None:
        every = f"every {save_interval} steps and " if save_interval is not None else ""
        saving = f"{save_dir} ({every}at the end)"
    logs = f"{log_dir} (metrics.jsonl)" if log_dir is not None else "console only (logger.log_dir is unset)"
    start = f"from step {start_step} " if start_step else ""
    return "\n".join(
        [
            size,
            f"layout: {shape}",
            *([memory] if memory else []),
            f"logs: {logs}",
            f"checkpoints: {saving}",
            f"training {start}to step {train_iterations}",
        ]
    )
