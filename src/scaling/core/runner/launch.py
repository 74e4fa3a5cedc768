"""Start a run: print the plan (dry run) or execute it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TextIO

from scaling.core.config import ConfigError
from scaling.core.runner.commands import LaunchPlan, plan_launch
from scaling.core.runner.config import RunnerConfig, RunnerType

__all__ = ["launch", "plan_for_this_machine"]

_REQUIRED_TOOL = {RunnerType.PDSH: "pdsh", RunnerType.PDSH_DOCKER: "pdsh", RunnerType.SLURM: "sbatch"}


def plan_for_this_machine(config: RunnerConfig, world_size: int) -> LaunchPlan:
    return plan_launch(config, world_size, python=sys.executable, cwd=os.getcwd(), env=dict(os.environ))


def launch(config: RunnerConfig, world_size: int, *, dry_run: bool = False, out: TextIO | None = None) -> int:
    """Start ``world_size`` processes as ``config`` says; returns the launcher's exit code.

    With ``dry_run`` the commands (and the sbatch script) are printed instead and 0 is returned.
    """
    out = out or sys.stdout
    plan = plan_for_this_machine(config, world_size)
    if dry_run:
        out.write(plan.describe())
        return 0
    tool = _REQUIRED_TOOL.get(config.runner_type)
    if tool is not None and shutil.which(tool) is None:
        raise ConfigError(f"runner.runner_type '{config.runner_type.value}' needs '{tool}', which is not on PATH")
    if plan.sbatch_script is not None:
        script_path = Path(plan.argv[-1])
        script_path.parent.mkdir(parents=True, exist_ok=True)
        if script_path.exists():
            raise ConfigError(f"runner.slurm.job_name: {script_path} already exists; remove it or rename the job")
        script_path.write_text(plan.sbatch_script, encoding="utf-8")
    if config.log_dir is not None:
        Path(config.log_dir).mkdir(parents=True, exist_ok=True)
    return subprocess.run(plan.argv, check=False).returncode
