"""ZeRO stages 0-3 of scaling against DeepSpeed's ZeRO of the same stage, on the same model, in the same run.

Run: ``python benchmarks/zero.py [--dp 2 4] [--stages 0 1 2 3] [--steps N] [--device cuda --dtype bfloat16]``
(needs ``pip install -e .[benchmark]`` for DeepSpeed; exits 2 with one line when it is missing).

Why this exists: the ZeRO redesign (issue 11) promises fewer bytes per parameter than the engine it
replaces and step times no slower than DeepSpeed. Figures from separate runs on a shared machine do not
compare, so every contender runs here, one after the other, on the same model, batch and hyper-parameters:

* ``scaling``: our stage k (``OptimizerConfig(zero_stage=k)``);
* ``deepspeed``: ``deepspeed.initialize`` with ZeRO stage k, DeepSpeed's CPU accelerator on gloo (CUDA and
  NCCL with ``--device cuda``), and the same ``torch.optim.AdamW`` (fused kernel) as ours;
* ``today's engine``: our stage-0 path (the bucketed data-parallel all-reduce), the baseline users run now;
* ``pre-redesign ZeRO-1``: ``optimizer.zero: true`` of commit bfde224, run from a temporary git worktree in
  a subprocess (``--no-legacy`` skips it).

Both sides do the same work per step: forward and backward of one micro-batch, the gradient reduction,
AdamW (same betas, eps, constant learning rate, no weight decay), no gradient clipping
(``gradient_clipping: 0`` on both sides, so no side pays for a norm the other skips).

The model is an MLP whose activations are small next to its weights (default: 6 residual blocks of width
512, 12.6M parameters, 8 rows per rank), built from the engine's own column/row-parallel linear layers;
DeepSpeed gets the very same layer objects in an ``nn.Sequential``. So the bytes measured are those of
parameters, gradients and optimizer state, which is what ZeRO shards.

Peak memory is one measurement for every side: a torch memory tracker that sees every tensor storage the
rank allocates from model construction to the end of the second step (when the Adam moments exist), and
reports the largest total it ever held. Bytes per parameter divide that peak (max over ranks) by the
parameter count of the whole model. Step time is the median over ``--steps`` steps after the tracked ones
(the tracker is off then) and one warm-up step, max over ranks.

The targets of issue 11 are printed beside the figures, not asserted: stage 1 <= 12 bytes/parameter and
stage 3 <= 10.5 at dp=2 in fp32 (<= 7.5 at dp=4), step time no slower than DeepSpeed at the same stage.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from scaling.core.nn import ColumnParallelLinear, RowParallelLinear
from scaling.core.pipeline.layer_spec import LayerSpec
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig

LEGACY_COMMIT = "bfde224"  # the last engine before the ZeRO redesign: ZeRO-1 as `optimizer.zero: true`
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RESULT_TAG = "LEGACY-RESULT "  # the line of the legacy subprocess's output that carries its figures
_TRACKED_STEPS = 2  # the Adam moments appear in step 1: the peak needs step 2 to have started

StepFn = Callable[[int], None]


@dataclass(frozen=True)
class Case:
    """One contender at one stage and data-parallel size; travels to the ranks (so plain fields only)."""

    side: str  # "scaling" | "deepspeed" | "engine" | "legacy"
    stage: int
    dp: int
    hidden: int
    blocks: int
    batch: int
    steps: int
    device: str
    dtype: str
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


# The model ------------------------------------------------------------------------------------------
class Block(nn.Module):
    """``x + down(relu(up(x)))``: the engine's column -> row parallel pair, as in examples/mlp_example."""

    def __init__(self, hidden: int, topology: Topology, seed: int) -> None:
        super().__init__()
        self.up = ColumnParallelLinear(hidden, 4 * hidden, topology, seed=seed)
        self.down = RowParallelLinear(4 * hidden, hidden, topology, seed=seed + 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


def layer_specs(case: Case, topology: Topology) -> list[LayerSpec]:
    return [LayerSpec(Block, (case.hidden, topology, 10 + 10 * i)) for i in range(case.blocks)]


def parameter_count(hidden: int, blocks: int) -> int:
    """Parameters of the whole model (weights and biases of both projections of every block)."""
    return blocks * (2 * hidden * 4 * hidden + 4 * hidden + hidden)


def _loss(y: torch.Tensor, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return y.float().pow(2).mean(), {}


# Peak memory ----------------------------------------------------------------------------------------
class _StorageTracker(TorchDispatchMode):
    """Stand-in for ``scaling.core.memory.measure`` until it lands: the bytes of every tensor storage an
    op creates while active, less those freed since (storage finalised, or resized as FSDP2 and DeepSpeed
    stage 3 free unsharded parameters), and the largest total reached."""

    def __init__(self) -> None:
        super().__init__()
        self._token: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> its key in _bytes
        self._bytes: dict[int, int] = {}
        self._next = 0
        self.current = 0
        self.peak = 0
        self._resize = torch.UntypedStorage.resize_

    def count(self, storage: torch.UntypedStorage) -> None:
        if storage.device.type == "meta":
            return
        size = storage.nbytes()
        token = self._token.get(storage)
        if token is None:
            token = self._token[storage] = self._next
            self._next += 1
            self._bytes[token] = 0
            weakref.finalize(storage, self._release, token)
        self.current += size - self._bytes[token]
        self._bytes[token] = size
        self.peak = max(self.peak, self.current)

    def _release(self, token: int) -> None:
        self.current -= self._bytes.pop(token, 0)

    def __enter__(self) -> _StorageTracker:
        resize, tracker = self._resize, self

        def resize_(storage: torch.UntypedStorage, size: int) -> Any:  # not an op: the mode never sees it
            out = resize(storage, size)
            if storage in tracker._token:
                tracker.count(storage)
            return out

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor (FSDP2 shards) unwraps first; its local ops then come back here
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.count(leaf.untyped_storage())
        return out


@dataclass
class _Peak:
    bytes: int = 0


@contextlib.contextmanager
def measure_peak() -> Iterator[_Peak]:
    """The peak bytes of tensor storage allocated inside the block (on the rank's device)."""
    peak = _Peak()
    with _StorageTracker() as tracker:
        yield peak
    peak.bytes = tracker.peak


# The contenders -------------------------------------------------------------------------------------
def _dtype(case: Case) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[case.dtype]


def _topology(case: Case) -> Topology:
    device = torch.device(case.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.distributed.get_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return Topology(TopologyConfig(data_parallel_size=case.dp), device=device)


def _optimizer_config(case: Case, **zero: Any) -> Any:
    from scaling.core.optimizer.config import OptimizerConfig, TrainingGroupConfig
    from scaling.core.optimizer.lr_schedule import LearningRateScheduleConfig

    schedule = LearningRateScheduleConfig(learning_rate=case.learning_rate, learning_rate_decay_style="constant")
    return OptimizerConfig(
        beta1=case.beta1,
        beta2=case.beta2,
        eps=case.eps,
        gradient_clipping=0.0,
        training_groups=[TrainingGroupConfig(weight_decay=0.0, learning_rate_schedule=schedule)],
        **zero,
    )


def _engine_step(case: Case, topology: Topology, batch: torch.Tensor, zero: dict[str, Any]) -> StepFn:
    """Our engine as the trainer drives it: ``ParallelModule.train_step`` then ``Optimizer.step``."""
    from scaling.core.nn.precision import PrecisionConfig
    from scaling.core.optimizer.optimizer import Optimizer
    from scaling.core.pipeline.module import ParallelModule

    config = _optimizer_config(case, **zero)
    # The pre-redesign engine shards in the optimizer alone; since the redesign the module is built for
    # the stage too (FSDP2 units for stages 1-3).
    sharding = {} if case.side == "legacy" else {"sharding": config.sharding}
    module = ParallelModule(
        layer_specs(case, topology), topology, _loss, precision=PrecisionConfig(precision=case.dtype), **sharding
    )
    optimizer = Optimizer(module, config)

    def step(index: int) -> None:
        module.train_step([batch], step=index)
        optimizer.step(index)

    return step


def _deepspeed_step(case: Case, topology: Topology, batch: torch.Tensor) -> StepFn:
    import deepspeed  # type: ignore[import-not-found]
    from deepspeed.utils import logger as ds_logger  # type: ignore[import-not-found]

    ds_logger.setLevel("WARNING")
    model = nn.Sequential(*(spec.build() for spec in layer_specs(case, topology))).to(topology.device)
    adamw = torch.optim.AdamW(
        model.parameters(),
        lr=case.learning_rate,
        betas=(case.beta1, case.beta2),
        eps=case.eps,
        weight_decay=0.0,
        fused=True,  # the kernel our optimizer runs
    )
    bucket = int(topology.config.grad_reduce_bucket_mb * 2**20) // torch.finfo(_dtype(case)).bits * 8
    config = {
        "train_micro_batch_size_per_gpu": case.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {
            "stage": case.stage,
            # DeepSpeed's defaults (5e8 elements) are sized for billions of parameters: on this model its
            # buckets would dwarf the weights. Give it the bucket budget of our stage-0 all-reduce.
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            "stage3_prefetch_bucket_size": bucket,
        },
        "zero_allow_untested_optimizer": True,  # a client torch.optim.AdamW rather than DeepSpeed's FusedAdam
        "bf16": {"enabled": case.dtype == "bfloat16"},
        "fp16": {"enabled": case.dtype == "float16"},
        "steps_per_print": 2**31,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=adamw, config=config, dist_init_required=False)
    x = batch.to(_dtype(case))

    def step(index: int) -> None:
        loss, _ = _loss(engine(x), None)
        engine.backward(loss)
        engine.step()

    return step


def _step_fn(case: Case, topology: Topology, batch: torch.Tensor) -> StepFn:
    if case.side == "deepspeed":
        return _deepspeed_step(case, topology, batch)
    if case.side == "legacy":  # the pre-redesign optimizer: ZeRO-1 as a boolean
        return _engine_step(case, topology, batch, {"zero": True})
    if case.side == "engine":
        return _engine_step(case, topology, batch, {})
    return _engine_step(case, topology, batch, {"zero_stage": case.stage})


def _rank(case: Case) -> dict[str, float]:
    """One rank: build and run two steps under the tracker, then time steps with it off."""
    if case.side == "deepspeed":  # DeepSpeed picks its accelerator at import; choose it, do not let it guess
        os.environ["DS_ACCELERATOR"] = "cuda" if case.device == "cuda" else "cpu"
    topology = _topology(case)
    torch.manual_seed(1234 + topology.dp_rank)
    batch = torch.randn(case.batch, case.hidden, device=topology.device)
    sync = torch.cuda.synchronize if topology.device.type == "cuda" else (lambda: None)
    with measure_peak() as peak:
        step = _step_fn(case, topology, batch)
        for index in range(_TRACKED_STEPS):
            step(index)
        sync()
    times = []
    for index in range(_TRACKED_STEPS, _TRACKED_STEPS + 1 + case.steps):
        begin = time.perf_counter()
        step(index)
        sync()
        times.append(time.perf_counter() - begin)
    return {"peak_bytes": float(peak.bytes), "step_s": statistics.median(times[1:])}


def run_case(case: Case) -> dict[str, float]:
    """Peak bytes per parameter and step time of one contender (worst rank of each)."""
    backend = "nccl" if case.device == "cuda" else "gloo"
    results = run_distributed(_rank, case.dp, case, timeout_s=900, backend=backend)
    return {
        "bytes_per_param": max(r["peak_bytes"] for r in results) / parameter_count(case.hidden, case.blocks),
        "step_ms": max(r["step_s"] for r in results) * 1e3,
    }


# The pre-redesign engine from a worktree ------------------------------------------------------------
def run_legacy(cases: list[Case]) -> dict[int, dict[str, float]]:
    """ZeRO-1 of commit bfde224, per dp: this script in a subprocess whose ``scaling`` is that commit's."""
    worktree = tempfile.mkdtemp(prefix="zero-old-")
    os.rmdir(worktree)  # git creates it
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", "-q", worktree, LEGACY_COMMIT], check=True)
    try:
        env = {**os.environ, "PYTHONPATH": os.path.join(worktree, "src")}
        payload = json.dumps([asdict(c) for c in cases])
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--legacy-cases", payload],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith(_RESULT_TAG)]
        if done.returncode != 0 or not lines:
            print(
                f"pre-redesign ZeRO-1 failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}", file=sys.stderr
            )
            return {}
        return {int(dp): value for dp, value in json.loads(lines[-1][len(_RESULT_TAG) :]).items()}
    finally:
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", worktree], check=False)


def _legacy_main(payload: str) -> None:
    import scaling

    expected = os.path.join(os.environ["PYTHONPATH"], "scaling")
    if os.path.dirname(os.path.abspath(scaling.__file__)) != expected:
        raise SystemExit(f"the legacy run imported scaling from {scaling.__file__}, not {expected}")
    cases = [Case(**fields) for fields in json.loads(payload)]
    print(_RESULT_TAG + json.dumps({case.dp: run_case(case) for case in cases}), flush=True)


# The table ------------------------------------------------------------------------------------------
def _target_bytes(stage: int, dp: int, dtype: str) -> float | None:
    if dtype != "float32":
        return None
    return {(1, 2): 12.0, (3, 2): 10.5, (3, 4): 7.5}.get((stage, dp))


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(a: dict[str, float] | None, b: dict[str, float] | None, key: str) -> float | None:
    return None if a is None or b is None else a[key] / b[key]


def print_table(
    args: argparse.Namespace,
    results: dict[tuple[str, int, int], dict[str, float]],
    legacy: dict[int, dict[str, float]],
) -> None:
    n = parameter_count(args.hidden, args.blocks)
    print(
        f"ZeRO on an MLP of {args.blocks} blocks of width {args.hidden} ({n / 1e6:.1f}M parameters), "
        f"{args.batch} rows per rank, {args.dtype} on {args.device}; step time: median of {args.steps} steps"
    )
    print("B/p: peak bytes one rank held (worst rank) per parameter of the whole model; ms: step time")
    headers = ["dp", "stage", "scaling B/p", "deepspeed B/p", "ratio", "target B/p", "scaling ms", "deepspeed ms",
               "ratio", "target"]  # fmt: skip
    rows = []
    for dp in args.dp:
        for stage in args.stages:
            ours, theirs = results.get(("scaling", stage, dp)), results.get(("deepspeed", stage, dp))
            rows.append(
                [
                    str(dp),
                    str(stage),
                    _fmt(ours and ours["bytes_per_param"]),
                    _fmt(theirs and theirs["bytes_per_param"]),
                    _fmt(_ratio(ours, theirs, "bytes_per_param")),
                    "<= " + _fmt(target) if (target := _target_bytes(stage, dp, args.dtype)) else "-",
                    _fmt(ours and ours["step_ms"], 1),
                    _fmt(theirs and theirs["step_ms"], 1),
                    _fmt(_ratio(ours, theirs, "step_ms")),
                    "<= 1.00",
                ]
            )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    for dp in args.dp:
        engine = results.get(("engine", 0, dp))
        if engine is not None:
            print(
                f"dp {dp}: today's engine (stage 0, bucketed all-reduce): {engine['bytes_per_param']:.2f} B/p, "
                f"{engine['step_ms']:.1f} ms"
            )
        if dp in legacy:
            old = legacy[dp]
            print(
                f"dp {dp}: pre-redesign ZeRO-1 ({LEGACY_COMMIT}, optimizer.zero: true): "
                f"{old['bytes_per_param']:.2f} B/p, {old['step_ms']:.1f} ms"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[2, 4], help="data-parallel sizes")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per contender")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8, help="rows per rank and step")
    parser.add_argument("--no-legacy", action="store_true", help=f"skip the ZeRO-1 of {LEGACY_COMMIT}")
    parser.add_argument("--legacy-cases", help=argparse.SUPPRESS)  # the worktree subprocess's entry
    args = parser.parse_args()
    if args.legacy_cases:
        _legacy_main(args.legacy_cases)
        return
    if importlib.util.find_spec("deepspeed") is None:
        print("benchmarks/zero.py compares against DeepSpeed, which is not installed: pip install -e .[benchmark]")
        raise SystemExit(2)

    def case(side: str, stage: int, dp: int) -> Case:
        return Case(side, stage, dp, args.hidden, args.blocks, args.batch, args.steps, args.device, args.dtype)

    from scaling.core.optimizer.config import OptimizerConfig

    sides = ("scaling", "deepspeed") if "zero_stage" in OptimizerConfig.model_fields else ("deepspeed",)
    results: dict[tuple[str, int, int], dict[str, float]] = {}
    for dp in args.dp:
        results["engine", 0, dp] = run_case(case("engine", 0, dp))
        for stage in args.stages:
            for side in sides:
                results[side, stage, dp] = run_case(case(side, stage, dp))
    legacy = {} if args.no_legacy else run_legacy([case("legacy", 1, dp) for dp in args.dp])
    print_table(args, results, legacy)


if __name__ == "__main__":
    main()
