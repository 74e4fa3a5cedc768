"""``scaling train-tokenizer TEXT... --vocab-size N --output tokenizer.json``: a byte-level BPE of one's own.

Byte-level BPE (what GPT-2 and Llama 3 use) can encode any text, so training needs nothing but a corpus:
the 256 byte symbols start the vocabulary, the special tokens training needs (``<|endoftext|>`` to end a
document, ``<pad>`` for finetuning batches) come next, and ``tokenizers`` learns merges up to the requested
size. The result is an ordinary ``tokenizer.json``, used by ``prepare-data``, training and generation.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from scaling.transformer.data.tokenizer import Tokenizer, TokenizerError

__all__ = ["SPECIAL_TOKENS", "main", "min_vocab_size", "train_bpe_tokenizer"]

SPECIAL_TOKENS = ("<|endoftext|>", "<pad>")


def min_vocab_size() -> int:
    """The byte alphabet plus the special tokens: the smallest vocabulary a byte-level BPE can have."""
    return 256 + len(SPECIAL_TOKENS)


def train_bpe_tokenizer(
    files: Sequence[Path], vocab_size: int, output: Path, *, overwrite: bool = False, progress: bool = False
) -> Tokenizer:
    """Train on the text of ``files`` and save to ``output``; an existing ``output`` is kept unless ``overwrite``."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if output.exists() and not overwrite:
        raise TokenizerError(f"{output} already exists: refusing to overwrite it (give --overwrite)")
    if vocab_size < min_vocab_size():
        raise TokenizerError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {min_vocab_size()} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    for path in files:
        if not path.is_file():
            raise TokenizerError(f"input {path} does not exist")
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train([str(path) for path in files], trainer)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f"{output.name}.tmp")
    tokenizer.save(str(temporary))
    temporary.replace(output)  # never a half-written tokenizer under the final name
    return Tokenizer.from_file(output)


def main(argv: Sequence[str] | None = None, prog: str = "scaling train-tokenizer") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Train a byte-level BPE tokenizer on text files and save it as a tokenizer.json."
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="Text files to learn the merges from.")
    parser.add_argument("--vocab-size", required=True, type=int, help="Vocabulary size, special tokens included.")
    parser.add_argument("--output", required=True, type=Path, help="Where to write the tokenizer.json.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output file.")
    args = parser.parse_args(argv)
    try:
        tokenizer = train_bpe_tokenizer(
            args.inputs, args.vocab_size, args.output, overwrite=args.overwrite, progress=sys.stderr.isatty()
        )
    except TokenizerError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    print(f"{args.output}: byte-level BPE, {tokenizer.vocab_size} tokens (sha256 {tokenizer.fingerprint[:12]})")
    return 0
