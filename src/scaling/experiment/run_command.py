"""``scaling run EXPERIMENT [--param NAME=VALUE ...] [--nproc N] [--max-restarts N] [--run-name NAME] [--force-new]
[--project DIR]``.

Runs an experiment on this machine through torchrun, as a recorded run (see :mod:`scaling.experiment.records`):

1. everything is checked before anything is written: the project, the experiment, every ``--param`` value
   (a bad one is one line naming the experiment, the parameter, the value and what was expected), the run
   name and what exists under it;
2. the run directory gets its record (status ``running``), ``params.json`` and ``pip-freeze.txt``;
3. ``python -m torch.distributed.run --standalone --nproc-per-node N -m scaling.experiment.worker ...``
   starts the ranks; each writes ``logs/rank_N.log``, rank 0 also to this console;
4. the record gets the end time, the status and the exit code, which is also this command's exit code.

``--run-name`` of an unfinished run resumes it (the worker points ``current_run().last_checkpoint`` at its
newest checkpoint), with the parameters and seed it was started with. ``scaling run EXPERIMENT --help``
lists the experiment's own parameters. The processes share this command's lifetime: torchrun dies with it
and every rank with torchrun. Ctrl-C (SIGINT, SIGHUP) ends the run as ``cancelled``; SIGTERM, the signal
schedulers send to take nodes back, as ``preempted``; either can be resumed under its name.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from scaling.experiment.decorators import Experiment
from scaling.experiment.describe import format_table, param_default, param_type, source_of
from scaling.experiment.loading import CommandError, LoadedProject, load
from scaling.experiment.params import ParamError, ParamValue
from scaling.experiment.provenance import git_state, pip_freeze, run_hosts
from scaling.experiment.rank_output import last_attempt
from scaling.experiment.records import (
    RecordError,
    RunPaths,
    RunPlan,
    RunStatus,
    begin_attempt,
    end_attempt,
    hold_run_lock,
    plan_run,
    write_json_atomic,
)

__all__ = ["PreparedRun", "experiment_help", "main", "prepare_run", "worker_command"]

_USAGE = (
    "{prog} EXPERIMENT [--param NAME=VALUE ...] [--nproc N] [--max-restarts N] [--run-name NAME] [--force-new] "
    "[--project DIR]"
)
_OPTIONS = (
    ("--param NAME=VALUE", "Set a parameter of the experiment (repeat for several)."),
    ("--nproc N", "Processes to start on this machine (default: processes_per_node of scaling.yml)."),
    ("--max-restarts N", "Restart all ranks up to N times when one fails (torchrun); they resume from a checkpoint."),
    ("--run-name NAME", "Name of the run (default EXPERIMENT-YYYYmmdd-HHMMSS); an unfinished run resumes."),
    ("--force-new", "Start a new run (NAME-2, ...) even where a run of that name exists."),
    ("--project DIR", "The project (or a folder inside it); default the current directory."),
    ("-h, --help", "With EXPERIMENT: its parameters; without: this help."),
)
_SIGNAL_STATUS: dict[int, RunStatus] = {
    signal.SIGTERM: "preempted",
    signal.SIGINT: "cancelled",
    signal.SIGHUP: "cancelled",
}
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=_USAGE.format(prog=prog),
        add_help=False,
        description="Run an experiment of the project on this machine (torchrun) as a recorded run in "
        "RUNS_DIR/EXPERIMENT/RUN_NAME/. `scaling run EXPERIMENT --help` lists the experiment's parameters.",
    )
    parser.add_argument("experiment", nargs="?", metavar="EXPERIMENT", help="Name of the experiment to run.")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help=_OPTIONS[0][1])
    parser.add_argument("--nproc", type=int, metavar="N", help=_OPTIONS[1][1])
    parser.add_argument("--max-restarts", type=int, default=0, metavar="N", help=_OPTIONS[2][1])
    parser.add_argument("--run-name", metavar="NAME", help=_OPTIONS[3][1])
    parser.add_argument("--force-new", action="store_true", help=_OPTIONS[4][1])
    parser.add_argument("--project", metavar="DIR", help=_OPTIONS[5][1])
    parser.add_argument("-h", "--help", action="store_true", help=_OPTIONS[6][1])
    return parser


def experiment_help(experiment: Experiment[Any], root: Path, prog: str = "scaling run") -> str:
    """What ``scaling run EXPERIMENT --help`` prints: usage, where it is defined, its parameters, the options."""
    usage = _USAGE.format(prog=prog).replace("EXPERIMENT", experiment.name, 1)
    lines = [f"usage: {usage}", ""]
    lines.append(f"Experiment {experiment.name!r} (seed {experiment.seed}), defined at {source_of(experiment, root)}.")
    doc = (experiment.fn.__doc__ or "").strip().split("\n\n")[0]
    if doc:
        lines.append(" ".join(doc.split()))
    lines.append("")
    if experiment.params:
        lines.append("Parameters (--param NAME=VALUE):")
        rows = [[p.name, param_type(p), param_default(p), p.description] for p in experiment.params]
        table = format_table(("NAME", "TYPE", "DEFAULT", "DESCRIPTION"), rows)
        lines.extend(f"  {row}".rstrip() for row in table.splitlines())
    else:
        lines.append("Parameters: none.")
    lines += ["", "Options:"]
    width = max(len(flag) for flag, _ in _OPTIONS)
    lines.extend(f"  {flag.ljust(width)}  {text}" for flag, text in _OPTIONS)
    return "\n".join(lines) + "\n"


def _given_values(items: Sequence[str], experiment: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise CommandError(f"experiment {experiment!r}: --param {item!r}: expected NAME=VALUE")
        if name in values:
            raise CommandError(f"experiment {experiment!r}: parameter {name!r} is given twice (--param {item!r})")
        values[name] = value
    return values


@dataclass(frozen=True)
class PreparedRun:
    """A run checked in full and ready to start; nothing of it is on disk yet."""

    project: LoadedProject
    experiment: Experiment[Any]
    plan: RunPlan
    params: dict[str, ParamValue]
    seed: int
    nproc: int
    command: list[str]
    max_restarts: int = 0  # torchrun restarts every rank this many times at most when one fails


def _resumed_params(experiment: Experiment[Any], plan: RunPlan, given: Mapping[str, str]) -> dict[str, ParamValue]:
    """The recorded parameters of the run being resumed; a ``--param`` may repeat one, never change it."""
    assert plan.previous is not None
    recorded: dict[str, Any] = dict(plan.previous.get("params") or {})
    known = {p.name for p in experiment.params}
    # A parameter the experiment no longer declares cannot be passed on; one it newly declares gets its default.
    params = experiment.parse({k: v for k, v in recorded.items() if k in known}).as_dict()
    for name, value in experiment.parse(given).as_dict().items():
        if name in given and params[name] != value:
            raise CommandError(
                f"experiment {experiment.name!r}: run {plan.run_name!r} was started with {name}={params[name]!r}; "
                f"resuming it with {name}={value!r} would make its record wrong (drop --param {name}, or start "
                "a new run with another --run-name)"
            )
    return params


def prepare_run(
    project: LoadedProject, experiment: Experiment[Any], args: argparse.Namespace, command: list[str]
) -> PreparedRun:
    """Check everything about the run asked for, creating nothing; each problem is one ``CommandError``."""
    given = _given_values(args.param, experiment.name)
    nproc = project.config.processes_per_node if args.nproc is None else args.nproc
    if nproc < 1:
        raise CommandError(f"--nproc {nproc}: expected at least 1 process")
    if args.max_restarts < 0:
        raise CommandError(f"--max-restarts {args.max_restarts}: expected 0 or more")
    try:
        plan = plan_run(
            project.root / project.config.runs_dir / experiment.name,
            experiment.name,
            args.run_name,
            force_new=args.force_new,
        )
        if plan.previous is None:
            params, seed = experiment.parse(given).as_dict(), experiment.seed
        else:
            params, seed = _resumed_params(experiment, plan, given), int(plan.previous.get("seed", experiment.seed))
    except (ParamError, RecordError) as exc:
        raise CommandError(str(exc)) from None
    return PreparedRun(project, experiment, plan, params, seed, nproc, command, args.max_restarts)


def worker_command(run: PreparedRun) -> list[str]:
    """torchrun on this machine: ``nproc`` ranks of ``scaling.experiment.worker`` for this run directory."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={run.nproc}",
        f"--max-restarts={run.max_restarts}",
        "-m", "scaling.experiment.worker",
        "--project", str(run.project.root), "--experiment", run.experiment.name, "--run-dir", str(run.plan.run_dir),
    ]  # fmt: skip


