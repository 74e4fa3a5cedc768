"""``scaling plan`` and ``scaling train --plan-only``: the ranked table, the reasons a layout cannot run,
the config's own budget, and one line with exit 2 for bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from scaling.transformer.planning.command import main, parse_memory
from scaling.transformer.train import main as train_main

REPO = Path(__file__).resolve().parents[2]


def _rows(out: str) -> list[list[str]]:
    """The table's data rows, split into cells (two or more spaces separate them)."""
    lines = out.split("layouts by predicted throughput", 1)[1].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.strip() or not line[0].isdigit():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def test_plan_of_a_preset_ranks_layouts_by_throughput_and_names_what_does_not_fit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["--preset", "llama2-7b", "--gpus", "16", "--nodes", "2", "--gpu", "a100", "--gpu-memory", "24GB",
                 "--seq-len", "2048", "--global-batch", "64", "--top", "6"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "llama2-7b: sequence 2048, global batch 64, bfloat16, 16 x a100 (8 per node, 24 GB each)" in out
    rows = _rows(out)
    assert len(rows) == 6
    throughputs = [float(r[10].replace(",", "")) for r in rows]
    assert throughputs == sorted(throughputs, reverse=True) and throughputs[0] > 0
    assert all(float(r[6]) * 2**30 <= 24e9 for r in rows)  # peak GiB within the GPU
    mfus = [float(r[11].rstrip("%")) for r in rows]
    assert all(0 < m < 100 for m in mfus)
    assert "tp 16 > 8 GPUs per node" in out  # tensor parallelism across nodes
    assert re.search(r"needs \d+\.\d\d GiB > 22\.35 GiB \(stage \d\)", out)  # 24 GB = 22.35 GiB
    assert "inter" in out and "intra" in out  # dp over two nodes crosses the inter-node link


def test_plan_of_a_config_starts_with_its_own_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = REPO / "examples" / "transformer_example" / "config.yml"
    assert main([str(config), "--gpu", "h100", "--top", "3"]) == 0
    out = capsys.readouterr().out
    own = out.split("the config's layout:", 1)[1].split("layouts by predicted throughput", 1)[0]
    assert "plan for tp 1 pp 1 dp 2 ZeRO 0 ckpt off mbs 8 x 2 on h100:" in own
    assert "memory per rank: parameters" in own and "predicted step" in own and "MFU" in own
    assert len(_rows(out)) == 3


def test_train_plan_only_prints_the_budget_and_starts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = yaml.safe_load((REPO / "examples" / "transformer_example" / "config.yml").read_text())
    config["data"] = {"prefixes": [str(tmp_path / "missing")]}  # the plan needs no data
    config["trainer"]["save_dir"] = str(tmp_path / "ckpt")
    path = tmp_path / "run.yml"
    path.write_text(yaml.safe_dump(config))
    assert train_main([str(path), "--plan-only", "-o", "trainer.mfu_device=h100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan for tp 1 pp 1 dp 2 ZeRO 0 ckpt off mbs 8 x 2 on h100:")
    assert "predicted step" in out
    assert not (tmp_path / "ckpt").exists()
    assert train_main([str(path), "--plan-only"]) == 0  # on a CPU: memory and communication only
    out = capsys.readouterr().out
    assert "on cpu:" in out and "step time: not predicted" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "nope", "--gpus", "2"], "--preset 'nope': unknown"),
        (["--preset", "tiny"], "--preset needs --gpus N"),
        (["--preset", "tiny", "--gpus", "0"], "--gpus must be at least 1"),
        (["--preset", "tiny", "--gpus", "6", "--nodes", "4"], "do not split evenly over --nodes 4"),
        (["--preset", "tiny", "--gpus", "2", "--gpu", "tpu"], "--gpu 'tpu': unknown device"),
        (["--preset", "tiny", "--gpus", "2", "--gpu-memory", "lots"], "--gpu-memory 'lots'"),
        ([], "give a CONFIG or --preset NAME"),
        (["missing.yml"], "missing.yml: no such config file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_memory_sizes_read_as_datasheets_write_them() -> None:
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("80GiB") == 80 * 2**30
    assert parse_memory("40") == 40 * 10**9
    assert parse_memory("1.5 TB") == 1.5 * 10**12


def test_the_scaling_command_has_plan(capsys: pytest.CaptureFixture[str]) -> None:
    from scaling.cli.main import main as scaling

    with pytest.raises(SystemExit) as exit_info:
        scaling(["plan", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--gpu-memory" in out and "--preset" in out and "measured" in out
