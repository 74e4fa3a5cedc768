"""``scaling.training``: clipping, fp16 loss scaling and rank-0-only code in a plain loop on a sharded model.

Where a failure points:

* ``test_clip_grad_norm_equals_one_process``: a wrong norm means the model's ``grads_for_norm()`` counts a
  weight twice or not at all (tied embedding, replicated norms at tp 2), or the squares are summed over the
  wrong group; a right norm with wrong gradients means some shard was not scaled by the clipping factor.
  The reference is one process's ``torch.nn.utils.clip_grad_norm_`` on the plain ``Transformer`` of the
  same seed (the same weights as every sharded layout) over the whole batch.
* ``test_scaler_overflow_on_one_rank_skips_everywhere``: ranks that disagree on skipping mean the overflow
  flag was not all-reduced over the world before ``optimizer.step()``; the model runs in fp16 on CPU.
* The ``master_node`` tests: the trace-function trick that skips a ``with`` block on non-zero ranks.

The distributed checks run in two worlds of two processes (one per module, shared by its tests through
module-scoped fixtures), since starting a world costs more than everything done in it.
"""

from __future__ import annotations

import contextlib
import sys
from types import FrameType
from typing import Any

import pytest
import torch
import torch.distributed as dist

from scaling.core.nn.param_meta import shard
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology
from scaling.core.zero.tensors import gathered, local_part
from scaling.training import Scaler, clip_grad_norm, master_node
from scaling.transformer import Transformer
from scaling.transformer.model.config import TransformerArchitectureConfig

ARCH = {
    "vocab_size": 64, "hidden_size": 16, "num_layers": 2, "num_attention_heads": 4, "num_kv_heads": 2,
    "intermediate_size": 32, "sequence_length": 16, "weight_tying": True,
}  # fmt: skip
SEED = 3
LR = 1e-3  # AdamW's first step moves every weight by about LR: keeps float32 noise well under atol
MAX_NORM = 0.1  # well below the model's gradient norm at initialisation, so clipping happens
LAYOUTS = [(3, 1), (3, 2), (0, 1)]  # (zero_stage, tp) on 2 processes: dp 2 sharded, tp 2 dp 1, dp 2 replicated


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (4, 9), generator=g)
    mask = (torch.rand(4, 8, generator=g) > 0.3).float()  # uneven loss tokens per data-parallel rank
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}


def _sharded(zero_stage: int, tp: int, precision: str = "fp32") -> Any:
    from scaling.transformer.plain.model import ShardedTransformer
    from scaling.transformer.plain_world import reset_plain_world

    reset_plain_world()
    return ShardedTransformer(
        TransformerArchitectureConfig(**ARCH), zero_stage=zero_stage, precision=precision, tp=tp, seed=SEED
    )


def _local_batch(model: Any) -> dict[str, torch.Tensor]:
    dp, rank = model.topology.dp_size, model.topology.dp_rank
    return {key: value.chunk(dp)[rank] for key, value in _batch().items()}


# clip_grad_norm ------------------------------------------------------------------------------------------


def _one_process_reference() -> dict[str, Any]:
    """torch's own clipping and AdamW on the unsharded model over the whole batch (no process group)."""
    model = Transformer(TransformerArchitectureConfig(**ARCH), Topology.single(), seed=SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    model(_batch()).loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"norm": float(norm), "grads": grads, "weights": weights}


