"""What a person watching a run reads: one progress line per log interval from one rank, and a start-up block
with the size of the whole model, the layout and where logs and checkpoints go."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from scaling.core.data import MemoryMapWriter
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.core.trainer.console import format_duration, parameter_counts, progress_line
from scaling.transformer.finetuning.apply import finetuning_adapter
from scaling.transformer.finetuning.config import FinetuningConfig
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.model.layers import LanguageModelLoss, transformer_layer_specs

from .pipeline.tp_models import Loss, model_specs

REPO = Path(__file__).resolve().parents[2]

PROGRESS = re.compile(
    r"step (\d+)/(\d+) \| loss (\d+\.\d{4}) \| lr (\d\.\de[-+]\d\d) \| grad norm (\S+) \| (\S+) tokens/s \| "
    r"(\d+\.\d\d) s/step \| ETA (\d+:\d\d:\d\d)( \| eval loss (\d+\.\d\d))?$"
)

ARCHITECTURE = {"vocab_size": 64, "vocab_multiple": 64, "hidden_size": 16, "num_layers": 2, "num_attention_heads": 4,
                "num_kv_heads": 2, "intermediate_size": 32, "sequence_length": 16}  # fmt: skip


def test_progress_line_has_every_field() -> None:
    line = progress_line(step=12, total=100, loss=3.45214, learning_rate=1e-4, grad_norm=0.8123,
                         seconds_per_step=0.41, tokens_per_s=12345.0, samples_per_s=3.0)  # fmt: skip
    expected = "step 12/100 | loss 3.4521 | lr 1.0e-04 | grad norm 0.812 | 12.3k tokens/s | 0.41 s/step | ETA 0:00:36"
    assert line == expected
    with_eval = progress_line(step=100, total=100, loss=3.0, learning_rate=1e-4, grad_norm=1.0, seconds_per_step=0.4,
                              tokens_per_s=None, samples_per_s=8.0, skipped_steps=2, eval_loss=3.5)  # fmt: skip
    assert with_eval.endswith("| 8 samples/s | 0.40 s/step | ETA 0:00:00 | skipped 2 | eval loss 3.50")
    assert format_duration(3 * 3600 + 62) == "3:01:02"


@pytest.mark.timeout(300)
def test_scaling_train_prints_one_progress_line_per_log_interval_from_one_of_two_ranks(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    with MemoryMapWriter(tmp_path / "corpus", vocab_size=64) as writer:
        for _ in range(40):
            start = int(torch.randint(0, 64, (1,), generator=generator))
            writer.add([(start + i) % 64 for i in range(40)])
    config = {
        "topology": {"pipe_parallel_size": 2, "micro_batch_size": 2, "gradient_accumulation_steps": 2},
        "architecture": ARCHITECTURE,
        "trainer": {"train_iterations": 6, "log_interval": 2, "eval_interval": 4},
        "optimizer": {"training_groups": [{"learning_rate_schedule": {"learning_rate": 0.01,
                                                                       "learning_rate_decay_style": "constant"}}]},
        "data": {"prefixes": [str(tmp_path / "corpus")], "validation_fraction": 0.1},
        "logger": {"log_dir": str(tmp_path / "logs")},
    }  # fmt: skip
    path = tmp_path / "run.yml"
    path.write_text(yaml.safe_dump(config))
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
