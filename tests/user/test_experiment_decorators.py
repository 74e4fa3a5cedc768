"""``@experiment`` / ``@param``: declared types, strict parsing, the params object, seeding and project loading.

Where a failure points:

* the type, option and boolean tests: ``_convert`` / ``parse_value`` in ``scaling/experiment/params.py``
  (what the command line and the generated workflows' string inputs go through);
* the declaration tests (reserved names, bad defaults, decorator order): ``Param.__post_init__`` and the
  decorators in ``decorators.py``; these errors must come at import time and name the file and line;
* the seed tests: ``seeding.apply_seed`` or ``Experiment.run`` not calling it before the function;
* the project tests: ``registry.load_project``, which imports the modules by path (never parses text), so
  aliases and computed defaults work, and which refuses a name defined twice, naming both places.

Nothing here starts processes; the experiments are defined inside the tests.
"""

from __future__ import annotations

import pickle
import random
import re
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from scaling.experiment import Experiment, ParamError, Params, RunContext, current_run, experiment, param
from scaling.experiment.params import RESERVED_NAMES, DefinitionError, Param, parse_value
from scaling.experiment.registry import (
    REGISTRY,
    DuplicateExperimentError,
    UnknownExperimentError,
    find_experiment,
    load_project,
)
from scaling.experiment.run_context import _set_current_run


def _define(*decorators: Callable[[Any], Any], name: str = "t", seed: int = 0) -> Experiment[Params]:
    """An experiment with ``decorators`` in reading order (top first) whose function returns its params."""

    def fn(params: Params) -> Params:
        return params

    for decorate in reversed(decorators):  # the bottom decorator applies first, as in source
        fn = decorate(fn)
    return experiment(name, seed=seed)(fn)


def _line_of(path: Path, text: str, occurrence: int = 0) -> int:
    lines = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if text in line]
    return lines[occurrence]


# Types ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("default", "expected_type", "kind"),
    [(3, int, "number"), (0.5, float, "number"), (True, bool, "boolean"), ("x", str, "string")],
)
def test_type_is_inferred_from_the_default(default: object, expected_type: type, kind: str) -> None:
    (declared,) = _define(param("p", default=default)).params  # type: ignore[arg-type]
    assert declared.type is expected_type
    assert declared.kind == kind
    assert declared.default == default and type(declared.default) is expected_type


def test_given_type_converts_the_default_and_values() -> None:
    train = _define(param("lr", default=1, type=float), param("steps", default="3", type=int))
    lr, steps = train.params
    assert (lr.type, lr.default, type(lr.default)) == (float, 1.0, float)
    assert (steps.type, steps.default) == (int, 3)
    params = train.parse({"lr": "2", "steps": "-4"})
    assert type(params.lr) is float and params.lr == 2.0
    assert params.steps == -4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"default": 1, "type": str}, "default 1 is not a string"),
        ({"default": "a", "type": float}, "is not a number"),
        ({"default": 1, "type": list}, "is not one of int, float, bool, str"),
        ({"default": None}, "default None (NoneType) is not an int, float, bool or str"),
        ({"default": [1]}, "is not an int, float, bool or str"),
        ({}, "needs a default"),
    ],
)
def test_bad_declarations_fail_at_decoration_naming_the_place(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=re.escape(message)) as failure:
        param("p", **kwargs)
    assert str(failure.value).startswith(f"{__file__}:") and "parameter 'p'" in str(failure.value)


@pytest.mark.parametrize(
    ("text", "value"), [("7", 7), ("-3", -3), ("+4", 4), ("0", 0), (12, 12)], ids=str
)  # fmt: skip
def test_int_accepts_integers(text: object, value: int) -> None:
    parsed = parse_value(Param("n", 1, int), text)
    assert parsed == value and type(parsed) is int


@pytest.mark.parametrize("text", ["1.5", "1e3", "abc", "", "0x10", " 7", True, 2.0, None], ids=repr)
def test_int_rejects_everything_else(text: object) -> None:
    with pytest.raises(ParamError, match="expected an integer"):
        parse_value(Param("n", 1, int), text)