def _max_error(model: Any, values: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """The largest difference between this rank's tp slice of each full ``values`` tensor and the same
    slice of the one-process ``reference``."""
    tp_rank = model.topology.tp_rank
    error = 0.0
    for name, value in values.items():
        record = model.engine.param_table[name]
        full = reference[name]
        expected = full if record.tp_split_dim is None else shard(full, record.tp_split_dim, tp_rank, record.tp_parts)
        error = max(error, (value - expected).abs().max().item())
    return error


def _clip_in_layouts(reference: dict[str, Any]) -> dict[tuple[int, int], dict[str, Any]]:
    torch.set_num_threads(1)
    results = {}
    for zero_stage, tp in LAYOUTS:
        model = _sharded(zero_stage, tp)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        model(_local_batch(model)).backward()
        norm = clip_grad_norm(model, optimizer, MAX_NORM)
        params = model.named_parameters_by_name()
        # gathered(): this rank's tp slice, whole over data-parallel shards (collective, same order everywhere)
        grads = {name: gathered(p.grad) for name, p in params.items()}
        optimizer.step()
        weights = {name: gathered(p.detach()) for name, p in params.items()}
        results[(zero_stage, tp)] = {
            "norm": float(norm),
            "sizes": (model.topology.dp_size, model.topology.tp_size),
            "grad_error": _max_error(model, grads, reference["grads"]),
            "weight_error": _max_error(model, weights, reference["weights"]),
            "names": sorted(params) == sorted(reference["weights"]),
        }
    return results


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return _one_process_reference()


@pytest.fixture(scope="module")
def clipped(reference: dict[str, Any]) -> list[dict[tuple[int, int], dict[str, Any]]]:
    result: list[dict[tuple[int, int], dict[str, Any]]] = run_distributed(_clip_in_layouts, 2, reference, timeout_s=120)
    return result


@pytest.mark.timeout(150)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["zero3-dp2", "zero3-tp2", "zero0-dp2"])
def test_clip_grad_norm_equals_one_process(
    layout: tuple[int, int], reference: dict[str, Any], clipped: list[dict[tuple[int, int], dict[str, Any]]]
) -> None:
    assert reference["norm"] > 2 * MAX_NORM  # the factor is far from 1: a shard left unclipped shows
    tp = layout[1]
    for rank, results in enumerate(clipped):
        got = results[layout]
        assert got["sizes"] == (2 // tp, tp), rank
        assert got["names"], rank
        # The same norm on every rank, summed from shards in another order: float32 rounding only.
        assert got["norm"] == pytest.approx(reference["norm"], rel=1e-5), (rank, got["norm"], reference["norm"])
        # The clipped gradients themselves (AdamW's first step barely depends on the gradient's scale).
        assert got["grad_error"] < 1e-7, (rank, got["grad_error"])
        assert got["weight_error"] < 1e-6, (rank, got["weight_error"])


def test_clip_grad_norm_rejects_what_it_cannot_do() -> None:
    linear = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"norm_type=1\.0 is not supported"):
        clip_grad_norm(linear, optimizer, 1.0, norm_type=1.0)
    with pytest.raises(ValueError, match=r"max_norm \(0\) must be positive"):
        clip_grad_norm(linear, optimizer, 0)
    with pytest.raises(TypeError, match=r"Linear has no grads_for_norm\(\)"):
        clip_grad_norm(linear, optimizer, 1.0)


# Scaler, in one process ----------------------------------------------------------------------------------


def _linear_and_loss() -> tuple[torch.nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 2)
    loss = linear(torch.randn(4, 3)).pow(2).mean()
    return linear, loss


def _grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters() if p.grad is not None]


def test_scaler_scales_unscales_steps_and_grows() -> None:
    linear, loss = _linear_and_loss()
    reference, reference_loss = _linear_and_loss()
    reference_loss.backward()
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference_optimizer.step()

    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)
    scaler = Scaler(init_scale=8.0, growth_interval=2)
    assert scaler.get_scale() == 8.0
    scaled = scaler.scale(loss)
    torch.testing.assert_close(scaled, loss * 8)
    scaled.backward()
    for got, want in zip(_grads(linear), _grads(reference), strict=True):
        torch.testing.assert_close(got, want * 8)
    scaler.unscale_(optimizer)
    scaler.unscale_(optimizer)  # idempotent within a step
    for got, want in zip(_grads(linear), _grads(reference), strict=True):
        torch.testing.assert_close(got, want)
    assert scaler.step(optimizer) is True  # already unscaled: not divided again
    for got, want in zip(linear.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want)
    scaler.update()
    assert scaler.get_scale() == 8.0  # one clean step of growth_interval 2

    optimizer.zero_grad()
    linear(torch.ones(1, 3)).sum().mul(scaler.get_scale()).backward()
    assert scaler.step(optimizer) is True  # unscales by itself
    scaler.update()
    assert scaler.get_scale() == 16.0  # two clean steps in a row: grown by growth_factor


