"""Instruction-tune a sharded Llama in a plain PyTorch loop (``torchrun --nproc-per-node 2 .../train.py``).

The loop of the README, on ``LlamaTiny`` and the bundled instructions (``data/instructions.json``, written
for this example by ``make_data.py``), with the parts a real run adds around it: a learning-rate schedule,
gradient accumulation, clipping, fp16 loss scaling, logging on one rank, and saving in both formats.
Everything here is ordinary PyTorch except the model, the loader and three helpers from ``scaling.training``.
``python -m examples.alpaca_example.run`` launches this on 2 CPU processes and generates from the result.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.optim as optim

from scaling.llama import LlamaTiny
from scaling.loaders import LlamaLoader, format_alpaca
from scaling.training import Scaler, clip_grad_norm, master_node
from scaling.transformer.presets import parameter_count

DATA = Path(__file__).with_name("data") / "instructions.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="examples/alpaca_example/output", help="where the checkpoints go")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--batch-size", type=int, default=32, help="global batch: every rank gets its share")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (a tiny model from scratch)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload the model (needs a Hugging Face token)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.out)

    # The model: its parameters are this rank's fp32 shards; compute runs in args.precision.
    model = LlamaTiny(zero_stage=args.zero_stage, fast_attn=False, precision=args.precision)
    # Any torch optimizer over model.parameters() is ZeRO-sharded, with no wrapper.
    optimizer = optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    # The data: Alpaca records as prompt/completion pairs; each data-parallel rank gets its share of every batch.
    dataset = [format_alpaca(record) for record in json.loads(DATA.read_text(encoding="utf-8"))]
    micro_batch = args.batch_size // args.accumulate
    train_loader = LlamaLoader(dataset, max_sequence_length=512, batch_size=micro_batch, seed=0)

    steps = args.epochs * len(train_loader) // args.accumulate
    if args.max_steps is not None:
        steps = min(steps, args.max_steps)
    warmup = max(1, steps // 10)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine to a tenth of the peak
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    scaler = Scaler(enabled=args.precision == "fp16")  # fp16 needs loss scaling; bf16 and fp32 pass through

    with master_node():
        print(f"LlamaTiny({model.extra_repr()}): {parameter_count(model.architecture):,} parameters")
        print(f"{steps} steps of {args.batch_size} samples ({args.accumulate} micro-batches each)")

    step, micro = 0, 0
    while step < steps:
        for batch in train_loader:
            last = (micro + 1) % args.accumulate == 0
            # Accumulate locally; the last micro-batch's backward reduces everything at once.
            with torch.enable_grad() if last else model.no_sync():
                loss = model(batch)  # the token mean over the whole data-parallel micro-batch
                scaler.scale(loss / args.accumulate).backward()
            micro += 1
            if not last:
                continue
            scaler.unscale_(optimizer)
            grad_norm = clip_grad_norm(model, optimizer, args.max_grad_norm)  # global over every shard
            scaler.step(optimizer)  # skipped on every rank if any rank overflowed
            scaler.update()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if step % 5 == 0 or step == steps:
                with master_node():
                    print(f"step {step:4d}  loss {loss.item():.4f}  grad norm {grad_norm.item():.3f}")
            if step == steps:
                break

    # Saving: a scaling checkpoint (resumable with model.load(..., optimizer=..., loader=...), loadable by
    # `scaling generate` and `pretrained=`), and a Hugging Face folder for transformers.
    checkpoint = model.save(out / "checkpoints", optimizer=optimizer, loader=train_loader, scaler=scaler, step=step)
    model.save_huggingface_model(out / f"hf-step{step}")
    if args.push_to_hub:
        model.push_to_hub(args.push_to_hub)
    with master_node():
        print(f"saved {checkpoint} and {out / f'hf-step{step}'}")


if __name__ == "__main__":
    main()
