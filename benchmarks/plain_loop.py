"""The plain PyTorch loop of issue 12 against the engine path and Hugging Face under FSDP2, in one run.

Run: ``python benchmarks/plain_loop.py [--dp 2] [--stages 0 3] [--steps N] [--hidden 256 --layers 4 --seq 128
--batch 4] [--device cuda --dtype bfloat16] [--profile]`` (needs ``transformers``).

Why this exists: issue 12 promises that a user who writes their own loop around a preset model loses nothing
against ``scaling train``, and gains against the obvious alternative, a Hugging Face model under FSDP2.
Figures from separate runs on a shared machine do not compare, so all three contenders run here, in the same
run, on the same architecture and the same batches:

* ``plain``: the loop as a user writes it, ``scaling.llama.Llama(arch, zero_stage=Z, precision=P)`` with
  ``torch.optim.AdamW(model.parameters())`` (torch's default implementation, as written) and
  ``loss = model(batch); loss.backward(); optimizer.step(); optimizer.zero_grad()``;
* ``engine``: what ``scaling train`` runs, ``ParallelModule.train_step`` and the engine's ``Optimizer`` at
  the same stage (stage 0 there is the bucketed all-reduce; the plain loop's stage 0 is FSDP2's
  ``replicate``, because nobody calls the engine's ``finish()`` between backward and step);
* ``hf``: ``transformers.LlamaForCausalLM`` built from the same architecture (its config from
  ``hf_config_from_architecture``), each decoder layer and then the root under FSDP2 ``fully_shard`` over the
  data-parallel ranks (stage 3 reshards after forward, stages 1 and 2 keep parameters gathered; stage 0 is
  ``replicate``, as ours), mixed precision through ``MixedPrecisionPolicy`` (fp32 masters, gradients reduced
  in fp32, as ours), ``sdpa`` attention, the loss a cross entropy over every position, and the same
  ``torch.optim.AdamW`` as the plain loop.

Every side uses AdamW with lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay and no clipping, so none
pays for work another skips. The batches are random token ids at a fixed sequence length with every position
in the loss (``--batch`` rows per rank, a few distinct batches per rank cycled, the same ones for every
contender), so tokens/s counts ``dp x batch x seq`` per step.

The contenders of one stage are built in one world of ``--dp`` processes (gloo on CPU with one thread each,
NCCL on GPU) and stepped in turn, A B C, B C A, C A B, ..., after warm-up steps, so a burst of load from
other processes slows all of them alike and none always runs after the same other. Per rank the fastest of
``--steps`` steps by default (``--statistic median`` for the median), then the slowest rank. The fastest step
is the one least disturbed by other processes, so it compares implementations; on a shared 2-core machine
the median moves by tens of percent between runs. If the world fails, each contender is timed alone, so one
broken side leaves the others' figures standing.

The default model (hidden 256, 4 layers, 4 heads, 2 kv heads, MLP 704 = 8/3 hidden rounded up to 64, vocab
4096: 5.0M parameters; 128 tokens x 4 rows per rank) is big enough that matrix multiplies, not Python
overhead, dominate a CPU step (about half of it), and small enough that the default command runs in one to
two minutes on 2 cores. ``--profile`` profiles a few more steps of each contender on rank 0 with
torch.profiler, to see where a gap comes from: one line of the step's phases (wall time; CPU time in
matmuls, attention, the optimizer step, FSDP2's gradient reduction and parameter gathers), then the
operators with the most self time. The engine's stage 0 all-reduce runs asynchronously without a range of
its own, so its wait shows in the wall time only.

The targets of issue 12 are printed beside the figures, not asserted: plain / engine >= 0.95 (within 5%)
and plain / Hugging Face >= 1.00 in tokens/s.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from scaling.core.testing import DistributedTestFailure, run_distributed
from scaling.core.topology import Topology
from scaling.transformer.model.config import TransformerArchitectureConfig

SIDES = ("plain", "engine", "hf")
TARGETS = {"engine": 0.95, "hf": 1.00}  # plain / side, in tokens/s
LR, BETAS, EPS = 1e-4, (0.9, 0.999), 1e-8
DISTINCT_BATCHES = 4  # per rank, cycled: the same ones for every contender
PROFILED_STEPS = 5

StepFn = Callable[[int], None]


@dataclass(frozen=True)
class Case:
    """One stage's run; travels to the ranks (so plain fields only)."""

    sides: tuple[str, ...]
    stage: int
    dp: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seq: int
    batch: int
    steps: int
    warmup: int
    device: str
    dtype: str
    statistic: str = "min"
    profile: bool = False


