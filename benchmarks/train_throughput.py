"""Training throughput and model FLOP utilisation against Hugging Face ``transformers``, on this machine.

Run: ``python benchmarks/train_throughput.py`` (CPU; on a GPU machine pass ``--device cuda --dtype bfloat16``,
and ``--attention-kernel flash_attention`` to use flash-attn on both sides).

For a ~20M and a ~100M parameter Llama-style model (GQA, SwiGLU, RoPE, RMSNorm, untied head), the same
shapes are trained (a) by scaling (ParallelModule + Optimizer, one process) and (b) as
``transformers.LlamaForCausalLM`` with a plain ``torch.optim.AdamW`` loop, same dtype, same batch. It
prints tokens/s, the ratio scaling / Hugging Face, and MFU = achieved FLOP/s over the matrix-multiply peak
measured in the same run (training FLOPs = 6 N tokens + 12 L s h tokens for attention): a 1024^2 matmul on
CPU, an 8192^2 one on GPU, in the run's dtype. With ``--device cuda`` both models, their batches and
optimizers live on the GPU (scaling through its topology: NCCL and ``Topology(config, device=...)``), the
timings wait for the GPU, and Hugging Face attention is ``sdpa`` (``flash_attention_2`` with
``--attention-kernel flash_attention``). Finally, on CPU only, dp=2 (two processes with one thread each) is
compared with one process using two threads.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from typing import Literal

import torch

from scaling.core.nn.precision import PrecisionConfig
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.core.topology.device import choose_device_for_this_process
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.model.layers import LanguageModelLoss, transformer_layer_specs

SIZES = {
    "20M": {
        "hidden_size": 384,
        "num_layers": 6,
        "num_attention_heads": 6,
        "num_kv_heads": 2,
        "intermediate_size": 1024,
    },
    "100M": {
        "hidden_size": 768,
        "num_layers": 10,
        "num_attention_heads": 12,
        "num_kv_heads": 4,
        "intermediate_size": 2048,
    },
}
VOCAB, SEQ = 8192, 256
# Untimed steps first, on both sides: the allocator settles on reusing the step's large buffers only after
# a few steps (glibc raises its mmap threshold as blocks are freed), and a median over the settling steps
# measures the allocator rather than the training step.
WARMUP_STEPS = 3


def _sync(device: torch.device) -> None:
    """Wait for the work queued on ``device``: GPU kernels run asynchronously to the host's clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _matmul_size(device: torch.device) -> int:
    return 8192 if device.type == "cuda" else 1024  # big enough to saturate the device, small enough to repeat


def _matmul_peak(device: torch.device, threads: int, dtype: torch.dtype, windows: int = 4) -> float:
    """FLOP/s of a large square matmul: the practical peak of this device for this dtype.

    The best of several one-second windows: on a shared machine a single window can catch a slow moment,
    and a peak measured too low inflates every MFU figure (past 100%).
    """
    torch.set_num_threads(threads)
    n = _matmul_size(device)
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(windows):
        _sync(device)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < 1.0:
            a @ b  # on GPU this only queues the kernel; the sync below waits for all of them
            count += 1
        _sync(device)
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start))
    return best


def _flops_per_token(arch: dict[str, int], parameters: int) -> float:
    return 6 * parameters + 12 * arch["num_layers"] * SEQ * arch["hidden_size"]


def _batch(micro: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)  # drawn on CPU: the same tokens on every device
    tokens = torch.randint(0, VOCAB, (micro, SEQ + 1), generator=g).to(device)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}


def _scaling(
    size: str, micro: int, steps: int, threads: int, dtype_name: str, device_name: Literal["cpu", "cuda"], kernel: str
) -> dict[str, float]:
    torch.set_num_threads(threads)
    arch = {
        **SIZES[size],
        "vocab_size": VOCAB,
        "sequence_length": SEQ,
        "weight_tying": False,
        "attention_kernel": kernel,
    }
    dp = torch.distributed.get_world_size()
    device = torch.device(choose_device_for_this_process(device_name).device)  # this rank's GPU under CUDA
    if device.type == "cuda":
        torch.cuda.set_device(device)
    topo_config = TopologyConfig(
        data_parallel_size=dp, micro_batch_size=micro, gradient_accumulation_steps=1, device=device_name
    )
    topo = Topology(topo_config, device=device)
    config = TransformerArchitectureConfig.from_dict(arch)
    precision = PrecisionConfig.from_dict({"precision": dtype_name})
    module = ParallelModule(transformer_layer_specs(config, topo), topo, LanguageModelLoss(topo), precision=precision)
    optimizer = Optimizer.for_module(module, OptimizerConfig())
    parameters = sum(p.numel() for p in module.parameters())
    times = []
    for step in range(steps + WARMUP_STEPS):
        batch = _batch(micro, step + 100 * topo.dp_rank, device)
        _sync(device)
        start = time.perf_counter()
        module.train_step([batch], step=step)
        optimizer.step(step)
        _sync(device)
        if step >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "parameters": float(parameters)}


