"""ZeRO stages 0-3 of scaling against DeepSpeed's ZeRO of the same stage, on the same model, in the same run.

Run: ``python benchmarks/zero.py [--dp 2 4] [--stages 0 1 2 3] [--steps N] [--device cuda --dtype bfloat16]``
(needs ``pip install -e .[benchmark]`` for DeepSpeed; exits 2 with one line when it is missing).

Why this exists: the ZeRO redesign (issue 11) promises fewer bytes per parameter than the engine it
replaces and step times no slower than DeepSpeed. Figures from separate runs on a shared machine do not
compare, so every contender runs here, in the same run, on the same model, batch and hyper-parameters:

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
DeepSpeed gets the same layers, built from the same specs and seeds, in an ``nn.Sequential``. So the bytes
measured are those of parameters, gradients and optimizer state, which is what ZeRO shards.

Peak memory is one measurement for every side, ``scaling.core.zero.memory.measure_peak`` (torch's memory
tracker: every tensor storage alive, from before model construction to the end of the second step, when
the Adam moments exist), in a world of processes of its own per contender, so nothing another contender
left behind is counted. Bytes per parameter divide the peak of the worst rank by the parameter count of
the whole model. Step times come from one more world per stage that builds all of that stage's
contenders and steps them in turn (after three warm-up steps each), so a burst of load from other
processes slows all of them alike; per rank the fastest of ``--steps`` steps by default (``--statistic
median`` for the median), then the slowest rank. The fastest step is the one least disturbed by other
processes, so it compares implementations; on 2 shared cores the median moves by tens of percent between
runs. The pre-redesign ZeRO-1 runs in its own subprocess, so its time is not timed in turn with the rest.

DeepSpeed's bucket sizes default to 5e8 elements, sized for billions of parameters: on this model a run
with them peaks at ~170 bytes/parameter at stages 1-3, nearly all of it buckets. It gets the bucket budget
of our stage-0 all-reduce instead (``grad_reduce_bucket_mb``, 25 MiB) for its reduce, all-gather and
stage-3 prefetch buckets.

The targets of issue 11 are printed beside the figures, not asserted: stage 1 <= 12 bytes/parameter and
stage 3 <= 10.5 at dp=2 in fp32 (<= 7.5 at dp=4), step time no slower than DeepSpeed at the same stage.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from scaling.core.nn import ColumnParallelLinear, RowParallelLinear
from scaling.core.pipeline.layer_spec import LayerSpec
from scaling.core.testing import DistributedTestFailure, run_distributed
from scaling.core.topology import Topology, TopologyConfig

LEGACY_COMMIT = "bfde224"  # the last engine before the ZeRO redesign: ZeRO-1 as `optimizer.zero: true`
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RESULT_TAG = "LEGACY-RESULT "  # the line of the legacy subprocess's output that carries its figures
_TRACKED_STEPS = 2  # the Adam moments appear in step 1: the peak needs step 2 to have started

StepFn = Callable[[int], None]
# (side, stage, dp) -> {"bytes_per_param": ..., "step_ms": ...}; a figure is None when its run failed
Results = dict[tuple[str, int, int], dict[str, float | None]]


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
    statistic: str = "min"  # of the timed steps: "min" or "median"
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
        out: torch.Tensor = x + self.down(torch.relu(self.up(x)))
        return out


def layer_specs(case: Case, topology: Topology) -> list[LayerSpec]:
    return [LayerSpec(Block, (case.hidden, topology, 10 + 10 * i)) for i in range(case.blocks)]


def parameter_count(hidden: int, blocks: int) -> int:
    """Parameters of the whole model (weights and biases of both projections of every block)."""
    return blocks * (2 * hidden * 4 * hidden + 4 * hidden + hidden)


def _loss(y: torch.Tensor, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return y.float().pow(2).mean(), {}


# Peak memory ----------------------------------------------------------------------------------------
def _measure_peak() -> Callable[..., Any]:
    """``scaling.core.zero.memory``'s measurement, for every side alike. The pre-redesign tree has none, so
    its run loads the file of this checkout (it needs nothing of scaling)."""
    try:
        from scaling.core.zero.memory.measure import measure_peak
    except ImportError:
        name = "_zero_benchmark_measure"
        path = os.path.join(REPO, "src", "scaling", "core", "zero", "memory", "measure.py")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None, path
        module = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        measure_peak = module.measure_peak
    return measure_peak


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
    # Since the redesign the module is built for its stage too (FSDP2 units for stages 1-3); the engine's
    # default (stage 0) and the pre-redesign ZeRO-1 (sharded in the optimizer alone) need no argument.
    sharding = {"sharding": config.sharding} if case.side == "scaling" else {}
    module = ParallelModule(
        layer_specs(case, topology), topology, _loss, precision=PrecisionConfig(precision=case.dtype), **sharding
    )
    # The pre-redesign tree (bfde224) builds its optimizer from the module itself.
    optimizer = Optimizer.for_module(module, config) if hasattr(Optimizer, "for_module") else Optimizer(module, config)  # type: ignore[arg-type]

    def step(index: int) -> None:
        module.train_step([batch], step=index)
        optimizer.step(index)

    return step


def _deepspeed_step(case: Case, topology: Topology, batch: torch.Tensor) -> StepFn:
    import deepspeed  # type: ignore[import-untyped, import-not-found, unused-ignore]
    from deepspeed.utils import logger as ds_logger  # type: ignore[import-untyped, import-not-found, unused-ignore]

    ds_logger.setLevel("WARNING")
    # DeepSpeed calls collectives that torch has deprecated; one warning per call and rank is noise here.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    model = nn.Sequential(*(spec.build() for spec in layer_specs(case, topology))).to(topology.device)
    adamw = torch.optim.AdamW(
        model.parameters(),
        lr=case.learning_rate,
        betas=(case.beta1, case.beta2),
        eps=case.eps,
        weight_decay=0.0,
        fused=True,  # the kernel our optimizer runs
    )
    bucket = int(topology.config.grad_reduce_bucket_mb * 2**20) // _dtype(case).itemsize  # in elements
    config = {
        "train_micro_batch_size_per_gpu": case.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {
            "stage": case.stage,
            # Not DeepSpeed's 5e8-element defaults (see the module docstring): our stage 0's bucket budget.
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            "stage3_prefetch_bucket_size": bucket,
        },
        "zero_allow_untested_optimizer": True,  # a client torch.optim.AdamW rather than DeepSpeed's FusedAdam
        "bf16": {"enabled": case.dtype == "bfloat16"},
        "fp16": {"enabled": case.dtype == "float16"},
        "steps_per_print": 2**31,
    }
    with contextlib.redirect_stdout(io.StringIO()):  # "DeepSpeed ... built successfully", once per rank and run
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


def _setup(case: Case) -> tuple[Topology, torch.Tensor, Callable[[], None]]:
    # DeepSpeed picks its accelerator when first imported: choose it rather than let it guess.
    os.environ["DS_ACCELERATOR"] = "cuda" if case.device == "cuda" else "cpu"
    topology = _topology(case)
    torch.manual_seed(1234 + topology.dp_rank)
    batch = torch.randn(case.batch, case.hidden, device=topology.device)
    sync = torch.cuda.synchronize if topology.device.type == "cuda" else (lambda: None)
    return topology, batch, sync


def _memory_rank(case: Case) -> float:
    """This rank's peak bytes from before the model exists to the end of the second step."""
    topology, batch, sync = _setup(case)

    def build_and_start() -> None:
        step = _step_fn(case, topology, batch)
        for index in range(_TRACKED_STEPS):
            step(index)
        sync()

    return float(_measure_peak()(build_and_start).peak_bytes)


