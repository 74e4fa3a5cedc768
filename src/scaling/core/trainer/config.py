"""``TrainerConfig``: how long to train, when to evaluate and save, and what to resume from."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from scaling.core.config import BaseConfig, InvalidCombination
from scaling.core.trainer.spikes import SpikeConfig

__all__ = ["TrainerConfig"]


class TrainerConfig(BaseConfig):
    """The training loop of a run."""

    train_iterations: int = Field(100, ge=1, description="Optimizer steps to train for (in total, over resumptions).")
    seed: int = Field(42, description="Seed of initialisation, data order and dropout.")
    save_dir: Path | None = Field(None, description="Where checkpoints are written; no checkpoints when unset.")
    save_interval: int | None = Field(
        None, ge=1, description="Save every N steps (and at the end and on SIGTERM/SIGINT); only at those when unset."
    )
    keep_last_n_checkpoints: int | None = Field(
        None, ge=1, description="Delete older checkpoints beyond the newest N; keep all when unset."
    )
    async_save: bool = Field(
        False,
        description="Write interval checkpoints in the background: the step only copies this rank's shards to "
        "host memory, a writer thread writes and publishes them while training continues (at most one in "
        "flight). The final save and a save on SIGTERM/SIGINT stay synchronous.",
    )
    load_dir: Path | None = Field(
        None,
        description="Checkpoint to start from: a global_step directory, or a save directory whose 'latest' "
        "file is followed. Commonly the same as save_dir, to resume.",
    )
    load: Literal["weights", "weights_and_optimizer", "everything"] = Field(
        "everything",
        description="What to restore: 'weights' (finetuning: step and data start at 0), 'weights_and_optimizer', "
        "or 'everything' (also step, data position and RNG states: an exact resumption).",
    )
    load_missing_weights: Literal["error", "keep_initialised"] = Field(
        "error",
        description="A model parameter the loaded checkpoint lacks: 'error', or 'keep_initialised' (finetuning a "
        "base checkpoint with adapters or LoRA, whose weights the base cannot hold).",
    )
    assert_checkpoint_loaded: bool = Field(
        False, description="Fail when load_dir holds no checkpoint instead of starting from scratch."
    )
    allow_fresh_start_beside_checkpoints: bool = Field(
        False,
        description="Start from scratch although save_dir already holds checkpoints (load_dir unset or empty). "
        "Off, such a run is refused: a typo in load_dir must not train anew and let keep_last_n_checkpoints "
        "delete the real checkpoints. On, older checkpoints there may be deleted by keep_last_n_checkpoints.",
    )
    eval_interval: int | None = Field(None, ge=1, description="Evaluate every N steps; never when unset.")
    eval_iterations: int = Field(1, ge=1, description="Global batches per evaluation.")
    log_interval: int = Field(
        1, ge=1, description="Write metrics, and a progress line to the console, every N steps (and the first)."
    )
    stall_warning_s: float = Field(
        60.0,
        gt=0,
        description="Warn (naming the rank, its coordinates, the step and its phase) when a rank makes no "
        "progress for this many seconds: it is usually waiting for a stopped or slow rank, and fails only "
        "when topology.collective_timeout_s passes.",
    )
    hang_timeout_s: float | None = Field(
        60.0,
        gt=0,
        description="When no rank makes progress for this many seconds (topology.collective_timeout_s while "
        "saving), every rank writes its stacks and recent pipeline instructions and collectives to "
        "<save_dir or log_dir>/hang/rank_N.txt and the run exits with one line naming the rank(s) that did not "
        "arrive. Unset: no hang detection (the run fails when a collective times out).",
    )
    max_consecutive_skips: int = Field(
        5,
        ge=1,
        description="Stop the run after this many steps in a row with a non-finite loss or gradient norm "
        "(skipped, not applied). fp16 overflows follow the loss scaler instead: only one at its minimum "
        "scale stops the run.",
    )
    mfu_device: str = Field(
        "auto",
        description="The device MFU and HFU are reported against: 'auto' (the device table's entry for the local "
        "GPU; no MFU on CPUs and GPUs the table does not know), a table name ('h100', 'a100', ...), or "
        "'measured' (what a short matmul in the compute dtype reaches on this machine, timed once at start).",
    )
    straggler_threshold: float = Field(
        0.2,
        gt=0,
        description="Warn when the slowest rank's busy time (step time minus time waiting on communication), "
        "gathered every log_interval, exceeds the median rank's by more than this fraction.",
    )
    spikes: SpikeConfig = Field(
        default_factory=SpikeConfig,
        description="Loss and gradient-norm spikes, what each bad step does (skip, rollback, abort), how many "
        "stop the run, and the bad-batch ledger.",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainerConfig:
        if self.save_interval is not None and self.save_dir is None:
            raise InvalidCombination("save_interval is set but save_dir is not", "save_dir")
        if self.assert_checkpoint_loaded and self.load_dir is None:
            raise InvalidCombination("assert_checkpoint_loaded needs load_dir", "load_dir")
        if self.spikes.uses_rollback and self.save_dir is None and self.load_dir is None:
            raise InvalidCombination("a 'rollback' policy in trainer.spikes needs save_dir (or load_dir)", "save_dir")
        if self.mfu_device not in ("auto", "measured"):
            from scaling.core.planner.devices import DEVICES, device_spec  # the table, only when one is named

            try:
                device_spec(self.mfu_device)
            except KeyError:
                raise InvalidCombination(
                    f"unknown device {self.mfu_device!r}: give 'auto', 'measured' or one of "
                    f"{', '.join(sorted(DEVICES))}",
                    "mfu_device",
                ) from None
        return self
