"""``scaling prepare-data INPUT... --tokenizer TOKENIZER_JSON --output PREFIX``: text into the memory map.

Inputs are plain text files (one document per file) or JSONL files (one document per line, text in
``--field``, default ``text``). Documents are tokenised in batches by ``tokenizers`` (which runs in
parallel threads), an EOS token is appended to each, and the result is written with the memory-map
writer, which records the tokenizer (path, fingerprint, vocabulary size) in ``PREFIX.json`` so training can
check that the model and its tokenizer fit the data; a summary (documents, tokens, seconds) is printed at the
end. An existing dataset under PREFIX is never replaced unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from scaling.core.data import MemoryMapWriter
from scaling.transformer.data.tokenizer import Tokenizer, TokenizerError

__all__ = [
    "InputError",
    "PrepareSummary",
    "existing_dataset_files",
    "iter_documents",
    "main",
    "prepare_data",
    "refuse_overwrite",
]

_BATCH = 256


class InputError(ValueError):
    """An input file cannot be read as documents; the message names the file and line."""


@dataclass(frozen=True)
class PrepareSummary:
    documents: int
    tokens: int
    seconds: float


def iter_documents(path: Path, field: str) -> Iterator[str]:
    if not path.is_file():
        raise InputError(f"input {path} does not exist")
    if path.suffix not in (".jsonl", ".json"):
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: not valid JSON: {exc.msg}") from None
            if not isinstance(record, dict) or field not in record:
                raise InputError(f"{path}:{number}: no field {field!r} in this line")
            if not isinstance(record[field], str):
                raise InputError(f"{path}:{number}: field {field!r} is not a string")
            yield record[field]


def existing_dataset_files(prefix: Path) -> list[Path]:
    """The files of a dataset already under ``prefix`` (any of PREFIX.bin/.idx/.json)."""
    return [path for path in (Path(f"{prefix}{s}") for s in (".bin", ".idx", ".json")) if path.exists()]


def refuse_overwrite(prefix: Path, overwrite: bool) -> None:
    existing = existing_dataset_files(prefix)
    if existing and not overwrite:
        raise InputError(f"{existing[0]} already exists: refusing to overwrite the dataset {prefix} (give --overwrite)")


def prepare_data(
    inputs: Sequence[Path],
    tokenizer: Tokenizer,
    output: Path,
    *,
    field: str = "text",
    progress: bool = False,
    overwrite: bool = False,
) -> PrepareSummary:
    refuse_overwrite(output, overwrite)
    eos = tokenizer.require_eos()
    start = time.perf_counter()
    documents = tokens = 0
    bar = tqdm(desc="documents", unit="doc", disable=not progress)
    metadata = {"tokenizer": tokenizer.description()}
    with MemoryMapWriter(output, vocab_size=tokenizer.vocab_size, metadata=metadata) as writer:
        batch: list[str] = []

        def flush() -> None:
            nonlocal documents, tokens
            for ids in tokenizer.encode_batch(batch):
                writer.add([*ids, eos])
                documents += 1
                tokens += len(ids) + 1
            bar.update(len(batch))
            batch.clear()

        for path in inputs:
            for text in iter_documents(path, field):
                batch.append(text)
                if len(batch) == _BATCH:
                    flush()
        if batch:
            flush()
    bar.close()
    return PrepareSummary(documents, tokens, time.perf_counter() - start)


def main(argv: Sequence[str] | None = None, prog: str = "scaling prepare-data") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Tokenise text or JSONL files into a memory-mapped dataset."
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="Text files (one document each) or JSONL files.")
    parser.add_argument("--tokenizer", required=True, type=Path, help="A tokenizer.json (Hugging Face tokenizers).")
    parser.add_argument("--output", required=True, type=Path, help="Output prefix: PREFIX.bin/.idx/.json.")
    parser.add_argument("--field", default="text", help="JSONL field holding the text (default: text).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing dataset under PREFIX.")
    args = parser.parse_args(argv)
    try:
        refuse_overwrite(args.output, args.overwrite)  # before reading the tokenizer or any input
        tokenizer = Tokenizer.from_file(args.tokenizer)
        summary = prepare_data(
            args.inputs,
            tokenizer,
            args.output,
            field=args.field,
            progress=sys.stderr.isatty(),
            overwrite=args.overwrite,
        )
    except (InputError, TokenizerError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    print(
        f"{summary.documents} documents, {summary.tokens} tokens -> {args.output}.bin/.idx/.json "
        f"in {summary.seconds:.2f} s ({summary.tokens / max(summary.seconds, 1e-9):,.0f} tokens/s)"
    )
    return 0
