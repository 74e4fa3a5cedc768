"""examples/alpaca_example end to end: torchrun starts 2 processes, the plain loop trains at ZeRO stage 3 in
bf16, saves both formats, and `scaling generate` answers from the checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_example_trains_on_two_processes_saves_and_generates(tmp_path: Path) -> None:
    out = tmp_path / "alpaca"
    done = subprocess.run(
        [sys.executable, "-m", "examples.alpaca_example.run", "--out", str(out), "--max-steps", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # master_node: rank 0 alone prints, so each line appears once although two ranks ran the loop
    assert done.stdout.count("step    2  loss") == 1, done.stdout
    assert done.stdout.count("steps of 32 samples") == 1
    assert (out / "checkpoints" / "global_step2" / "manifest.json").is_file()
    assert (out / "hf-step2" / "config.json").is_file()
    assert "### Response:" in done.stdout  # the generation's echo of the prompt
