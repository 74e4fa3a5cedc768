"""Checks that run in the launching process before any worker starts: bad input fails in one line, at once.

Everything a run needs that can be looked at without building the model is looked at here: the config
itself (loaded and validated before this is called: pipeline stages <= layers, wandb installed), the data
files (they exist, are readable, and each ``.bin`` agrees with its ``.idx``; see ``_datasets``), the device
and the save directory. Otherwise each of these fails later in every rank at once, as one traceback per
rank, after seconds or minutes of start-up.
"""

from __future__ import annotations

import torch

from scaling.core.checkpoint import check_save_dir
from scaling.core.config import ConfigError
from scaling.core.runner import RunnerType
from scaling.transformer.config import TransformerConfig

__all__ = ["check_before_launch", "check_device"]


def check_device(config: TransformerConfig) -> None:
    """``topology.device: cuda`` needs a GPU here for each local rank (remote nodes are checked there)."""
    if config.topology.device != "cuda" or config.runner.runner_type != RunnerType.LOCAL:
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            "topology.device is 'cuda' but this machine has no usable CUDA device (torch.cuda.is_available() is "
            "False); use 'auto' or 'cpu'"
        )
    ranks, gpus = config.topology.n_ranks, torch.cuda.device_count()
    if ranks > gpus:
        raise ConfigError(f"topology.device is 'cuda' with {ranks} local ranks, but only {gpus} GPUs are visible")


def check_before_launch(config: TransformerConfig) -> None:
    """Raise the first problem found (``ConfigError``, ``DataFileError``: bad input, exit code 2)."""
    from scaling.transformer.train import _datasets  # train imports this module

    check_device(config)
    if config.trainer.save_dir is not None:
        check_save_dir(config.trainer.save_dir)  # the size check needs the model: the trainer does it
    _datasets(config)
