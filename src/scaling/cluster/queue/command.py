"""``scaling queue submit|list|status|logs|cancel``: experiments as Slurm jobs (see :mod:`scaling.cluster.queue`).

Priority: ``--priority P`` (-10000..10000, default 0) becomes Slurm's ``--nice=-P``; a higher P runs
earlier among pending jobs, and a positive P (negative nice) is for Slurm operators only. Jobs otherwise wait
in Slurm's order; nothing is cancelled because another is pending. The Slurm commands read ``SLURM_CONF``
from the environment like any Slurm client.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from scaling.cluster.queue import slurm
from scaling.cluster.queue.cancel import cancel_run
from scaling.cluster.queue.listing import list_text, status_text
from scaling.cluster.queue.logs import show_logs
from scaling.cluster.queue.runs import find_run, queued_runs
from scaling.cluster.queue.submit import add_arguments, prepare, submit
from scaling.experiment.loading import CommandError, load
from scaling.experiment.records import RecordError

__all__ = ["main"]


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="action", metavar="COMMAND", required=True)
    add_arguments(commands.add_parser("submit", help="Queue a run of an experiment as a Slurm job."))
    listing = commands.add_parser("list", help="Queued runs: state, job, nodes, elapsed, pending reason.")
    status = commands.add_parser("status", help="One run: state, exit code, preemptions, log tail if it failed.")
    status.add_argument("run", metavar="RUN")
    logs = commands.add_parser("logs", help="A rank's log; -f follows it until the job ends.")
    logs.add_argument("run", metavar="RUN")
    logs.add_argument("-f", "--follow", action="store_true", help="Keep printing until the job ends.")
    logs.add_argument("--rank", type=int, default=0, metavar="R", help="Whose log (default rank 0).")
    cancel = commands.add_parser("cancel", help="Cancel exactly the run named RUN.")
    cancel.add_argument("run", metavar="RUN")
    for sub in (listing, status, logs, cancel):
        sub.add_argument("--project", metavar="DIR", help="The project (or a folder inside it); default: here.")
    return parser


def _dispatch(args: argparse.Namespace, argv: list[str], prog: str) -> int:
    project = load(args.project)
    if args.action == "submit":
        submission = prepare(project, args, [*prog.split(), *argv])
        if args.dry_run:
            sys.stdout.write(submission.script)
            return 0
        job_id = submit(submission)
        print(f"{prog}: submitted job {job_id}: run {submission.run.plan.run_name} of {args.experiment}")
        return 0
    if args.action == "list":
        sys.stdout.write(list_text(queued_runs(project)))
        return 0
    run = find_run(project, args.run)
    if args.action == "status":
        sys.stdout.write(status_text(run))
        return 0
    if args.action == "logs":
        return show_logs(run, args.rank, args.follow)
    print(f"{prog}: {cancel_run(run)}")
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "scaling queue") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(prog).parse_args(argv)
    try:
        return _dispatch(args, argv, prog)
    except (CommandError, RecordError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except slurm.SlurmError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