def _timing_rank(cases: list[Case]) -> list[float]:
    """Seconds per step of each contender, stepping them in turn: a burst of load from other processes
    then slows all of them alike instead of whichever happened to run at the time."""
    topology, batch, sync = _setup(cases[0])
    steps = [_step_fn(case, topology, batch) for case in cases]
    warm_up = _TRACKED_STEPS + 1  # state allocated, first-use costs paid
    times: list[list[float]] = [[] for _ in cases]
    for index in range(warm_up + cases[0].steps):
        # Each round starts with the next contender, so none always runs after the same other one (whose
        # memory traffic leaves the caches cold for it); the order is the same on every rank.
        for i in (index + k for k in range(len(cases))):
            begin = time.perf_counter()
            steps[i % len(cases)](index)
            sync()
            if index >= warm_up:
                times[i % len(cases)].append(time.perf_counter() - begin)
    statistic = min if cases[0].statistic == "min" else statistics.median
    return [statistic(record) for record in times]


def _describe(case: Case) -> str:
    what = {"engine": "today's engine", "legacy": f"ZeRO-1 of {LEGACY_COMMIT}"}.get(case.side, case.side)
    return f"dp {case.dp} stage {case.stage} {what}"


def _root_cause(error: DistributedTestFailure) -> str:
    """The last line of the first failing rank's traceback: the exception, in one line."""
    first_rank = str(error).split("\n--- rank ")[1] if "\n--- rank " in str(error) else str(error)
    lines = [line for line in first_rank.splitlines() if line.strip()]
    return lines[-1].strip() if lines else str(error)


