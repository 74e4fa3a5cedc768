"""Start a run: print the plan (dry run) or execute it.

All decisions are made by the pure ``plan_launch``; this module only adds what depends on the machine it
runs on (interpreter, directory, environment, tools on PATH) and the side effects.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TextIO

from scaling.core.config import ConfigError
from scaling.core.runner.commands import RANK_LOGS, LaunchPlan, plan_launch
from scaling.core.runner.config import RunnerConfig, RunnerType
from scaling.core.runner.lifetime import die_with_parent

__all__ = ["launch", "plan_for_this_machine"]

# Tools this machine must have. 'docker' (pdsh_docker) runs on the remote nodes and is not checked here: a
# node without it fails with the shell's 'docker: command not found', which pdsh prefixes with the host name.
_REQUIRED_TOOL = {RunnerType.PDSH: "pdsh", RunnerType.PDSH_DOCKER: "pdsh", RunnerType.SLURM: "sbatch"}


def plan_for_this_machine(config: RunnerConfig, world_size: int, log_dir: str | Path | None = None) -> LaunchPlan:
    """``plan_launch`` with this interpreter (local runs), this directory and this environment."""
    return plan_launch(
        config, world_size, python=sys.executable, cwd=os.getcwd(), env=dict(os.environ), log_dir=log_dir
    )


def launch(
    config: RunnerConfig,
    world_size: int,
    dry_run: bool = False,
    *,
    out: TextIO | None = None,
    log_dir: str | Path | None = None,
) -> int:
    """Start ``world_size`` processes as ``config`` says; returns the launcher's exit code.

    Local runs return the exit code of ``torch.distributed.run`` (run by ``scaling.core.runner.agent``:
    non-zero when any rank failed, 2 when for bad input), pdsh runs
    the largest exit code over the nodes, Slurm runs that of ``sbatch`` (the job itself runs later). With
    ``dry_run`` the commands (and the sbatch script) are written to ``out`` (stdout) and 0 is returned.
    ``log_dir``: the run's ``logger.log_dir`` (per-rank logs with ``runner.rank_logs``, the sbatch script).

    Raises:
        ConfigError: the config cannot start this world, or a required tool is not on PATH.
    """
    plan = plan_for_this_machine(config, world_size, log_dir)
    if dry_run:
        (out or sys.stdout).write(plan.describe())
        return 0
    tool = _REQUIRED_TOOL.get(config.runner_type)
    if tool is not None and shutil.which(tool) is None:
        raise ConfigError(
            f"runner.runner_type: '{config.runner_type.value}' needs the '{tool}' command, which is not on PATH"
        )
    if config.rank_logs and log_dir is not None:
        (Path(log_dir) / RANK_LOGS).mkdir(parents=True, exist_ok=True)
    if plan.sbatch_script is not None:
        # Overwriting is safe: sbatch copies the script when it submits, so queued jobs keep their own.
        script_path = Path(plan.argv[-1])
        script_path.parent.mkdir(parents=True, exist_ok=True)
        script_path.write_text(plan.sbatch_script, encoding="utf-8")
    return _run(plan.argv)


def _run(argv: list[str]) -> int:
    """Run ``argv`` to completion; SIGTERM and SIGINT are passed on to it, once.

    The launcher runs in its own session, so a Ctrl-C in the terminal reaches it only through this process
    (torchrun shuts down on the first signal it gets; a second one during that shutdown would abort the
    workers' final save). It dies with this process, however this one ends (``kill -9`` too), and takes the
    workers with it (see ``scaling.core.runner.lifetime``). A second signal kills the launcher at once.
    """
    parent = os.getpid()
    process = subprocess.Popen(
        argv, start_new_session=True, preexec_fn=lambda: die_with_parent(signal.SIGTERM, expected_parent=parent)
    )
    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if received:
            process.kill()
        else:
            received.append(signum)
            process.send_signal(signum)

    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {}
    if threading.current_thread() is threading.main_thread():  # handlers can only be set there
        previous = {s: signal.signal(s, forward) for s in handled}
    try:
        return process.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if process.poll() is None:
            process.kill()
            process.wait()
