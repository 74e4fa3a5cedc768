"""What every project command does first: find the project, read ``scaling.yml``, import its experiments.

Each way this can fail becomes one :class:`CommandError` line for the user (exit code 2): no project here,
a bad ``scaling.yml`` field, a wrong ``@param`` declaration (its message names the file and line), an
experiment module that does not import (the error and where in that module it was raised), an unknown
experiment name (the message lists the known ones).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaling.experiment.decorators import Experiment
from scaling.experiment.project import ProjectConfig, ProjectError, find_project, load_project_config

__all__ = ["CommandError", "LoadedProject", "load"]


class CommandError(Exception):
    """A project command cannot go on; ``str(error)`` is the one line to print."""


@dataclass(frozen=True)
class LoadedProject:
    root: Path
    config: ProjectConfig
    experiments: dict[str, Experiment[Any]]

    def experiment(self, name: str) -> Experiment[Any]:
        if name not in self.experiments:
            known = ", ".join(self.experiments) or "none"
            raise CommandError(f"no experiment {name!r} in the project at {self.root} (known: {known})")
        return self.experiments[name]


def _raised_in(exc: BaseException, root: Path) -> str:
    """`` (at FILE:LINE)`` of the innermost frame inside the project, where the user's module failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve().is_relative_to(root)]
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" (at {exc.filename}:{exc.lineno})"
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def load(project: str | Path | None = None) -> LoadedProject:
    """The project at or above ``project`` (default: the current directory), with its experiments imported."""
    from scaling.experiment.params import DefinitionError
    from scaling.experiment.registry import load_project

    try:
        root = find_project(project)
        config = load_project_config(root)
    except ProjectError as exc:
        raise CommandError(str(exc)) from None
    try:
        experiments = load_project(root)
    except (DefinitionError, ProjectError, FileNotFoundError) as exc:
        raise CommandError(str(exc)) from None
    except Exception as exc:  # the user's module raised while importing: say what and where, in one line
        detail = " ".join(str(exc).split())
        raise CommandError(
            f"importing the experiments of {root} failed: {type(exc).__name__}: {detail}{_raised_in(exc, root)}"
        ) from None
    return LoadedProject(root, config, experiments)