def architecture(case: Case) -> TransformerArchitectureConfig:
    """The tiny Llama preset (RMSNorm, SwiGLU, RoPE, GQA, untied head) at the benchmark's size."""
    from scaling.transformer.presets import preset_architecture

    return preset_architecture(
        "tiny",
        vocab_size=case.vocab,
        hidden_size=case.hidden,
        num_layers=case.layers,
        num_attention_heads=case.heads,
        num_kv_heads=case.kv_heads,
        head_dim=case.hidden // case.heads,
        intermediate_size=case.intermediate,
        sequence_length=case.seq,
        max_position_embeddings=case.seq,
    )


def _batches(case: Case, rank: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Random token ids, every position in the loss; drawn on CPU so every device sees the same tokens."""
    out = []
    for index in range(DISTINCT_BATCHES):
        g = torch.Generator().manual_seed(1000 * rank + index)
        tokens = torch.randint(0, case.vocab, (case.batch, case.seq + 1), generator=g)
        batch = {
            "tokens": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "positions": torch.arange(case.seq).expand(case.batch, case.seq),
            "loss_mask": torch.ones(case.batch, case.seq),
        }
        out.append({key: value.contiguous().to(device) for key, value in batch.items()})
    return out


# The contenders ---------------------------------------------------------------------------------------
def _plain_step(model: Any, batches: list[dict[str, torch.Tensor]]) -> StepFn:
    """The loop as issue 12 writes it."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)

    def step(index: int) -> None:
        loss = model(batches[index % len(batches)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def _engine_step(case: Case, topology: Topology, batches: list[dict[str, torch.Tensor]]) -> StepFn:
    """What ``scaling train`` runs: the engine's module and optimizer at the same stage."""
    from scaling.core.nn.precision import PrecisionConfig
    from scaling.core.optimizer.config import OptimizerConfig, TrainingGroupConfig
    from scaling.core.optimizer.lr_schedule import LearningRateScheduleConfig
    from scaling.core.optimizer.optimizer import Optimizer
    from scaling.core.pipeline.module import ParallelModule
    from scaling.transformer.model.layers import LanguageModelLoss, loss_tokens, transformer_layer_specs

    schedule = LearningRateScheduleConfig(learning_rate=LR, learning_rate_decay_style="constant")
    config = OptimizerConfig(
        beta1=BETAS[0],
        beta2=BETAS[1],
        eps=EPS,
        gradient_clipping=0.0,
        zero_stage=case.stage,
        training_groups=[TrainingGroupConfig(weight_decay=0.0, learning_rate_schedule=schedule)],
    )
    module = ParallelModule(
        transformer_layer_specs(architecture(case), topology),
        topology,
        LanguageModelLoss(topology),
        precision=PrecisionConfig(precision=case.dtype),
        weight_fn=loss_tokens,
        sharding=config.sharding,
    )
    optimizer = Optimizer.for_module(module, config)

    def step(index: int) -> None:
        module.train_step([batches[index % len(batches)]], step=index)
        optimizer.step(index)

    return step


def _hf_step(case: Case, topology: Topology, batches: list[dict[str, torch.Tensor]]) -> StepFn:
    """``LlamaForCausalLM`` of the same architecture under FSDP2, each decoder layer and then the root."""
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from scaling.transformer.convert.hf_config import hf_config_from_architecture

    fields = hf_config_from_architecture(architecture(case), torch.float32)  # fp32 masters, as ours
    config = LlamaConfig(**fields, attn_implementation="sdpa")  # type: ignore[arg-type, call-arg]
    hf = LlamaForCausalLM(config)
    layers = list(hf.model.layers)
    model: torch.nn.Module = hf
    model.to(topology.device)
    assert topology.dp_group is not None
    mesh = DeviceMesh.from_group(topology.dp_group, device_type=topology.device.type)
    dtype = getattr(torch, case.dtype)
    mixed = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)

    def shard(module: torch.nn.Module) -> None:
        if case.stage == 0:  # what our plain loop runs at stage 0
            replicate(module, mesh=mesh, mp_policy=mixed)
        else:
            fully_shard(module, mesh=mesh, reshard_after_forward=case.stage == 3, mp_policy=mixed)

    for layer in layers:
        shard(layer)
    shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)

    def step(index: int) -> None:
        batch = batches[index % len(batches)]
        logits = model(input_ids=batch["tokens"]).logits  # [b, s, vocab]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten())
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        optimizer.zero_grad()

    return step


# One world per stage ----------------------------------------------------------------------------------
# Where a step's time goes, from the profiler's totals: (label, event-name prefix, "self" or "total" time).
# The FSDP ranges hold their collectives and copies; the engine's stage 0 all-reduce has no range of its own.
_PHASES = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm"), "self"),
    ("attention", ("aten::_scaled_dot_product",), "self"),
    ("optimizer step", ("Optimizer.step#",), "total"),
    ("FSDP grad reduce", ("FSDP::post_backward_reduce",), "total"),
    ("FSDP param gather", ("FSDP::all_gather",), "total"),
]