def test_scaler_overflow_skips_the_step_and_backs_off() -> None:
    linear, loss = _linear_and_loss()
    optimizer = torch.optim.AdamW(linear.parameters(), lr=0.1)
    scaler = Scaler(init_scale=64.0, growth_interval=2, backoff_factor=0.25)

    scaler.scale(loss).backward()  # a clean step: the growth tracker counts 1
    assert scaler.step(optimizer)
    scaler.update()

    optimizer.zero_grad()
    scaler.scale(linear(torch.ones(1, 3)).sum()).backward()
    linear.weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in linear.parameters()]
    assert scaler.step(optimizer) is False
    for got, want in zip(linear.parameters(), before, strict=True):
        assert torch.equal(got, want)  # skipped: nothing changed, not even AdamW's moments
    assert all(state["step"] == 1 for state in optimizer.state.values())
    scaler.update()
    assert scaler.get_scale() == 16.0  # 64 * 0.25

    optimizer.zero_grad()
    scaler.scale(linear(torch.ones(1, 3)).sum()).backward()
    assert scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 16.0  # the overflow reset the tracker: one clean step is not two


def test_scaler_disabled_passes_everything_through() -> None:
    linear, loss = _linear_and_loss()
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)
    scaler = Scaler(enabled=False)
    assert scaler.get_scale() == 1.0
    assert scaler.scale(loss) is loss
    loss.backward()
    grads = _grads(linear)
    scaler.unscale_(optimizer)
    for got, want in zip(_grads(linear), grads, strict=True):
        assert torch.equal(got, want)
    linear.bias.grad[0] = float("inf")  # not checked: bf16 and fp32 loops step whatever they get
    assert scaler.step(optimizer) is True
    assert not torch.isfinite(linear.bias).all()
    scaler.update()
    assert scaler.get_scale() == 1.0


def test_scaler_state_dict_and_misuse() -> None:
    linear, loss = _linear_and_loss()
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)
    scaler = Scaler(init_scale=32.0, growth_interval=3)
    with pytest.raises(RuntimeError, match=r"no step\(optimizer\) since the last update"):
        scaler.update()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    with pytest.raises(RuntimeError, match="already stepped in this step"):
        scaler.step(optimizer)
    scaler.update()

    restored = Scaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.get_scale() == 32.0 and restored.growth_interval == 3
    assert restored.state_dict() == scaler.state_dict()  # the growth tracker (1) came along
    with pytest.raises(ValueError, match=r"lacks \['growth_tracker'\]"):
        restored.load_state_dict({"scale": 2.0})
    with pytest.raises(ValueError, match=r"backoff_factor \(1\.5\)"):
        Scaler(backoff_factor=1.5)
    with pytest.raises(ValueError, match=r"growth_interval \(0\)"):
        Scaler(growth_interval=0)


# Scaler and master_node on two processes -----------------------------------------------------------------


def _snapshot(model: Any) -> list[torch.Tensor]:
    return [local_part(p.detach()).clone() for p in model.parameters()]


def _changed(model: Any, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(_snapshot(model), before, strict=True))


def _scaler_world() -> dict[str, Any]:
    torch.set_num_threads(1)
    rank = dist.get_rank()
    model = _sharded(3, 1, precision="fp16")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    scaler = Scaler(init_scale=2.0**10)
    batch = _local_batch(model)
    out: dict[str, Any] = {}

    model(batch).backward()  # unscaled, for the reference norm
    plain_norm = float(clip_grad_norm(model, optimizer, 1e9))
    optimizer.zero_grad()
    scaler.scale(model(batch)).backward()
    scaler.unscale_(optimizer)
    out["norms"] = (plain_norm, float(clip_grad_norm(model, optimizer, 1e9)))
    before = _snapshot(model)
    out["stepped"] = [scaler.step(optimizer)]
    out["changed"] = [_changed(model, before)]
    scaler.update()
    out["scales"] = [scaler.get_scale()]

    optimizer.zero_grad()
    scaler.scale(model(batch)).backward()
    if rank == 1:  # an overflow on one rank only
        grad = next(local_part(p.grad) for p in model.parameters() if local_part(p.grad).numel() > 0)
        grad.view(-1)[0] = float("inf")
    before = _snapshot(model)
    out["stepped"].append(scaler.step(optimizer))
    out["changed"].append(_changed(model, before))
    out["adam_steps"] = sorted({int(state["step"]) for state in optimizer.state.values()})
    scaler.update()
    out["scales"].append(scaler.get_scale())
    out["master_node"] = _master_node_uses()
    return out


