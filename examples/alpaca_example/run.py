"""``python -m examples.alpaca_example.run [--out DIR] [train.py options]``: train on 2 CPU processes, then generate.

1. ``torchrun --standalone --nproc-per-node 2 examples/alpaca_example/train.py`` (ZeRO stage 3, the bundled
   instructions);
2. ``scaling generate`` answers one instruction from the checkpoint just written (greedy, KV cache).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from scaling.loaders import format_alpaca
from scaling.transformer.inference.cli import main as generate_main

TRAIN = Path(__file__).with_name("train.py")
QUESTION = {"instruction": "Reverse the word 'candle'.", "input": ""}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="examples/alpaca_example/output")
    parser.add_argument("--nproc", type=int, default=2)
    args, rest = parser.parse_known_args()
    out = Path(args.out)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
    done = subprocess.run([*command, str(TRAIN), "--out", str(out), *rest], check=False)
    if done.returncode != 0:
        return done.returncode
    prompt = format_alpaca({**QUESTION, "output": ""})["prompt"]
    return generate_main([str(out / "checkpoints"), "--prompt", prompt, "--max-new-tokens", "8"])


if __name__ == "__main__":
    sys.exit(main())