@pytest.mark.parametrize(
    ("text", "value"),
    [("3", 3.0), ("1e-4", 1e-4), ("-0.5", -0.5), (".5", 0.5), ("2.", 2.0), ("1E+2", 100.0), (2, 2.0), (0.25, 0.25)],
    ids=str,
)
def test_float_accepts_ints_floats_and_exponents(text: object, value: float) -> None:
    parsed = parse_value(Param("lr", 0.1, float), text)
    assert parsed == value and type(parsed) is float


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "abc", "1e", "", "1_000", True, float("nan")], ids=repr)
def test_float_rejects_everything_else(text: object) -> None:
    with pytest.raises(ParamError, match="expected a number"):
        parse_value(Param("lr", 0.1, float), text)


def test_string_keeps_text_as_is_and_refuses_other_types() -> None:
    declared = Param("note", "", str)
    assert parse_value(declared, " two words ") == " two words "
    with pytest.raises(ParamError, match="expected a string"):
        parse_value(declared, 5)


# Options ----------------------------------------------------------------------------------------------------


def test_options_make_a_choice_of_their_type() -> None:
    train = _define(param("size", options=["70b", "13b", "7b"], default="7b"), name="alpaca")
    (size,) = train.params
    assert (size.kind, size.type, size.options, size.default) == ("choice", str, ("70b", "13b", "7b"), "7b")
    assert train.parse({"size": "13b"}).size == "13b"
    with pytest.raises(ParamError) as failure:
        train.parse({"size": "8b"})
    assert str(failure.value) == "experiment 'alpaca': parameter 'size' got '8b'; expected one of '70b', '13b', '7b'"


def test_numeric_options_are_compared_after_parsing() -> None:
    train = _define(param("lr", options=[0.1, 1, 10], default=1), param("layers", options=[2, 4]))
    lr, layers = train.params
    assert (lr.type, lr.options, lr.default) == (float, (0.1, 1.0, 10.0), 1.0)
    assert (layers.type, layers.default) == (int, 2)  # no default: the first option
    params = train.parse({"lr": "0.10", "layers": "4"})
    assert params.lr == 0.1 and params.layers == 4
    with pytest.raises(ParamError, match="expected one of 2, 4"):
        train.parse({"layers": "3"})
    with pytest.raises(ParamError, match="expected one of 2, 4"):
        train.parse({"layers": "4.0"})  # an int choice still takes integers only


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"options": ["a", "b"], "default": "c"}, "default 'c' is not among the options"),
        ({"options": ["a", "a"], "default": "a"}, "options repeat 'a'"),
        ({"options": ["a", 1], "default": "a"}, "cannot infer the type"),
        ({"options": [], "default": "a"}, "non-empty"),
        ({"options": "ab", "default": "a"}, "options must be a list"),
        ({"options": [1, "x"], "default": 1, "type": int}, "option 'x' is not an integer"),
    ],
)
def test_bad_options_fail_at_decoration(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        param("p", **kwargs)


# Validation errors ------------------------------------------------------------------------------------------


def test_a_bad_value_names_experiment_parameter_value_and_expected_before_the_function_runs() -> None:
    calls = []

    @experiment("alpaca", seed=7)
    @param("lr", default=1e-5)
    def train(params: Params) -> None:
        calls.append(params)

    with pytest.raises(ParamError) as failure:
        train.run({"lr": "fast"})
    error = failure.value
    assert (error.experiment, error.parameter, error.value) == ("alpaca", "lr", "fast")
    assert "number" in error.expected
    assert str(error) == "experiment 'alpaca': parameter 'lr' got 'fast'; expected a number (such as 3, 0.5 or 1e-4)"
    assert isinstance(error, ValueError)
    assert calls == []


# Booleans ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("TRUE", True), ("True", True), ("yes", True), ("YeS", True), ("1", True), (True, True),
     ("false", False), ("False", False), ("FALSE", False), ("no", False), ("No", False), ("0", False),
     (False, False)],
    ids=repr,
)  # fmt: skip
def test_booleans_accept_each_spelling(text: object, value: bool) -> None:
    train = _define(param("use_lora", default=not value))
    assert train.parse({"use_lora": text}).use_lora is value


@pytest.mark.parametrize("text", ["2", "y", "n", "on", "off", "t", "", " true", "truee", "-1", 1, 0, None], ids=repr)
def test_booleans_reject_everything_else(text: object) -> None:
    train = _define(param("use_lora", default=False), name="lora")
    with pytest.raises(ParamError) as failure:
        train.parse({"use_lora": text})
    assert failure.value.parameter == "use_lora" and failure.value.value == text
    assert f"got {text!r}; expected a boolean (true/false, 1/0 or yes/no" in str(failure.value)


