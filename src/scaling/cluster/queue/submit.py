"""``scaling queue submit``: check a run like ``scaling run`` does, record it as ``queued``, write its batch
script and hand it to Slurm.

Everything is checked before anything is written (the project, the experiment, every ``--param``, the run
name, the Slurm options). The job is submitted held and released only once its record names the job, so
the job never starts on a record that does not know it yet. ``--run-name`` of an unfinished run (failed,
cancelled, preempted) submits it again: it resumes from its newest checkpoint with its recorded parameters.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import Any

from scaling.cluster.queue import slurm
from scaling.cluster.queue.listing import LIVE_STATES
from scaling.cluster.queue.runs import CANCEL_MARKER
from scaling.cluster.queue.sbatch import JobSpec, Mode, render_script
from scaling.experiment.loading import CommandError, LoadedProject
from scaling.experiment.provenance import git_state, pip_freeze
from scaling.experiment.records import RECORD_VERSION, RunPaths, hold_run_lock, now_iso, write_json_atomic
from scaling.experiment.run_command import PreparedRun, prepare_run

__all__ = ["QueuedSubmission", "add_arguments", "prepare", "submit"]

_TIME = re.compile(r"(\d+-)?\d{1,2}:\d{2}:\d{2}")
PRIORITY_RANGE = 10000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", metavar="EXPERIMENT", help="Name of the experiment to queue.")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="Set a parameter.")
    parser.add_argument("--nodes", type=int, default=1, metavar="N", help="Nodes of the job (default 1).")
    parser.add_argument(
        "--nproc-per-node", type=int, metavar="N", help="Ranks per node (default: processes_per_node of scaling.yml)."
    )
    parser.add_argument("--gpus-per-node", type=int, metavar="G", help="GPUs per node (default: none asked).")
    parser.add_argument("--cpus-per-task", type=int, metavar="C", help="CPUs per node's task (default: Slurm's).")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--exclusive", dest="mode", action="store_const", const="exclusive", help="The job owns its nodes (default)."
    )
    mode.add_argument(
        "--shared", dest="mode", action="store_const", const="shared", help="Share nodes by CPUs/GPUs requested."
    )
    parser.set_defaults(mode="exclusive")
    parser.add_argument(
        "--priority",
        type=int,
        default=0,
        metavar="P",
        help=f"Higher runs earlier: Slurm --nice=-P ({-PRIORITY_RANGE}..{PRIORITY_RANGE}; P > 0 needs an operator).",
    )
    parser.add_argument("--time", metavar="HH:MM:SS", help="Time limit (also D-HH:MM:SS); ranks save before it.")
    parser.add_argument("--partition", metavar="P", help="Slurm partition (default: the cluster's default).")
    parser.add_argument("--retries", type=int, default=0, metavar="N", help="Requeue a failed run up to N times.")
    parser.add_argument("--run-name", metavar="NAME", help="Name of the run (default EXPERIMENT-YYYYmmdd-HHMMSS).")
    parser.add_argument("--force-new", action="store_true", help="A new run (NAME-2...) even where NAME exists.")
    parser.add_argument("--dry-run", action="store_true", help="Print the batch script; create and submit nothing.")
    parser.add_argument("--project", metavar="DIR", help="The project (or a folder inside it); default: here.")


@dataclass(frozen=True)
class QueuedSubmission:
    run: PreparedRun
    spec: JobSpec
    script: str
    retries: int


def _check_options(args: argparse.Namespace) -> None:
    for flag, value, least in (
        ("--nodes", args.nodes, 1),
        ("--nproc-per-node", args.nproc_per_node, 1),
        ("--gpus-per-node", args.gpus_per_node, 1),
        ("--cpus-per-task", args.cpus_per_task, 1),
        ("--retries", args.retries, 0),
    ):
        if value is not None and value < least:
            raise CommandError(f"{flag} {value}: expected at least {least}")
    if abs(args.priority) > PRIORITY_RANGE:
        raise CommandError(f"--priority {args.priority}: expected {-PRIORITY_RANGE}..{PRIORITY_RANGE}")
    if args.time is not None and not _TIME.fullmatch(args.time):
        raise CommandError(f"--time {args.time!r}: expected HH:MM:SS or D-HH:MM:SS")
    if args.partition is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", args.partition):
        raise CommandError(f"--partition {args.partition!r}: not a partition name")


def _refuse_live_job(run: PreparedRun) -> None:
    previous = run.plan.previous
    job_id = (previous or {}).get("queue", {}).get("job_id") if previous else None
    if job_id is None:
        return
    state = slurm.job_states([str(job_id)]).get(str(job_id))
    if state is not None and state.state in LIVE_STATES:
        raise CommandError(
            f"run {run.plan.run_name!r} is still job {job_id} ({state.state}): cancel it first "
            f"(scaling queue cancel {run.plan.run_name})"
        )


def prepare(project: LoadedProject, args: argparse.Namespace, command: list[str]) -> QueuedSubmission:
    """Check everything; nothing is created. Each problem is one ``CommandError``."""
    _check_options(args)
    experiment = project.experiment(args.experiment)
    run_args = argparse.Namespace(
        param=args.param,
        nproc=args.nproc_per_node,
        max_restarts=0,
        run_name=args.run_name,
        force_new=args.force_new,
    )
    run = prepare_run(project, experiment, run_args, command)
    mode: Mode = args.mode
    spec = JobSpec(
        job_name=f"{experiment.name}:{run.plan.run_name}",
        python=sys.executable,
        project=project.root,
        experiment=experiment.name,
        run_dir=run.plan.run_dir.resolve(),
        nodes=args.nodes,
        nproc_per_node=run.nproc,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        mode=mode,
        priority=args.priority,
        time=args.time,
        partition=args.partition,
    )
    return QueuedSubmission(run, spec, render_script(spec), args.retries)


def _queued_record(sub: QueuedSubmission) -> dict[str, Any]:
    run, spec = sub.run, sub.spec
    previous = dict(run.plan.previous or {})
    previous_queue = dict(previous.get("queue") or {})
    record: dict[str, Any] = {
        **previous,
        "record_version": RECORD_VERSION,
        "experiment": run.experiment.name,
        "run_name": run.plan.run_name,
        "params": run.params,
        "seed": run.seed,
        "git": git_state(run.project.root),
        "command": run.command,
        "hosts": [],
        "nproc": spec.nodes * spec.nproc_per_node,
        "ended": None,
        "status": "queued",
        "exit_code": None,
        "attempts": int(previous.get("attempts", 0)),
        "history": list(previous.get("history", [])),
    }
    record["queue"] = {
        "job_id": None,
        "submitted": now_iso(),
        "script": str(RunPaths(spec.run_dir).run_dir / "job.sbatch"),
        "nodes": spec.nodes,
        "nproc_per_node": spec.nproc_per_node,
        "gpus_per_node": spec.gpus_per_node,
        "cpus_per_task": spec.cpus_per_task,
        "mode": spec.mode,
        "priority": spec.priority,
        "time": spec.time,
        "partition": spec.partition,
        "retries": sub.retries,
        "retries_used": 0,
        "preemptions": int(previous_queue.get("preemptions", 0)),
        "jobs": [*previous_queue.get("jobs", [])],
    }
    return record


def submit(sub: QueuedSubmission) -> str:
    """Write the run directory and the batch script, submit held, record the job id, release; the job id."""
    _refuse_live_job(sub.run)
    run_dir = sub.spec.run_dir
    paths = RunPaths(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with hold_run_lock(run_dir):
        record = _queued_record(sub)
        write_json_atomic(paths.params, sub.run.params)
        paths.pip_freeze.write_text(pip_freeze(), encoding="utf-8")
        paths.logs.mkdir(parents=True, exist_ok=True)
        (run_dir / CANCEL_MARKER).unlink(missing_ok=True)
        script = run_dir / "job.sbatch"
        script.write_text(sub.script, encoding="utf-8")
        write_json_atomic(paths.record, record)
        try:
            job_id = slurm.submit(str(script), hold=True)
        except slurm.SlurmError:
            write_json_atomic(paths.record, {**record, "status": "failed", "ended": now_iso()})
            raise
        record["queue"]["job_id"] = job_id
        record["queue"]["jobs"].append(job_id)
        write_json_atomic(paths.record, record)
        slurm.release(job_id)
    return job_id
