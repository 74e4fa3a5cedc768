"""Writing a conversion's output: never into a directory that holds something, never half a folder.

A converter writes into a hidden sibling ``.{name}.incomplete-{pid}`` and renames it to the requested name
only when everything is written, so a crash leaves no folder that looks finished, and an existing,
non-empty output directory is refused before any work starts.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from scaling.transformer.convert.errors import ConversionError

__all__ = ["SIDE_FILES", "refuse_non_empty", "staged_directory"]

# Files that travel with the weights in both directions (tokenizer and generation defaults).
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)


def refuse_non_empty(path: Path) -> None:
    """Raise ``ConversionError`` unless ``path`` is absent or an empty directory."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConversionError(f"output directory {path} is not empty; refusing to overwrite what is there")


@contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """Yield an empty staging directory that becomes ``out_dir`` when the block finishes without error."""
    refuse_non_empty(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.incomplete-{os.getpid()}"
    if staging.exists():  # left by a crashed conversion of this same pid number: never published
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
        refuse_non_empty(out_dir)  # something may have appeared meanwhile: still never overwrite it
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked just above); rename needs the name free on every platform
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
