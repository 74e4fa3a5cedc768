"""Imports only go down (DESIGN.md, Layers): the engine never reaches into the LLM suite or the user layer.

The test reads every module under ``src/scaling`` and collects what it imports, at the top and inside
functions (the CLI and several entry points import lazily), including ``importlib.import_module`` calls
with a literal name. A failure names the importing file, its line and the forbidden module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
USER_LAYER = ("scaling.llama", "scaling.mistral", "scaling.loaders", "scaling.training", "scaling.experiment",
              "scaling.cluster", "scaling.cli")  # fmt: skip
FORBIDDEN = {
    "scaling.core": ("scaling.transformer", *USER_LAYER, "examples"),
    "scaling.transformer": (*USER_LAYER, "examples"),
    "scaling": ("examples",),
}


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, src: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    name = _module_name(path, src)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def _violations(layer: str, src: Path = SRC) -> list[str]:
    banned = FORBIDDEN[layer]
    problems = []
    for path in sorted(src.rglob("*.py")):
        name = _module_name(path, src)
        owner = max((key for key in FORBIDDEN if name == key or name.startswith(key + ".")), key=len, default=None)
        if owner != layer:
            continue
        for line, imported in _imports(path, src):
            hit = next((b for b in banned if imported == b or imported.startswith(b + ".")), None)
            if hit is not None:
                problems.append(f"{path.relative_to(src)}:{line} imports {imported} ({layer} must not import {hit})")
    return problems


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_only_go_down(layer: str) -> None:
    problems = _violations(layer)
    assert not problems, "\n".join(problems)


def test_the_import_walk_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The checker itself: a forbidden import inside a function, relative or by import_module, is found."""
    core = tmp_path / "scaling" / "core"
    core.mkdir(parents=True)
    (core / "__init__.py").write_text("", encoding="utf-8")
    (core / "_layering_probe.py").write_text(
        "def f():\n    from ..transformer import config\n    import importlib\n"
        "    importlib.import_module('scaling.cli.main')\n",
        encoding="utf-8",
    )
    problems = _violations("scaling.core", src=tmp_path)
    assert any("_layering_probe.py:2 imports scaling.transformer" in p for p in problems), problems
    assert any("_layering_probe.py:4 imports scaling.cli.main" in p for p in problems), problems


def test_packages_export_their_public_api() -> None:
    import scaling.core
    import scaling.transformer

    for package in (scaling.core, scaling.transformer):
        for name in package.__all__:
            value = getattr(package, name)
            assert value is not None, f"{package.__name__}.{name}"
        with pytest.raises(AttributeError, match="no attribute 'NotAPublicName'"):
            package.NotAPublicName  # noqa: B018
    from scaling.core.trainer.trainer import Trainer
    from scaling.transformer.inference.loading import load_model

    assert scaling.core.Trainer is Trainer
    assert scaling.transformer.load_model is load_model
