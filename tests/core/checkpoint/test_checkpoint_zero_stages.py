"""Checkpoints resume across ZeRO stages and layouts, with weights and optimizer state.

A run trains 4 steps on one (tp, pp, dp, zero_stage), saves, and another run resumes it on a different
one for 4 more: stage 3 -> stage 0 and 0 -> 3, dp 2 -> 4, tp 2 -> 1, pp 2 -> 1. Losses and final weights
equal one process training 8 steps straight (dropout on: its masks do not depend on the layout).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from scaling.core.testing import run_distributed

from .test_checkpoint import _full_weights, _run, _world


@functools.cache
def _straight() -> dict[str, Any]:
    """One process training 8 steps straight at stage 0: the reference of every case (run once)."""
    return run_distributed(_run, 1, {}, 0, range(8), None, None, False, timeout_s=240)[0]


CASES = [
    ({"data_parallel_size": 2}, 3, {"data_parallel_size": 2}, 0),
    ({"data_parallel_size": 2}, 0, {"data_parallel_size": 4}, 3),
    ({"model_parallel_size": 2, "data_parallel_size": 2}, 3, {"data_parallel_size": 2}, 1),
    ({"pipe_parallel_size": 2, "data_parallel_size": 2}, 2, {"data_parallel_size": 2}, 3),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("saved", "saved_stage", "resumed", "resumed_stage"), CASES, ids=str)
def test_resume_across_zero_stages_and_layouts(
    tmp_path: Path, saved: dict[str, Any], saved_stage: int, resumed: dict[str, Any], resumed_stage: int
) -> None:
    straight = _straight()
    first = run_distributed(_run, _world(saved), saved, saved_stage, range(4), str(tmp_path), 4, False, timeout_s=240)
    second = run_distributed(
        _run, _world(resumed), resumed, resumed_stage, range(4, 8), str(tmp_path), None, True, timeout_s=240
    )
    for r in first:
        torch.testing.assert_close(torch.stack(r["losses"]), torch.stack(straight["losses"][:4]), rtol=1e-6, atol=1e-6)
    for r in second:
        torch.testing.assert_close(torch.stack(r["losses"]), torch.stack(straight["losses"][4:]), rtol=1e-5, atol=1e-6)
    full = _full_weights(second)
    for name, (weight, _) in straight["weights"].items():
        torch.testing.assert_close(full[name], weight, rtol=1e-5, atol=1e-6, msg=name)
