"""An experiment's parameters: their declarations (:class:`Param`), how a value is read, and the resolved set.

A parameter reaches an experiment from three places that must agree: a default written in Python, a
``--param k=v`` string on the command line, and a GitHub ``workflow_dispatch`` input (always a string). So
one function, :func:`parse_value`, turns either a typed value or its text into the parameter's canonical
value, and it is strict: a boolean is ``true/false/1/0/yes/no`` (any case) and nothing else, an integer
has no decimal point, a float is finite. A typo then fails before the run starts, with a message naming
the experiment, the parameter, the value and what was expected, instead of silently training on
``bool("no") == True``.

The resolved :class:`Params` are immutable: they are recorded with the run (``params.json``), and code
that changed them halfway through would make the record lie.
"""

from __future__ import annotations

import keyword
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NoReturn

__all__ = [
    "PARAM_TYPES",
    "RESERVED_NAMES",
    "DefinitionError",
    "Param",
    "ParamError",
    "ParamKind",
    "ParamType",
    "ParamValue",
    "Params",
    "parse_value",
]

ParamValue = bool | int | float | str
ParamType = type[bool] | type[int] | type[float] | type[str]
ParamKind = Literal["choice", "boolean", "number", "string"]

PARAM_TYPES: tuple[ParamType, ...] = (int, float, bool, str)

# The run's own fields: command-line flags of `scaling run` (--run-name, --nproc, --force-new, --help) and
# keys of the run record (name, seed). A parameter with one of these names would be ambiguous in both.
RESERVED_NAMES = frozenset({"seed", "name", "run_name", "nproc", "help", "force_new", "param", "experiment"})

# Attributes of a Params object itself; a parameter so named could not be read as `params.NAME`.
_PARAMS_ATTRIBUTES = frozenset({"keys", "items", "values", "get", "as_dict"})

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


class ParamError(ValueError):
    """A value given for a parameter is not one it accepts (or names no parameter at all)."""

    def __init__(self, experiment: str, parameter: str, value: object, expected: str, message: str = "") -> None:
        self.experiment = experiment
        self.parameter = parameter
        self.value = value
        self.expected = expected
        where = f"experiment {experiment!r}: " if experiment else ""
        super().__init__(where + (message or f"parameter {parameter!r} got {value!r}; expected {expected}"))


class DefinitionError(ValueError):
    """An ``@experiment`` or ``@param`` declaration is itself wrong; raised when the module is imported."""


class _Mismatch(Exception):
    """Internal: a value does not convert; carries what was expected."""


def _expected(type_: ParamType) -> str:
    if type_ is bool:
        return "a boolean (true/false, 1/0 or yes/no, in any case)"
    if type_ is int:
        return "an integer"
    if type_ is float:
        return "a number (such as 3, 0.5 or 1e-4)"
    return "a string"


def _mismatch(type_: ParamType) -> NoReturn:
    raise _Mismatch(_expected(type_))


def _convert(type_: ParamType, value: object) -> ParamValue:
    """``value`` (typed, or text as on the command line) as a ``type_``; raises :class:`_Mismatch`."""
    if type_ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        _mismatch(type_)
    if type_ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _INT.fullmatch(value):
            return int(value)
        _mismatch(type_)
    if type_ is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value):
            value = float(value)
        # nan and inf are refused: no learning rate is meant to be one, and JSON records could not hold them
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        _mismatch(type_)
    if isinstance(value, str):
        return value
    _mismatch(type_)


def _common_type(values: Sequence[object]) -> ParamType:
    """The one parameter type of all ``values`` (ints among floats make floats); raises :class:`_Mismatch`."""
    kinds = {bool if isinstance(v, bool) else type(v) for v in values}
    for type_ in (bool, int, str):
        if kinds == {type_}:
            return type_
    if kinds and kinds <= {int, float}:
        return float
    names = ", ".join(sorted(k.__name__ for k in kinds))
    raise _Mismatch(f"values of one type among int, float, bool and str (got {names})")


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise DefinitionError(f"parameter name {name!r} must be a Python identifier (it is read as params.NAME)")
    if name.startswith("_"):
        raise DefinitionError(f"parameter name {name!r} must not start with '_'")
    if name.lower() in RESERVED_NAMES:  # lower(): GitHub workflow inputs ignore case
        reserved = ", ".join(sorted(RESERVED_NAMES))
        raise DefinitionError(f"parameter name {name!r} is reserved for the run's own fields ({reserved})")
    if name in _PARAMS_ATTRIBUTES:
        raise DefinitionError(f"parameter name {name!r} would hide the method params.{name}()")
    return name