def _phases(prof: Any, steps: int, wall_s: float) -> str:
    """One line: wall ms per step, then ms per step of each phase (CPU time, summed over its events)."""
    totals = dict.fromkeys([label for label, _, _ in _PHASES], 0.0)
    for event in prof.key_averages():
        for label, prefixes, kind in _PHASES:
            if event.key.startswith(prefixes):
                totals[label] += event.self_cpu_time_total if kind == "self" else event.cpu_time_total
    parts = [f"{label} {us / 1e3 / steps:.1f}" for label, us in totals.items()]
    return f"{wall_s * 1e3 / steps:.1f} ms/step wall; CPU ms/step: " + ", ".join(parts)


def _profile(steps: dict[str, StepFn], first: int, sync: Callable[[], None]) -> dict[str, str]:
    """A few more steps of each contender under torch.profiler: the phases of a step, then the operators
    with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    tables = {}
    for side, step in steps.items():
        with profile(activities=activities) as prof:
            begin = time.perf_counter()
            for index in range(first, first + PROFILED_STEPS):
                step(index)
            sync()
            wall = time.perf_counter() - begin
        key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60)
        tables[side] = _phases(prof, PROFILED_STEPS, wall) + "\n" + table
    return tables


def _timing_rank(case: Case) -> dict[str, Any]:
    """Seconds per step of each contender (the statistic of the timed steps), stepping them in turn."""
    from scaling.llama import Llama
    from scaling.transformer.plain_world import reset_plain_world

    torch.set_num_threads(1)  # dp processes share the cores: one thread each, as the engine's tests run
    if case.device == "cuda":
        torch.cuda.set_device(torch.distributed.get_rank() % torch.cuda.device_count())
    reset_plain_world()
    # The plain model builds the world's topology (as in a user's loop); the others run on the same one.
    plain = Llama(architecture(case), zero_stage=case.stage, precision=case.dtype, device=case.device)
    topology = plain.topology
    batches = _batches(case, topology.dp_rank, topology.device)
    builders: dict[str, Callable[[], StepFn]] = {
        "plain": lambda: _plain_step(plain, batches),
        "engine": lambda: _engine_step(case, topology, batches),
        "hf": lambda: _hf_step(case, topology, batches),
    }
    steps = {side: builders[side]() for side in case.sides}

    def sync() -> None:  # GPU kernels run asynchronously to the host's clock: wait for them
        if topology.device.type == "cuda":
            torch.cuda.synchronize(topology.device)

    order = list(steps)
    times: dict[str, list[float]] = {side: [] for side in order}
    for index in range(case.warmup + case.steps):
        # Each round starts with the next contender, so none always runs after the same other one (whose
        # memory traffic leaves the caches cold for it); the order is the same on every rank.
        for k in range(len(order)):
            side = order[(index + k) % len(order)]
            sync()
            begin = time.perf_counter()
            steps[side](index)
            sync()
            if index >= case.warmup:
                times[side].append(time.perf_counter() - begin)
    statistic = min if case.statistic == "min" else statistics.median
    result: dict[str, Any] = {"seconds": {side: statistic(record) for side, record in times.items()}}
    if case.profile and topology.global_rank == 0:
        result["profiles"] = _profile(steps, case.warmup + case.steps, sync)
    elif case.profile:
        _profile(steps, case.warmup + case.steps, sync)  # the same steps on every rank: collectives pair up
    return result


def _root_cause(error: DistributedTestFailure) -> str:
    """The last line of the first failing rank's traceback: the exception, in one line."""
    text = str(error)
    first_rank = text.split("\n--- rank ")[1] if "\n--- rank " in text else text
    lines = [line for line in first_rank.splitlines() if line.strip()]
    return lines[-1].strip() if lines else text


