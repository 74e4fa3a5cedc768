"""The per-rank memory estimate: its arithmetic, and that it matches what a training step really holds.

The measured check trains a deep MLP with tiny activations (so weights, gradients and optimizer state
dominate, as the formula assumes) for two steps per ZeRO stage at dp 2 and 4 in fp32 with two
micro-batches, and at dp 2 in bf16 with one, through the engine (``ParallelModule(...,
sharding=config.sharding)`` + ``Optimizer``; FSDP2 per layer over the gloo group for stages 1-3). The
peak of live tensor bytes (torch's memory tracker) must be within 10% of ``estimate_memory``'s. A
failure means the formula no longer describes the code: a buffer was added or removed, or a stage keeps
something alive longer.
"""

from __future__ import annotations

from dataclasses import astuple
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from scaling.core.testing import run_distributed
from scaling.core.zero.memory import (
    MemoryEstimate,
    ParamSize,
    estimate_memory,
    format_memory_line,
    human_bytes,
    live_tensor_bytes,
    measure_peak,
    param_sizes,
)

HIDDEN, LAYERS, STEPS = 512, 8, 2
TOLERANCE = 0.10


def _mlp_sizes(hidden: int = HIDDEN, layers: int = LAYERS) -> list[ParamSize]:
    return [
        size
        for i in range(layers)
        for size in (ParamSize(f"{i}.weight", hidden * hidden, layer=i), ParamSize(f"{i}.bias", hidden, layer=i))
    ]


def _bpp(estimate: MemoryEstimate) -> float:
    return estimate.peak_bytes_per_parameter


# Arithmetic -------------------------------------------------------------------------------------------
def test_stage0_fp32_is_16_bytes_per_parameter_plus_one_layer_gradient() -> None:
    sizes = _mlp_sizes(1000, 10)
    n = sum(s.numel for s in sizes)
    e = estimate_memory(sizes, zero_stage=0, dp=2)
    # weights 4 (their own fp32 masters), gradient buckets 4 (the optimizer reads them in place), Adam 8
    assert (e.parameters, e.gradients, e.optimizer) == (4 * n, 4 * n, 8 * n)
    assert e.peak == 16 * n + 4 * (1000 * 1000 + 1000)
    assert estimate_memory(sizes, zero_stage=0, dp=8).peak == e.peak  # replicas: dp changes nothing


def test_stage0_bf16_keeps_separate_fp32_masters_and_gradient_copies() -> None:
    sizes = _mlp_sizes(1000, 10)
    n = sum(s.numel for s in sizes)
    e = estimate_memory(sizes, zero_stage=0, dp=2, compute_dtype=torch.bfloat16)
    assert e.parameters == 2 * n
    assert e.optimizer == 12 * n  # Adam 8 + fp32 master 4
    assert e.gradients == (4 + 2) * n  # fp32 bucket (read by the optimizer in place) + bf16 autograd gradient
    narrow = estimate_memory(sizes, zero_stage=0, dp=2, compute_dtype=torch.bfloat16, reduce_dtype=None)
    assert narrow.gradients == (2 + 4) * n  # the bucket is the bf16 gradient itself, and its fp32 copy


def test_sharded_stages_divide_states_by_dp_and_order_as_zero_promises() -> None:
    sizes = _mlp_sizes(1024, 64)  # small layers: the per-layer transients hardly count
    for m in (1, 4):
        peaks = {
            (stage, dp): _bpp(estimate_memory(sizes, zero_stage=stage, dp=dp, gradient_accumulation_steps=m))
            for stage in range(4)
            for dp in (2, 4, 8)
        }
        for dp in (2, 4, 8):
            assert peaks[(3, dp)] < peaks[(2, dp)] <= peaks[(1, dp)] < peaks[(0, dp)]
        for stage in (1, 2, 3):
            assert peaks[(stage, 8)] < peaks[(stage, 4)] < peaks[(stage, 2)]
    # Stage 3: 16 bytes / dp (4 master + 4 gradient + 8 Adam) plus 16 + 4 / dp bytes per element of one
    # layer (it and the prefetched one gathered, its unsharded gradient, reduce-scatter input and output).
    for dp in (2, 4, 8):
        bpp = _bpp(estimate_memory(sizes, zero_stage=3, dp=dp, gradient_accumulation_steps=4))
        assert bpp == pytest.approx(16 / dp + (16 + 4 / dp) / 64, rel=1e-4)
    # Stage 1 with accumulation holds the unsharded fp32 gradients; stage 2 only their shards.
    s1 = estimate_memory(sizes, zero_stage=1, dp=4, gradient_accumulation_steps=4)
    s2 = estimate_memory(sizes, zero_stage=2, dp=4, gradient_accumulation_steps=4)
    n = s1.n_params
    assert s1.peak - s2.peak == 4 * n - 4 * n // 4
    one = estimate_memory(sizes, zero_stage=1, dp=4, gradient_accumulation_steps=1)
    assert one.peak == estimate_memory(sizes, zero_stage=2, dp=4, gradient_accumulation_steps=1).peak