@dataclass(frozen=True)
class Param:
    """One declared parameter: its name, default, type and, for a choice, the allowed options.

    ``default`` and ``options`` are stored canonically (converted to ``type``: ``default=1`` of a float
    parameter is ``1.0``), so what generated workflows and run records show is what the run receives.
    Construction validates everything; :func:`scaling.experiment.param` infers ``type`` before that.
    """

    name: str
    default: ParamValue
    type: ParamType
    options: tuple[ParamValue, ...] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.type not in PARAM_TYPES:
            raise DefinitionError(f"parameter {self.name!r}: type {self.type!r} is not one of int, float, bool, str")
        if not isinstance(self.description, str):
            raise DefinitionError(f"parameter {self.name!r}: description must be a string, got {self.description!r}")
        try:
            default = _convert(self.type, self.default)
        except _Mismatch as exc:
            raise DefinitionError(f"parameter {self.name!r}: default {self.default!r} is not {exc}") from None
        object.__setattr__(self, "default", default)
        if self.options is not None:
            object.__setattr__(self, "options", self._canonical_options(default))

    def _canonical_options(self, default: ParamValue) -> tuple[ParamValue, ...]:
        given: object = self.options  # typed as a tuple, but a caller may pass anything
        if isinstance(given, str | bytes) or not isinstance(given, Sequence) or not given:
            raise DefinitionError(f"parameter {self.name!r}: options must be a non-empty list, got {self.options!r}")
        options = []
        for option in given:
            try:
                options.append(_convert(self.type, option))
            except _Mismatch as exc:
                raise DefinitionError(f"parameter {self.name!r}: option {option!r} is not {exc}") from None
        repeated = sorted({repr(o) for o in options if options.count(o) > 1})
        if repeated:
            raise DefinitionError(f"parameter {self.name!r}: options repeat {', '.join(repeated)}")
        if default not in options:
            raise DefinitionError(f"parameter {self.name!r}: default {default!r} is not among the options {options}")
        return tuple(options)

    @property
    def kind(self) -> ParamKind:
        """How a form or workflow input shows it: a ``choice`` of the options, else by type."""
        if self.options is not None:
            return "choice"
        if self.type is bool:
            return "boolean"
        if self.type in (int, float):
            return "number"
        return "string"

    @property
    def expected(self) -> str:
        """What a valid value looks like, in words (used in error messages and ``--help``)."""
        if self.options is not None:
            return "one of " + ", ".join(repr(o) for o in self.options)
        return _expected(self.type)

    @staticmethod
    def infer_type(name: str, default: object, options: Sequence[object] | None) -> ParamType:
        """The type implied by the default together with the options; raises :class:`DefinitionError`."""
        if not isinstance(default, PARAM_TYPES):
            kind = type(default).__name__
            raise DefinitionError(f"parameter {name!r}: default {default!r} ({kind}) is not an int, float, bool or str")
        try:
            return _common_type([default, *(options or ())])
        except _Mismatch as exc:
            raise DefinitionError(
                f"parameter {name!r}: cannot infer the type from the default and options: expected {exc}"
            ) from None


def parse_value(param: Param, value: object, experiment: str = "") -> ParamValue:
    """``value`` (typed, or the text the command line or a workflow gives) as ``param``'s canonical value.

    Choices are compared after conversion to the options' type, so ``"0.10"`` selects the option ``0.1``.
    Raises :class:`ParamError` naming ``experiment``, the parameter, the value and what was expected.
    """
    try:
        converted = _convert(param.type, value)
    except _Mismatch:
        raise ParamError(experiment, param.name, value, param.expected) from None
    if param.options is not None and converted not in param.options:
        raise ParamError(experiment, param.name, value, param.expected)
    return converted


class Params(Mapping[str, ParamValue]):
    """The resolved parameters of one run: ``params.lr``, ``params["lr"]``, ``dict(params)``; immutable.

    Iteration yields the names in declaration order. Assignment of either kind raises ``TypeError``; the
    object pickles (it travels to worker processes) and compares equal to a dict of the same values.
    """

    __slots__ = ("_experiment", "_values")
    _experiment: str
    _values: dict[str, ParamValue]

    def __init__(self, values: Mapping[str, ParamValue], experiment: str = "") -> None:
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_experiment", experiment)

    def _unknown(self, name: str) -> str:
        where = f"experiment {self._experiment!r} " if self._experiment else ""
        known = ", ".join(self._values) or "none"
        return f"{where}has no parameter {name!r} (known: {known})"

    def __getattr__(self, name: str) -> ParamValue:
        if name.startswith("_"):  # before __init__ ran (copy, unpickling): never look in _values
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(self._unknown(name)) from None

    def __getitem__(self, name: str) -> ParamValue:
        try:
            return self._values[name]
        except KeyError:
            raise KeyError(self._unknown(name)) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise TypeError(f"params are immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise TypeError(f"params are immutable: cannot delete {name!r}")

    def __setitem__(self, name: str, value: object) -> NoReturn:
        raise TypeError(f"params are immutable: cannot set {name!r}")

    def __delitem__(self, name: str) -> NoReturn:
        raise TypeError(f"params are immutable: cannot delete {name!r}")

    def __hash__(self) -> int:
        return hash(tuple(self._values.items()))

    def __reduce__(self) -> tuple[type[Params], tuple[dict[str, ParamValue], str]]:
        return Params, (dict(self._values), self._experiment)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *self._values})

    def __repr__(self) -> str:
        return "Params(" + ", ".join(f"{k}={v!r}" for k, v in self._values.items()) + ")"

    def as_dict(self) -> dict[str, ParamValue]:
        """A new (mutable) dict of the values, in declaration order: what the run record stores."""
        return dict(self._values)
