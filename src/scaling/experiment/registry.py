"""Which experiments a project has: found by importing its experiment modules, never by reading their text.

Importing runs the decorators, so whatever Python allows works: ``import scaling.experiment as ex`` and
``@ex.experiment(...)``, ``from scaling.experiment import param as p``, defaults computed from constants or
other modules. A parser of source text would have to imitate all of that and would still miss cases.

Each :func:`load_project` collects the experiments its imports register and refuses two with one name,
naming both places; the modules are executed afresh every time, so an edited file is seen. ``REGISTRY``
holds every experiment decorated in this process by name (the latest wins), for code that imports a module
itself; uniqueness is a property of a project, so only :func:`load_project` enforces it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scaling.experiment.decorators import Experiment
from scaling.experiment.params import DefinitionError

__all__ = [
    "DEFAULT_EXPERIMENT_MODULES",
    "REGISTRY",
    "DuplicateExperimentError",
    "UnknownExperimentError",
    "find_experiment",
    "load_project",
    "register",
]

# Where a project without an `experiments:` entry in scaling.yml keeps them (what `scaling init` writes).
DEFAULT_EXPERIMENT_MODULES = ("src/experiments.py",)

REGISTRY: dict[str, Experiment[Any]] = {}

# One dict per load_project in progress (innermost last): what its imports registered, by name.
_loading: list[dict[str, Experiment[Any]]] = []


class DuplicateExperimentError(DefinitionError):
    """Two experiments of one project share a name."""


class UnknownExperimentError(LookupError):
    """No experiment of the requested name in the project; the message lists those there are."""

    def __str__(self) -> str:  # LookupError would show the repr of the message
        return str(self.args[0])


def _where(experiment: Experiment[Any]) -> str:
    return f"{experiment.source[0]}:{experiment.source[1]}"


def register(experiment: Experiment[Any]) -> None:
    """Record a newly decorated experiment (``@experiment`` calls this)."""
    if _loading:
        found = _loading[-1]
        earlier = found.get(experiment.name)
        # The same place twice is one definition seen twice (a module listed and also imported by another).
        if earlier is not None and earlier.source != experiment.source:
            raise DuplicateExperimentError(
                f"experiment {experiment.name!r} is defined twice in the project: at {_where(earlier)} and at "
                f"{_where(experiment)}; experiment names must be unique"
            )
        found[experiment.name] = experiment
    REGISTRY[experiment.name] = experiment


def _experiment_modules(root: Path) -> Sequence[str]:
    config = root / "scaling.yml"
    if not config.is_file():
        return DEFAULT_EXPERIMENT_MODULES
    from scaling.experiment.project import load_project_config

    return load_project_config(root).experiments


def _module_name(path: Path) -> str:
    """A name for ``path`` in ``sys.modules`` that cannot shadow a real module (``config``, ``random``...)."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = "".join(c if c.isalnum() else "_" for c in path.stem)
    return f"_scaling_experiments_{stem}_{digest}"


def _import_path(path: Path, listed_in: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"experiment module {path} (listed in {listed_in}) does not exist")
    # The module's own folder goes on sys.path (and stays: the function may import lazily when it runs),
    # so `src/experiments.py` can `import config` for a `src/config.py` beside it.
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = _module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before executing: dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def load_project(root: str | Path, modules: Sequence[str] | None = None) -> dict[str, Experiment[Any]]:
    """Import the project's experiment modules and return its experiments by name, in definition order.

    Args:
        root: the project folder (the one holding ``scaling.yml``).
        modules: module files relative to ``root``; by default the ``experiments`` list of ``scaling.yml``,
            or ``src/experiments.py`` when the project has no ``scaling.yml``.

    Raises:
        DuplicateExperimentError: two experiments share a name (the message names both file:line).
        FileNotFoundError: a listed module does not exist.
        DefinitionError: a declaration is wrong; any other error of a module propagates as raised there.
    """
    root = Path(root).resolve()
    if modules is not None:
        listed_in = "the modules passed to load_project"
    elif (root / "scaling.yml").is_file():
        listed_in = f"'experiments' of {root / 'scaling.yml'}"
    else:
        listed_in = "the default for a project without scaling.yml"
    relative = _experiment_modules(root) if modules is None else modules
    paths = list(dict.fromkeys((root / m).resolve() for m in relative))  # each module once, in order
    found: dict[str, Experiment[Any]] = {}
    _loading.append(found)
    try:
        for path in paths:
            _import_path(path, listed_in)
    finally:
        _loading.pop()
    return found


def find_experiment(root: str | Path, name: str) -> Experiment[Any]:
    """The experiment ``name`` of the project at ``root``; an error lists the ones it has."""
    experiments = load_project(root)
    if name not in experiments:
        known = ", ".join(experiments) or "none"
        raise UnknownExperimentError(
            f"no experiment {name!r} in the project at {Path(root).resolve()} (known: {known})"
        )
    return experiments[name]
