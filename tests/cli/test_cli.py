"""The `scaling` command: help, the config template, and its error paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scaling.cli.main import main
from scaling.core.engine_config import EngineConfig


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "config" in out and "launch" in out


def test_config_template_is_complete_and_loads_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The default class is now TransformerConfig (tests/cli/test_config_template.py); the engine's is one --class away.
    assert main(["config", "template", "--class", "scaling.core.engine_config:EngineConfig"]) == 0
    text = capsys.readouterr().out
    for field in ["model_parallel_size:", "pipe_schedule:", "runner_type:", "hostsfile:", "log_dir:", "wandb_mode:"]:
        assert field in text
    assert "# Tensor-parallel size" in text
    path = tmp_path / "template.yml"
    path.write_text(text)
    assert EngineConfig.from_yaml(path) == EngineConfig()


def test_template_of_another_class_and_bad_class(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "template", "--class", "scaling.core.topology:TopologyConfig"]) == 0
    assert "runner_type" not in capsys.readouterr().out
    assert main(["config", "template", "--class", "scaling.core.topology:Topology"]) == 2
    assert "is not a scaling config class" in capsys.readouterr().err
    assert main(["config", "template", "--class", "no.such.module:X"]) == 2
    assert "cannot import" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    scaling = Path(sys.executable).with_name("scaling")
    result = subprocess.run([str(scaling), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "Train large models" in result.stdout


@pytest.mark.parametrize("command", [["config", "template"], ["launch"], ["prepare-data"], ["train"]])
def test_every_sub_command_answers_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    assert f"usage: scaling {' '.join(command)}" in capsys.readouterr().out


def test_unknown_arguments_of_plain_commands_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["config", "template", "--bogus"])
    assert info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