def _run(fn: Callable[..., Any], dp: int, arg: Any, device: str, what: str) -> list[Any] | None:
    """The ranks' results, or None after one line on stderr: one broken contender leaves the others'
    figures standing."""
    try:
        return run_distributed(fn, dp, arg, timeout_s=900, backend="nccl" if device == "cuda" else "gloo")
    except DistributedTestFailure as error:
        print(f"{what} failed: {_root_cause(error)}", file=sys.stderr, flush=True)
        return None


def measure_memory(case: Case) -> float | None:
    """Peak bytes per parameter of the whole model, on the worst rank (a world of its own per contender,
    so nothing another contender left behind is counted)."""
    peaks = _run(_memory_rank, case.dp, case, case.device, f"{_describe(case)} (memory)")
    if peaks is None:
        return None
    value = float(max(peaks)) / parameter_count(case.hidden, case.blocks)
    print(f"{_describe(case)}: {value:.2f} bytes/parameter", file=sys.stderr, flush=True)
    return value


def measure_times(cases: list[Case]) -> list[float | None]:
    """Step time in ms of each contender (slowest rank), all in one world; if that fails, each alone."""
    per_rank = _run(_timing_rank, cases[0].dp, cases, cases[0].device, ", ".join(map(_describe, cases)))
    if per_rank is None and len(cases) > 1:
        return [value for case in cases for value in measure_times([case])]
    values = [None if per_rank is None else max(r[i] for r in per_rank) * 1e3 for i in range(len(cases))]
    for case, value in zip(cases, values, strict=True):
        if value is not None:
            print(f"{_describe(case)}: {value:.1f} ms per step", file=sys.stderr, flush=True)
    return values


def run_cases(groups: list[list[Case]]) -> Results:
    """Memory of every contender, then the step times of each group (contenders timed side by side)."""
    results: Results = {}
    for group in groups:
        for case in group:
            results[case.side, case.stage, case.dp] = {"bytes_per_param": measure_memory(case)}
        for case, value in zip(group, measure_times(group), strict=True):
            results[case.side, case.stage, case.dp]["step_ms"] = value
    return results


# The pre-redesign engine from a worktree ------------------------------------------------------------
def run_legacy(cases: list[Case]) -> Results:
    """ZeRO-1 of commit bfde224, per dp: this script in a subprocess whose ``scaling`` is that commit's,
    from a git worktree that is removed again when the run ends (or fails)."""
    failed: Results = {("legacy", c.stage, c.dp): {"bytes_per_param": None, "step_ms": None} for c in cases}
    worktree = tempfile.mkdtemp(prefix="zero-old-")
    os.rmdir(worktree)  # git creates it
    add = ["git", "-C", REPO, "worktree", "add", "--detach", "-q", worktree, LEGACY_COMMIT]
    if subprocess.run(add, capture_output=True, text=True).returncode != 0:
        print(f"pre-redesign ZeRO-1 skipped: cannot check out {LEGACY_COMMIT} (not a full clone?)", file=sys.stderr)
        return failed
    try:
        env = {**os.environ, "PYTHONPATH": os.path.join(worktree, "src")}
        payload = json.dumps([asdict(c) for c in cases])
        command = [sys.executable, os.path.abspath(__file__), "--legacy-cases", payload]
        # Its own session, so a timeout or Ctrl-C takes its ranks down with it.
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, _ = process.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            print("pre-redesign ZeRO-1 failed: no result after 30 minutes", file=sys.stderr)
            return failed
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        lines = [line for line in stdout.splitlines() if line.startswith(_RESULT_TAG)]
        if process.returncode != 0 or not lines:
            print(f"pre-redesign ZeRO-1 failed (exit code {process.returncode})", file=sys.stderr)
            return failed
        figures = json.loads(lines[-1][len(_RESULT_TAG) :])
        return {("legacy", case.stage, case.dp): figures[str(case.dp)] for case in cases}
    finally:
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", worktree], check=False)


