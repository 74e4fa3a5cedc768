"""Thin wrappers over ``sbatch``, ``squeue``, ``scontrol`` and ``scancel``: each with a timeout, each failure a
:class:`SlurmError` that names the command and what it printed. The environment is passed through as it is,
so ``SLURM_CONF`` (another cluster, or the tests' private one) is honoured."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["JobState", "SlurmError", "cancel", "hostnames", "job_states", "release", "requeue", "submit"]

TIMEOUT_S = 30.0
# squeue's fields, in this order, separated by a character no job name or reason holds.
_FIELDS = ("%i", "%T", "%D", "%M", "%r", "%N")
_SEP = "\x1f"


class SlurmError(RuntimeError):
    """A Slurm command that could not run, ran too long, or failed (the message says which and why)."""


@dataclass(frozen=True)
class JobState:
    """What ``squeue`` says about one job while Slurm still knows it."""

    job_id: str
    state: str  # PENDING, RUNNING, COMPLETING, ...
    nodes: str
    elapsed: str
    reason: str
    nodelist: str


def _run(command: Sequence[str], timeout: float = TIMEOUT_S) -> str:
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise SlurmError(
            f"{command[0]} is not installed here: `scaling queue` needs the Slurm client commands"
        ) from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(command)}` did not answer within {timeout:.0f} s (is slurmctld up?)") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise SlurmError(f"`{' '.join(command)}` failed (exit {done.returncode}): {' '.join(detail[-3:])}")
    return done.stdout


def submit(script: str, *, hold: bool = False) -> str:
    """``sbatch --parsable [--hold] SCRIPT``; returns the job id."""
    out = _run(["sbatch", "--parsable", *(["--hold"] if hold else []), script]).strip()
    job_id = out.split(";")[0]  # "ID" or "ID;CLUSTER"
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed {out!r} instead of a job id")
    return job_id


def job_states(job_ids: Iterable[str] | None = None) -> dict[str, JobState]:
    """The jobs Slurm still knows (pending, running, completing, recently ended), by job id."""
    command = ["squeue", "-h", "-o", _SEP.join(_FIELDS)]
    ids = sorted(set(job_ids or ()))
    if job_ids is not None:
        if not ids:
            return {}
        command += ["--states=all", "-j", ",".join(ids)]
    try:
        out = _run(command)
    except SlurmError as exc:
        if "Invalid job id" in str(exc):  # every one of them is gone from Slurm's memory
            return {}
        raise
    states = {}
    for line in out.splitlines():
        parts = line.split(_SEP)
        if len(parts) == len(_FIELDS):
            states[parts[0]] = JobState(*parts)
    return states


def cancel(job_id: str) -> None:
    _run(["scancel", job_id])


def release(job_id: str) -> None:
    _run(["scontrol", "release", job_id])


def requeue(job_id: str) -> None:
    _run(["scontrol", "requeue", job_id])


def hostnames(nodelist: str) -> list[str]:
    """``scontrol show hostnames NODELIST``: ``node[1-2]`` as ``["node1", "node2"]``."""
    return _run(["scontrol", "show", "hostnames", nodelist]).split()