def _huggingface(
    size: str, micro: int, steps: int, threads: int, dtype_name: str, device: torch.device, kernel: str
) -> dict[str, float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    arch = SIZES[size]
    dtype = getattr(torch, dtype_name)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=arch["hidden_size"], intermediate_size=arch["intermediate_size"],
        num_hidden_layers=arch["num_layers"], num_attention_heads=arch["num_attention_heads"],
        num_key_value_heads=arch["num_kv_heads"], max_position_embeddings=SEQ, tie_word_embeddings=False,
        attn_implementation="flash_attention_2" if kernel == "flash_attention" else "sdpa", dtype=dtype,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for step in range(steps + WARMUP_STEPS):
        batch = _batch(micro, step, device)
        _sync(device)
        start = time.perf_counter()
        logits = model(input_ids=batch["tokens"]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "parameters": float(sum(p.numel() for p in model.parameters()))}


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help=f"timed steps (median), after {WARMUP_STEPS} warm-up")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--attention-kernel",
        default="torch",
        choices=["torch", "flash_attention"],
        help="'torch': scaled_dot_product_attention (HF 'sdpa'); 'flash_attention': flash-attn on both sides "
        "(HF 'flash_attention_2'; needs the flash-attn package, --device cuda and --dtype bfloat16)",
    )
    args = parser.parse_args()
    if args.attention_kernel == "flash_attention":
        if importlib.util.find_spec("flash_attn") is None:
            parser.error(
                "--attention-kernel flash_attention needs the flash-attn package: "
                "pip install 'scaling[gpu_optimization]' (or pip install flash-attn)"
            )
        if args.device != "cuda":
            parser.error("--attention-kernel flash_attention runs on GPUs only: add --device cuda")
        if args.dtype != "bfloat16":
            parser.error("--attention-kernel flash_attention computes in half precision: add --dtype bfloat16")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available on this machine")
    return args


def main() -> None:
    args = _parse_args()
    threads = os.cpu_count() or 1
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    backend = choose_device_for_this_process(args.device).backend  # gloo on CPU, NCCL on GPU
    peak = _matmul_peak(device, threads, dtype)
    tokens = args.micro_batch * SEQ
    if device.type == "cuda":
        n = _matmul_size(device)
        where = f"{torch.cuda.get_device_name(device)}, {n}x{n}, {args.dtype}"
        print(f"matmul peak ({where}): {peak / 1e12:.1f} TFLOP/s; {tokens} tokens per step; {args.attention_kernel}")
    else:
        print(f"matmul peak ({threads} threads, {args.dtype}): {peak / 1e9:.1f} GFLOP/s; {tokens} tokens per step")
    headers = ["model", "params", "scaling tok/s", "HF tok/s", "ratio", "scaling MFU", "HF MFU"]
    widths = [6, 8, 14, 10, 6, 12, 8]
    print(_row(headers, widths))
    run = (args.micro_batch, args.steps, threads, args.dtype, args.device, args.attention_kernel)
    for size in args.sizes:
        ours = run_distributed(_scaling, 1, size, *run, timeout_s=1800, backend=backend)[0]
        theirs = _huggingface(size, args.micro_batch, args.steps, threads, args.dtype, device, args.attention_kernel)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # hand the Hugging Face model's cached blocks back before the next scaling run
        flops = _flops_per_token(SIZES[size], int(ours["parameters"]))
        ours_tps, theirs_tps = tokens / ours["seconds"], tokens / theirs["seconds"]
        cells = [
            size,
            f"{ours['parameters'] / 1e6:.1f}M",
            f"{ours_tps:.0f}",
            f"{theirs_tps:.0f}",
            f"{ours_tps / theirs_tps:.2f}",
            f"{ours_tps * flops / peak:.1%}",
            f"{theirs_tps * flops / peak:.1%}",
        ]
        print(_row(cells, widths))
    size = args.sizes[0]
    if device.type == "cuda":
        print(f"\n{size}: dp=2 vs 2 threads skipped: it compares how processes and threads share CPU cores")
        return
    single = (args.micro_batch, args.steps, 2, args.dtype, args.device, args.attention_kernel)
    two_threads = run_distributed(_scaling, 1, size, *single, timeout_s=1800)[0]
    per_rank = (args.micro_batch, args.steps, 1, args.dtype, args.device, args.attention_kernel)
    two_ranks = run_distributed(_scaling, 2, size, *per_rank, timeout_s=1800)
    one = tokens / two_threads["seconds"]
    dp = 2 * tokens / max(r["seconds"] for r in two_ranks)
    print(f"\n{size}: dp=2 (2 processes x 1 thread) {dp:.0f} tok/s", end="")
    print(f" vs 1 process x 2 threads {one:.0f} tok/s: {dp / one:.2f}x")


if __name__ == "__main__":
    main()
