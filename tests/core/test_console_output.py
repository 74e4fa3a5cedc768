"""What a person watching a run reads: one progress line per log interval from one rank, and a start-up block
with the size of the whole model, the layout and where logs and checkpoints go."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest

from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.core.trainer.console import format_duration, parameter_counts, progress_line, startup_block
from scaling.transformer.finetuning.apply import finetuning_adapter
from scaling.transformer.finetuning.config import FinetuningConfig
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.model.layers import LanguageModelLoss, transformer_layer_specs

from .pipeline.tp_models import Loss, model_specs
from .processes import ARCHITECTURE, tiny_config

REPO = Path(__file__).resolve().parents[2]

PROGRESS = re.compile(
    r"step (\d+)/(\d+) \| loss (\d+\.\d{4}) \| lr (\d\.\de[-+]\d\d) \| grad norm (\S+) \| (\S+) tokens/s \| "
    r"(\d+\.\d\d) s/step \| ETA (\d+:\d\d:\d\d)( \| eval loss (\d+\.\d\d))?$"
)


def test_progress_line_has_every_field() -> None:
    line = progress_line(step=12, total=100, loss=3.45214, learning_rate=1e-4, grad_norm=0.8123,
                         seconds_per_step=0.41, tokens_per_s=12345.0, samples_per_s=3.0)  # fmt: skip
    expected = "step 12/100 | loss 3.4521 | lr 1.0e-04 | grad norm 0.812 | 12.3k tokens/s | 0.41 s/step | ETA 0:00:36"
    assert line == expected
    with_eval = progress_line(step=100, total=100, loss=3.0, learning_rate=1e-4, grad_norm=1.0, seconds_per_step=0.4,
                              tokens_per_s=None, samples_per_s=8.0, skipped_steps=2, eval_loss=3.5)  # fmt: skip
    assert with_eval.endswith("| 8 samples/s | 0.40 s/step | ETA 0:00:00 | skipped 2 | eval loss 3.50")
    assert format_duration(3 * 3600 + 62) == "3:01:02"


def _tiny_run(tmp_path: Path, trainer: dict[str, Any]) -> Path:
    """A config file of a tiny transformer on two pipeline stages, with its data."""
    topology = {"pipe_parallel_size": 2, "micro_batch_size": 2, "gradient_accumulation_steps": 2}
    return tiny_config(tmp_path, topology, trainer)


def test_startup_block_names_trainable_parameters_and_where_checkpoints_go() -> None:
    block = startup_block(total=1_234_567, trainable=12_345, layout={"tp": 2, "pp": 1, "ZeRO": "on"},
                          log_dir=None, save_dir="runs/a", save_interval=50, start_step=100,
                          train_iterations=200)  # fmt: skip
    assert block.splitlines() == [
        "model: 1.2M parameters (1,234,567), 12.3k trainable (12,345, 1.00%)",
        "layout: tp 2, pp 1, ZeRO on",
        "logs: console only (logger.log_dir is unset)",
        "checkpoints: runs/a (every 50 steps and at the end)",
        "training from step 100 to step 200",
    ]


@pytest.mark.timeout(300)
def test_scaling_train_prints_one_progress_line_per_log_interval_from_one_of_two_ranks(tmp_path: Path) -> None:
    path = _tiny_run(tmp_path, {"train_iterations": 6, "log_interval": 2, "eval_interval": 4})
    scaling = Path(sys.executable).with_name("scaling")
    result = subprocess.run([str(scaling), "train", str(path)], cwd=REPO, capture_output=True, text=True, timeout=280)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    lines = [match for line in output.splitlines() if (match := PROGRESS.search(line))]
    assert [int(m[1]) for m in lines] == [1, 2, 4, 6]  # the first step, every log_interval, once each
    assert all(int(m[2]) == 6 and float(m[3]) > 0 and float(m[5]) > 0 and float(m[7]) > 0 for m in lines)
    assert [m[10] is not None for m in lines] == [False, False, True, False]  # evaluated at step 4
    assert all("[rank 0 " in line for line in output.splitlines() if PROGRESS.search(line))
    # The start-up block, once: the whole model, the layout, where logs go, and that nothing is saved.
    assert output.count("model: ") == 1 and output.count("all trainable") == 1
    assert "layout: tp 1, pp 2, dp 1, micro batch 2, gradient accumulation 2, global batch 4, precision float32, " \
        "ZeRO off" in output  # fmt: skip
    assert f"logs: {tmp_path / 'logs'} (metrics.jsonl)" in output
    assert "checkpoints: not saved (trainer.save_dir is unset)" in output
    # The expected memory of rank 0, from the parameter table (its stage holds about half the parameters).
    memory = re.search(
        r"memory per rank \(ZeRO-0, dp 1, float32\): parameters .* expected peak .* of ([\d.]+)k\)", output
    )
    assert memory is not None, output[:2000]
    assert 2.0 < float(memory[1]) < 6.736


def _counts_with(layout: dict[str, Any], lora: bool) -> dict[str, Any]:
    topo = Topology(TopologyConfig.from_dict(layout))
    if lora:
        arch = TransformerArchitectureConfig.from_dict(ARCHITECTURE)
        adapt = finetuning_adapter(FinetuningConfig.from_dict({"lora": {"rank": 4}}), topo)
        module = ParallelModule(transformer_layer_specs(arch, topo), topo, LanguageModelLoss(topo), adapt=adapt)
    else:
        module = ParallelModule(model_specs(topo, 2, 0.0), topo, Loss(topo))
    total, trainable = parameter_counts(module)
    lora_params = sum(p.numel() for n, p in module.named_parameters() if "lora" in n)
    return {"total": total, "trainable": trainable, "local": sum(p.numel() for p in module.parameters()),
            "lora": lora_params}  # fmt: skip


@pytest.mark.parametrize("lora", [False, True], ids=["tiny model", "LoRA transformer"])
def test_parameter_counts_are_the_whole_models_on_tp_2_and_pp_2(lora: bool) -> None:
    reference = run_distributed(_counts_with, 1, {}, lora)[0]
    assert reference["total"] == reference["local"]  # one process holds the whole model
    if lora:
        assert 0 < reference["trainable"] == reference["lora"] < reference["total"]
    else:
        assert reference["trainable"] == reference["total"]
    for layout in ({"model_parallel_size": 2}, {"pipe_parallel_size": 2}):
        results = run_distributed(_counts_with, 2, layout, lora)
        for result in results:
            assert (result["total"], result["trainable"]) == (reference["total"], reference["trainable"]), layout
        assert all(r["local"] < reference["total"] for r in results)  # each rank holds part of it


def _run_on_a_terminal(command: list[str], timeout_s: float) -> tuple[int | None, str]:
    """Run ``command`` with stdout and stderr on a pseudo-terminal 160 columns wide; its output, raw."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, cwd=REPO,
                               start_new_session=True)  # fmt: skip
    os.close(terminal)
    output = b""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # every writer closed the terminal
                break
            if not chunk:
                break
            output += chunk
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        os.close(controller)
    return process.returncode, output.decode(errors="replace")


