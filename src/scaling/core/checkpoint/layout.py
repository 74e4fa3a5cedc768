"""Where things live inside a checkpoint directory. Pure path arithmetic, no I/O.

::

    save_dir/
      latest                       # text: "global_step{N}", replaced atomically after every rank finished
      global_step{N}/
        manifest.json              # version, step, topology it was written on, run config
        model/layer_{i:05d}.safetensors      # full (unsharded) weights of layer i + split metadata
        optimizer/layer_{i:05d}.safetensors  # full fp32 master, exp_avg, exp_avg_sq of layer i + steps
        rank_state/rank{r:05d}.safetensors       # per-rank RNG states and similar
        user_state/...                           # anything the caller adds (data position, ...)
      .global_step{N}.incomplete/  # a save in progress; never read
      .global_step{N}.unpublished/ # renamed into place by a save that crashed before 'latest' moved

File names depend on layer indices and coordinates, never on which rank wrote them, so any layout can
find what it needs.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "LATEST",
    "MANIFEST",
    "incomplete_dir",
    "leftover_of",
    "model_layer_file",
    "optimizer_layer_file",
    "rank_state_file",
    "step_dir",
    "step_of",
]

LATEST = "latest"
MANIFEST = "manifest.json"
_STEP = re.compile(r"^global_step(\d+)$")
_LEFTOVER = re.compile(r"^\.global_step(\d+)\.(incomplete|unpublished)$")


def step_dir(save_dir: Path, step: int) -> Path:
    return save_dir / f"global_step{step}"


def incomplete_dir(save_dir: Path, step: int) -> Path:
    return save_dir / f".global_step{step}.incomplete"


def step_of(path: Path) -> int | None:
    match = _STEP.match(path.name)
    return int(match.group(1)) if match else None


def leftover_of(path: Path) -> tuple[int, str] | None:
    """(step, "incomplete" or "unpublished") for a directory a crashed save left, else None."""
    match = _LEFTOVER.match(path.name)
    return (int(match.group(1)), match.group(2)) if match else None


def model_layer_file(checkpoint: Path, layer: int) -> Path:
    return checkpoint / "model" / f"layer_{layer:05d}.safetensors"


def optimizer_layer_file(checkpoint: Path, layer: int) -> Path:
    return checkpoint / "optimizer" / f"layer_{layer:05d}.safetensors"


def rank_state_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / "rank_state" / f"rank{rank:05d}.safetensors"
