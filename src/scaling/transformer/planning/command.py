"""``scaling plan``: which layouts fit, and which is fastest, before any GPU hour is spent.

``scaling plan CONFIG`` plans the config's own layout first (its budget block), then every layout for its
number of GPUs; ``scaling plan --preset NAME --gpus N`` plans a preset. Memory is per rank, for its
busiest pipeline stage; communication is per rank and step with the link it crosses; step time and MFU
come from the roofline model of :mod:`scaling.core.planner.roofline` against the device table
(``--gpu``) or, with ``--gpu measured``, this machine's own matmul peak.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from scaling.core.config import ConfigError
from scaling.core.planner.devices import (
    DEVICES,
    DeviceSpec,
    device_spec,
    host_spec,
    measure_local_device,
    spec_for_local_device,
)
from scaling.core.planner.layout import Layout, LayoutPlan
from scaling.core.planner.table import budget_block, plan_table
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.planning.plan import PlanSettings, plan_layout, plan_layouts

__all__ = ["config_plan", "main", "parse_memory", "resolve_device", "training_device"]

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}  # fmt: skip
_UNITS = {"": 10**9, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_memory(text: str) -> int:
    """``80GB`` -> 80e9 bytes, ``80GiB`` -> 80 x 2^30, a bare number is GB (as GPU datasheets count)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigError(f"--gpu-memory {text!r}: expected a size such as 80GB, 80GiB or 80")
    return int(float(match.group(1)) * _UNITS[unit])


def resolve_device(name: str | None, memory: str | None = None, gpus_per_node: int | None = None) -> DeviceSpec:
    """The device to plan for: a table name, ``measured`` (this machine's matmul peak), or ``None`` for the
    local GPU's table entry (an H100 when there is none: the planner's common question). ``memory``
    overrides the table's memory; ``gpus_per_node`` the node size."""
    if name is None:
        spec = spec_for_local_device() or DEVICES["h100"]
    elif name.lower() == "measured":
        spec = measure_local_device()
    else:
        try:
            spec = device_spec(name)
        except KeyError:
            known = ", ".join(sorted(DEVICES))
            raise ConfigError(f"--gpu {name!r}: unknown device; known: {known}, measured") from None
    updates: dict[str, object] = {}
    if memory is not None:
        updates["memory_bytes"] = parse_memory(memory)
    if gpus_per_node is not None:
        updates["gpus_per_node"] = gpus_per_node
    if updates:
        from dataclasses import replace

        spec = replace(spec, **updates)  # type: ignore[arg-type]
    return spec


def training_device(mfu_device: str = "auto") -> DeviceSpec:
    """The device a run plans for, from ``trainer.mfu_device``: a table name; ``measured``; ``auto``, the
    local GPU's table entry, else this machine's CPU (memory only, no step time)."""
    if mfu_device == "measured":
        return measure_local_device()
    if mfu_device != "auto":
        return device_spec(mfu_device)
    return spec_for_local_device() or host_spec()