def test_reshard_after_forward_overrides_the_stage_default() -> None:
    sizes = _mlp_sizes(1024, 32)
    for m in (1, 4):
        kw: dict[str, Any] = {"dp": 4, "gradient_accumulation_steps": m}
        stage2 = estimate_memory(sizes, zero_stage=2, **kw)
        stage3 = estimate_memory(sizes, zero_stage=3, **kw)
        assert estimate_memory(sizes, zero_stage=2, reshard_after_forward=True, **kw).peak == stage3.peak
        assert estimate_memory(sizes, zero_stage=3, reshard_after_forward=False, **kw).peak == stage2.peak
        assert estimate_memory(sizes, zero_stage=2, reshard_after_forward=False, **kw) == stage2


def test_param_sizes_reads_tensor_parallel_local_sizes_from_the_table() -> None:
    from scaling.core.nn.param_table import ParamRecord

    common = {"layer": 0, "tied_key": None, "tied_owner": False, "partial_grad_over_tp": False}
    records = [
        ParamRecord(name="0.weight", shape=(64, 32), tp_split_dim=0, tp_parts=2, trainable=True, **common),
        ParamRecord(name="0.bias", shape=(32,), tp_split_dim=None, tp_parts=1, trainable=False, **common),
    ]
    assert param_sizes(records) == [ParamSize("0.weight", 1024, True, 0), ParamSize("0.bias", 32, False, 0)]


def test_frozen_parameters_have_no_gradients_or_optimizer_state() -> None:
    trainable = _mlp_sizes(256, 4)
    frozen = [ParamSize(s.name, s.numel, trainable=False, layer=s.layer) for s in trainable]
    for stage in range(4):
        e = estimate_memory(frozen, zero_stage=stage, dp=2)
        assert e.n_trainable == 0 and e.gradients == 0 and e.optimizer == 0
        assert e.parameters > 0
        assert e.peak < estimate_memory(trainable, zero_stage=stage, dp=2).peak


def test_units_are_layers_so_a_tied_layer_pair_counts_as_one_unit() -> None:
    """Stage 3's transient is a few unsharded units: merging the embedding and head into one unit
    (the same ``layer``) makes the largest unit, and so the peak, larger."""
    body = [ParamSize(f"{i}.w", 100 * 100, layer=i) for i in range(1, 9)]
    separate = [ParamSize("embed", 100 * 100, layer=0), *body, ParamSize("head.bias", 100 * 100, layer=9)]
    tied = [ParamSize("embed", 100 * 100, layer=0), *body, ParamSize("head.bias", 100 * 100, layer=0)]
    a = estimate_memory(separate, zero_stage=3, dp=2)
    b = estimate_memory(tied, zero_stage=3, dp=2)
    assert b.n_params == a.n_params and b.peak > a.peak


def test_offload_moves_shards_to_the_host() -> None:
    sizes = _mlp_sizes(1024, 16)
    on_device = estimate_memory(sizes, zero_stage=3, dp=4)
    offloaded = estimate_memory(sizes, zero_stage=3, dp=4, offload=True)
    assert offloaded.host == offloaded.parameters + offloaded.optimizer + offloaded.gradients
    assert offloaded.peak < on_device.peak / 4
    with pytest.raises(ValueError, match="offload needs zero_stage"):
        estimate_memory(sizes, zero_stage=0, dp=2, offload=True)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="zero_stage"):
        estimate_memory([], zero_stage=4, dp=2)
    with pytest.raises(ValueError, match="dp"):
        estimate_memory([], zero_stage=1, dp=0)


def test_activation_bytes_add_to_the_peak() -> None:
    sizes = _mlp_sizes(128, 2)
    assert (
        estimate_memory(sizes, zero_stage=2, dp=2, activation_bytes=1000).peak
        == estimate_memory(sizes, zero_stage=2, dp=2).peak + 1000
    )


def test_the_start_up_line_names_every_part_in_human_units() -> None:
    sizes = _mlp_sizes(1024, 10)
    line = format_memory_line(estimate_memory(sizes, zero_stage=2, dp=2, compute_dtype=torch.bfloat16))
    assert line.startswith("memory per rank (ZeRO-2, dp 2, bfloat16): ")
    assert "parameters 20.0 MiB" in line and "gradients 20.0 MiB" in line and "optimizer state 40.0 MiB" in line
    assert "expected peak " in line and "B/parameter of 10.5M" in line and "\n" not in line
    assert "on the host" in format_memory_line(estimate_memory(sizes, zero_stage=3, dp=2, offload=True))
    assert [human_bytes(v) for v in (512, 1536, 3 * 2**30)] == ["512 B", "1.5 KiB", "3.0 GiB"]


