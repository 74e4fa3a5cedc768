"""``@experiment`` and ``@param``: an experiment is a Python function with declared, typed parameters.

::

    @experiment("alpaca", seed=7)
    @param("size", options=["70b", "13b", "7b"], default="7b")
    @param("lr", default=1e-5, description="peak learning rate")
    def train(params): ...

The ``@param`` decorators run first (bottom up) and only attach their :class:`Param` to the function;
``@experiment`` then collects them in reading order (top first), checks the function can take the params,
and registers the result with :mod:`scaling.experiment.registry`. Every mistake in a declaration is an
error when the module is imported, naming the file and line, so ``scaling experiments list`` and
``scaling build-experiments`` catch it before anything is launched.

The decorated name stays callable (``train(params)`` calls the function), and ``train.run({...})`` is the
one path every launcher uses: parse the values as the command line would, fill defaults, seed, call.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from scaling.experiment.params import DefinitionError, Param, ParamError, Params, ParamType, ParamValue, parse_value

__all__ = ["Experiment", "experiment", "param"]

R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

# Where @param leaves its declarations on the function until @experiment collects them (top decorator first).
_PARAMS_ATTR = "__scaling_params__"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # used in run directories and workflow file names
_SEED_LIMIT = 2**32  # numpy's legacy global seed must be below this
_NO_DEFAULT: Any = object()


def _file(code_filename: str) -> str:
    """Absolute, except for pseudo-files such as ``<stdin>`` or ``<string>``."""
    return code_filename if code_filename.startswith("<") else os.path.abspath(code_filename)


def _caller(depth: int = 2) -> str:
    """``file:line`` of the code that called our caller: the decorator line in the user's module."""
    frame = sys._getframe(depth)
    return f"{_file(frame.f_code.co_filename)}:{frame.f_lineno}"


def _where(source: tuple[str, int]) -> str:
    return f"{source[0]}:{source[1]}"


def param(
    name: str,
    default: ParamValue = _NO_DEFAULT,
    options: Sequence[ParamValue] | None = None,
    type: ParamType | None = None,
    description: str = "",
) -> Callable[[F], F]:
    """Declare a parameter of the experiment below; place it between ``@experiment`` and the ``def``.

    Args:
        name: a Python identifier, not one of the reserved run fields (``seed``, ``name``, ...).
        default: the value when the run does not set it. Required, except with ``options``, whose first
            entry it then is. ``0``, ``False``, ``""`` and negative numbers are ordinary defaults.
        options: the allowed values, which makes this a choice; compared after parsing as their type.
        type: ``int``, ``float``, ``bool`` or ``str``; inferred from the default and options when omitted
            (an int among float options makes a float).
        description: shown by ``--help``, ``scaling experiments list`` and the generated workflow.
    """
    where = _caller()
    try:
        if default is _NO_DEFAULT:
            if not options:
                raise DefinitionError(f"parameter {name!r} needs a default (or options, the first being the default)")
            default = options[0]
        if options is not None and (isinstance(options, str | bytes) or not isinstance(options, Sequence)):
            raise DefinitionError(f"parameter {name!r}: options must be a list of values, got {options!r}")
        choices = None if options is None else tuple(options)
        declared = Param(
            name=name,
            default=default,
            type=Param.infer_type(name, default, choices) if type is None else type,
            options=choices,
            description=description,
        )
    except DefinitionError as exc:
        raise DefinitionError(f"{where}: {exc}") from None

    def attach(fn: F) -> F:
        if isinstance(fn, Experiment):
            raise DefinitionError(
                f"{where}: @param({name!r}) is above @experiment({fn.name!r}); put every @param below it"
            )
        if not callable(fn):
            raise DefinitionError(f"{where}: @param({name!r}) must decorate a function, not {fn!r}")
        below: tuple[Param, ...] = getattr(fn, _PARAMS_ATTR, ())
        for other in below:
            if other.name.lower() == name.lower():  # GitHub workflow inputs ignore case
                raise DefinitionError(f"{where}: parameter {name!r} is declared twice (also as {other.name!r})")
        setattr(fn, _PARAMS_ATTR, (declared, *below))
        return fn

    return attach


