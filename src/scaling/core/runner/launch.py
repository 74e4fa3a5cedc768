"""Start a run: print the plan (dry run) or execute it.

All decisions are made by the pure ``plan_launch``; this module only adds what depends on the machine it
runs on (interpreter, directory, environment, tools on PATH) and the side effects.
"""

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

# Tools this machine must have. 'docker' (pdsh_docker) runs on the remote nodes and is not checked here: a
# node without it fails with the shell's 'docker: command not found', which pdsh prefixes with the host name.
_REQUIRED_TOOL = {RunnerType.PDSH: "pdsh", RunnerType.PDSH_DOCKER: "pdsh", RunnerType.SLURM: "sbatch"}


def plan_for_this_machine(config: RunnerConfig, world_size: int) -> LaunchPlan:
    """``plan_launch`` with this interpreter (local runs), this directory and this environment."""
    return plan_launch(config, world_size, python=sys.executable, cwd=os.getcwd(), env=dict(os.environ))


def launch(config: RunnerConfig, world_size: int, dry_run: bool = False, *, out: TextIO | None = None) -> int:
    """Start ``world_size`` processes as ``config`` says; returns the launcher's exit code.

    Local runs return the exit code of ``torch.distributed.run`` (non-zero when any rank failed), pdsh runs
    the largest exit code over the nodes, Slurm runs that of ``sbatch`` (the job itself runs later). With
    ``dry_run`` the commands (and the sbatch script) are written to ``out`` (stdout) and 0 is returned.

    Raises:
        ConfigError: the config cannot start this world, or a required tool is not on PATH.
    """
    plan = plan_for_this_machine(config, world_size)
    if dry_run:
        (out or sys.stdout).write(plan.describe())
        return 0
    tool = _REQUIRED_TOOL.get(config.runner_type)
    if tool is not None and shutil.which(tool) is None:
        raise ConfigError(
            f"runner.runner_type: '{config.runner_type.value}' needs the '{tool}' command, which is not on PATH"
        )
    if config.log_dir is not None:
        Path(config.log_dir).mkdir(parents=True, exist_ok=True)
    if plan.sbatch_script is not None:
        # Overwriting is safe: sbatch copies the script when it submits, so queued jobs keep their own.
        script_path = Path(plan.argv[-1])
        script_path.parent.mkdir(parents=True, exist_ok=True)
        script_path.write_text(plan.sbatch_script, encoding="utf-8")
    return _run(plan.argv)


def _run(argv: list[str]) -> int:
    """Run ``argv`` to completion, also when interrupted.

    On Ctrl-C the launcher receives the same SIGINT (same process group) and stops its workers itself; killing
    it right away (as ``subprocess.run`` does after a short grace period) would leave the workers orphaned.
    A second Ctrl-C kills it.
    """
    process = subprocess.Popen(argv)
    try:
        return process.wait()
    except KeyboardInterrupt:
        try:
            return process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
