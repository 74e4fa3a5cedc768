"""``scaling``: one command with sub-commands; each parses its arguments and hands off to the library.

Sub-commands are thin: anything they do is importable and testable without the command line. Heavy
imports happen inside the handlers so ``scaling --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from scaling import __version__

__all__ = ["build_parser", "main"]

DEFAULT_TEMPLATE_CLASS = "scaling.core.engine_config:EngineConfig"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scaling",
        description="Train large models on data x pipeline x tensor parallel layouts.",
    )
    parser.add_argument("--version", action="version", version=f"scaling {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config = commands.add_parser("config", help="Work with config files.", description="Work with config files.")
    config_commands = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    template = config_commands.add_parser(
        "template",
        help="Print a complete, commented YAML config with every default.",
        description="Print a complete YAML config: every field, its default, and its description as a comment.",
    )
    template.add_argument(
        "--class",
        dest="config_class",
        default=DEFAULT_TEMPLATE_CLASS,
        metavar="MODULE:CLASS",
        help=f"Config class to describe (default: {DEFAULT_TEMPLATE_CLASS}).",
    )
    template.set_defaults(handler=_config_template)

    launch = commands.add_parser(
        "launch",
        help="Start the processes of a config's topology (locally, over pdsh/ssh, or with Slurm).",
        description="Start `runner.script` on the topology of CONFIG. See `python -m scaling.core.runner --help`.",
        add_help=False,
    )
    launch.set_defaults(handler=_launch, delegate=True)

    train = commands.add_parser(
        "train",
        help="Train a transformer on the topology in a config (launches the processes itself).",
        description="Run `scaling train --help` for the options.",
        add_help=False,
    )
    train.set_defaults(handler=_train, delegate=True)

    prepare = commands.add_parser(
        "prepare-data",
        help="Tokenise text or JSONL files into a memory-mapped dataset.",
        description="Run `scaling prepare-data --help` for the options.",
        add_help=False,
    )
    prepare.set_defaults(handler=_prepare_data, delegate=True)

    generate = commands.add_parser(
        "generate",
        help="Continue prompts with a trained checkpoint (KV-cache generation).",
        description="Run `scaling generate --help` for the options.",
        add_help=False,
    )
    generate.set_defaults(handler=_generate, delegate=True)
    return parser


def _config_template(args: argparse.Namespace) -> int:
    from scaling.core.config import BaseConfig

    module_name, _, class_name = args.config_class.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        print(f"scaling config template: cannot import --class {args.config_class!r}: {exc}", file=sys.stderr)
        return 2
    if not (isinstance(cls, type) and issubclass(cls, BaseConfig)):
        print(f"scaling config template: {args.config_class!r} is not a scaling config class", file=sys.stderr)
        return 2
    sys.stdout.write(cls.template())
    return 0


def _launch(args: argparse.Namespace) -> int:
    from scaling.core.runner.command_line import main as runner_main

    return runner_main(list(args.rest), prog="scaling launch")


def _train(args: argparse.Namespace) -> int:
    from scaling.transformer.train import main as train_main

    return train_main(list(args.rest))


def _prepare_data(args: argparse.Namespace) -> int:
    from scaling.transformer.data.prepare import main as prepare_main

    return prepare_main(list(args.rest))


def _generate(args: argparse.Namespace) -> int:
    from scaling.transformer.inference.cli import main as generate_main

    return generate_main(list(args.rest))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Delegating sub-commands parse their own arguments (and their own --help).
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "delegate", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
