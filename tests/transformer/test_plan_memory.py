"""The planner's per-rank memory against what real training steps hold, and its arithmetic.

The measured check trains a small transformer (activations about half of every rank's peak, so a wrong
activation term shows) through the engine on ten layouts of a 2-process world: ZeRO 0-3, fp32 and bf16,
1F1B and GPipe pipelines, tensor parallelism, activation checkpointing per layer and per stage. For every
rank, the peak of live tensor bytes over two training steps (torch's memory tracker, exact and the same on
every machine) must be within 10% of the plan's prediction for that rank's stage, and the parameter sizes
the plan derives from the architecture must be the ones the built model's table holds.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from scaling.core.planner.devices import device_spec
from scaling.core.planner.layout import Layout
from scaling.core.planner.memory import StageActivations, activation_peak, in_flight_micro_batches
from scaling.core.testing import run_distributed
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.planning.measured import CHECK_ARCH, CHECK_LAYOUTS, layout_of, measure_layouts
from scaling.transformer.planning.plan import PlanSettings, plan_layout, stage_memory
from scaling.transformer.planning.shapes import stage_param_sizes

TOLERANCE = 0.10
ARCH, LAYOUTS, _layout = CHECK_ARCH, CHECK_LAYOUTS, layout_of


def _settings(fields: dict[str, Any]) -> PlanSettings:
    dtype = getattr(torch, fields.get("precision", "float32"))
    return PlanSettings(device=device_spec("h100"), sequence_length=ARCH["sequence_length"], compute_dtype=dtype)


@pytest.mark.timeout(150)
def test_predicted_peak_is_within_10_percent_of_the_measured_peak_on_every_layout() -> None:
    arch = TransformerArchitectureConfig.from_dict(ARCH)
    measured = run_distributed(measure_layouts, 2, ARCH, LAYOUTS, timeout_s=130)
    report, failures = [], []
    for per_rank in measured:
        for m in per_rank:
            layout, stage = _layout(m["layout"]), m["coord"][0]
            sizes = stage_param_sizes(arch, tp=layout.tp, pp=layout.pp, stage=stage)
            assert sorted((s.numel, s.layer) for s in sizes) == sorted((r[1], r[3]) for r in m["param_sizes"]), m
            predicted = stage_memory(arch, layout, _settings(m["layout"]), stage)
            error = predicted.peak / m["peak_bytes"] - 1
            report.append(f"{layout.describe()} stage {stage} rank {m['rank']}: {m['peak_bytes']} vs {predicted.peak}"
                          f" ({error:+.1%})")  # fmt: skip
            if abs(error) > TOLERANCE:
                failures.append(report[-1])
            # Activations are a real share of the peak, so the check tests their term, not only ZeRO's.
            assert predicted.activations > 0.15 * predicted.peak, report[-1]
    print("\n".join(report))
    assert not failures, "\n".join([*failures, "all:", *report])


def test_checkpointing_keeps_layer_inputs_and_recomputes_one_block() -> None:
    acts = StageActivations(saved=(100, 100, 100), inputs=(10, 10, 10), boundary=5)
    assert activation_peak(acts, 2, "disabled") == 2 * (300 + 5)
    assert activation_peak(acts, 2, "every_layer") == 2 * (30 + 5) + 100
    assert activation_peak(acts, 2, "every_pipe_stage") == 2 * (10 + 5) + 300


def test_in_flight_counts_come_from_the_schedule() -> None:
    assert in_flight_micro_batches("1f1b", 8, 4) == (4, 3, 2, 1)
    assert in_flight_micro_batches("gpipe", 8, 4) == (8, 8, 8, 8)
    assert in_flight_micro_batches("1f1b", 8, 1) == (1,)


def test_a_plan_names_why_a_layout_cannot_run() -> None:
    arch = TransformerArchitectureConfig.from_dict({**ARCH, "num_attention_heads": 4})
    settings = PlanSettings(device=device_spec("h100"), gpus_per_node=8, sequence_length=64)
    wide = plan_layout(arch, Layout(16, 1, 1, 0, "disabled", 1, 1), settings)
    assert "tp 16 > 8 GPUs per node" in wide.infeasible
    assert any("num_attention_heads (4) must be divisible" in r for r in wide.infeasible)
    from dataclasses import replace

    tiny_gpu = replace(settings, device=replace(device_spec("h100"), memory_bytes=10**6))
    full = plan_layout(arch, Layout(1, 1, 2, 0, "disabled", 2, 1), tiny_gpu)
    assert full.infeasible and full.infeasible[0].startswith("needs ") and "> 976.6 KiB" in full.infeasible[0]
    fits = plan_layout(arch, Layout(1, 1, 2, 0, "disabled", 2, 1), settings)
    assert fits.fits and fits.time is not None and 0 < fits.mfu < 1