def _master_node_uses() -> dict[str, Any]:
    ran = []
    with master_node():
        ran.append("block")
    ran.append("after")
    with master_node():
        with master_node():
            ran.append("nested")
        ran.append("outer")
    # On one line, no line event comes before the body: the trick must fire on the first opcode.
    with master_node(): ran.append("one line")  # noqa: E701  # fmt: skip

    @master_node()
    def value(x: int) -> int:
        ran.append("function")
        return x + 1

    raised = None
    try:
        with master_node():
            raise KeyError("from the block")
    except KeyError as error:
        raised = str(error)
    return {"ran": ran, "returned": value(1), "raised": raised, "trace": sys.gettrace() is None}


@pytest.fixture(scope="module")
def scaler_world() -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = run_distributed(_scaler_world, 2, timeout_s=120)
    return result


@pytest.mark.timeout(150)
def test_scaler_overflow_on_one_rank_skips_everywhere(scaler_world: list[dict[str, Any]]) -> None:
    for rank, got in enumerate(scaler_world):
        plain, unscaled = got["norms"]
        assert unscaled == pytest.approx(plain, rel=1e-2), rank  # unscale_ undid the 2**10 (fp16 backward)
        assert got["stepped"] == [True, False], rank  # rank 0 saw finite gradients and still skipped
        assert got["changed"] == [True, False], rank
        assert got["adam_steps"] == [1], rank  # the skipped step left AdamW's state alone
        assert got["scales"] == [2.0**10, 2.0**9], rank  # backed off once, the same on every rank


@pytest.mark.timeout(150)
def test_master_node_runs_on_rank_zero_only(scaler_world: list[dict[str, Any]]) -> None:
    zero, one = (got["master_node"] for got in scaler_world)
    assert zero == {
        "ran": ["block", "after", "nested", "outer", "one line", "function"],
        "returned": 2,
        "raised": "'from the block'",  # exceptions of the block propagate on rank 0
        "trace": True,
    }
    # Rank 1: no block ran, the code after each did, and tracing is off again.
    assert one == {"ran": ["after"], "returned": None, "raised": None, "trace": True}


# master_node in this process (RANK from the environment) -------------------------------------------------


def test_master_node_skips_on_rank_one_and_restores_a_previous_tracer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    events = []

    def tracer(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_name == "probe":
            events.append(event)

    def probe() -> None:
        pass

    ran = []
    previous = sys.gettrace()
    sys.settrace(tracer)  # a debugger's or coverage's place
    try:
        with master_node():
            ran.append("block")
        for _ in range(2):
            with master_node(): ran.append("loop")  # noqa: E701  # fmt: skip
        probe()
        restored = sys.gettrace()
    finally:
        sys.settrace(previous)
    assert ran == []
    assert restored is tracer
    assert events == ["call"]  # and it still traces

    @master_node()
    def value() -> int:
        return 1

    assert value() is None
    monkeypatch.setenv("RANK", "0")
    assert value() == 1  # the rank is read at call time, not when decorating


def test_master_node_refuses_what_it_cannot_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    with (
        pytest.raises(RuntimeError, match="must be used as `with master_node\\(\\):`"),
        contextlib.ExitStack() as stack,
    ):
        stack.enter_context(master_node())
    monkeypatch.setenv("RANK", "first")
    with pytest.raises(ValueError, match="RANK='first' is not an integer"), master_node():
        pass