class Experiment(Generic[R]):
    """A registered experiment: the function, its name and seed, and its parameters in declaration order.

    Calling it calls the function unchanged; :meth:`run` is what ``scaling run`` and the tests use.
    """

    # Copied from the function by functools.update_wrapper, so the object still reads as the function.
    __name__: str
    __qualname__: str
    __wrapped__: Callable[[Params], R]

    def __init__(self, fn: Callable[[Params], R], name: str, seed: int, params: Sequence[Param]) -> None:
        self._fn = fn
        self._name = name
        self._seed = seed
        self._params = tuple(params)
        code = getattr(fn, "__code__", None)
        if code is not None:  # the first decorator's line: where `@experiment(...)` is written
            self._source = (_file(code.co_filename), code.co_firstlineno)
        else:
            file, _, line = _caller(3).rpartition(":")
            self._source = (file, int(line))
        functools.update_wrapper(self, fn, updated=())

    @property
    def fn(self) -> Callable[[Params], R]:
        return self._fn

    @property
    def name(self) -> str:
        return self._name

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def params(self) -> list[Param]:
        """The declared parameters, top decorator first (a new list each time)."""
        return list(self._params)

    @property
    def source(self) -> tuple[str, int]:
        """(absolute file, line) of the definition, as ``scaling experiments list`` shows it."""
        return self._source

    def parse(self, values: Mapping[str, object] | None = None) -> Params:
        """Resolve ``values`` (text as on the command line, or typed) into :class:`Params`, defaults filled.

        Raises :class:`~scaling.experiment.params.ParamError` for a bad value or an unknown name.
        """
        values = {} if values is None else values
        by_name = {p.name: p for p in self._params}
        for key in values:
            if key not in by_name:
                known = ", ".join(by_name) or "none"
                message = f"unknown parameter {key!r} (known: {known})"
                raise ParamError(self._name, str(key), values[key], f"one of the parameters {known}", message)
        resolved = {
            p.name: parse_value(p, values[p.name], self._name) if p.name in values else p.default for p in self._params
        }
        return Params(resolved, self._name)

    def run(self, values: Mapping[str, object] | None = None, *, seed: int | None = None) -> R:
        """Parse ``values``, seed Python, NumPy and torch (with ``seed``, else the experiment's), call the function.

        Returns what the function returns. Parsing happens before seeding, so a bad value fails before
        any state is touched.
        """
        from scaling.experiment.seeding import apply_seed

        params = self.parse(values)
        apply_seed(self._seed if seed is None else seed)
        return self._fn(params)

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        return self._fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Experiment {self._name!r} seed={self._seed} at {_where(self._source)}>"


def _check_seed(seed: object, where: str) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < _SEED_LIMIT:
        raise DefinitionError(f"{where}: seed must be an integer in [0, 2**32), got {seed!r}")
    return seed


def _check_callable_with_params(fn: Callable[..., Any], where: str) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none; nothing to check
        return
    try:
        signature.bind(None)
    except TypeError:
        raise DefinitionError(
            f"{where}: {getattr(fn, '__qualname__', fn)}{signature} must take the params as its one "
            "positional argument, as in `def train(params): ...`"
        ) from None


def experiment(name: str, seed: int = 0) -> Callable[[Callable[[Params], R]], Experiment[R]]:
    """Register the function below as the experiment ``name``, run with ``seed`` unless a run says otherwise.

    ``name`` appears in run directories and workflow file names, so it is letters, digits, ``.``, ``_``
    and ``-``; it must be unique within a project (checked when the project is loaded).
    """
    where = _caller()
    if not isinstance(name, str):
        raise DefinitionError(f"{where}: write @experiment('NAME', seed=...), with the name first; got {name!r}")
    if not _NAME.fullmatch(name):
        raise DefinitionError(f"{where}: experiment name {name!r} must match {_NAME.pattern}")
    seed = _check_seed(seed, where)

    def register(fn: Callable[[Params], R]) -> Experiment[R]:
        from scaling.experiment.registry import register as add_to_registry

        if isinstance(fn, Experiment):
            raise DefinitionError(f"{where}: {fn.name!r} is already an experiment; use one @experiment per function")
        if not callable(fn):
            raise DefinitionError(f"{where}: @experiment({name!r}) must decorate a function, not {fn!r}")
        _check_callable_with_params(fn, where)
        declared: tuple[Param, ...] = getattr(fn, _PARAMS_ATTR, ())
        made = Experiment(fn, name, seed, declared)
        add_to_registry(made)
        return made

    return register
