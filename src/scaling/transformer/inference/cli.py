"""``scaling generate CHECKPOINT_DIR --prompt TEXT ...``: print the model's continuation of each prompt.

Each prompt is printed followed by its continuation. With one prompt (and no stop strings) the text
streams to stdout as it is generated; with several, each is printed when the batch is done, under a
header naming its prompt.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from scaling.core.checkpoint import CheckpointError, find_checkpoint
from scaling.core.config import ConfigError
from scaling.core.runner import RunnerConfig, launch
from scaling.core.topology import shutdown_distributed
from scaling.transformer.data.tokenizer import Tokenizer, TokenizerError

if TYPE_CHECKING:
    from scaling.transformer.inference.generation import GenerationConfig

__all__ = ["main"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Continue prompts with a trained checkpoint.")
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="A save dir (uses 'latest') or a global_step dir.")
    parser.add_argument("--prompt", action="append", required=True, help="Text to continue (repeat for a batch).")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="Tokens to generate at most (default 64).")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher = more random.")
    parser.add_argument("--top-k", type=int, default=0, help="Sample among the k most likely tokens (0 = all).")
    parser.add_argument("--top-p", type=float, default=1.0, help="Sample among tokens holding this probability mass.")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating tokens.")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="Stop at this text (repeatable).")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed (default 0).")
    parser.add_argument("--adapters", metavar="DIR", help="Adapter checkpoint (LoRA etc.) to load on top.")
    parser.add_argument("--tokenizer", metavar="TOKENIZER_JSON", help="Tokenizer when the checkpoint has none.")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="Where to run.")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="Weights dtype (default float32).")
    parser.add_argument("--no-cache", action="store_true", help="Recompute every step (slow; for comparison).")
    parser.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="Split the model over N local processes (tensor-parallel ranks; one GPU each with --device cuda).",
    )
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "scaling generate") -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(arguments)
    if args.tensor_parallel < 1:
        print(f"{prog}: --tensor-parallel must be at least 1, got {args.tensor_parallel}", file=sys.stderr)
        return 2
    if args.tensor_parallel > 1 and "RANK" not in os.environ:  # started by hand: start the ranks, each runs this
        try:  # before any rank starts: a missing checkpoint is one line here, not one per rank
            find_checkpoint(args.checkpoint)
        except CheckpointError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 2
        runner = RunnerConfig(script="scaling.transformer.inference.cli", module=True, script_args=arguments)
        return launch(runner, args.tensor_parallel)
    joined_a_world = torch.distributed.is_initialized()  # a caller's world is left as it was
    try:
        return _run(args, prog)
    finally:
        if not joined_a_world:
            shutdown_distributed()  # the world of one this command made


def _run(args: argparse.Namespace, prog: str) -> int:
    from scaling.transformer.inference.decoder import InferenceModel
    from scaling.transformer.inference.generation import generate
    from scaling.transformer.inference.loading import inference_topology, load_model

    try:
        config = _generation_config(args)
        topology = inference_topology(args.tensor_parallel, device=args.device)
        loaded = load_model(args.checkpoint, adapters=args.adapters, topology=topology, dtype=_DTYPES[args.dtype])
        if args.tokenizer is not None:
            loaded.tokenizer = Tokenizer.from_file(args.tokenizer)
        tokenizer = loaded.tokenizer
        if tokenizer is None:
            raise TokenizerError(f"{loaded.checkpoint} holds no tokenizer.json: pass --tokenizer TOKENIZER_JSON")
        if tokenizer.eos_id is not None:
            config = config.model_copy(update={"stop_tokens": [tokenizer.eos_id]})
        model = InferenceModel(loaded)
        prompts = tokenizer.encode_batch(args.prompt)
        for text, ids in zip(args.prompt, prompts, strict=True):
            if not ids:
                raise ValueError(f"prompt {text!r} encodes to no tokens")
        # Streaming would show a stop string before it is known to be one: stream only without them.
        # Every tensor-parallel rank draws the same tokens; the first one prints them.
        printing = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        stream = printing and len(prompts) == 1 and not args.stop
        streamer = _Streamer(tokenizer, args.prompt[0]) if stream else None
        completions = generate(model, prompts, config, on_token=streamer)
    except (CheckpointError, ConfigError, TokenizerError, ValueError, FileNotFoundError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if not printing:
        return 0
    if streamer is not None:
        streamer.finish(completions[0].text or "")
        return 0
    for text, completion in zip(args.prompt, completions, strict=True):
        print(f"=== {text!r} ({len(completion.tokens)} tokens, {completion.finish_reason})")
        print(text + (completion.text or ""))
    return 0


def _generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The sampling options as a validated config; a bad value is reported under its option name."""
    from scaling.transformer.inference.generation import GenerationConfig

    options = {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "repetition_penalty": args.repetition_penalty, "stop_strings": args.stop,
        "seed": args.seed, "use_cache": not args.no_cache,
    }  # fmt: skip
    try:
        return GenerationConfig.from_dict(options)
    except ConfigError as exc:
        problems = str(exc).splitlines()[1:]  # the first line names the config class, not the command line
        for name in options:
            problems = [line.replace(f"  {name}:", f"  --{name.replace('_', '-')}:") for line in problems]
        raise ConfigError("invalid option:\n" + "\n".join(problems)) from None


class _Streamer:
    """Prints the prompt's continuation as tokens arrive (text re-decoded so multi-byte tokens print whole)."""

    def __init__(self, tokenizer: Tokenizer, prompt: str) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.printed = ""
        sys.stdout.write(prompt)
        sys.stdout.flush()

    def __call__(self, row: int, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.printed) :])
            sys.stdout.flush()
            self.printed = text

    def finish(self, final: str) -> None:
        """The final text may be shorter (a stop string is cut): print what is missing, then a newline."""
        if final.startswith(self.printed):
            sys.stdout.write(final[len(self.printed) :])
        sys.stdout.write("\n")
        sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main(prog="scaling generate"))
