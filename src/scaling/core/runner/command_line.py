"""``python -m scaling.core.runner CONFIG [-o key.path=value ...] [--max-restarts N] [--dry-run]`` (also
``scaling launch``).

The config file is any run config with a ``runner:`` section and a ``topology:`` section (for the world
size); other sections belong to the launched script and are ignored here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from scaling.core.config import BaseConfig, ConfigError, apply_overrides
from scaling.core.logging.config import LoggerConfig
from scaling.core.runner.config import RunnerConfig
from scaling.core.runner.launch import launch
from scaling.core.runner.restarts import add_restarts_argument, restart_overrides
from scaling.core.topology.config import TopologyConfig

__all__ = ["load_launch_configs", "main"]

ConfigT = TypeVar("ConfigT", bound=BaseConfig)


def load_launch_configs(path: Path, overrides: Sequence[str] = ()) -> tuple[RunnerConfig, TopologyConfig, LoggerConfig]:
    """The ``runner``, ``topology`` and ``logger`` sections of the file at ``path``, after the dotted ``overrides``.

    The logger section is read for ``logger.log_dir``, the run's one log directory (per-rank logs, sbatch script).

    Overrides apply to the whole document, so ``-o runner.master_port=6000`` and ``-o topology.world_size=8``
    both work; errors name the field from the top of the file (``runner.master_port``).
    """
    try:
        document: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"config file {path}: expected a mapping with 'runner' and 'topology' sections")
    document = apply_overrides(document, overrides)
    runner = _section(RunnerConfig, document, "runner", path)
    topology = _section(TopologyConfig, document, "topology", path)
    logger = _section(LoggerConfig, document, "logger", path)
    return runner, topology, logger


def _section(cls: type[ConfigT], document: dict[str, Any], name: str, path: Path) -> ConfigT:
    data = document.get(name)
    if data is None:
        data = {}  # a missing (or empty) section means all defaults
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config in {path}:\n  {name}: expected a mapping, got {type(data).__name__}")
    try:
        return cls.from_dict(data, source=str(path))
    except ConfigError as exc:
        # Name fields from the top of the file: 'runner.master_port', not 'master_port'.
        message = str(exc).replace("\n  ", f"\n  {name}.")
        problems = [f"{name}.{problem}" for problem in exc.problems]
        raise ConfigError(message, source=str(path), problems=problems) from None


def main(argv: Sequence[str] | None = None, prog: str = "python -m scaling.core.runner") -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), load the config and launch; returns the exit code.

    A bad config or override prints one message naming the field to stderr and returns 2.
    """
    parser = argparse.ArgumentParser(prog=prog, description="Start the processes of a run's topology.")
    parser.add_argument("config", type=Path, help="YAML config with 'runner' and 'topology' sections.")
    parser.add_argument(
        "-o", "--override", action="append", default=[], metavar="KEY.PATH=VALUE", help="Override a config field."
    )
    parser.add_argument("--dry-run", action="store_true", help="Print the commands instead of running them.")
    add_restarts_argument(parser)
    args = parser.parse_args(argv)
    try:
        runner, topology, logger = load_launch_configs(args.config, [*args.override, *restart_overrides(args)])
        return launch(runner, topology.n_ranks, dry_run=args.dry_run, log_dir=logger.log_dir)
    except ConfigError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
