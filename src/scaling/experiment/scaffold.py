"""``scaling init PROJECT [--name NAME]``: a new project that runs at once, offline, on this machine.

It writes, from the templates shipped in ``scaling/experiment/templates/``::

    scaling.yml          the project (ProjectConfig): experiment files, hosts, SSH user and port, ...
    src/experiments.py   a working experiment ("tiny"): LlamaTiny, ZeRO 3, a few plain-loop steps that
                         save into the run and resume from it
    data/sample.json     50 Alpaca-style records the experiment trains on (no download)
    requirements.txt     scaling and torch pinned to the versions installed here
    Dockerfile           the same environment on a pinned base image
    .gitignore           runs/, .scaling/ (the deploy key), Python caches
    README.md            how to run it

A target that exists and is not empty is refused before anything is written, so ``init`` never mixes its
files into someone's work. Every file is rendered in memory first; the written ``scaling.yml`` is then
loaded back, so a scaffold that would not validate is never handed over.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

from scaling import __version__
from scaling.experiment.project import ProjectError, load_project_config

__all__ = ["BASE_IMAGE", "FILES", "ScaffoldError", "init_project", "main", "pinned_versions", "render"]

# A fixed patch release of a fixed Debian: rebuilding the image later gives the same Python.
BASE_IMAGE = "python:3.11.9-slim-bookworm"
# template (in scaling/experiment/templates) -> file of the project
FILES: tuple[tuple[str, str], ...] = (
    ("scaling.yml.tmpl", "scaling.yml"),
    ("experiments.py.tmpl", "src/experiments.py"),
    ("sample.json", "data/sample.json"),
    ("requirements.txt.tmpl", "requirements.txt"),
    ("Dockerfile.tmpl", "Dockerfile"),
    ("gitignore.tmpl", ".gitignore"),
    ("README.md.tmpl", "README.md"),
)
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ScaffoldError(ValueError):
    """The project cannot be created there (the message says why)."""


def render(text: str, values: Mapping[str, str]) -> str:
    """``text`` with each ``{{ key }}`` replaced by ``values[key]``; an unknown key is an error, not a blank."""

    def value(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"template placeholder {{{{{key}}}}} has no value")
        return values[key]

    return _PLACEHOLDER.sub(value, text)


def pinned_versions() -> dict[str, str]:
    """The versions ``requirements.txt`` pins: this ``scaling`` and this ``torch``.

    A local build label (``2.13.0+cpu``) is dropped from the pin: the package indexes publish the public
    version, and each node's pip picks the build for its own hardware.
    """
    try:
        scaling_version = importlib.metadata.version("scaling")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        scaling_version = __version__
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        raise ScaffoldError("torch is not installed here, so there is no version to pin") from None
    return {"scaling_version": scaling_version, "torch_version": torch_version.split("+", 1)[0]}


def project_name(target: Path) -> str:
    """The folder's name made into a project name (other characters become '-')."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", target.resolve().name).strip("-._")
    return name or "project"


def _rendered(values: Mapping[str, str]) -> dict[str, str]:
    templates = resources.files("scaling.experiment").joinpath("templates")
    return {dest: render(templates.joinpath(source).read_text(encoding="utf-8"), values) for source, dest in FILES}


def init_project(target: Path | str, name: str | None = None) -> list[Path]:
    """Create the project in ``target`` (absent or an empty folder); returns the files written."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ScaffoldError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()):
        raise ScaffoldError(f"{target} is not empty: `scaling init` creates a project only in a new or empty folder")
    name = project_name(target) if name is None else name
    if not _NAME.fullmatch(name):
        raise ScaffoldError(f"--name {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit")
    files = _rendered({"name": name, "base_image": BASE_IMAGE, **pinned_versions()})
    written = []
    for relative, text in files.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    try:
        load_project_config(target)
    except ProjectError as exc:  # a broken template: a bug of scaling, not of the user
        raise RuntimeError(f"the scaffolded scaling.yml does not validate: {exc}") from exc
    return written


def main(argv: Sequence[str] | None = None, prog: str = "scaling init") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Create a project that runs offline at once: scaling.yml, src/experiments.py (a tiny "
        "experiment on LlamaTiny and bundled data), pinned requirements.txt, Dockerfile, .gitignore, README.md.",
    )
    parser.add_argument("project", metavar="PROJECT", help="Folder to create (must be absent or empty).")
    parser.add_argument("--name", help="Project name (default: the folder's name).")
    args = parser.parse_args(argv)
    try:
        written = init_project(args.project, args.name)
    except (ScaffoldError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    root = Path(args.project)
    print(f"created {root}: " + ", ".join(str(p.relative_to(root)) for p in written))
    print(f"next: cd {root} && scaling experiments list && scaling run tiny --nproc 2")
    return 0
