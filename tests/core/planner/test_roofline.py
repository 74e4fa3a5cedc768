"""The roofline step-time model: each part responds to the input it models, the parts add up, and a
measured CPU spec (no bandwidth figures) still gives a finite prediction."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
import torch

from scaling.core.planner import (
    DeviceSpec,
    device_spec,
    measure_local_device,
    predict_step_time,
    step_communication,
)
from scaling.core.planner.communication import CommunicationVolume
from scaling.core.planner.roofline import StepTimePrediction

H100 = device_spec("h100")
FLOPS = 6e12  # one micro-batch on one rank, forward + backward


def _communication(**overrides: Any) -> CommunicationVolume:
    base: dict[str, Any] = dict(
        tp=1,
        pp=1,
        dp=1,
        zero_stage=0,
        gpus_per_node=8,
        params_per_rank=1e9,
        trainable_per_rank=1e9,
        compute_bytes=2,
        reduce_bytes=2,
        layers_per_stage=8,
        tokens_per_micro_batch=8192,
        hidden_size=4096,
        n_micro=8,
    )
    return step_communication(**(base | overrides))


def _predict(device: DeviceSpec = H100, **overrides: Any) -> StepTimePrediction:
    n_micro, pp = overrides.pop("n_micro", 8), overrides.pop("pp", 1)
    communication = overrides.pop("communication", None) or _communication(n_micro=n_micro, pp=pp)
    base: dict[str, Any] = dict(
        device=device,
        dtype=torch.bfloat16,
        flops_per_micro_batch_stage=FLOPS,
        recompute_flops_per_micro_batch_stage=0.0,
        n_micro=n_micro,
        pp=pp,
        schedule="1f1b",
        n_chunks=1,
        communication=communication,
        optimizer_bytes=0.0,
    )
    return predict_step_time(**(base | overrides))


def _parts(p: StepTimePrediction) -> float:
    return p.compute_s + p.recompute_s + p.tp_comm_s + p.dp_comm_s + p.pp_comm_s + p.bubble_s + p.optimizer_s


def test_compute_only_runs_at_the_matmul_efficiency() -> None:
    prediction = _predict()
    assert prediction.compute_s == pytest.approx(8 * FLOPS / (989e12 * 0.6))
    assert prediction.step_s == pytest.approx(prediction.compute_s)
    assert prediction.mfu(8 * FLOPS) == pytest.approx(0.6)
    assert (prediction.bubble_s, prediction.tp_comm_s, prediction.dp_comm_s, prediction.pp_comm_s) == (0, 0, 0, 0)


def test_doubling_the_peak_halves_compute() -> None:
    fast = replace(H100, peak_flops={k: 2 * v for k, v in H100.peak_flops.items()})
    assert _predict(fast).compute_s == pytest.approx(_predict().compute_s / 2)
    assert _predict(fast, recompute_flops_per_micro_batch_stage=FLOPS / 3).recompute_s == pytest.approx(
        _predict(recompute_flops_per_micro_batch_stage=FLOPS / 3).recompute_s / 2
    )


def test_more_micro_batches_shrink_the_bubble_share() -> None:
    shares = [(p := _predict(pp=4, n_micro=m)).bubble_s / p.step_s for m in (4, 8, 32)]
    assert shares[0] > shares[1] > shares[2] > 0
    # 1F1B with instant messages: the textbook (pp-1)/(m+pp-1) of the pipeline part
    assert _predict(pp=4, n_micro=4).bubble_fraction == pytest.approx(3 / 7)


def test_pipeline_messages_add_to_the_step() -> None:
    prediction = _predict(pp=4, n_micro=8)
    assert prediction.pp_comm_s > 0
    assert _parts(prediction) == pytest.approx(prediction.step_s)


def test_tensor_parallel_collectives_are_exposed() -> None:
    communication = _communication(tp=8)
    prediction = _predict(communication=communication)
    assert prediction.tp_comm_s == pytest.approx(communication.tp / (450e9 * 0.8))
    assert prediction.step_s == pytest.approx(prediction.compute_s + prediction.tp_comm_s)


def test_an_inter_node_data_parallel_link_costs_more() -> None:
    """ZeRO stage 3 on dp=16 with 8 GPUs per node (inter-node) against the same traffic on NVLink."""
    communication = _communication(dp=16, zero_stage=3)
    assert communication.links["dp"] == "inter"
    inter = _predict(communication=communication)
    intra = _predict(communication=communication, links={"tp": "intra", "dp": "intra", "pp": "intra"})
    assert inter.dp_comm_s > intra.dp_comm_s >= 0
    assert inter.step_s > intra.step_s


def test_data_parallel_overlap_is_capped_by_the_compute_it_hides_behind() -> None:
    """Stage 0 reduces once per step, during the last backward: with a tiny model step its all-reduce is
    mostly exposed; with no overlap allowed it is exposed entirely."""
    communication = _communication(dp=16, zero_stage=0)
    reduce_s = communication.dp_reduce / (50e9 * 0.8)
    one_backward = 2 / 3 * FLOPS / (989e12 * 0.6)
    assert _predict(communication=communication).dp_comm_s == pytest.approx(
        reduce_s - min(0.8 * reduce_s, one_backward)
    )
    assert _predict(communication=communication, dp_overlap=0.0).dp_comm_s == pytest.approx(reduce_s)


def test_optimizer_is_memory_bound() -> None:
    assert _predict(optimizer_bytes=16 * 1e9).optimizer_s == pytest.approx(16e9 / 3.35e12)


def test_measured_cpu_spec_gives_a_finite_prediction() -> None:
    cpu = measure_local_device(torch.device("cpu"), (torch.float32,), size=128, seconds=0.05)
    communication = _communication(tp=2, dp=2, pp=2, zero_stage=1)
    prediction = _predict(cpu, dtype=torch.float32, communication=communication, pp=2, optimizer_bytes=1e6)
    assert all(math.isfinite(v) and v >= 0 for v in (prediction.step_s, prediction.dp_comm_s, prediction.optimizer_s))
    assert prediction.step_s > 0 and prediction.tp_comm_s > 0 and prediction.optimizer_s > 0
    assert any("memory bandwidth" in a for a in prediction.assumed)
    assert 0 < prediction.mfu(8 * FLOPS) <= 0.6 + 1e-9


def test_bad_efficiencies_are_rejected() -> None:
    with pytest.raises(ValueError, match="matmul_efficiency"):
        _predict(matmul_efficiency=0.0)
    with pytest.raises(ValueError, match="dp_overlap"):
        _predict(dp_overlap=1.5)