# Measured --------------------------------------------------------------------------------------------
def test_measure_peak_sees_a_transient_tensor_and_the_baseline() -> None:
    kept = torch.zeros(1000)  # alive before the call: part of the peak

    def work() -> float:
        scratch = torch.ones(4000)  # 16 kB, freed before the return
        return float(scratch.sum())

    measured = measure_peak(work)
    assert measured.result == 4000.0
    assert measured.peak_bytes >= 4 * (4000 + kept.numel())
    assert measured.peak_bytes < 4 * (4000 + kept.numel()) + 2**20  # nothing else of note is alive in a test


def _loss(out: torch.Tensor, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return out.float().square().mean(), {}


def _engine(stage: int, dp: int, dtype: torch.dtype, micro_batches: int) -> tuple[int, list[tuple[Any, ...]]]:
    """Two steps of the engine at ZeRO ``stage``: ``ParallelModule`` over a deep MLP + ``Optimizer``."""
    from scaling.core.nn.precision import Precision, PrecisionConfig
    from scaling.core.optimizer.config import OptimizerConfig
    from scaling.core.optimizer.optimizer import Optimizer
    from scaling.core.pipeline.layer_spec import LayerSpec
    from scaling.core.pipeline.module import ParallelModule
    from scaling.core.topology import Topology, TopologyConfig

    topo = Topology(
        TopologyConfig(data_parallel_size=dp, micro_batch_size=2, gradient_accumulation_steps=micro_batches)
    )
    precision = PrecisionConfig(precision=Precision(str(dtype).removeprefix("torch.")))
    config = OptimizerConfig(zero_stage=stage)
    specs = [LayerSpec(nn.Linear, (HIDDEN, HIDDEN)) for _ in range(LAYERS)]
    module = ParallelModule(specs, topo, _loss, precision=precision, sharding=config.sharding)
    optimizer = Optimizer.for_module(module, config)
    batches = [torch.randn(2, HIDDEN) for _ in range(micro_batches)]

    def train() -> None:
        for step in range(STEPS):
            module.train_step(batches, step=step)
            optimizer.step(step)

    sizes = [astuple(size) for size in param_sizes(module.param_table.values())]  # what the start-up line reads
    return measure_peak(train, module, optimizer).peak_bytes, sizes


def _measure_stages(cases: list[tuple[str, int]]) -> dict[tuple[str, int, int], tuple[int, list[tuple[Any, ...]]]]:
    """Per (dtype, micro-batches) case and stage: the peak bytes its training adds to what is alive before
    its model is built, and the estimate's input read from the model's parameter table. The engine's
    gradient hooks form reference cycles through C++ that outlive a model, so earlier models' tensors are
    still there when the next one is measured; one world runs every case because starting one costs more
    than the cases themselves."""
    out = {}
    for dtype_name, micro_batches in cases:
        for stage in range(4):
            floor = live_tensor_bytes()
            peak, sizes = _engine(stage, dist.get_world_size(), getattr(torch, dtype_name), micro_batches)
            out[(dtype_name, micro_batches, stage)] = (peak - floor, sizes)
            dist.barrier()
    return out


CASES = {2: [("float32", 2), ("bfloat16", 1)], 4: [("float32", 2)]}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("dp", sorted(CASES))
def test_measured_peak_matches_the_estimate_per_stage(dp: int) -> None:
    measured = run_distributed(_measure_stages, dp, CASES[dp], timeout_s=130)
    report = []
    for dtype_name, micro_batches in CASES[dp]:
        for stage in range(4):
            for rank, per_rank in enumerate(measured):
                peak, table = per_rank[(dtype_name, micro_batches, stage)]
                sizes = [ParamSize(*row) for row in table]
                assert sorted((s.numel, s.layer) for s in sizes) == sorted((s.numel, s.layer) for s in _mlp_sizes())
                estimate = estimate_memory(
                    sizes,
                    zero_stage=stage,
                    dp=dp,
                    compute_dtype=getattr(torch, dtype_name),
                    gradient_accumulation_steps=micro_batches,
                )
                bpp = peak / estimate.n_params
                report.append((dtype_name, micro_batches, stage, rank, round(bpp, 3), round(_bpp(estimate), 3)))
    off = [r for r in report if abs(r[4] - r[5]) > TOLERANCE * r[5]]
    assert not off, "bytes/parameter (dtype, micro-batches, stage, rank, measured, estimate): " + repr(report)
