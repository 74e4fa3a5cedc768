"""``scaling nodes setup|check|exec``: the command line of :mod:`scaling.cluster.nodes`.

Exit status: 0 when every host passed, 1 naming the failed hosts, 2 for bad input (no project, a
``scaling.yml`` that does not validate, no ``requirements.txt`` to install), and for ``exec`` the
status of the first host that failed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from scaling.cluster.nodes.checks import check_all
from scaling.cluster.nodes.cluster import Cluster, Row
from scaling.cluster.nodes.execute import exec_all
from scaling.cluster.nodes.setup import setup_all
from scaling.cluster.nodes.table import failed_hosts, render
from scaling.experiment.deploy_key import DeployKeyError
from scaling.experiment.project import ProjectError, find_project, load_project_config

__all__ = ["main"]


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Check, set up or run a command on the project's hosts (scaling.yml) over SSH."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--project", metavar="DIR", help="The project (or a folder inside it); default: here.")
    common.add_argument(
        "--connect-timeout", type=float, default=10, metavar="S", help="Seconds to wait for each SSH connection."
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="{setup,check,exec}")
    setup = sub.add_parser(
        "setup",
        parents=[common],
        help="Checks, then install the project, its pinned environment and deploy key (idempotent).",
    )
    setup.add_argument(
        "--slurm", action="store_true", help="Also install and configure Slurm (controller on the first host)."
    )
    sub.add_parser("check", parents=[common], help="Check every host: OS, Python, disk, clock, GPUs, network.")
    run = sub.add_parser("exec", parents=[common], help="Run a command on every host: scaling nodes exec -- CMD")
    run.add_argument("--timeout", type=float, default=3600, metavar="S", help="Seconds the command may run.")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="The command (after --).")
    return parser


def _report(rows: list[Row], prog: str, what: str) -> int:
    print(render(rows))
    failed = failed_hosts(rows)
    if failed:
        print(f"{prog}: {what} failed on {len(failed)} host(s): {', '.join(failed)}", file=sys.stderr)
        return 1
    if what == "setup" and all(row.status in ("ok", "unchanged", "skipped") for row in rows):
        print(f"{prog}: every host was already set up: nothing changed")
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "scaling nodes") -> int:
    args = _parser(prog).parse_args(argv)
    try:
        root = find_project(args.project)
        cluster = Cluster.from_project(root, load_project_config(root), args.connect_timeout)
    except ProjectError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2

    def say(text: str) -> None:
        print(text, file=sys.stderr)

    if args.action == "check":
        rows, _ = check_all(cluster, say)
        return _report(rows, prog, "check")
    if args.action == "setup":
        try:
            rows = setup_all(cluster, say, with_slurm=args.slurm)
        except (FileNotFoundError, DeployKeyError) as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 2
        return _report(rows, prog, "setup")
    command = list(args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd)
    if not command:
        print(f"{prog} exec: give the command after --, e.g. `{prog} exec -- nvidia-smi`", file=sys.stderr)
        return 2
    code, failed = exec_all(cluster, command, args.timeout)
    if failed:
        print(f"{prog} exec: failed on {', '.join(failed)}", file=sys.stderr)
    return code