def _legacy_main(payload: str) -> None:
    import scaling

    expected = os.path.join(os.environ["PYTHONPATH"], "scaling")
    if os.path.dirname(os.path.abspath(scaling.__file__)) != expected:
        raise SystemExit(f"the legacy run imported scaling from {scaling.__file__}, not {expected}")
    cases = [Case(**fields) for fields in json.loads(payload)]
    results = run_cases([[case] for case in cases])
    print(_RESULT_TAG + json.dumps({case.dp: results[case.side, case.stage, case.dp] for case in cases}), flush=True)


# The table ------------------------------------------------------------------------------------------
def _target_bytes(stage: int, dp: int, dtype: str) -> float | None:
    if dtype != "float32":
        return None
    return {(1, 2): 12.0, (3, 2): 10.5, (3, 4): 7.5}.get((stage, dp))


def _cell(results: Results, key: tuple[str, int, int], field: str, digits: int) -> str:
    if key not in results:
        return "-"  # not run
    value = results[key].get(field)
    return "failed" if value is None else f"{value:.{digits}f}"


def _ratio(results: Results, stage: int, dp: int, field: str) -> str:
    ours = results.get(("scaling", stage, dp), {}).get(field)
    theirs = results.get(("deepspeed", stage, dp), {}).get(field)
    return "-" if ours is None or theirs is None else f"{ours / theirs:.2f}"


def print_table(args: argparse.Namespace, results: Results) -> None:
    n = parameter_count(args.hidden, args.blocks)
    print(
        f"ZeRO on an MLP of {args.blocks} blocks of width {args.hidden} ({n / 1e6:.1f}M parameters), "
        f"{args.batch} rows per rank, {args.dtype} on {args.device}; step time: {args.statistic} of {args.steps} steps"
    )
    print("B/p: peak bytes one rank held (worst rank) per parameter of the whole model; ms: step time")
    headers = ["dp", "stage", "scaling B/p", "deepspeed B/p", "ratio", "target B/p", "scaling ms", "deepspeed ms",
               "ratio", "target"]  # fmt: skip
    rows = []
    for dp in args.dp:
        for stage in args.stages:
            target = _target_bytes(stage, dp, args.dtype)
            rows.append(
                [
                    str(dp),
                    str(stage),
                    _cell(results, ("scaling", stage, dp), "bytes_per_param", 2),
                    _cell(results, ("deepspeed", stage, dp), "bytes_per_param", 2),
                    _ratio(results, stage, dp, "bytes_per_param"),
                    "-" if target is None else f"<= {target:.2f}",
                    _cell(results, ("scaling", stage, dp), "step_ms", 1),
                    _cell(results, ("deepspeed", stage, dp), "step_ms", 1),
                    _ratio(results, stage, dp, "step_ms"),
                    "<= 1.00",
                ]
            )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    references = [
        ("engine", 0, "today's engine (stage 0, bucketed all-reduce)"),
        ("legacy", 1, f"pre-redesign ZeRO-1 ({LEGACY_COMMIT}, optimizer.zero: true)"),
    ]
    for dp in args.dp:
        for side, stage, what in references:
            if (side, stage, dp) in results:
                print(
                    f"dp {dp}: {what}: {_cell(results, (side, stage, dp), 'bytes_per_param', 2)} B/p, "
                    f"{_cell(results, (side, stage, dp), 'step_ms', 1)} ms"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[2, 4], help="data-parallel sizes")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per contender")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--statistic", choices=["min", "median"], default="min", help="of the timed steps")
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

    if args.device == "cuda" and max(args.dp) > torch.cuda.device_count():
        print(
            f"--dp {max(args.dp)} needs as many GPUs (one NCCL rank each); this machine has {torch.cuda.device_count()}"
        )
        raise SystemExit(2)

    def case(side: str, stage: int, dp: int) -> Case:
        return Case(
            side, stage, dp, args.hidden, args.blocks, args.batch, args.steps, args.device, args.dtype, args.statistic
        )

    sides = ("scaling", "deepspeed")
    groups = []
    for dp in args.dp:
        for i, stage in enumerate(args.stages):
            engine = [case("engine", 0, dp)] if i == 0 else []  # timed beside the first stage's contenders
            groups.append([case(side, stage, dp) for side in sides] + engine)
    results = run_cases(groups)
    if not args.no_legacy:
        results.update(run_legacy([case("legacy", 1, dp) for dp in args.dp]))
    print_table(args, results)


if __name__ == "__main__":
    main()
