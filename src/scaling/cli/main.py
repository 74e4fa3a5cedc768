"""``scaling``: one command with sub-commands; each parses its arguments and hands off to the library.

Sub-commands are thin: anything they do is importable and testable without the command line. Heavy
imports happen inside the handlers so ``scaling --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from scaling import __version__

__all__ = ["build_parser", "main"]

# What `scaling train` runs: `scaling config template > run.yml`, edit data.prefixes, `scaling train run.yml`.
DEFAULT_TEMPLATE_CLASS = "scaling.transformer.config:TransformerConfig"

# Sub-commands that parse their own arguments (and their own --help): name -> (summary, module with main).
DELEGATED = {
    "launch": (
        "Start the processes of a config's topology (locally, over pdsh/ssh, or with Slurm).",
        "scaling.core.runner.command_line",
    ),
    "train": (
        "Train a transformer on the topology in a config (launches the processes itself).",
        "scaling.transformer.train",
    ),
    "prepare-data": ("Tokenise text or JSONL files into a memory-mapped dataset.", "scaling.transformer.data.prepare"),
    "train-tokenizer": (
        "Train a byte-level BPE tokenizer on text files (writes a tokenizer.json).",
        "scaling.transformer.data.train_tokenizer",
    ),
    "generate": (
        "Continue prompts with a trained checkpoint (KV-cache generation).",
        "scaling.transformer.inference.cli",
    ),
    "build-experiments": (
        "Write GitHub workflows (deploy, one per experiment, cancel) into .github/workflows.",
        "scaling.experiment.workflows",
    ),
    "init": (
        "Create a project that runs at once: scaling.yml, a tiny experiment, pinned env.",
        "scaling.experiment.scaffold",
    ),
    "experiments": (
        "List the project's experiments: parameters, defaults, where defined.",
        "scaling.experiment.list_command",
    ),
    "run": ("Run an experiment on this machine as a recorded run (torchrun).", "scaling.experiment.run_command"),
    "show-deploy-key": ("Print the project's SSH deploy key, creating it once.", "scaling.experiment.deploy_key"),
    "nodes": (
        "Set up, check or run a command on the project's hosts over SSH (setup, check, exec).",
        "scaling.cluster.nodes.command",
    ),
    "queue": (
        "Queue experiments on Slurm and follow them (submit, list, status, logs, cancel).",
        "scaling.cluster.queue.command",
    ),
    "plan": (
        "Predict memory, communication, step time and MFU of every layout before launching.",
        "scaling.transformer.planning.command",
    ),
    "report": ("Plot runs and compare them in one self-contained HTML page.", "scaling.experiment.report.command"),
}


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

    for name, (summary, _) in DELEGATED.items():
        delegated = commands.add_parser(
            name, help=summary, description=f"Run `scaling {name} --help` for the options.", add_help=False
        )
        delegated.set_defaults(handler=_delegate, delegate=True)
    _add_convert_parser(commands)
    return parser


def _add_convert_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    convert = commands.add_parser(
        "convert",
        help="Convert between Hugging Face (Llama family) folders and scaling checkpoints.",
        description="Convert between Hugging Face (Llama family) folders and scaling checkpoints.",
    )
    convert_commands = convert.add_subparsers(dest="convert_command", metavar="SUBCOMMAND", required=True)
    dtypes = ["float32", "bfloat16", "float16"]
    from_hf = convert_commands.add_parser(
        "from-hf",
        help="Hugging Face Llama/Mistral folder -> scaling checkpoint.",
        description="Convert a Hugging Face Llama or Mistral folder (config.json + safetensors) into a scaling "
        "checkpoint at OUT_DIR (global_step0, with the tokenizer), plus finetune.yml, a training config to edit.",
    )
    from_hf.add_argument("hf_dir", metavar="HF_DIR", help="Folder with config.json and model*.safetensors.")
    from_hf.add_argument("out_dir", metavar="OUT_DIR", help="Save directory to create (must be absent or empty).")
    from_hf.add_argument("--dtype", choices=dtypes, help="Weight dtype (default: as stored).")
    from_hf.set_defaults(handler=_convert_from_hf)
    to_hf = convert_commands.add_parser(
        "to-hf",
        help="scaling checkpoint -> Hugging Face LlamaForCausalLM folder.",
        description="Export a scaling checkpoint (any training layout; LoRA adapters merged) as a Hugging Face "
        "LlamaForCausalLM folder, and optionally upload it to the Hub.",
    )
    to_hf.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR", help="A global_step dir or a save dir (latest).")
    to_hf.add_argument("out_dir", metavar="OUT_DIR", help="Folder to create (must be absent or empty).")
    to_hf.add_argument("--adapters", metavar="DIR", help="Adapter checkpoint (LoRA) to merge into the weights.")
    to_hf.add_argument("--dtype", choices=dtypes, help="Weight dtype (default: as stored).")
    to_hf.add_argument(
        "--push-to-hub", metavar="REPO_ID", help="Also upload to this (private) Hub repo; token from HF_TOKEN."
    )
    to_hf.set_defaults(handler=_convert_to_hf)


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


def _delegate(args: argparse.Namespace) -> int:
    """Hand the rest of the command line to the sub-command's own ``main`` (imported only now)."""
    module_name = DELEGATED[args.command][1]
    run: Callable[..., int] = importlib.import_module(module_name).main
    return int(run(list(args.rest), prog=f"scaling {args.command}"))


def _convert_errors() -> tuple[type[Exception], ...]:
    from scaling.core.checkpoint import CheckpointError

    return (ValueError, CheckpointError, OSError)  # ConversionError and ConfigError are ValueErrors


def _convert_from_hf(args: argparse.Namespace) -> int:
    from scaling.transformer.convert import from_huggingface

    try:
        path = from_huggingface(args.hf_dir, args.out_dir, dtype=args.dtype)
    except _convert_errors() as exc:
        print(f"scaling convert from-hf: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _convert_to_hf(args: argparse.Namespace) -> int:
    from scaling.transformer.convert import push_to_hub, save_huggingface

    try:
        path = save_huggingface(args.checkpoint_dir, args.out_dir, adapters=args.adapters, dtype=args.dtype)
        print(f"wrote {path}")
        if args.push_to_hub:
            print(f"uploaded: {push_to_hub(path, args.push_to_hub)}")
    except _convert_errors() as exc:
        print(f"scaling convert to-hf: {exc}", file=sys.stderr)
        return 2
    return 0


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
