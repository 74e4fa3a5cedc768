"""``scaling experiments list [--project DIR]``: every experiment of the project, with its parameters.

One row per parameter (type, and the options of a choice; default; description); the experiment's name,
seed and ``file:line`` on its first row. The list comes from importing the project's modules, exactly as
``scaling run`` will, so an experiment listed here is one that runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from scaling.experiment.decorators import Experiment
from scaling.experiment.describe import format_table, param_default, param_type, source_of
from scaling.experiment.loading import CommandError, LoadedProject, load

__all__ = ["experiments_table", "main"]

HEADERS = ("EXPERIMENT", "SEED", "SOURCE", "PARAMETER", "TYPE", "DEFAULT", "DESCRIPTION")


def _rows(experiment: Experiment[Any], project: LoadedProject) -> list[list[str]]:
    head = [experiment.name, str(experiment.seed), source_of(experiment, project.root)]
    params = experiment.params
    if not params:
        return [[*head, "(none)", "", "", ""]]
    rows = []
    for index, param in enumerate(params):
        shown = head if index == 0 else ["", "", ""]
        rows.append([*shown, param.name, param_type(param), param_default(param), param.description])
    return rows


def experiments_table(project: LoadedProject) -> str:
    """The table ``scaling experiments list`` prints (a line saying so when there are none)."""
    if not project.experiments:
        listed = ", ".join(project.config.experiments)
        return f"no experiments in {project.root} (looked in {listed})\n"
    rows = [row for experiment in project.experiments.values() for row in _rows(experiment, project)]
    return format_table(HEADERS, rows)


def main(argv: Sequence[str] | None = None, prog: str = "scaling experiments") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Work with the experiments of a project.")
    commands = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    listing = commands.add_parser(
        "list",
        help="Show every experiment: parameters with type, options and default, and where it is defined.",
        description="Show every experiment of the project: its parameters (type, options, default, "
        "description), its seed, and the file:line that defines it.",
    )
    listing.add_argument(
        "--project", metavar="DIR", help="The project (or a folder inside it); default the current directory."
    )
    args = parser.parse_args(argv)
    try:
        project = load(args.project)
    except CommandError as exc:
        print(f"{prog} {args.command}: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(experiments_table(project))
    return 0
