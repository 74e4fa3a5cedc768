"""Checkpoints: resume equals uninterrupted (bitwise on the same layout, fp32 tolerance on others),
crashes never publish half a checkpoint, retention, and clear errors for damaged or foreign checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from scaling.core.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint
from scaling.core.checkpoint import io as checkpoint_io
from scaling.core.nn import unshard
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.core.zero import gathered

from ..pipeline.tp_models import Loss, batches, model_specs

MICRO_PER_STEP = 4  # micro-batches per optimizer step over all data-parallel ranks
OPTIMIZER = {"training_groups": [{"weight_decay": 0.1, "learning_rate_schedule": {"learning_rate": 1e-2}}]}


def _run(
    layout: dict[str, Any], zero: bool | int, steps: range, save_dir: str | None, save_at: int | None, load: bool
) -> dict[str, Any]:
    """Train ``steps`` on ``layout``; ``zero``: the old ``zero`` flag (a bool) or a ZeRO stage (an int)."""
    dp = layout.get("data_parallel_size", 1)
    topo = Topology(TopologyConfig(**layout, gradient_accumulation_steps=MICRO_PER_STEP // dp))
    sharding = {"zero": zero} if isinstance(zero, bool) else {"zero_stage": zero}
    config = OptimizerConfig.from_dict({**OPTIMIZER, **sharding})
    module = ParallelModule(model_specs(topo, 2, 0.1), topo, Loss(topo), seed=3, sharding=config.sharding)
    optimizer = Optimizer.for_module(module, config)
    if load:
        assert save_dir is not None
        info = load_checkpoint(save_dir, module, optimizer)
        assert info.step == steps.start and info.optimizer_loaded
    losses = []
    n_micro = MICRO_PER_STEP // dp
    for step in steps:
        mine = batches(MICRO_PER_STEP, seed=200 + step)[topo.dp_rank * n_micro : (topo.dp_rank + 1) * n_micro]
        losses.append(module.train_step(mine, step=step).loss)
        optimizer.step(step)
        if save_at is not None and step + 1 == save_at:
            assert save_dir is not None
            save_checkpoint(save_dir, step + 1, module, optimizer, config={"layout": layout})
    weights = {
        n: (gathered(p.detach()).clone(), module.param_table[n].tp_split_dim)
        for n, p in module.named_parameters_canonical()
    }
    return {"coord": (topo.pp_rank, topo.dp_rank, topo.tp_rank), "losses": losses, "weights": weights}


def _world(layout: dict[str, Any]) -> int:
    return (
        layout.get("model_parallel_size", 1) * layout.get("pipe_parallel_size", 1) * layout.get("data_parallel_size", 1)
    )


def _full_weights(results: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    shards: dict[str, dict[int, tuple[torch.Tensor, int | None]]] = {}
    for r in results:
        _pp, dp, tp = r["coord"]
        if dp == 0:
            for name, value in r["weights"].items():
                shards.setdefault(name, {})[tp] = value
    return {
        n: s[0][0] if s[0][1] is None else unshard([s[t][0] for t in sorted(s)], s[0][1]) for n, s in shards.items()
    }


SAME_LAYOUT = [
    ({"model_parallel_size": 2, "pipe_parallel_size": 2}, False),
    ({"pipe_parallel_size": 2, "data_parallel_size": 2}, True),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("layout", "zero"), SAME_LAYOUT, ids=str)
def test_resume_equals_uninterrupted_bitwise(tmp_path: Path, layout: dict[str, Any], zero: bool) -> None:
    world = _world(layout)
    straight = run_distributed(_run, world, layout, zero, range(10), None, None, False, timeout_s=240)
    first = run_distributed(_run, world, layout, zero, range(5), str(tmp_path), 5, False, timeout_s=240)
    second = run_distributed(_run, world, layout, zero, range(5, 10), str(tmp_path), None, True, timeout_s=240)
    for a, b, c in zip(straight, first, second, strict=True):
        assert torch.equal(torch.stack(a["losses"]), torch.stack(b["losses"] + c["losses"])), a["coord"]
        for name, (weight, _) in a["weights"].items():
            assert torch.equal(weight, c["weights"][name][0]), name


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "resumed",
    [
        {"data_parallel_size": 2},
        {"model_parallel_size": 2, "data_parallel_size": 2},
        {"pipe_parallel_size": 2},
    ],
    ids=str,
)
def test_resume_on_another_layout_continues_the_run(tmp_path: Path, resumed: dict[str, Any]) -> None:
    saved = {"model_parallel_size": 2, "pipe_parallel_size": 2}
    straight = run_distributed(_run, 1, {}, False, range(8), None, None, False, timeout_s=240)[0]
    run_distributed(_run, 4, saved, False, range(4), str(tmp_path), 4, False, timeout_s=240)
    results = run_distributed(_run, _world(resumed), resumed, True, range(4, 8), str(tmp_path), None, True)
    for r in results:
        torch.testing.assert_close(torch.stack(r["losses"]), torch.stack(straight["losses"][4:]), rtol=1e-5, atol=1e-6)
    full = _full_weights(results)
    for name, (weight, _) in straight["weights"].items():
        torch.testing.assert_close(full[name], weight, rtol=1e-5, atol=1e-6, msg=name)


def _crash_then_recover(save_dir: str) -> dict[str, Any]:
    topo = Topology(TopologyConfig())
    module = ParallelModule(model_specs(topo, 1, 0.0), topo, Loss(topo))
    optimizer = Optimizer.for_module(module, OptimizerConfig.from_dict(OPTIMIZER))
    save_checkpoint(save_dir, 1, module, optimizer)
    weights_at_1 = {n: p.detach().clone() for n, p in module.named_parameters_canonical()}
    module.train_step(batches(1))
    optimizer.step(1)

    def crash(*args: Any, **kwargs: Any) -> Path:
        raise RuntimeError("injected crash after the tensors were written, before 'latest' moved")

    original, checkpoint_io._commit = checkpoint_io._commit, crash  # type: ignore[assignment]
    try:
        save_checkpoint(save_dir, 2, module, optimizer)
    except RuntimeError:
        pass
    finally:
        checkpoint_io._commit = original  # type: ignore[assignment]
    found = find_checkpoint(save_dir)
    info = load_checkpoint(save_dir, module, optimizer)
    restored = all(torch.equal(p, weights_at_1[n]) for n, p in module.named_parameters_canonical())
    leftovers = sorted(p.name for p in Path(save_dir).iterdir())
    for step in (2, 3, 4):  # a later save cleans the crashed attempt; retention keeps the last two
        save_checkpoint(save_dir, step, module, optimizer, keep_last=2)
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(save_dir, 4, module, optimizer)
    return {
        "found": found.name,
        "step": info.step,
        "restored": restored,
        "leftovers": leftovers,
        "after": sorted(p.name for p in Path(save_dir).iterdir()),
        "latest": (Path(save_dir) / "latest").read_text(),
    }


def _crash_between_rename_and_latest(save_dir: str) -> dict[str, Any]:
    """The step directory is in place but ``latest`` still names the previous one when the save dies."""
    from scaling.core.checkpoint import io as checkpoint_io
    from scaling.core.checkpoint.layout import incomplete_dir, step_dir

    topo = Topology(TopologyConfig())
    module = ParallelModule(model_specs(topo, 1, 0.0), topo, Loss(topo))
    save_checkpoint(save_dir, 1, module, None)

    def crash(directory: Path, step: int, keep_last: int | None) -> Path:
        incomplete_dir(directory, step).rename(step_dir(directory, step))
        raise RuntimeError("injected crash after the rename, before 'latest' moved")

    original, checkpoint_io._commit = checkpoint_io._commit, crash  # type: ignore[assignment]
    try:
        save_checkpoint(save_dir, 2, module, None)
    except RuntimeError:
        pass
    finally:
        checkpoint_io._commit = original  # type: ignore[assignment]
    found = find_checkpoint(save_dir).name
    save_checkpoint(save_dir, 2, module, None)  # the resumed run reaches step 2 again and must save it
    return {"found": found, "after": sorted(p.name for p in Path(save_dir).iterdir()),
            "latest": (Path(save_dir) / "latest").read_text()}  # fmt: skip


def test_a_crash_after_the_rename_does_not_block_the_resumed_run(tmp_path: Path) -> None:
    result = run_distributed(_crash_between_rename_and_latest, 1, str(tmp_path))[0]
    assert result["found"] == "global_step1"  # the loader never sees the unpublished step
    assert result["latest"] == "global_step2"
    # set aside while step 2 is saved again, then removed by the commit that publishes step 2 (issue 10)
    assert result["after"] == ["global_step1", "global_step2", "latest"]


def test_a_crash_during_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    result = run_distributed(_crash_then_recover, 1, str(tmp_path))[0]
    assert result["found"] == "global_step1"
    assert result["step"] == 1 and result["restored"]
    assert result["leftovers"] == [".global_step2.incomplete", "global_step1", "latest"]
    assert result["after"] == ["global_step3", "global_step4", "latest"]
    assert result["latest"] == "global_step4"


def _load_into(save_dir: str, blocks: int, hidden_mismatch: bool) -> str:
    topo = Topology(TopologyConfig())
    specs = model_specs(topo, blocks, 0.0)
    if hidden_mismatch:
        from scaling.core.nn import ColumnParallelLinear
        from scaling.core.pipeline.layer_spec import LayerSpec

        specs[1] = LayerSpec(_Wider, (topo, ColumnParallelLinear))
    module = ParallelModule(specs, topo, Loss(topo))
    try:
        load_checkpoint(save_dir, module, None)
    except CheckpointError as exc:
        return str(exc)
    return "loaded"


class _Wider(torch.nn.Module):
    def __init__(self, topology: Topology, column: Any) -> None:
        super().__init__()
        self.up = column(8, 24, topology)

    def forward(self, x: Any) -> Any:
        return x


def _save_small(save_dir: str) -> None:
    topo = Topology(TopologyConfig())
    module = ParallelModule(model_specs(topo, 1, 0.0), topo, Loss(topo))
    save_checkpoint(save_dir, 1, module, None)


def test_checkpoints_that_do_not_fit_give_named_errors(tmp_path: Path) -> None:
    run_distributed(_save_small, 1, str(tmp_path))
    assert run_distributed(_load_into, 1, str(tmp_path), 1, False)[0] == "loaded"
    wider = run_distributed(_load_into, 1, str(tmp_path), 1, True)[0]
    assert "parameter 'layers.1.up.weight': the checkpoint holds shape [16, 8]" in wider
    assert "the model expects [24, 8]" in wider
    deeper = run_distributed(_load_into, 1, str(tmp_path), 2, False)[0]
    assert "parameter 'layers.2.norm.weight' is not in the checkpoint" in deeper
    layer_file = tmp_path / "global_step1" / "model" / "layer_00001.safetensors"
    original = layer_file.read_bytes()
    tampered = bytearray(original)
    tampered[-3] ^= 0xFF  # one flipped byte inside the weights: still a valid safetensors file
    layer_file.write_bytes(bytes(tampered))
    changed = run_distributed(_load_into, 1, str(tmp_path), 1, False)[0]
    assert f"checkpoint file {layer_file} does not match the checksum recorded when it was saved" in changed
    layer_file.write_bytes(original[:100])  # truncated: the checksum catches it too
    truncated = run_distributed(_load_into, 1, str(tmp_path), 1, False)[0]
    assert f"checkpoint file {layer_file} does not match the checksum" in truncated
    manifest = tmp_path / "global_step1" / "manifest.json"  # a checkpoint without checksums (older writers):
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "checksums": {}}))  # the parser says it
    truncated = run_distributed(_load_into, 1, str(tmp_path), 1, False)[0]
    assert f"checkpoint file {layer_file} is corrupt or truncated" in truncated
    assert "no checkpoint at" in run_distributed(_load_into, 1, str(tmp_path / "nowhere"), 1, False)[0]


def _bare_load(path: str) -> str:
    dist.barrier()
    try:
        find_checkpoint(path)
    except CheckpointError as exc:
        return str(exc)
    return "found"


def test_latest_pointing_nowhere_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "latest").write_text("global_step9")
    assert "names global_step9, which has no manifest.json" in run_distributed(_bare_load, 1, str(tmp_path))[0]