def config_plan(config: object, device: DeviceSpec, *, gpus_per_node: int | None = None) -> LayoutPlan:
    """The plan of a :class:`~scaling.transformer.config.TransformerConfig`'s own layout on ``device``: what
    ``scaling train --plan-only`` prints and a run prints when it starts."""
    from scaling.transformer.config import TransformerConfig

    assert isinstance(config, TransformerConfig)
    topo = config.topology
    arch = config.architecture
    kind = getattr(topo.activation_checkpointing_type, "value", topo.activation_checkpointing_type)
    chunks = topo.virtual_pipe_stages if topo.pipe_schedule == "interleaved_1f1b" else 1
    layout = Layout(
        tp=topo.model_parallel_size,
        pp=topo.pipe_parallel_size,
        dp=topo.dp,
        zero_stage=config.optimizer.zero_stage,
        checkpointing=str(kind),
        micro_batch_size=topo.micro_batch,
        n_micro=topo.micro_batches,
        schedule=topo.pipe_schedule,
        n_chunks=chunks,
    )
    method = topo.pipe_partition_method
    settings = PlanSettings(
        device=device,
        gpus_per_node=gpus_per_node or min(device.gpus_per_node, topo.n_ranks),
        sequence_length=arch.sequence_length,
        compute_dtype=config.precision.precision.dtype,
        reduce_in_fp32=config.precision.reduce_grads_in_fp32,
        offload=str(getattr(config.optimizer.offload, "value", config.optimizer.offload)) != "none",
        sequence_parallel=topo.sequence_parallel,
        partition_method=method.value if hasattr(method, "value") else "uniform",
    )
    return plan_layout(arch, layout, settings)


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("config", nargs="?", help="a training config (YAML); or give --preset and --gpus")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--preset", help="an architecture preset (llama2-7b, llama3-70b, mistral-7b, tiny, ...)")
    parser.add_argument("--gpus", type=int, help="GPUs in all (default: the config's world size)")
    parser.add_argument("--nodes", type=int, default=None, help="nodes the GPUs are spread over (default 1 per 8)")
    known = ", ".join(sorted(DEVICES))
    parser.add_argument("--gpu", help=f"device: {known}, or 'measured' (default: the local GPU, else h100)")
    parser.add_argument("--gpu-memory", help="memory per GPU, e.g. 80GB (default: the device table's)")
    parser.add_argument("--seq-len", type=int, help="tokens per sample (default: the config's or preset's)")
    parser.add_argument("--global-batch", type=int, help="samples per step (default: the config's, else 8 x GPUs)")
    parser.add_argument("--precision", default=None, choices=sorted(_DTYPES), help="compute dtype (default bf16)")
    parser.add_argument("--top", type=int, default=15, help="layouts to show (default 15)")
    return parser


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}")


def _run(args: argparse.Namespace) -> str:
    for name in ("gpus", "nodes", "seq_len", "global_batch", "top"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if (args.config is None) == (args.preset is None):
        raise ConfigError("give a CONFIG or --preset NAME (one of them)")
    own: LayoutPlan | None = None
    if args.config is not None:
        from scaling.transformer.config import TransformerConfig

        if not Path(args.config).is_file():
            raise ConfigError(f"{args.config}: no such config file")
        config = TransformerConfig.from_yaml(args.config, args.override)
        arch = config.architecture
        gpus = args.gpus or config.topology.n_ranks
        batch = args.global_batch or config.topology.global_batch
        dtype = _DTYPES[args.precision] if args.precision else config.precision.precision.dtype
        seq = args.seq_len or arch.sequence_length
    else:
        from scaling.transformer.presets import PRESETS, preset_architecture

        if args.preset not in PRESETS:
            raise ConfigError(f"--preset {args.preset!r}: unknown; known: {', '.join(PRESETS)}")
        if args.gpus is None:
            raise ConfigError("--preset needs --gpus N")
        arch = preset_architecture(args.preset)
        gpus = args.gpus
        batch = args.global_batch or 8 * gpus
        dtype = _DTYPES[args.precision or "bf16"]
        seq = args.seq_len or arch.sequence_length
    if seq != arch.sequence_length:
        arch = TransformerArchitectureConfig.from_dict({**arch.to_dict(), "sequence_length": seq})
    nodes = args.nodes or max(1, -(-gpus // 8))
    if gpus % nodes:
        raise ConfigError(f"--gpus {gpus} do not split evenly over --nodes {nodes}")
    device = resolve_device(args.gpu, args.gpu_memory, gpus // nodes)
    settings = PlanSettings(device=device, gpus_per_node=gpus // nodes, sequence_length=seq, compute_dtype=dtype)
    if args.config is not None and args.gpus in (None, config.topology.n_ranks):
        own = config_plan(config, device, gpus_per_node=gpus // nodes)
    plans = plan_layouts(arch, settings, devices=gpus, global_batch=batch)
    where = f"{gpus} x {device.name} ({gpus // nodes} per node, {device.memory_bytes / 1e9:.0f} GB each)"
    dtype_name = str(dtype).removeprefix("torch.")
    head = f"{args.preset or args.config}: sequence {seq}, global batch {batch}, {dtype_name}, {where}"
    parts = [head]
    if own is not None:
        parts += ["", "the config's layout:", budget_block(own, device.name)]
    parts += ["", f"layouts by predicted throughput ({len(plans)} considered):", plan_table(plans, top=args.top)]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None, prog: str = "scaling plan") -> int:
    """Print the plan; 0, or 2 with one line for bad input."""
    args = _parser(prog).parse_args(argv)
    try:
        print(_run(args))
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m scaling.transformer.planning.command"))
