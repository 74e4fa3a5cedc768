"""The planner against reality: predicted and measured peak memory and step time, per layout and rank.

    python benchmarks/planner.py [--hidden 512] [--layers 4] [--seq 256]

Trains a transformer through the engine on the layouts the memory test checks
(``scaling.transformer.planning.measured.CHECK_LAYOUTS``:
ZeRO 0-3, bf16, 1F1B and GPipe, tp, checkpointing per layer and per stage) in a 2-process gloo world on
this machine, measures each rank's peak of live tensor bytes (torch's memory tracker) and its step time,
and prints them beside the plan's prediction with the error of each. Step times are predicted against
this machine's own matmul peak (measured in a rank, with the rank's one thread), since a CPU has no
table entry; at this size launch and Python overhead dominate, which the roofline deliberately leaves out,
so expect the time errors to be large on CPU and read them as such. On a GPU the same script compares
against the device table.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from scaling.core.planner.devices import measure_local_device
from scaling.core.testing import run_distributed
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.planning.measured import CHECK_ARCH, CHECK_LAYOUTS, layout_of, measure_layouts
from scaling.transformer.planning.plan import PlanSettings, plan_layout, stage_memory


def _in_rank(arch: dict[str, Any], layouts: list[dict[str, Any]]) -> dict[str, Any]:
    spec = measure_local_device(dtypes=(torch.float32, torch.bfloat16), seconds=0.5)
    return {"peak_flops": spec.peak_flops, "measured": measure_layouts(arch, layouts, timed=True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (the test's model: 64)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="sequence length (the test's model: 64)")
    args = parser.parse_args(argv)
    fields = {**CHECK_ARCH, "hidden_size": args.hidden, "num_layers": args.layers,
              "intermediate_size": 2 * args.hidden, "sequence_length": args.seq}  # fmt: skip
    arch = TransformerArchitectureConfig.from_dict(fields)
    results = run_distributed(_in_rank, 2, fields, CHECK_LAYOUTS, timeout_s=600)
    spec = measure_local_device(dtypes=(torch.float32,), seconds=0.01)  # a spec to fill with the rank's peaks
    spec = type(spec)(**{**spec.__dict__, "peak_flops": results[0]["peak_flops"], "gpus_per_node": 2})
    header = ("layout", "precision", "stage", "rank", "peak MiB", "predicted", "error", "step s", "predicted",
              "ratio")  # fmt: skip
    rows = [header]
    memory_errors, time_ratios = [], []
    for per_rank in results:
        for m in per_rank["measured"]:
            layout, stage = layout_of(m["layout"]), m["coord"][0]
            dtype = getattr(torch, m["layout"].get("precision", "float32"))
            settings = PlanSettings(device=spec, gpus_per_node=2, sequence_length=args.seq, compute_dtype=dtype)
            predicted = stage_memory(arch, layout, settings, stage)
            plan = plan_layout(arch, layout, settings)
            error = predicted.peak / m["peak_bytes"] - 1
            step = plan.time.step_s if plan.time else float("nan")
            memory_errors.append(abs(error))
            time_ratios.append(step / m["step_s"])
            rows.append((
                layout.describe(), str(dtype).removeprefix("torch."), str(stage), str(m["rank"]),
                f"{m['peak_bytes'] / 2**20:.2f}", f"{predicted.peak / 2**20:.2f}", f"{error:+.1%}",
                f"{m['step_s']:.4f}", f"{step:.4f}", f"{step / m['step_s']:.2f}",
            ))  # fmt: skip
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print(
        f"\nmemory: max |error| {max(memory_errors):.1%}, mean {sum(memory_errors) / len(memory_errors):.1%} over "
        f"{len(memory_errors)} rank figures; step time: predicted / measured from {min(time_ratios):.2f} to "
        f"{max(time_ratios):.2f} (peak fp32 {results[0]['peak_flops']['float32'] / 1e9:.1f} GFLOP/s per rank)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
