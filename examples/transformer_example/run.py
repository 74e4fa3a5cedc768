"""``python -m examples.transformer_example.run [CONFIG] [-o key.path=value ...]``: the whole pipeline, no downloads.

CONFIG defaults to the bundled ``examples/transformer_example/config.yml``; another config (a longer run,
another output directory, another layout) runs the same steps with its own paths and sizes.

1. corpus: the Python standard library's ``.py`` sources on this machine (found via ``sysconfig``);
2. tokenizer: a byte-level BPE with the config's vocabulary size, trained on that corpus by ``tokenizers``;
3. data: the corpus tokenised into the memory-mapped format (``prepare_data``, what ``scaling prepare-data`` runs);
4. training: ``scaling train config.yml`` on the config's topology (2 processes by default);
5. generation: ``scaling generate`` continues a prompt with the checkpoint just written (KV cache, greedy).

Steps 1-3 are cached where the config's ``data`` section points (``examples/transformer_example/output``
for the bundled config); the loss at the start and the end is printed from the metrics file.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

from scaling.core.config import ConfigError
from scaling.transformer.config import TransformerConfig
from scaling.transformer.data.prepare import prepare_data
from scaling.transformer.data.tokenizer import Tokenizer
from scaling.transformer.data.train_tokenizer import train_bpe_tokenizer
from scaling.transformer.inference.cli import main as generate_main
from scaling.transformer.train import main as train_main

CONFIG = Path(__file__).with_name("config.yml")
MAX_CORPUS_BYTES = 6_000_000  # enough text for the default run, small enough to prepare in seconds
PROMPT = "def __init__(self"


def corpus_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or not path.is_file():
            continue
        files.append(path)
        total += path.stat().st_size
        if total > MAX_CORPUS_BYTES:
            break
    if not files:
        raise RuntimeError(f"no Python sources found under {stdlib}")
    return files


def train_tokenizer(files: list[Path], vocab_size: int, path: Path) -> Tokenizer:
    """What ``scaling train-tokenizer FILES --vocab-size N --output PATH`` does, cached in ``path``."""
    if path.is_file():
        return Tokenizer.from_file(path)
    return train_bpe_tokenizer(files, vocab_size, path)


def losses(log_dir: Path) -> list[float]:
    metrics = log_dir / "metrics.jsonl"
    if not metrics.is_file():
        return []
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r["loss"] for r in records if isinstance(r.get("loss"), float)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m examples.transformer_example.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "config", nargs="?", type=Path, default=CONFIG, help=f"Run config (default: the bundled {CONFIG.name})."
    )
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY.PATH=VALUE")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = TransformerConfig.from_yaml(args.config, args.override)
        if config.data.tokenizer is None or len(config.data.prefixes) != 1:
            raise ConfigError(
                f"{args.config}: the example trains its own tokenizer and prepares one dataset: "
                "set data.tokenizer (where to write tokenizer.json) and exactly one data.prefixes entry"
            )
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    assert config.data.tokenizer is not None
    files = corpus_files()
    tokenizer = train_tokenizer(files, config.architecture.vocab_size, config.data.tokenizer)
    prefix = config.data.prefixes[0]
    if not Path(f"{prefix}.json").is_file():
        summary = prepare_data(files, tokenizer, prefix)
        print(f"prepared {summary.documents} files, {summary.tokens} tokens in {summary.seconds:.1f} s -> {prefix}")
    log_dir = config.logger.log_dir
    before = len(losses(log_dir)) if log_dir is not None else 0
    code = train_main([str(args.config), *[a for o in args.override for a in ("-o", o)]])
    if code != 0:
        return code
    run = losses(log_dir)[before:] if log_dir is not None else []
    if log_dir is None:
        print("trained (set logger.log_dir to see the losses)")
    elif run:
        print(f"loss: {run[0]:.3f} at the start, {run[-1]:.3f} at the end ({len(run)} logged steps)")
    else:
        previous = losses(log_dir)
        summary = f" (loss {previous[0]:.3f} -> {previous[-1]:.3f})" if previous else ""
        steps = config.trainer.train_iterations
        print(f"already trained to step {steps}{summary}; delete {config.trainer.save_dir} to train again")
    if config.trainer.save_dir is None:
        return 0
    print(f"generating from {config.trainer.save_dir}:")
    return generate_main(
        [str(config.trainer.save_dir), "--prompt", PROMPT, "--max-new-tokens", "48", "--device", "cpu"]
    )


if __name__ == "__main__":
    raise SystemExit(main())