def _die_with_this_process() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel SIGTERM the child when this process dies (Linux), or None.

    libc is looked up here, before the fork: the child then only makes the call, which is safe to do in a
    forked child of a process with threads (torch's).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _supervise(command: list[str], cwd: Path) -> tuple[int, RunStatus]:
    """Run ``command`` to its end; returns (exit code, status). A signal to this process stops the run: the
    first is passed on to torchrun as SIGTERM (it stops the ranks), a second kills it."""
    received: list[int] = []
    process: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if process is not None and process.poll() is None:
            if len(received) == 1:
                process.send_signal(signal.SIGTERM)
            else:
                process.kill()

    previous = {sig: signal.signal(sig, on_signal) for sig in _SIGNAL_STATUS}
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        process = subprocess.Popen(command, cwd=cwd, preexec_fn=_die_with_this_process())
        if received:  # arrived while starting
            process.send_signal(signal.SIGTERM)
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code < 0:  # torchrun itself was killed by a signal
        code = 128 - code
    if received:  # the shell's convention, whatever torchrun made of the signal
        return 128 + received[0], _SIGNAL_STATUS[received[0]]
    return code, "completed" if code == 0 else "failed"


def _start(run: PreparedRun) -> dict[str, Any]:
    """Write the record of the attempt starting now (with params.json and pip-freeze.txt)."""
    paths = RunPaths(run.plan.run_dir)
    record = begin_attempt(
        run.plan.previous,
        experiment=run.experiment.name,
        run_name=run.plan.run_name,
        params=run.params,
        seed=run.seed,
        git=git_state(run.project.root),
        command=run.command,
        hosts=run_hosts(),
        nproc=run.nproc,
    )
    write_json_atomic(paths.params, run.params)
    paths.pip_freeze.write_text(pip_freeze(), encoding="utf-8")
    paths.logs.mkdir(parents=True, exist_ok=True)
    write_json_atomic(paths.record, record)
    return record


def _rank_of(log: Path) -> int:
    number = log.stem.removeprefix("rank_")
    return int(number) if number.isdigit() else -1


def _show_failed_rank(paths: RunPaths, lines: int = 20) -> None:
    """The end of the first rank log holding a traceback; rank 0's is skipped, the console showed it."""
    for log in sorted(paths.logs.glob("rank_*.log"), key=_rank_of):
        attempt = last_attempt(log)
        if _rank_of(log) > 0 and any(line.startswith("Traceback") for line in attempt):
            print(f"--- the end of {log}:", *attempt[-lines:], sep="\n", file=sys.stderr)
            return


def launch(run: PreparedRun, prog: str = "scaling run") -> int:
    """Create or continue the run directory, run the ranks, record how it ended; returns the exit code."""
    run_dir = run.plan.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    code: int
    status: RunStatus
    try:
        with hold_run_lock(run_dir):
            if run.plan.previous is None and RunPaths(run_dir).record.exists():
                raise RecordError(f"run {run.plan.run_name!r} was started by another `scaling run` just now")
            record = _start(run)
            verb = f"resuming (attempt {record['attempts']})" if run.plan.resume else "starting"
            where = f"on {run.nproc} process(es) in {run_dir}"
            print(f"{prog}: {verb} run {run.plan.run_name} of {run.experiment.name} {where}")
            code, status = 1, "failed"  # what the record says if starting the processes raises
            if run.max_restarts:  # a fresh rendezvous store per attempt: none of the dead attempt's addresses
                os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
            try:
                code, status = _supervise(worker_command(run), run.project.root)
            finally:
                write_json_atomic(RunPaths(run_dir).record, end_attempt(record, status, code))
    except RecordError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if status == "completed":
        print(f"{prog}: run {run.plan.run_name} completed; record: {RunPaths(run_dir).record}")
    else:
        _show_failed_rank(RunPaths(run_dir))
        print(
            f"{prog}: run {run.plan.run_name} {status} (exit code {code}); logs of every rank: {RunPaths(run_dir).logs}"
            f"; resume it with --run-name {run.plan.run_name}",
            file=sys.stderr,
        )
    return code


def main(argv: Sequence[str] | None = None, prog: str = "scaling run") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.experiment is None:
        if args.help:
            parser.print_help()
            return 0
        parser.error("the experiment to run is required (`scaling experiments list` shows them)")
    try:
        project = load(args.project)
        experiment = project.experiment(args.experiment)
        if args.help:
            sys.stdout.write(experiment_help(experiment, project.root, prog))
            return 0
        run = prepare_run(project, experiment, args, [*prog.split(), *argv])
    except CommandError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return launch(run, prog)