# Falsy and negative defaults --------------------------------------------------------------------------------


def test_falsy_and_negative_defaults_are_valid_and_kept() -> None:
    train = _define(
        param("zero", default=0),
        param("off", default=False),
        param("empty", default=""),
        param("neg", default=-3),
        param("neg_float", default=-0.5),
        param("zero_float", default=0.0),
    )
    defaults = {p.name: (p.default, p.type, p.kind) for p in train.params}
    assert defaults == {
        "zero": (0, int, "number"),
        "off": (False, bool, "boolean"),
        "empty": ("", str, "string"),
        "neg": (-3, int, "number"),
        "neg_float": (-0.5, float, "number"),
        "zero_float": (0.0, float, "number"),
    }
    params = train.parse({})
    assert dict(params) == {"zero": 0, "off": False, "empty": "", "neg": -3, "neg_float": -0.5, "zero_float": 0.0}
    assert type(params.zero) is int and params.off is False  # 0 stays an int, False a bool
    assert train.parse({"neg": "-7", "empty": "x"}).as_dict()["neg"] == -7


# Reserved and invalid names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*sorted(RESERVED_NAMES), "Seed", "RUN_NAME"])
def test_reserved_names_fail_at_decoration(name: str) -> None:
    with pytest.raises(DefinitionError, match="reserved for the run's own fields") as failure:
        param(name, default=1)  # the @param(...) line itself fails, before any experiment exists
    assert repr(name) in str(failure.value)
    assert f"{__file__}:" in str(failure.value)


