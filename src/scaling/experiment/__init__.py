"""Experiments as decorated Python functions: typed parameters, a registry, seeding and the current run.

``from scaling.experiment import experiment, param`` is all a project's ``src/experiments.py`` needs; the
command line (``scaling run``, ``scaling experiments list``, ``scaling build-experiments``) loads those
modules through :mod:`scaling.experiment.registry`. Names are imported on first use, so importing this
package loads neither torch nor the command-line modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scaling._lazy import lazy_exports

if TYPE_CHECKING:
    from scaling.experiment.decorators import Experiment, experiment, param
    from scaling.experiment.params import DefinitionError, Param, ParamError, Params
    from scaling.experiment.registry import find_experiment, load_project
    from scaling.experiment.run_context import RunContext, current_run

__all__ = [
    "DefinitionError",
    "Experiment",
    "Param",
    "ParamError",
    "Params",
    "RunContext",
    "current_run",
    "experiment",
    "find_experiment",
    "load_project",
    "param",
]

_HOME = {
    "Experiment": "scaling.experiment.decorators",
    "experiment": "scaling.experiment.decorators",
    "param": "scaling.experiment.decorators",
    "DefinitionError": "scaling.experiment.params",
    "Param": "scaling.experiment.params",
    "ParamError": "scaling.experiment.params",
    "Params": "scaling.experiment.params",
    "find_experiment": "scaling.experiment.registry",
    "load_project": "scaling.experiment.registry",
    "RunContext": "scaling.experiment.run_context",
    "current_run": "scaling.experiment.run_context",
}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _HOME)