@pytest.mark.timeout(300)
def test_on_a_terminal_other_ranks_lines_replace_the_progress_bar_instead_of_breaking_into_it(tmp_path: Path) -> None:
    # Both stages log "saved checkpoint" while rank 0's bar is drawn: rank 1 is another process, so its lines
    # must clear the bar's line first; rank 0's own lines go through the bar.
    trainer = {"train_iterations": 4, "log_interval": 2, "save_dir": str(tmp_path / "ckpt"), "save_interval": 2}
    scaling = str(Path(sys.executable).with_name("scaling"))
    code, output = _run_on_a_terminal([scaling, "train", str(_tiny_run(tmp_path, trainer))], 280)
    assert code == 0, output[-3000:]
    assert re.search(r"\rtraining: +\d+%\|", output)  # the bar is drawn
    rank_one = [m.start() for m in re.finditer(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \w+ \[rank 1 ", output)]
    assert any("saved checkpoint" in output[at : at + 200] for at in rank_one)
    assert all(output[:at].endswith("\r\x1b[2K") for at in rank_one)  # back to column 0, the line cleared
    progress = [m.start() for m in re.finditer(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO \[rank 0 [^]]*\] step \d", output)]
    assert len(progress) == 3 and all(output[:at].endswith("\r\x1b[2K") for at in progress)