@pytest.mark.parametrize(
    ("name", "message"),
    [("a-b", "Python identifier"), ("class", "Python identifier"), ("_lr", "must not start with '_'"),
     ("keys", "hide the method params.keys()"), ("as_dict", "hide the method")],
)  # fmt: skip
def test_names_that_params_could_not_hold_fail(name: str, message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        param(name, default=1)


def test_a_parameter_declared_twice_fails() -> None:
    with pytest.raises(DefinitionError, match="parameter 'LR' is declared twice"):
        _define(param("LR", default=1.0), param("lr", default=1.0))


@pytest.mark.parametrize(
    ("name", "seed", "message"),
    [("a b", 0, "must match"), ("../x", 0, "must match"), ("", 0, "must match"), ("ok", -1, "seed must be"),
     ("ok", 2**32, "seed must be"), ("ok", True, "seed must be"), ("ok", "7", "seed must be")],
)  # fmt: skip
def test_bad_experiment_name_or_seed_fails(name: str, seed: Any, message: str) -> None:
    with pytest.raises(DefinitionError, match=message) as failure:
        experiment(name, seed=seed)
    assert f"{__file__}:" in str(failure.value)


def test_decorator_misuse_fails_with_the_fix() -> None:
    with pytest.raises(DefinitionError, match="with the name first"):

        @experiment  # type: ignore[arg-type]
        def bare(params: Params) -> None: ...

    with pytest.raises(DefinitionError, match="@param\\('lr'\\) is above @experiment\\('order'\\)"):

        @param("lr", default=1.0)
        @experiment("order")
        def above(params: Params) -> None: ...

    with pytest.raises(DefinitionError, match="must take the params as its one positional argument"):

        @experiment("no_args")  # type: ignore[arg-type]
        def no_args() -> None: ...


# Seeding ----------------------------------------------------------------------------------------------------


def _draws(params: Params) -> dict[str, Any]:
    return {
        "random": random.random(),
        "numpy": np.random.rand(3),
        "torch": torch.randn(4),
        "linear": torch.nn.Linear(4, 3).weight.detach().clone(),
    }


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["random"] == b["random"]
    np.testing.assert_array_equal(a["numpy"], b["numpy"])
    torch.testing.assert_close(a["torch"], b["torch"], rtol=0, atol=0)
    torch.testing.assert_close(a["linear"], b["linear"], rtol=0, atol=0)


def test_the_seed_is_applied_before_the_function() -> None:
    seeded = experiment("seeded", seed=123)(_draws)
    first = seeded.run()
    random.random(), np.random.rand(), torch.randn(7)  # move every generator on
    second = seeded.run()
    _assert_same(first, second)  # same seed -> same draws and the same initial weights

    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    _assert_same(first, _draws(seeded.parse()))  # it is the experiment's seed, applied to each library

    other = experiment("other_seed", seed=124)(_draws).run()
    overridden = seeded.run(seed=124)
    _assert_same(other, overridden)
    assert other["random"] != first["random"]
    assert not torch.equal(other["linear"], first["linear"])
    assert not np.array_equal(other["numpy"], first["numpy"])


# The experiment object and the params object ----------------------------------------------------------------


def test_experiment_keeps_its_function_name_seed_source_and_returns_the_result() -> None:
    @experiment("alpaca_full", seed=7)
    @param("size", options=["70b", "13b", "7b"], default="7b")
    @param("lr", default=1e-5, description="peak learning rate")
    @param("use_lora", default=False)
    def train(params: Params) -> tuple[object, ...]:
        """Doc kept."""
        return params.size, params["lr"], params.use_lora

    assert isinstance(train, Experiment)
    assert (train.name, train.seed) == ("alpaca_full", 7)
    assert train.source == (__file__, _line_of(Path(__file__), '@experiment("alpaca_full", seed=7)'))
    assert [p.name for p in train.params] == ["size", "lr", "use_lora"]  # top decorator first
    assert train.params[1].description == "peak learning rate"
    assert train.run({"lr": "1e-4", "use_lora": "yes"}) == ("7b", 1e-4, True)
    assert train.run() == ("7b", 1e-5, False)
    assert train(Params({"size": "13b", "lr": 0.5, "use_lora": False})) == ("13b", 0.5, False)  # still callable
    assert train.fn(train.parse({"size": "70b"})) == ("70b", 1e-5, False)
    assert train.__doc__ == "Doc kept." and train.__name__ == "train"
    assert REGISTRY["alpaca_full"] is train


def test_an_unknown_parameter_names_it_and_lists_the_known_ones() -> None:
    train = _define(param("lr", default=0.1), param("steps", default=10), name="alpaca")
    with pytest.raises(ParamError) as failure:
        train.run({"lr": "0.2", "stpes": "3"})
    assert str(failure.value) == "experiment 'alpaca': unknown parameter 'stpes' (known: lr, steps)"
    assert failure.value.parameter == "stpes"


def test_params_read_both_ways_and_are_immutable() -> None:
    params = _define(param("size", default="7b"), param("lr", default=0.1), name="alpaca").parse({"lr": "0.5"})
    assert params.lr == params["lr"] == 0.5 and params.size == "7b"
    assert list(params) == ["size", "lr"] and len(params) == 2 and "lr" in params
    assert dict(params) == params.as_dict() == {"size": "7b", "lr": 0.5} == params
    assert repr(params) == "Params(size='7b', lr=0.5)"
    copy = params.as_dict()
    copy["lr"] = 9.0
    assert params.lr == 0.5  # as_dict is a copy

    with pytest.raises(TypeError, match="params are immutable: cannot set 'lr'"):
        params.lr = 1.0
    with pytest.raises(TypeError, match="params are immutable: cannot set 'lr'"):
        params["lr"] = 1.0
    with pytest.raises(TypeError, match="params are immutable: cannot set 'new'"):
        params.new = 1
    with pytest.raises(TypeError, match="params are immutable: cannot delete 'lr'"):
        del params.lr
    with pytest.raises(TypeError, match="params are immutable: cannot delete 'lr'"):
        del params["lr"]
    assert params.lr == 0.5

    with pytest.raises(AttributeError, match=r"experiment 'alpaca' has no parameter 'lrr' \(known: size, lr\)"):
        _ = params.lrr
    with pytest.raises(KeyError, match="has no parameter 'lrr'"):
        _ = params["lrr"]
    assert pickle.loads(pickle.dumps(params)) == params and hash(params) == hash(Params(dict(params)))


# Run context ------------------------------------------------------------------------------------------------


def test_current_run_is_none_outside_a_run_and_set_by_the_worker(tmp_path: Path) -> None:
    assert current_run() is None
    context = RunContext(
        name="alpaca-1",
        run_dir=tmp_path,
        checkpoint_dir=tmp_path / "checkpoints",
        last_checkpoint=None,
        params=Params({"lr": 0.1}),
        seed=7,
    )
    assert _set_current_run(context) is None
    try:

        def peek(params: Params) -> RunContext | None:
            return current_run()

        seen = experiment("sees_run")(peek).run()
        assert seen is context
        with pytest.raises(AttributeError):
            context.seed = 8  # type: ignore[misc]
    finally:
        assert _set_current_run(None) is context
    assert current_run() is None


# Projects ---------------------------------------------------------------------------------------------------

ALIASED = """
    import math

    import scaling.experiment as ex
    from scaling.experiment import param as p
    from _exp_test_settings import BATCH  # a module beside this one

    BASE_LR = 3e-4
    SIZES = ["7b", "13b", "70b"]


    def _warmup(steps):
        return steps // 10


    @ex.experiment("aliased", seed=BATCH * 2)
    @p("lr", default=BASE_LR / 10, description=f"peak, {BASE_LR} / 10")
    @p("size", options=SIZES, default=SIZES[1])
    @ex.param("warmup", default=_warmup(200))
    @p("steps", default=int(math.sqrt(10_000)))
    @p("batch", default=BATCH)
    def train(params):
        return dict(params)


    @ex.experiment("second")
    def second(params):
        return "second ran"
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A project without scaling.yml (so the default src/experiments.py) holding ALIASED."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_project adds the module's folder
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "experiments.py").write_text(textwrap.dedent(ALIASED))
    (tmp_path / "src" / "_exp_test_settings.py").write_text("BATCH = 8\n")
    yield tmp_path
    sys.modules.pop("_exp_test_settings", None)


def test_load_project_imports_aliases_constants_and_computed_defaults(project: Path) -> None:
    experiments = load_project(project)
    assert list(experiments) == ["aliased", "second"]
    train = experiments["aliased"]
    module = project / "src" / "experiments.py"
    assert train.source == (str(module), _line_of(module, '@ex.experiment("aliased"'))
    assert train.seed == 16
    defaults = {p.name: p.default for p in train.params}
    assert defaults == {"lr": 3e-4 / 10, "size": "13b", "warmup": 20, "steps": 100, "batch": 8}
    assert train.params[0].description == "peak, 0.0003 / 10"
    assert train.params[1].options == ("7b", "13b", "70b")
    assert train.run({"size": "70b", "steps": "5"}) == {**defaults, "size": "70b", "steps": 5}
    assert find_experiment(project, "second").run() == "second ran"


def test_load_project_sees_an_edited_module_and_loads_twice_without_duplicates(project: Path) -> None:
    assert load_project(project)["aliased"].params[-1].default == 8
    module = project / "src" / "experiments.py"
    module.write_text(module.read_text().replace('@p("batch", default=BATCH)', '@p("batch", default=BATCH + 1)'))
    assert load_project(project)["aliased"].params[-1].default == 9


def test_find_experiment_lists_the_known_ones(project: Path) -> None:
    with pytest.raises(UnknownExperimentError) as failure:
        find_experiment(project, "alpaca")
    assert str(failure.value) == f"no experiment 'alpaca' in the project at {project} (known: aliased, second)"


def test_a_missing_module_names_its_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"experiment module {tmp_path / 'src' / 'experiments.py'} "):
        load_project(tmp_path)


TWICE = """
    from scaling.experiment import experiment


    @experiment("alpaca")
    def first(params):
        pass
"""


def test_a_name_defined_twice_in_one_module_names_both_lines(tmp_path: Path) -> None:
    module = tmp_path / "src" / "experiments.py"
    module.parent.mkdir()
    module.write_text(textwrap.dedent(TWICE + TWICE.split("\n", 2)[2].replace("first", "again")))
    first, again = _line_of(module, "@experiment"), _line_of(module, "@experiment", 1)
    with pytest.raises(DuplicateExperimentError) as failure:
        load_project(tmp_path)
    assert f"{module}:{first}" in str(failure.value) and f"{module}:{again}" in str(failure.value)
    assert "'alpaca' is defined twice" in str(failure.value)


def test_a_name_defined_in_two_modules_of_scaling_yml_names_both(tmp_path: Path) -> None:
    (tmp_path / "scaling.yml").write_text("name: demo\nexperiments: [src/a.py, src/b.py]\n")
    (tmp_path / "src").mkdir()
    for name in ("a", "b"):
        (tmp_path / "src" / f"{name}.py").write_text(textwrap.dedent(TWICE))
    a, b = tmp_path / "src" / "a.py", tmp_path / "src" / "b.py"
    line = _line_of(a, "@experiment")
    with pytest.raises(DuplicateExperimentError, match="'alpaca' is defined twice") as failure:
        load_project(tmp_path)
    assert f"at {a}:{line} and at {b}:{line}" in str(failure.value)
    assert list(load_project(tmp_path, modules=["src/a.py"])) == ["alpaca"]  # each alone is fine