def measure(case: Case) -> tuple[dict[str, float | None], dict[str, str]]:
    """Tokens/s of each contender (slowest rank) and rank 0's profiles; if the world fails, each alone."""
    backend = "nccl" if case.device == "cuda" else "gloo"
    try:
        ranks = run_distributed(_timing_rank, case.dp, case, timeout_s=1800, backend=backend)
    except DistributedTestFailure as error:
        print(f"stage {case.stage} {'+'.join(case.sides)} failed: {_root_cause(error)}", file=sys.stderr)
        if len(case.sides) == 1:
            return {case.sides[0]: None}, {}
        rates: dict[str, float | None] = {}
        profiles: dict[str, str] = {}
        for side in case.sides:
            alone, profile = measure(replace(case, sides=(side,)))
            rates.update(alone)
            profiles.update(profile)
        return rates, profiles
    tokens = case.dp * case.batch * case.seq
    rates = {side: tokens / max(rank["seconds"][side] for rank in ranks) for side in case.sides}
    for side, rate in rates.items():
        print(f"stage {case.stage} {side}: {rate:.0f} tok/s", file=sys.stderr, flush=True)
    return rates, ranks[0].get("profiles", {})


# The table ----------------------------------------------------------------------------------------------
def _cell(value: float | None) -> str:
    return "failed" if value is None else f"{value:.0f}"


def _ratio(ours: float | None, theirs: float | None) -> str:
    return "-" if ours is None or theirs is None else f"{ours / theirs:.2f}"


def print_table(args: argparse.Namespace, case: Case, results: dict[int, dict[str, float | None]]) -> None:
    from scaling.transformer.presets import parameter_count

    n = parameter_count(architecture(case))
    print(
        f"Llama of hidden {case.hidden}, {case.layers} layers, {case.heads} heads ({case.kv_heads} kv), "
        f"intermediate {case.intermediate}, vocab {case.vocab} ({n / 1e6:.1f}M parameters); dp {case.dp}, "
        f"{case.batch} x {case.seq} tokens per rank, {case.dtype} on {case.device}; step time: {case.statistic} "
        f"of {case.steps} steps after {case.warmup} warm-up, slowest rank"
    )
    headers = ["stage", "plain tok/s", "engine tok/s", "plain/engine", "target", "HF tok/s", "plain/HF", "target"]
    rows = []
    for stage in args.stages:
        rates = results[stage]
        rows.append(
            [
                str(stage),
                _cell(rates["plain"]),
                _cell(rates["engine"]),
                _ratio(rates["plain"], rates["engine"]),
                f">= {TARGETS['engine']:.2f}",
                _cell(rates["hf"]),
                _ratio(rates["plain"], rates["hf"]),
                f">= {TARGETS['hf']:.2f}",
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dp", type=int, default=2, help="data-parallel processes")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contender first")
    parser.add_argument("--statistic", choices=["min", "median"], default="min", help="of the timed steps")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, help="MLP width (default: 8/3 hidden, rounded up to 64)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=128, help="tokens per row")
    parser.add_argument("--batch", type=int, default=4, help="rows per rank and step")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per contender")
    args = parser.parse_args()
    if args.hidden % args.heads != 0:
        parser.error(f"--heads ({args.heads}) must divide --hidden ({args.hidden})")
    if args.heads % args.kv_heads != 0:
        parser.error(f"--kv-heads ({args.kv_heads}) must divide --heads ({args.heads})")
    for name in ("dp", "steps", "hidden", "layers", "heads", "kv_heads", "vocab", "seq", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available on this machine")
        if args.dp > torch.cuda.device_count():
            parser.error(f"--dp {args.dp} needs as many GPUs (one NCCL rank each); found {torch.cuda.device_count()}")
    if importlib.util.find_spec("transformers") is None:
        print("benchmarks/plain_loop.py compares against Hugging Face transformers, which is not installed")
        raise SystemExit(2)
    return args


def main() -> None:
    args = _parse_args()
    intermediate = args.intermediate or 64 * math.ceil(8 * args.hidden / 3 / 64)  # Llama's 8/3 ratio
    results = {}
    case = None
    for stage in args.stages:
        case = Case(
            SIDES, stage, args.dp, args.hidden, args.layers, args.heads, args.kv_heads, intermediate, args.vocab,
            args.seq, args.batch, args.steps, args.warmup, args.device, args.dtype, args.statistic, args.profile,
        )  # fmt: skip
        results[stage], profiles = measure(case)
        for side, table in profiles.items():
            print(f"\n--- stage {stage} {side}: {PROFILED_STEPS} steps on rank 0 ---\n{table}")
    assert case is not None
    print_table(args, case, results)


if __name__ == "__main__":
    main()
