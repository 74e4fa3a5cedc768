"""The batch script of a queued run: what ``RUN_DIR/job.sbatch`` says, as a pure function of a :class:`JobSpec`.

One task per node (``srun --ntasks-per-node=1``) starts torchrun, and the torchruns of all nodes meet in a
c10d rendezvous on the first node of the allocation, each starting ``nproc_per_node`` ranks of
``scaling.experiment.worker``. Around that step the script:

- is submitted with ``--requeue`` and ``--signal=B:USR1@SECONDS``: Slurm warns the batch shell that long
  before the time limit; the shell then sends SIGTERM to the step (every rank saves and returns) and
  :mod:`scaling.cluster.queue.job_step` requeues the job, which resumes from the newest checkpoint;
- traps SIGTERM the same way (preemption, ``scontrol requeue``: Slurm itself requeues such a job);
- appends everything Slurm prints into ``RUN_DIR/slurm.out`` (``--open-mode=append``: every attempt kept);
- records each attempt's start and end through ``python -m scaling.cluster.queue.job_step begin|end``.

Priority: ``--priority P`` becomes ``--nice=-P`` (Slurm's nice lowers a job's priority by that much, so a
higher P runs earlier among pending jobs; a negative nice, P > 0, is allowed to Slurm operators/root only).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["JobSpec", "render_script"]

Mode = Literal["exclusive", "shared"]


@dataclass(frozen=True)
class JobSpec:
    """Everything the batch script of one run needs; paths are absolute, as the nodes see them."""

    job_name: str
    python: str
    project: Path
    experiment: str
    run_dir: Path
    nodes: int = 1
    nproc_per_node: int = 1
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mode: Mode = "exclusive"
    priority: int = 0
    time: str | None = None
    partition: str | None = None
    signal_seconds: int = 120  # warning before the time limit: enough for the ranks to save
    rdzv_port_base: int = 29500  # + job id % 10000: jobs sharing a node rendezvous on different ports

    @property
    def output(self) -> Path:
        return self.run_dir / "slurm.out"


def _directives(spec: JobSpec) -> list[str]:
    lines = [
        f"--job-name={spec.job_name}",
        f"--nodes={spec.nodes}",
        "--ntasks-per-node=1",
        "--requeue",
        f"--signal=B:USR1@{spec.signal_seconds}",
        "--open-mode=append",
        f"--output={spec.output}",
        f"--chdir={spec.project}",
    ]
    if spec.mode == "exclusive":  # shared: Slurm's default, jobs share a node by the CPUs/GPUs they ask for
        lines.append("--exclusive")
    if spec.cpus_per_task is not None:
        lines.append(f"--cpus-per-task={spec.cpus_per_task}")
    if spec.gpus_per_node is not None:
        lines.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.priority:
        lines.append(f"--nice={-spec.priority}")
    if spec.time is not None:
        lines.append(f"--time={spec.time}")
    if spec.partition is not None:
        lines.append(f"--partition={spec.partition}")
    return [f"#SBATCH {line}" for line in lines]


def render_script(spec: JobSpec) -> str:
    """The text of ``job.sbatch`` for ``spec`` (bash; every value shell-quoted)."""
    q = shlex.quote
    python, run_dir = q(spec.python), q(str(spec.run_dir))
    torchrun = (
        f'{python} -m torch.distributed.run --nnodes "$SLURM_NNODES" --nproc-per-node {spec.nproc_per_node} '
        '--rdzv-backend c10d --rdzv-endpoint "$FIRST_NODE:$RDZV_PORT" --rdzv-id "$SLURM_JOB_ID" --max-restarts 0 '
        f"-m scaling.experiment.worker --project {q(str(spec.project))} --experiment {q(spec.experiment)} "
        f"--run-dir {run_dir}"
    )
    body = f"""#!/bin/bash
# Written by `scaling queue submit` for run {spec.run_dir.name} of {spec.experiment}; resubmit with
# `sbatch {spec.run_dir}/job.sbatch` only through `scaling queue submit` (it keeps the run record right).
{chr(10).join(_directives(spec))}

set -u
FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# Its address (NodeAddr), where it differs from the node's name; the rendezvous store listens there.
FIRST_ADDR=$(scontrol show node "$FIRST_NODE" | awk -F'NodeAddr=' 'NF > 1 {{ split($2, a, " "); print a[1] }}')
FIRST_NODE=${{FIRST_ADDR:-$FIRST_NODE}}
RDZV_PORT=$(( {spec.rdzv_port_base} + SLURM_JOB_ID % 10000 ))
{python} -m scaling.cluster.queue.job_step begin --run-dir {run_dir} || exit $?

# One task per node: torchrun there starts the node's ranks; all nodes meet at FIRST_NODE:RDZV_PORT.
srun --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \\
  {torchrun} &
STEP=$!
SIGNAL=
# USR1: the time limit is near (--signal); TERM: preemption or requeue. Either way the ranks save and return.
trap 'SIGNAL=USR1; kill -TERM "$STEP" 2>/dev/null' USR1
trap 'SIGNAL=TERM; kill -TERM "$STEP" 2>/dev/null' TERM
CODE=
while [ -z "$CODE" ]; do
  wait "$STEP"; STATUS=$?
  kill -0 "$STEP" 2>/dev/null || CODE=$STATUS  # still alive: a trap interrupted the wait
done
exec {python} -m scaling.cluster.queue.job_step end --run-dir {run_dir} --exit-code "$CODE" --signal "$SIGNAL"
"""
    return body
